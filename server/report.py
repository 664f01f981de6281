"""The privacy-budget report of a run: what each site's users gave up, and the evidence.

Built from the run directory alone (``config.json``, ``ledger.json``,
``metrics.json``, ``releases.json`` and, after ``fedgraphrec audit``,
``audit.json``), so ``fedgraphrec report RUN_DIR`` can re-render it at any
time. Writes, atomically:

- ``privacy_report.json``: the machine-readable report (schema in the README);
- ``privacy_report.md``: the same for people;
- ``privacy_report.html``: self-contained (plots embedded as PNG): epsilon of
  every site over the rounds, utility over the rounds, and the privacy-utility
  path of this run ending at its final point.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.config import RunConfig
from common.files import replacing, write_json
from common.privacy import metric_names

SCHEMA = "fedgraphrec.privacy-report/1"
AGREEMENT_TOLERANCE = 0.02
"""Largest relative gap allowed between Opacus's epsilon and dp-accounting's."""

ASSUMPTIONS = (
    "The server and anyone watching the network are honest-but-curious: they see every "
    "message a site sends and nothing else of the site.",
    "Each site runs this code unmodified; its training data, user attributes and private "
    "state never leave it.",
    "Sampling rate, steps, clip norm and noise multiplier are public and do not depend on "
    'a site\'s data (with delta = "auto", delta reveals the order of magnitude of the '
    "site's user count).",
    "Noise and Poisson sampling come from PyTorch generators seeded with operating-system "
    "entropy; Opacus's secure_mode (a cryptographic generator that also resists "
    "floating-point attacks) is not available for current PyTorch.",
    "The guarantee is per site: a person who is a user at several sites is protected by "
    "the composition of those sites' guarantees, which no site can see.",
    "Item ids, item text and the rating scale are public.",
    "Hyper-parameters chosen by looking at private results spend budget that this report "
    "does not charge.",
)


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
    return {
        "schema": SCHEMA,
        "run": run_dir.name,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dp": config.dp,
        "privacy-unit": ledger["privacy-unit"],
        "neighbouring-relation": ledger["neighbouring-relation"],
        "mechanism": {
            "algorithm": _algorithm(config),
            "secure-aggregation": config.secure_aggregation,
            "secagg-min-sites": config.secagg_min_sites if config.secure_aggregation else None,
            "sample-rate": ledger["sample-rate"],
            "steps-per-round": ledger["steps-per-round"],
            "clip-norm": ledger["clip-norm"] if config.dp else None,
            "noise-multiplier": config.noise_multiplier if config.target_epsilon == 0 else None,
            "target-epsilon": config.target_epsilon or None,
            "max-epsilon": config.max_epsilon or None,
            "delta": config.delta,
            "accountant": f"opacus {config.accountant.upper()}",
            "independent-accountant": "dp-accounting "
            + ("PLD" if config.accountant == "prv" else "RDP"),
        },
        "sites": sites,
        "largest-epsilon": max(finite) if len(finite) == len(sites) and finite else None,
        "stopped-after-round": ledger["stopped-after-round"],
        "dropouts": _dropouts(rounds),
        "releases": _read(run_dir / "releases.json"),
        "utility": {
            "metrics": list(names),
            "by-round": {str(r): v for r, v in sorted(utility.items())},
            "final-round": final_round,
            "final": utility.get(final_round, {}),
        },
        "audit": _read(audit_path) if audit_path.exists() else None,
        "assumptions": list(ASSUMPTIONS),
    }


def _algorithm(config: RunConfig) -> str:
    if not config.dp:
        return "none (dp = false)"
    if not config.secure_aggregation:
        return (
            "DP-SGD (Opacus) at each site: Poisson sampling of users, per-user clipping, "
            "Gaussian noise on the sum"
        )
    return (
        "DP-SGD with distributed noise under SecAgg+: each round every site sends one "
        "step's clipped per-user gradient sum with noise of sigma*C/sqrt(T); the server "
        f"sees only the sum over at least T = {config.secagg_min_sites} sites. Headline "
        "epsilon: against an honest-but-curious server colluding with no site. "
        "Single-message epsilon: against a party that sees one site's message alone"
    )


def _dropouts(rounds: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per site (or node, if it never said which site it is): the rounds it failed in."""
    dropouts: dict[str, list[dict[str, Any]]] = {}
    for server_round, entry in sorted(rounds.items(), key=lambda kv: int(kv[0])):
        for sender, reason in entry["failed"].items():
            dropouts.setdefault(sender, []).append({"round": int(server_round), "reason": reason})
    return dropouts


def _site_summary(entries: list[dict[str, Any]], config: RunConfig) -> dict[str, Any]:
    trained = [e for e in entries if not e["declined"]]
    last = entries[-1] if entries else {}
    epsilon = last.get("epsilon")
    check = last.get("independent-epsilon")
    bounded = config.dp and epsilon is not None and math.isfinite(epsilon)
    return {
        "rounds-trained": [e["round"] for e in trained],
        "rounds-declined": [e["round"] for e in entries if e["declined"]],
        "delta": last.get("delta"),
        "noise-multiplier": last.get("noise-multiplier"),
        "epsilon": epsilon if bounded else None,
        "independent-epsilon": check if bounded else None,
        "relative-gap": abs(epsilon - check) / epsilon if bounded and epsilon > 0 else None,
        "single-message-epsilon": last.get("single-message-epsilon") if bounded else None,
        "guarantee": "(epsilon, delta)-DP" if bounded else "none: trained without noise",
        "epsilon-by-round": [
            {"round": e["round"], "epsilon": e.get("epsilon"), "declined": e["declined"]}
            for e in entries
        ],
    }


def write_report(run_dir: Path) -> dict[str, Any]:
    """Build the report and write its JSON, Markdown and HTML forms."""
    report = build_report(run_dir)
    write_json(run_dir / "privacy_report.json", report)
    _write_text(run_dir / "privacy_report.md", render_markdown(report))
    _write_text(run_dir / "privacy_report.html", render_html(report))
    return report


def summary(report: dict[str, Any]) -> str:
    """The table printed at the end of a run: utility per round, then each site's budget."""
    names = report["utility"]["metrics"]
    lines = ["round  " + "  ".join(f"{n:>14}" for n in names)]
    for server_round, values in report["utility"]["by-round"].items():
        cells = "  ".join(_number(values.get(n), 14) for n in names)
        lines.append(f"{server_round:>5}  {cells}")
    lines.append("")
    lines.append(_sites_table(report, plain=True))
    if report["stopped-after-round"] is not None:
        lines.append(
            f"stopped after round {report['stopped-after-round']}: "
            "no site could train within max-epsilon"
        )
    lines += [f"dropped out: {line}" for line in _dropout_lines(report)]
    return "\n".join(lines)


def _dropout_lines(report: dict[str, Any]) -> list[str]:
    return [
        f"{sender} in round(s) {_rounds([f['round'] for f in failures])}: {failures[-1]['reason']}"
        for sender, failures in report["dropouts"].items()
    ]


def _sites_table(report: dict[str, Any], plain: bool) -> str:
    secure = report["mechanism"]["secure-aggregation"]
    header = ["site", "epsilon (headline)" if secure else "epsilon", "check (dp-accounting)"]
    header += ["single-message epsilon"] if secure else []
    header += ["delta", "sigma", "trained", "declined"]
    rows = []
    for site, entry in sorted(report["sites"].items(), key=lambda kv: int(kv[0])):
        single = [_number(entry["single-message-epsilon"], 0).strip()] if secure else []
        rows.append(
            [
                site,
                "unbounded" if entry["epsilon"] is None else f"{entry['epsilon']:.3f}",
                "-"
                if entry["independent-epsilon"] is None
                else f"{entry['independent-epsilon']:.3f}",
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
    sigma = mechanism["noise-multiplier"] or (
        f"planned per site for target epsilon {mechanism['target-epsilon']}"
    )
    lines = [
        f"# Privacy report: {report['run']}",
        "",
        f"- Privacy unit: {report['privacy-unit']}",
        f"- Neighbouring relation: {report['neighbouring-relation']}",
        f"- Mechanism: {mechanism['algorithm']}",
        f"- Sampling rate {mechanism['sample-rate']:g}, {mechanism['steps-per-round']} steps per "
        f"round, clip norm {mechanism['clip-norm']}, noise multiplier {sigma}",
        f"- Accountant: {mechanism['accountant']}; "
        f"checked with {mechanism['independent-accountant']}",
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
        lines += [f"- {line}" for line in _dropout_lines(report)] + [""]
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


def _utility_table(report: dict[str, Any]) -> str:
    names = report["utility"]["metrics"]
    lines = ["| round | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for server_round, values in report["utility"]["by-round"].items():
        lines.append(
            f"| {server_round} | "
            + " | ".join(_number(values.get(n), 0).strip() for n in names)
            + " |"
        )
    return "\n".join(lines)


def _number(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.4f}"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: the Markdown content as HTML tables plus three plots."""
    plots = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, png in _plots(report)
    )
    body = _markdown_to_html(render_markdown(report))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Privacy report {html.escape(report['run'])}</title><style>"
        "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.3em .6em;text-align:left}th{background:#f3f3f3}"
        "figure{display:inline-block;margin:1em}img{width:30em}"
        "</style></head><body>" + body + "<h2>Plots</h2>" + plots + "</body></html>"
    )


def _markdown_to_html(markdown: str) -> str:
    """The subset of Markdown that :func:`render_markdown` writes, as HTML."""
    out, table, items = [], [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("- "):
            items.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                table.append([_inline(c.strip()) for c in line.strip("|").split("|")])
            continue
        if table:
            head, *rows = table
            out.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
            table = []
        if line.startswith("# "):
            out.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
    return "\n".join(out)


def _inline(text: str) -> str:
    text = html.escape(text)
    parts = text.split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


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
    if axes.get_lines():
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no epsilon: dp = false", ha="center", transform=axes.transAxes)
    plots.append(("Epsilon of every site after each round", _png(figure)))

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    rounds = sorted(r for r in by_round if metric in by_round[r])
    axes.plot(rounds, [by_round[r][metric] for r in rounds], marker="o")
    axes.set(xlabel="round", ylabel=metric, title=f"Utility: {metric}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    plots.append(
        (f"{metric} of the global model after each round (round 0: untrained)", _png(figure))
    )

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    largest = {}
    for entry in report["sites"].values():
        for e in entry["epsilon-by-round"]:
            if e["epsilon"] is not None and math.isfinite(e["epsilon"]):
                largest[e["round"]] = max(largest.get(e["round"], 0.0), e["epsilon"])
    path = [(largest[r], by_round[r][metric]) for r in rounds if r in largest]
    if path:
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


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
