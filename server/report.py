"""The privacy-budget report of a run: what each site's users gave up, and the evidence.

Built from the run directory alone (``config.json``, ``status.json``, ``ledger.json``,
``metrics.json``, ``releases.json`` and, after ``fedgraphrec audit``,
``audit.json``), so ``fedgraphrec report RUN_DIR`` can re-render it at any
time. Writes, atomically:

- ``privacy_report.json``: the machine-readable report (schema in the README);
- ``privacy_report.md`` and ``privacy_report.html``: the same for people
  (``server.report_render``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.files import replacing, write_json
from common.privacy import assumptions, metric_names
from server.report_render import render_html, render_markdown

SCHEMA = "fedgraphrec.privacy-report/1"
AGREEMENT_TOLERANCE = 0.02
"""Largest relative gap allowed between Opacus's epsilon and dp-accounting's."""


def build_report(run_dir: Path) -> dict[str, Any]:
    """The report's content (the ``privacy_report.json`` schema)."""
    config = RunConfig.from_mapping(_read(run_dir / "config.json"))
    ledger = _read(run_dir / "ledger.json")
    rounds = _read(run_dir / "metrics.json")
    audit_path = run_dir / "audit.json"
    names = metric_names(config)
    utility = {
        int(r): {k: v for k, v in entry["aggregated"].items() if k in names}
        for r, entry in rounds.items()
        if entry["aggregated"]
    }
    final_round = max(utility) if utility else None
    sites = {site: _site_summary(entries, config) for site, entries in ledger["sites"].items()}
    finite = [s["epsilon"] for s in sites.values() if s["epsilon"] is not None]
    releases = _read(run_dir / "releases.json")
    status = _read(run_dir / "status.json") if (run_dir / "status.json").exists() else {}
    derived = status.get("derived-from-data", [])
    return {
        "schema": SCHEMA,
        "run": run_dir.name,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "warnings": _warnings(config, releases, derived) + _regression(config, utility),
        "dp": config.dp,
        "privacy-unit": ledger["privacy-unit"],
        "neighbouring-relation": ledger["neighbouring-relation"],
        "mechanism": {
            "algorithm": _algorithm(config),
            "secure-aggregation": config.secure_aggregation,
            "secagg-min-sites": config.secagg_min_sites if config.secure_aggregation else None,
            "sample-rate": ledger["sample-rate"],
            "steps-per-round": ledger["steps-per-round"],
            "item-graph": config.item_graph,
            "statistics-rounds": config.statistics_rounds,
            "training-rounds": config.training_rounds,
            "clip-norm": ledger["clip-norm"] if config.dp else None,
            "noise-multiplier": config.noise_multiplier if config.target_epsilon is None else None,
            "target-epsilon": config.target_epsilon,
            "max-epsilon": config.max_epsilon,
            "delta": config.delta,
            "max-users-per-site": config.max_users_per_site,
            "evaluation": config.evaluation,
            "evaluation-noise-multiplier": (
                config.evaluation_noise_multiplier if config.evaluation == "dp" else None
            ),
            "accountant": _accountant(config),
            "independent-accountant": _independent_accountant(config),
        },
        "sites": sites,
        "largest-epsilon": max(finite) if len(finite) == len(sites) and finite else None,
        "stopped-after-round": ledger["stopped-after-round"],
        "stopped-early": status.get("stopped-early"),
        "dropouts": _by_site(rounds, "failed"),
        "rejected": _by_site(rounds, "rejected"),
        "releases": releases,
        "utility": {
            "metrics": list(names),
            "by-round": {str(r): v for r, v in sorted(utility.items())},
            "round-labels": {r: round_label(config, int(r)) for r in sorted(rounds, key=int)},
            "baseline": baseline_name(config),
            "baseline-from": BASELINES[config.task][1] if baseline_name(config) else None,
            "final-round": final_round,
            "final": utility.get(final_round, {}),
        },
        "audit": _read(audit_path) if audit_path.exists() else None,
        "assumptions": assumptions(config),
    }


def _warnings(config: RunConfig, releases: list[dict[str, Any]], derived: list[str]) -> list[str]:
    """What a reader must see first: under DP, anything sent outside the guarantee;
    without DP, a catalogue taken from the users' interactions."""
    if not config.dp:
        if not derived:
            return []
        return [
            f"The catalogue's {' and '.join(derived)} were taken from the interactions "
            "(allowed with dp = false): they are users' data, not public schema."
        ]
    uncovered = sorted({r["key"] for r in releases if not r["covered"]})
    if not uncovered:
        return []
    why = (
        ' (evaluation = "exact": exact validation and test metrics)'
        if config.evaluation == "exact"
        else ""
    )
    return [
        f"Released outside epsilon{why}: {', '.join(uncovered)}. The (epsilon, delta) "
        "below does not cover these values."
    ]


BASELINES = {
    "rating": ("user mean + item offset", "item offsets and global mean"),
    "ranking": ("MostPop", "item degrees"),
}
"""Each task's round-1 baseline: its name, and what of round 1's release it is scored from."""


def baseline_name(config: RunConfig) -> str | None:
    """The baseline a run scores in round 1 from its own round-1 release (within the run's
    epsilon), or None: ``item-graph = "none"`` releases no item statistics."""
    return BASELINES[config.task][0] if config.statistics_rounds else None


def round_label(config: RunConfig, server_round: int) -> str:
    """What a round's metrics are of."""
    if server_round == 0:
        return "untrained model" if config.releases_metrics_in(0) else "check-in (nothing scored)"
    if config.is_statistics_round(server_round):
        if server_round == 1:
            return f"baseline: {baseline_name(config)}"
        if config.item_graph == "filter":
            return "item graph (the filter)"
        return "item graph (the learned model before training)"
    return f"training round {server_round - config.statistics_rounds}"


def _regression(config: RunConfig, utility: dict[int, dict[str, float]]) -> list[str]:
    """A warning when the last evaluated round validates worse than the baseline (round 1)
    or than the first round after it (the model before training)."""
    metric = "val-rmse" if config.task == "rating" else f"val-ndcg@{config.top_k}"
    rounds = sorted(r for r, values in utility.items() if metric in values)
    if len(rounds) < 2:
        return []
    last = utility[rounds[-1]][metric]
    warnings = []
    for reference in rounds[:2] if rounds[0] == 1 else rounds[:1]:
        if reference == rounds[-1]:
            continue
        value = utility[reference][metric]
        if (last > value) if config.task == "rating" else (last < value):
            warnings.append(
                f"The last round's {metric} ({last:.4f}, round {rounds[-1]}) is worse than "
                f"round {reference}'s ({value:.4f}, {round_label(config, reference)})"
                + (" (or the metrics' noise moved them)" if config.evaluation == "dp" else "")
            )
    return warnings


def _algorithm(config: RunConfig) -> str:
    """The mechanism in words: the item graph's releases, then DP-SGD, per the config."""
    if not config.dp:
        return "none (dp = false)"
    parts = []
    if config.item_graph != "none":
        parts.append(
            "item graph: two releases of sums over each site's users, each user bounded "
            "(round 1: item degrees or item rating statistics; round 2: an item-item Gram "
            "matrix), with Gaussian noise on the sum; the filter is post-processing"
        )
    if config.training_rounds:
        parts.append(
            "DP-SGD (Opacus): Poisson sampling of users, per-user clipping, Gaussian noise on "
            "the sum"
        )
    if config.evaluation == "dp":
        parts.append(
            "evaluation: per-user metric sums, each user bounded, with Gaussian noise "
            f"(noise multiplier {config.evaluation_noise_multiplier:g}), one release per "
            "evaluation round"
        )
    where = (
        "at each site, each adding all of the noise"
        if not config.secure_aggregation
        else "through SecAgg+ with distributed discrete Gaussian noise: every site sends its "
        "vector as integers with its share sigma/sqrt(T) of the noise and the server sees "
        f"only the sum over at least T = {config.secagg_min_sites} sites. Headline epsilon: "
        "against an honest-but-curious server colluding with no site. Single-message "
        "epsilon: against a party that sees one site's message alone"
    )
    return "; then ".join(parts) + f"; {where}"


def _accountant(config: RunConfig) -> str:
    if config.secure_aggregation:
        return (
            "RDP: Kairouz-Liu-Steinke bound for the distributed discrete Gaussian with "
            "Zhu-Wang Poisson subsampling"
        )
    return f"opacus {config.accountant.upper()}"


def _independent_accountant(config: RunConfig) -> str:
    if config.secure_aggregation:
        return (
            "dp-accounting RDP of the continuous sampled Gaussian at the same noise: a "
            "reference the discrete bound can only exceed"
        )
    return "dp-accounting " + ("PLD" if config.accountant == "prv" else "RDP")


def _by_site(rounds: dict[str, Any], kind: str) -> dict[str, list[dict[str, Any]]]:
    """Per site (or node, if it never said which site it is): the rounds it ``failed`` in,
    or whose message the server ``rejected``, and why."""
    found: dict[str, list[dict[str, Any]]] = {}
    for server_round, entry in sorted(rounds.items(), key=lambda kv: int(kv[0])):
        for sender, reason in entry.get(kind, {}).items():
            found.setdefault(sender, []).append({"round": int(server_round), "reason": reason})
    return found


def _site_summary(entries: list[dict[str, Any]], config: RunConfig) -> dict[str, Any]:
    training = [e for e in entries if e.get("message", "train") == "train"]
    trained = [e for e in training if not e["declined"]]
    evaluations = [e for e in entries if e.get("message") == "evaluate"]
    last = entries[-1] if entries else {}
    epsilon = last.get("epsilon")
    check = last.get("independent-epsilon")
    bounded = config.dp and epsilon is not None and math.isfinite(epsilon)
    return {
        "rounds-trained": [e["round"] for e in trained],
        "rounds-declined": [e["round"] for e in training if e["declined"]],
        "metric-releases": [e["round"] for e in evaluations if not e["declined"]],
        "delta": last.get("delta"),
        "noise-multiplier": (training[-1] if training else last).get("noise-multiplier"),
        "epsilon": epsilon if bounded else None,
        "independent-epsilon": check if bounded else None,
        "relative-gap": abs(epsilon - check) / epsilon if bounded and epsilon > 0 else None,
        "single-message-epsilon": last.get("single-message-epsilon") if bounded else None,
        "run-epsilon": _finite(last.get("run-epsilon")) if bounded else None,
        "earlier-epsilon": _finite(last.get("earlier-epsilon")) if bounded else None,
        "guarantee": "(epsilon, delta)-DP" if bounded else "none: trained without noise",
        "epsilon-by-round": [
            {
                "round": e["round"],
                "message": e.get("message", "train"),
                "epsilon": e.get("epsilon"),
                "declined": e["declined"],
            }
            for e in entries
        ],
    }


def _finite(value: float | None) -> float | None:
    """``value``, or None when it is unknown (an entry written before it was recorded)."""
    return value if value is not None and math.isfinite(value) else None


def write_report(run_dir: Path) -> dict[str, Any]:
    """Build the report and write its JSON, Markdown and HTML forms."""
    report = build_report(run_dir)
    write_json(run_dir / "privacy_report.json", report)
    _write_text(run_dir / "privacy_report.md", render_markdown(report))
    _write_text(run_dir / "privacy_report.html", render_html(report))
    return report


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
