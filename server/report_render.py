"""The privacy report for people: the end-of-run summary, Markdown, and a self-contained page.

Renders the content that ``server.report.build_report`` assembles; the HTML
page is the Markdown converted by the ``markdown`` library, with the plots
(epsilon of every site over the rounds, utility over the rounds, the
privacy-utility path of the run) embedded as PNG.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import markdown
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from server.round_book import RoundLog

NAMED_SITES = 10
"""A round's log line and the epsilon plot's legend name sites one by one up to this
many; beyond, the line counts them and the plot shows the lines alone."""


def round_line(server_round: int, record: RoundLog) -> str:
    """One line for the log: who trained, declined, checked in (round 0) or failed, and the
    round's metrics."""
    parts = [f"Round {server_round}:"]
    checked_in = record.evaluate if server_round == 0 else {}
    for label, sites in (
        ("trained", record.train),
        ("declined", record.declined),
        ("checked in", checked_in),
    ):
        if len(sites) > NAMED_SITES:
            parts.append(f"{label} {len(sites):,} sites;")
        elif sites:
            parts.append(f"{label} {', '.join(f'site {s}' for s in sorted(sites))};")
    if record.failed:
        parts.append(f"failed {', '.join(sorted(record.failed))};")
    if record.discarded:
        parts.append("discarded;")
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(record.aggregated.items()))
    epsilons = [float(m["epsilon"]) for m in record.train.values() if "epsilon" in m]
    if epsilons:
        metrics += f"{', ' if metrics else ''}largest epsilon {max(epsilons):.3f}"
    if server_round == 0:
        metrics = f"untrained model: {metrics}" if metrics else "nothing scored before training"
    return " ".join([*parts, metrics or "no evaluation"])


def summary(report: dict[str, Any]) -> str:
    """The table printed at the end of a run: utility per round, then each site's budget."""
    names = report["utility"]["metrics"]
    lines = [f"WARNING: {warning}" for warning in report.get("warnings", [])]
    if report["mechanism"].get("evaluation") == "dp":
        lines.append(
            'Metrics from per-user sums with DP noise (evaluation = "dp"): over a few '
            "hundred users per site their noise can exceed the differences between rounds."
        )
    labels = report["utility"].get("round-labels", {})
    width = max([len(labels.get(r, "")) for r in report["utility"]["by-round"]] + [0])
    lines.append(f"round  {'':{width}}  " + "  ".join(f"{n:>14}" for n in names))
    for server_round, values in report["utility"]["by-round"].items():
        cells = "  ".join(_number(values.get(n), 14) for n in names)
        lines.append(f"{server_round:>5}  {labels.get(server_round, ''):{width}}  {cells}")
    lines.append(_baseline_line(report))
    if report.get("stopped-early"):
        lines.append(f"training stopped early: {report['stopped-early']}")
    lines.append("")
    lines.append(_sites_table(report, plain=True))
    if report["stopped-after-round"] is not None:
        lines.append(
            f"stopped after round {report['stopped-after-round']}: "
            "no site could train within max-epsilon"
        )
    lines += [f"dropped out: {line}" for line in _site_lines(report, "dropouts")]
    lines += [f"rejected: {line}" for line in _site_lines(report, "rejected")]
    earlier = {
        site: entry["earlier-epsilon"]
        for site, entry in sorted(report["sites"].items(), key=lambda kv: int(kv[0]))
        if entry.get("earlier-epsilon")
    }
    if earlier:
        spent = ", ".join(f"site {site} {value:.3f}" for site, value in earlier.items())
        limit = report["mechanism"]["max-epsilon"]
        lines.append(
            f"WARNING: earlier runs on this data had spent epsilon ({spent}); the totals above "
            f"include them, and max-epsilon = {limit if limit else 'none'} caps them"
        )
    return "\n".join(lines)


def _site_lines(report: dict[str, Any], kind: str) -> list[str]:
    """One line per site of the report's ``dropouts`` or ``rejected`` messages."""
    return [
        f"{sender} in round(s) {_rounds([f['round'] for f in events])}: {events[-1]['reason']}"
        for sender, events in report.get(kind, {}).items()
    ]


def _sites_table(report: dict[str, Any], plain: bool) -> str:
    secure = report["mechanism"]["secure-aggregation"]
    header = ["site", "epsilon (headline)" if secure else "epsilon"]
    header += ["this run", "earlier runs", "check (dp-accounting)"]
    header += ["single-message epsilon"] if secure else []
    header += ["delta", "sigma", "trained (this run)", "declined"]
    rows = []
    for site, entry in sorted(report["sites"].items(), key=lambda kv: int(kv[0])):
        single = [_number(entry["single-message-epsilon"], 0).strip()] if secure else []
        rows.append(
            [
                site,
                "unbounded" if entry["epsilon"] is None else f"{entry['epsilon']:.3f}",
                _epsilon(entry.get("run-epsilon")),
                _epsilon(entry.get("earlier-epsilon")),
                _epsilon(entry["independent-epsilon"]),
                *single,
                "-" if entry["delta"] is None else f"{entry['delta']:g}",
                "-" if not entry["noise-multiplier"] else f"{entry['noise-multiplier']:.3f}",
                _rounds(entry["rounds-trained"]),
                _rounds(entry["rounds-declined"]),
            ]
        )
    if plain:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        return "\n".join(
            "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))
            for r in [header, *rows]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _epsilon(value: float | None) -> str:
    """An epsilon for a table: ``-`` when unknown (no DP, or a ledger written before it)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _rounds(rounds: list[int]) -> str:
    """``-``, ``3``, ``1-5`` or ``[1, 3]``."""
    if not rounds:
        return "-"
    if len(rounds) == 1:
        return str(rounds[0])
    contiguous = rounds == list(range(rounds[0], rounds[-1] + 1))
    return f"{rounds[0]}-{rounds[-1]}" if contiguous else str(rounds)


def render_markdown(report: dict[str, Any]) -> str:
    mechanism = report["mechanism"]
    lines = [f"# Privacy report: {report['run']}", ""]
    lines += [f"**Warning.** {warning}\n" for warning in report.get("warnings", [])]
    lines += [
        f"- Privacy unit: {report['privacy-unit']}",
        f"- Neighbouring relation: {report['neighbouring-relation']}",
        f"- Mechanism: {mechanism['algorithm']}",
        f"- Item graph: {mechanism.get('item-graph', 'none')} "
        f"({mechanism.get('statistics-rounds', 0)} statistics rounds first)",
        _dp_sgd(mechanism, report["dp"]),
        f"- Accountant: {mechanism['accountant']}; "
        f"checked with {mechanism['independent-accountant']}",
        f"- Evaluation: {_evaluation(mechanism)}",
        f"- Budget limit per site (max-epsilon): {mechanism['max-epsilon'] or 'none'}",
        "",
        "## Budget spent per site",
        "",
        _sites_table(report, plain=False),
        "",
    ]
    if report["stopped-after-round"] is not None:
        lines += [
            f"The run stopped after round {report['stopped-after-round']}: no site could "
            "train within max-epsilon.",
            "",
        ]
    if report["dropouts"]:
        lines += ["## Sites that dropped out", ""]
        lines += [f"- {line}" for line in _site_lines(report, "dropouts")] + [""]
    if report.get("rejected"):
        lines += ["## Messages the server rejected (the round went on without them)", ""]
        lines += [f"- {line}" for line in _site_lines(report, "rejected")] + [""]
    lines += [
        "## What each site sent",
        "",
        "| message | record | key | covered | why |",
        "|---|---|---|---|---|",
    ]
    for r in report["releases"]:
        covered = "yes" if r["covered"] else "**no**"
        lines.append(f"| {r['message']} | {r['record']} | `{r['key']}` | {covered} | {r['why']} |")
    lines += ["", "## Utility", "", _utility_table(report), ""]
    audit = report["audit"]
    if audit is not None:
        lines += [
            "## Empirical audit",
            "",
            f"One-run canary audit (Steinke, Nasr and Jagielski, 2023) with {audit['canaries']} "
            f"canary users: {audit['correct']} of {audit['guesses']} membership guesses correct; "
            f"empirical epsilon lower bound {audit['epsilon-lower-bound']:.3f} at confidence "
            f"{1 - audit['p-value']:.2f} (accountant epsilon of the audited run: "
            f"{_number(audit.get('accountant-epsilon'), 0).strip()}).",
            "",
        ]
    lines += ["## Assumptions", ""] + [f"- {a}" for a in report["assumptions"]]
    return "\n".join(lines) + "\n"


def _dp_sgd(mechanism: dict[str, Any], dp: bool) -> str:
    """The DP-SGD line: its settings where it ran, else that it did not."""
    if not mechanism.get("training-rounds", 1):
        return "- DP-SGD: none (no training rounds: the item graph's filter alone)"
    if not dp:
        return "- DP-SGD: none (dp = false: plain SGD, no clipping, no noise)"
    sigma = mechanism["noise-multiplier"] or (
        f"planned per site for target epsilon {mechanism['target-epsilon']}"
    )
    return (
        f"- DP-SGD: sampling rate {mechanism['sample-rate']:g}, {mechanism['steps-per-round']} "
        f"steps per training round, clip norm {mechanism['clip-norm']}, noise multiplier {sigma}"
    )


def _evaluation(mechanism: dict[str, Any]) -> str:
    """How the metrics were released (``evaluation``)."""
    kind = mechanism.get("evaluation", "exact")
    if kind == "dp":
        return (
            "per-user metric sums with Gaussian noise (noise multiplier "
            f"{mechanism['evaluation-noise-multiplier']:g}), in each site's epsilon"
        )
    return "none sent" if kind == "off" else "exact metrics"


def _utility_table(report: dict[str, Any]) -> str:
    names = report["utility"]["metrics"]
    labels = report["utility"].get("round-labels", {})
    lines = ["| round | what | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for server_round, values in report["utility"]["by-round"].items():
        lines.append(
            f"| {server_round} | {labels.get(server_round, '')} | "
            + " | ".join(_number(values.get(n), 0).strip() for n in names)
            + " |"
        )
    lines += ["", _baseline_line(report)]
    if report.get("stopped-early"):
        lines += ["", f"Training stopped early: {report['stopped-early']}."]
    return "\n".join(lines)


def _baseline_line(report: dict[str, Any]) -> str:
    """Which baseline the table holds: scored in round 1 from the run's own release."""
    baseline = report["utility"].get("baseline")
    if baseline is None:
        return "baseline: none (item-graph = none releases no item statistics to build one from)"
    return (
        f"baseline (round 1): {baseline}, scored on the same split from round 1's released "
        f"{report['utility']['baseline-from']} (inside the run's epsilon)"
    )


def _number(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.4f}"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: the Markdown content as HTML plus the plots (embedded PNG):
    epsilon and utility over the rounds, and the privacy-utility path where it has two
    points or more."""
    plots = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, png in _plots(report)
    )
    body = markdown.markdown(render_markdown(report), extensions=["tables"])
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Privacy report {html.escape(report['run'])}</title><style>"
        "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.3em .6em;text-align:left}th{background:#f3f3f3}"
        "figure{display:inline-block;margin:1em}img{width:30em}"
        "</style></head><body>" + body + "<h2>Plots</h2>" + plots + "</body></html>"
    )


def _plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    metric = report["utility"]["metrics"][0]
    by_round = {int(r): v for r, v in report["utility"]["by-round"].items()}
    plots = []

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    styles = ("-", "--", ":", "-.")
    for i, (site, entry) in enumerate(sorted(report["sites"].items(), key=lambda kv: int(kv[0]))):
        points = [
            (e["round"], e["epsilon"])
            for e in entry["epsilon-by-round"]
            if e["epsilon"] is not None and math.isfinite(e["epsilon"])
        ]
        if points:
            axes.plot(*zip(*points, strict=True), styles[i % 4], marker="o", label=f"site {site}")
    axes.set(xlabel="round", ylabel="epsilon (cumulative)", title="Epsilon per site")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if 0 < len(axes.get_lines()) <= NAMED_SITES:
        axes.legend()
    elif not axes.get_lines():
        axes.text(0.5, 0.5, "no epsilon: dp = false", ha="center", transform=axes.transAxes)
    plots.append(("Epsilon of every site after each round", _png(figure)))

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    rounds = sorted(r for r in by_round if metric in by_round[r])
    axes.plot(rounds, [by_round[r][metric] for r in rounds], marker="o")
    axes.set(xlabel="round", ylabel=metric, title=f"Utility: {metric}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    plots.append(
        (f"{metric} after each round (round 1: the baseline, with an item graph)", _png(figure))
    )

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    largest = {}
    for entry in report["sites"].values():
        for e in entry["epsilon-by-round"]:
            if e["epsilon"] is not None and math.isfinite(e["epsilon"]):
                largest[e["round"]] = max(largest.get(e["round"], 0.0), e["epsilon"])
    path = [(largest[r], by_round[r][metric]) for r in rounds if r in largest]
    if len(path) < 2:  # one point (or none, without DP) is no path
        return plots
    axes.plot(*zip(*path, strict=True), marker=".", color="grey", label="after each round")
    axes.plot(*path[-1], marker="*", markersize=16, color="crimson", label="this run")
    axes.legend()
    axes.set(xlabel="largest epsilon of any site", ylabel=metric, title="Privacy-utility")
    plots.append(("Privacy-utility path of this run, ending at its final point", _png(figure)))
    return plots


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode()
