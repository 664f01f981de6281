"""The run configuration: every key of ``[tool.flwr.app.config]``, typed and checked.

The defaults live in one place, ``pyproject.toml``; Flower fuses them with
``flwr run . -c 'key=value'`` overrides into ``context.run_config``. The server
reads that once into :class:`RunConfig` and sends it to every site with each
message, so both sides use the same values. Field ``foo_bar`` is key
``foo-bar``.

TOML has no null, so two spellings stand for "none" there and become explicit
here: ``target-epsilon = 0`` and ``max-epsilon = 0`` (off) are ``None``, and
``delta = "auto"`` is resolved to the number it stands for
(:func:`auto_delta`), ``evaluation = "auto"`` to ``"dp"`` under DP and
``"exact"`` without, ``secagg-min-sites = 0`` to ``min-sites``,
``item-graph = "auto"`` to the pipeline that won on validation for the task
and privacy (:func:`auto_pipeline`), and ``num-server-rounds = 0`` to that
pipeline's own number of training rounds (:data:`TRAINING_ROUNDS`: none for the
filter alone).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InputError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@dataclass(frozen=True)
class RunConfig:
    """One field per configuration key; the README's table explains each."""

    num_server_rounds: int
    seed: int
    min_sites: int
    min_sites_to_continue: int
    site_timeout: float
    round_timeout: float
    dataset: str
    data_path: str
    test_path: str
    val_path: str
    catalogue_path: str
    item_text_path: str
    rating_scale: str
    download: bool
    on_duplicate: str
    implicit: bool
    split: str
    split_fraction_per: str
    val_fraction: float
    test_fraction: float
    cold_item_fraction: float
    partition: str
    partition_column: str
    dirichlet_alpha: float
    synthetic_users: int
    synthetic_items: int
    task: str
    embedding_dim: int
    degree_cap: int
    edge_dropout: float
    user_features: bool
    user_bias: bool
    user_bias_shrinkage: float
    private_user_embedding: bool
    item_text: bool
    text_model: str
    text_cache_dir: str
    local_epochs: int
    sample_rate: float
    learning_rate: float
    weight_decay: float
    dp: bool
    noise_multiplier: float
    target_epsilon: float | None
    max_epsilon: float | None
    clip_norm: float
    delta: float
    max_users_per_site: int
    accountant: str
    grad_sample_mode: str
    secure_aggregation: bool
    secagg_min_sites: int
    secagg_bits: int
    item_side_aggregation: str
    item_graph: str
    item_graph_items: int | str | None
    item_graph_exponent: float | str
    item_graph_rank: int | str
    item_graph_alpha: float | str
    item_graph_ease_weight: float | str
    item_graph_ease_ridge: float | str
    item_graph_sharpening: float | str
    item_graph_alpha_decay: float | str
    item_graph_text_weight: float | str
    item_graph_degree_bound: float
    item_graph_degree_share: float | None
    item_graph_budget_share: float | None
    item_graph_dense_items: int
    item_graph_top_per_row: int | str | None
    gcn_layers: int
    top_k: int
    evaluate_every: int
    early_stopping_rounds: int
    evaluation: str
    evaluation_noise_multiplier: float
    device: str
    run_dir: str
    site_state_dir: str
    initial_model: str

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys; unknown, missing or mistyped keys raise InputError."""
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            hints = [
                f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)
                for key in unknown
                for close in [difflib.get_close_matches(key, fields, n=1)]
            ]
            raise InputError(
                f"unknown configuration key(s) {', '.join(hints)}; every key is listed in "
                "[tool.flwr.app.config] of pyproject.toml and in the README"
            )
        missing = sorted(set(fields) - set(values))
        if missing:
            raise InputError(f"missing configuration key(s) {missing}")
        typed = {}
        for key, field in fields.items():
            value = values[key]
            if key in OFF_WHEN_ZERO and value == 0 and not isinstance(value, bool):
                typed[field.name] = None
            elif key == "delta" and value == "auto":
                typed[field.name] = AUTO_DELTA
            elif key == "num-server-rounds" and value == 0:
                typed[field.name] = TRAINING_ROUNDS.get(_pipeline(values), 0)
            elif key == "item-graph" and value == "auto":
                typed[field.name] = _pipeline(values)
            elif key in ("secagg-min-sites", "min-sites-to-continue") and value == 0:
                typed[field.name] = _typed("min-sites", values["min-sites"], "int")
            elif key == "evaluation" and value == "auto":
                typed[field.name] = "dp" if _typed("dp", values["dp"], "bool") else "exact"
            else:
                typed[field.name] = _typed(key, value, field.type.removesuffix(" | None"))
        if typed["delta"] is AUTO_DELTA:
            typed["delta"] = auto_delta(
                _typed("max-users-per-site", values["max-users-per-site"], "int")
            )
        config = cls(**typed)
        config.validate()
        return config

    def to_mapping(self) -> dict[str, Any]:
        """The configuration as ``[tool.flwr.app.config]`` keys (``None`` written as 0)."""
        return {
            k.replace("_", "-"): 0.0 if v is None else v
            for k, v in dataclasses.asdict(self).items()
        }

    def replace(self, **changes: Any) -> RunConfig:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    @property
    def steps_per_epoch(self) -> int:
        """Poisson-sampled steps in one local epoch: ``1 / sample-rate``."""
        return round(1.0 / self.sample_rate)

    @property
    def statistics_rounds(self) -> int:
        """Rounds of the item-graph phase, which come first (``common.graph.release``)."""
        return 0 if self.item_graph == "none" else 2

    @property
    def training_rounds(self) -> int:
        """DP-SGD rounds: ``num-server-rounds`` (none with the item graph's filter alone)."""
        return self.num_server_rounds

    @property
    def total_rounds(self) -> int:
        return self.statistics_rounds + self.training_rounds

    @property
    def first_statistics_share(self) -> float:
        """Round 1's share of the item graph's 1/z^2: ``item-graph-degree-share``, or the
        share validation chose for the task (0.1 ranking; 0.95 rating, where the item
        offsets of round 1 carry more than round 2's covariance)."""
        if self.item_graph_degree_share is not None:
            return self.item_graph_degree_share
        return 0.1 if self.task == "ranking" else 0.95

    @property
    def graph_budget_share(self) -> float:
        """With ``filter+gcn`` under a target epsilon, the item graph's share of it (the rest
        to DP-SGD): ``item-graph-budget-share``, or the share validation chose for the task
        (0.9 ranking; 0.97 rating, where the graph's item offsets gain more from the budget
        than DP-SGD does)."""
        if self.item_graph_budget_share is not None:
            return self.item_graph_budget_share
        return 0.9 if self.task == "ranking" else 0.97

    @property
    def aggregation(self) -> str:
        """How the server combines the trained item side: ``item-side-aggregation``, whose
        ``"auto"`` is the trimmed mean, or the mean under secure aggregation (only the sum)."""
        if self.item_side_aggregation != "auto":
            return self.item_side_aggregation
        return "mean" if self.secure_aggregation else "trimmed-mean"

    def is_statistics_round(self, server_round: int) -> bool:
        return 1 <= server_round <= self.statistics_rounds

    def evaluates_in(self, server_round: int) -> bool:
        """Whether round ``server_round`` ends with a federated evaluation: round 0, the
        item graph's two rounds (round 1 scores the baseline its release gives, round 2
        the graph), every ``evaluate-every``-th training round and the last round. Round
        0 is every site's check-in (it opens its data and says which site it is),
        whatever ``evaluation`` says; later rounds evaluate unless ``evaluation =
        "off"``."""
        if server_round == 0:
            return True
        if self.evaluation == "off":
            return False
        training_round = server_round - self.statistics_rounds
        if server_round == self.total_rounds or self.is_statistics_round(server_round):
            return True
        return training_round > 0 and training_round % self.evaluate_every == 0

    def releases_metrics_in(self, server_round: int) -> bool:
        """Whether a site's evaluation in round ``server_round`` sends metrics: every
        evaluation but any with ``evaluation = "off"``, and but round 0's when an item
        graph comes first (nothing to evaluate yet) or under ``"dp"`` (the model before
        any release is not worth a release of its own)."""
        if self.evaluation == "off":
            return False
        if server_round == 0 and (self.evaluation == "dp" or self.item_graph != "none"):
            return False
        return self.evaluates_in(server_round)

    @property
    def metric_release_rounds(self) -> list[int]:
        """The rounds whose evaluation sends metrics (:meth:`releases_metrics_in`)."""
        return [r for r in range(self.total_rounds + 1) if self.releases_metrics_in(r)]

    @property
    def steps_per_round(self) -> int:
        """DP-SGD steps a site takes per round: one under secure aggregation."""
        return 1 if self.secure_aggregation else self.local_epochs * self.steps_per_epoch

    @property
    def sampling_probability(self) -> float:
        """``sample-rate`` exactly ``1 / steps_per_epoch`` (the key is checked to be close)."""
        return 1.0 / self.steps_per_epoch

    def validate(self) -> None:
        """Check value ranges and choices; the message names the key."""
        choices = {
            "task": (self.task, ("rating", "ranking")),
            "accountant": (self.accountant, ("prv", "rdp")),
            "grad-sample-mode": (self.grad_sample_mode, ("auto", "hooks", "ghost")),
            "device": (self.device, ("auto", "cpu", "cuda")),
            "on-duplicate": (self.on_duplicate, ("error", "keep-latest")),
            "split-fraction-per": (self.split_fraction_per, ("user", "dataset")),
            "item-graph": (self.item_graph, ("none", "filter", "filter+gcn")),
            "evaluation": (self.evaluation, ("dp", "off", "exact")),
            "item-side-aggregation": (
                self.item_side_aggregation,
                ("auto", "mean", "median", "trimmed-mean"),
            ),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise InputError(f"{key}: expected one of {allowed}, got {value!r}")
        for key, value, least in (
            ("item-graph-items", self.item_graph_items, 1),
            ("item-graph-exponent", self.item_graph_exponent, 0),
            ("item-graph-rank", self.item_graph_rank, 1),
            ("item-graph-alpha", self.item_graph_alpha, 0),
            ("item-graph-ease-weight", self.item_graph_ease_weight, 0),
            ("item-graph-ease-ridge", self.item_graph_ease_ridge, 0),
            ("item-graph-sharpening", self.item_graph_sharpening, 0),
            ("item-graph-alpha-decay", self.item_graph_alpha_decay, 0),
            ("item-graph-text-weight", self.item_graph_text_weight, 0),
            ("item-graph-top-per-row", self.item_graph_top_per_row, 1),
        ):
            if isinstance(value, str) and value != "auto":
                raise InputError(f'{key}: expected "auto" or a number, got {value!r}')
            if isinstance(value, int | float) and value < least:
                raise InputError(f'{key}: expected "auto" or a number >= {least}, got {value}')
        if self.item_graph_ease_ridge == 0:
            raise InputError('item-graph-ease-ridge: expected "auto" or a positive number, got 0')
        if self.item_graph == "filter" and self.num_server_rounds:
            raise InputError(
                f'num-server-rounds: item-graph = "filter" trains nothing (its two statistics '
                f"rounds are all it runs), got {self.num_server_rounds}; to train for that "
                'many rounds on the released graph set item-graph = "filter+gcn", or leave '
                "num-server-rounds at 0"
            )
        if self.item_graph != "filter" and self.num_server_rounds <= 0:
            raise InputError(
                f"num-server-rounds: expected a positive number (0 in the configuration: the "
                f"pipeline's own), got {self.num_server_rounds}"
            )
        positive = {
            "min-sites": self.min_sites,
            "round-timeout": self.round_timeout,
            "site-timeout": self.site_timeout,
            "min-sites-to-continue": self.min_sites_to_continue,
            "secagg-min-sites": self.secagg_min_sites,
            "max-users-per-site": self.max_users_per_site,
            "embedding-dim": self.embedding_dim,
            "degree-cap": self.degree_cap,
            "local-epochs": self.local_epochs,
            "learning-rate": self.learning_rate,
            "clip-norm": self.clip_norm,
            "top-k": self.top_k,
            "evaluate-every": self.evaluate_every,
            "item-graph-degree-bound": self.item_graph_degree_bound,
            "item-graph-dense-items": self.item_graph_dense_items,
        }
        for key, value in positive.items():
            if value <= 0:
                raise InputError(f"{key}: expected a positive number, got {value}")
        if not 0 <= self.cold_item_fraction < 1:
            raise InputError(
                f"cold-item-fraction: expected a fraction in [0, 1), got {self.cold_item_fraction}"
            )
        if not 0 <= self.edge_dropout < 1:
            raise InputError(
                f"edge-dropout: expected a probability in [0, 1), got {self.edge_dropout}"
            )
        if self.gcn_layers < 0:
            raise InputError(f"gcn-layers: expected >= 0, got {self.gcn_layers}")
        if self.early_stopping_rounds < 0:
            raise InputError(
                f"early-stopping-rounds: expected >= 0 (0 turns it off), "
                f"got {self.early_stopping_rounds}"
            )
        if self.weight_decay < 0:
            raise InputError(f"weight-decay: expected >= 0, got {self.weight_decay}")
        if self.noise_multiplier < 0:
            raise InputError(f"noise-multiplier: expected >= 0, got {self.noise_multiplier}")
        if self.evaluation == "dp" and not self.dp:
            raise InputError(
                'evaluation: "dp" releases metrics with noise under dp = true; without DP use '
                '"exact" or "off"'
            )
        if self.evaluation == "dp" and self.evaluation_noise_multiplier <= 0:
            raise InputError(
                "evaluation-noise-multiplier: expected a positive number for evaluation = "
                f'"dp", got {self.evaluation_noise_multiplier}'
            )
        if not 0 < self.delta < 1:
            raise InputError(f'delta: expected "auto" or a number in (0, 1), got {self.delta!r}')
        for key, value in (
            ("target-epsilon", self.target_epsilon),
            ("max-epsilon", self.max_epsilon),
        ):
            if value is not None and value < 0:
                raise InputError(f"{key}: expected >= 0 (0 turns it off), got {value}")
        if not MIN_SECAGG_BITS <= self.secagg_bits <= MAX_SECAGG_BITS:
            raise InputError(
                f"secagg-bits: expected {MIN_SECAGG_BITS} to {MAX_SECAGG_BITS} (the secure sum "
                f"is computed modulo 2^bits), got {self.secagg_bits}"
            )
        if self.user_bias_shrinkage < 0:
            raise InputError(f"user-bias-shrinkage: expected >= 0, got {self.user_bias_shrinkage}")
        steps = 1.0 / self.sample_rate if 0 < self.sample_rate <= 1 else math.nan
        if not math.isclose(steps, round(steps), rel_tol=0, abs_tol=1e-6):
            raise InputError(
                f"sample-rate: expected 1/n for a whole number n of steps per local epoch "
                f"(e.g. 0.1, 0.05, 0.25), got {self.sample_rate}"
            )
        if self.test_path and self.split != "canonical":
            raise InputError(
                f'test-path: a test file of your own needs split = "canonical" (data-path '
                f"is then the training set), got split = {self.split!r}"
            )
        if self.val_path and not self.test_path:
            raise InputError("val-path: needs test-path too (a split of your own has a test file)")
        for key, value in (
            ("item-graph-degree-share", self.first_statistics_share),
            ("item-graph-budget-share", self.graph_budget_share),
        ):
            if not 0 < value < 1 + (key == "item-graph-budget-share"):
                raise InputError(f"{key}: expected a share in (0, 1], got {value}")
        if self.item_graph == "filter" and self.cold_item_fraction > 0:
            raise InputError(
                "cold-item-fraction: the item graph's filter scores items nobody touched by "
                "its text part alone, and under DP not at all (it covers the items of largest "
                'released degree); use item-graph = "none" or "filter+gcn" (the model with '
                "item text)"
            )
        if self.secure_aggregation and not self.dp:
            raise InputError("secure-aggregation: needs dp = true (it sums noised gradients)")
        if self.secure_aggregation and self.item_side_aggregation in ("median", "trimmed-mean"):
            raise InputError(
                "item-side-aggregation: secure aggregation gives the server only the sum, so "
                f'only "mean" is possible, got {self.item_side_aggregation!r}'
            )
        if self.min_sites_to_continue > self.min_sites:
            raise InputError(
                f"min-sites-to-continue: expected at most min-sites = {self.min_sites} (the "
                f"sites a run starts with), got {self.min_sites_to_continue}"
            )
        if self.secure_aggregation and self.secagg_min_sites < 2:
            raise InputError(
                f"secagg-min-sites: expected at least 2 sites per secure sum, "
                f"got {self.secagg_min_sites}"
            )
        if self.dp and self.noise_multiplier == 0 and self.target_epsilon is None:
            raise InputError(
                "noise-multiplier: dp = true needs a positive noise multiplier or a target-epsilon"
            )


TRAINING_ROUNDS = {"filter": 0, "filter+gcn": 5, "none": 5}
"""``num-server-rounds = 0``: each pipeline's own number of DP-SGD rounds."""
OFF_WHEN_ZERO = (
    "target-epsilon",
    "max-epsilon",
    "item-graph-items",
    "item-graph-top-per-row",
    "item-graph-degree-share",
    "item-graph-budget-share",
)
"""Keys that 0 turns off in TOML; ``None`` in :class:`RunConfig`."""
AUTO_DELTA = object()
MIN_SECAGG_BITS, MAX_SECAGG_BITS = 16, 30
"""SecAgg+ holds each site's integers as int32 and the sites' count times 2^bits in 2^32."""


def auto_pipeline(task: str, dp: bool) -> str:
    """``item-graph = "auto"``: the learned model on the item graph (``"filter+gcn"``),
    but for ranking under DP, where the filter alone validated better; for ratings under
    DP the two validate within their runs' spread, the learned model at or below the
    filter (``simulations/item_graph_benchmark.py --cases pipelines``, README
    *Results*)."""
    return "filter" if task == "ranking" and dp else "filter+gcn"


def _pipeline(values: Mapping[str, Any]) -> str:
    """The ``item-graph`` that ``values`` (kebab-case keys) ask for, ``"auto"`` resolved."""
    pipeline = _typed("item-graph", values["item-graph"], "str")
    if pipeline != "auto":
        return pipeline
    task = _typed("task", values["task"], "str")
    return auto_pipeline(task, _typed("dp", values["dp"], "bool"))


def auto_delta(max_users_per_site: int) -> float:
    """``delta = "auto"``: the largest power of ten at most ``1 / (10 n)`` for the public
    bound ``n`` on the users of any site, so that delta stays below one over the users."""
    return 10.0 ** math.floor(math.log10(1.0 / (10 * max(max_users_per_site, 1))))


def _typed(key: str, value: Any, annotation: str) -> Any:
    """``value`` as the annotated type (``"float"``, ``"float | str"`` ...); ints pass as floats."""
    for name in annotation.split(" | "):
        expected = {"int": int, "float": float, "bool": bool, "str": str}[name]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is expected:
            return value
    raise InputError(f"{key}: expected a {annotation.replace(' | ', ' or ')}, got {value!r}")


def app_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The defaults of ``[tool.flwr.app.config]`` (for tests and benchmark scripts)."""
    with open(pyproject, "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def default_config(**overrides: Any) -> RunConfig:
    """The app defaults with ``overrides`` (snake_case field names, values as in TOML)."""
    return RunConfig.from_mapping(
        app_defaults() | {k.replace("_", "-"): v for k, v in overrides.items()}
    )
