"""Every configuration key and command-line option that a message names exists.

Messages tell the user what to set (``set on-duplicate = "keep-latest"``,
``--out: ... is not empty``). A hint that names a key that does not exist
(``on_duplicate=...``, ``delimiter=...``) sends the user to an error about an
unknown key. This reads every string in the data layer, the configuration and
the command line (docstrings aside) and checks each name used as
``key = value``, ``key: ...`` at the start of a message, or ``--option``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from common.config import app_defaults

REPO = Path(__file__).resolve().parents[1]
MODULES = [*sorted((REPO / "common" / "data").glob("*.py")), REPO / "common" / "config.py"]
CLI = REPO / "cli.py"

NAME = r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*"
ASSIGNED = re.compile(rf"(?<![\w.-])({NAME}) ?=(?!=) ?(?=[\"'\w{{]|$)")
LEADING = re.compile(rf"^({NAME}(?:[-_][a-z0-9]+)): ")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def strings(path: Path) -> list[str]:
    """The string constants of a module (parts of f-strings included), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def cli_options() -> set[str]:
    """The options that cli.py defines (first arguments of ``add_argument``)."""
    return {
        arg.value
        for node in ast.walk(ast.parse(CLI.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
    }


def named(text: str) -> tuple[set[str], set[str]]:
    """The configuration keys and the options that ``text`` names."""
    keys = set(ASSIGNED.findall(text)) | set(LEADING.findall(text))
    return keys, set(OPTION.findall(text))


@pytest.mark.parametrize("module", [*MODULES, CLI], ids=lambda p: str(p.relative_to(REPO)))
def test_every_key_and_option_a_message_names_exists(module):
    keys = set(app_defaults())
    options = cli_options() | {"--stream"}  # flwr run's, which `fedgraphrec run` passes on
    wrong = []
    for text in strings(module):
        named_keys, named_options = named(text)
        wrong += [(key, text) for key in named_keys - keys]
        wrong += [(option, text) for option in named_options - options]
    assert not wrong, f"names that are neither a configuration key nor an option: {wrong}"


def test_the_checker_finds_the_names_of_hints():
    assert named('set on-duplicate = "keep-latest" to keep') == ({"on-duplicate"}, set())
    assert named("on_duplicate='keep-latest' keeps the latest") == ({"on_duplicate"}, set())
    assert named("pass delimiter=',' or delimiter='\\t'") == ({"delimiter"}, set())
    assert named("data-path: dataset = ") == ({"data-path", "dataset"}, set())
    assert named("--out: is not empty; a == b") == (set(), {"--out"})
