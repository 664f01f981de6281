"""The installed package: its generic top-level names (common, client, server, cli) are its own.

The project keeps Flower's app layout, so its packages install as top-level
``common``, ``client`` and ``server``. This installs it (not editable) into a
fresh virtual environment and checks that each name resolves to the installed
copy, and that no other installed distribution ships a top-level module of
the same name, which would shadow it or be shadowed by it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ("common", "client", "server", "cli")

PROBE = """
import importlib, importlib.metadata, json, sys
found = {n: importlib.import_module(n).__file__ for n in NAMES}
others = {}
for dist in importlib.metadata.distributions():
    if dist.metadata["Name"] == "fedgraphrec":
        continue
    for file in dist.files or ():
        top = file.parts[0].removesuffix(".py")
        if top in NAMES and len(file.parts) <= 2:
            others.setdefault(top, set()).add(dist.metadata["Name"])
print(json.dumps({"found": found, "others": {k: sorted(v) for k, v in others.items()},
                  "site": [p for p in sys.path if p.endswith("site-packages")][0]}))
"""


def test_installed_top_level_packages_are_the_projects_own(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheels = tmp_path / "wheels"
    build = ["pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([sys.executable, "-m", *build, str(REPO)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("fedgraphrec-*.whl")
    # --ignore-installed: the developer's own (editable) install is visible from the venv
    install = [
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
    ]
    subprocess.run([*install, str(wheel)], check=True, cwd=tmp_path)
    probe = f"NAMES = {NAMES!r}\n" + PROBE
    # as a user's shell would start it: Ray, started by other tests in this process, puts
    # the working directory on PYTHONPATH
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path, env=clean
    )
    result = json.loads(out.stdout)
    for name, file in result["found"].items():
        assert file.startswith(result["site"]), f"{name} resolved to {file}, not the install"
    assert result["others"] == {}, f"other distributions ship {result['others']}"
