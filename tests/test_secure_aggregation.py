"""Secure aggregation with distributed noise: what the server sees, the sum, dropouts.

In-process simulations of 4 sites with ``secagg-min-sites = 3``. A client mod
inside SecAgg+ records each site's plain vector before it is masked; the
server's grid is wrapped to record every masked vector it receives, and the
strategy's step to record the sum it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

import client.app as site_app
import server.secure_aggregation as secure
from client.secure_aggregation import secure_aggregation_mod
from common.config import default_config
from server.app import run

SITES, THRESHOLD = 4, 3


def client_app(plain: Path, fail: frozenset[tuple[int, int]]) -> ClientApp:
    """The site app, with a mod that fails given (round, site) pairs in the middle of
    SecAgg+ (when asked for the masked vector) and one that records plain vectors."""

    def failing(msg, context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = None if configs is None else configs.get(Key.STAGE)
        key = (int(msg.metadata.group_id or 0), int(context.node_config["partition-id"]))
        if stage == Stage.COLLECT_MASKED_VECTORS and key in fail:
            raise RuntimeError(f"site {key[1]} drops out in round {key[0]}")
        return call_next(msg, context)

    def recording(msg, context, call_next):
        reply = call_next(msg, context)
        if "fitres.parameters" in reply.content.array_records:
            arrays = [a.numpy() for a in reply.content.array_records["fitres.parameters"].values()]
            name = f"round{msg.metadata.group_id}-site{context.node_config['partition-id']}.npy"
            np.save(plain / name, np.concatenate([a.ravel() for a in arrays]))
        return reply

    app = ClientApp(mods=[failing, secure_aggregation_mod, recording])
    app.train()(site_app.train)
    app.evaluate()(site_app.evaluate)
    return app


class RecordingGrid:
    """The server's grid, keeping every masked vector that reaches the server."""

    def __init__(self, grid, masked: list[np.ndarray]) -> None:
        self.grid, self.masked = grid, masked

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        replies = self.grid.send_and_receive(messages, *args, **kwargs)
        for reply in replies:
            configs = (
                None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
            )
            if configs is not None and Key.MASKED_PARAMETERS in configs:
                vectors = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
                self.masked.append(np.concatenate([v.ravel() for v in vectors]))
        return replies


def simulate_secure(base: Path, rounds: int, fail=frozenset(), monkeypatch=None) -> dict:
    (base / "plain").mkdir(parents=True)
    config = default_config(
        secure_aggregation=True,
        secagg_min_sites=THRESHOLD,
        min_sites=SITES,
        sample_rate=0.5,
        num_server_rounds=rounds,
        synthetic_users=200,
        synthetic_items=60,
        delta=1e-5,
        run_dir=str(base / "runs"),
        site_state_dir=str(base / "sites"),
    )
    masked: list[np.ndarray] = []
    sums: dict[int, np.ndarray] = {}
    step = secure.SecureSumStrategy.aggregate_fit

    def recording_step(self, server_round, results, failures):
        averages = [
            np.concatenate([a.ravel() for a in parameters_to_ndarrays(r.parameters)])
            for _, r in results
        ]
        assert all(np.array_equal(a, averages[0]) for a in averages), "one sum, nothing else"
        sums[server_round] = averages[0] * len(results)
        return step(self, server_round, results, failures)

    monkeypatch.setattr(secure.SecureSumStrategy, "aggregate_fit", recording_step)
    out: list[Path] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        out.append(run(RecordingGrid(grid, masked), config, context))

    run_simulation(
        server_app=server_app,
        client_app=client_app(base / "plain", frozenset(fail)),
        num_supernodes=SITES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    plain = {
        (int(p.stem.split("-")[0][5:]), int(p.stem.split("-")[1][4:])): np.load(p)
        for p in (base / "plain").glob("*.npy")
    }
    return {"config": config, "run_dir": out[0], "masked": masked, "sums": sums, "plain": plain}


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield simulate_secure(tmp_path_factory.mktemp("secure"), 2, monkeypatch=monkeypatch)


def quantisation_bound(config, sites: int) -> float:
    """Stochastic rounding moves each site's value by less than one step."""
    return sites * 2 * config.secagg_clipping_range / config.secagg_quantization_range


def test_the_sum_matches_the_plain_sum_within_the_quantisation_bound(secure_run):
    config = secure_run["config"]
    for server_round in (1, 2):
        plain = sum(secure_run["plain"][(server_round, s)] for s in range(SITES))
        error = np.abs(secure_run["sums"][server_round] - plain).max()
        assert error <= quantisation_bound(config, SITES) + 1e-6
    # ... and that bound is negligible next to the DP noise each coordinate carries.
    assert quantisation_bound(config, SITES) < 1e-3 * config.noise_multiplier * config.clip_norm


def test_the_server_sees_masked_vectors_and_the_sum_only(secure_run):
    masked, plain = secure_run["masked"], secure_run["plain"]
    assert len(masked) == 2 * SITES
    config = secure_run["config"]
    step = config.secagg_quantization_range / (2 * config.secagg_clipping_range)
    for vector in masked:
        assert vector.min() >= 0 and vector.max() < 2**32  # uniform-looking residues
        for site_vector in plain.values():
            quantised = np.rint((site_vector + config.secagg_clipping_range) * step)
            n = min(len(quantised), len(vector) - 1)
            correlation = np.corrcoef(quantised[:n], vector[1 : n + 1].astype(float))[0, 1]
            assert abs(correlation) < 0.05


def test_ledger_and_report_carry_both_epsilons(secure_run):
    run_dir = secure_run["run_dir"]
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["secure-aggregation"] and ledger["steps-per-round"] == 1
    for entries in ledger["sites"].values():
        for entry in entries:
            assert entry["single-message-epsilon"] > 1.5 * entry["epsilon"] > 0
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert (
        report["mechanism"]["secure-aggregation"] and report["mechanism"]["secagg-min-sites"] == 3
    )
    assert "Headline epsilon" in report["mechanism"]["algorithm"]
    for site in report["sites"].values():
        assert site["single-message-epsilon"] > site["epsilon"]
    markdown = (run_dir / "privacy_report.md").read_text()
    assert "epsilon (headline)" in markdown and "single-message epsilon" in markdown
    releases = {r["key"]: r for r in report["releases"]}
    assert releases["<masked noised gradient sum>"]["covered"]
    assert "<item-side parameters>" not in releases


def test_dropouts_leave_the_round_complete_or_discarded(tmp_path, monkeypatch):
    result = simulate_secure(tmp_path, 2, fail={(1, 3), (2, 2), (2, 3)}, monkeypatch=monkeypatch)
    # Round 1: site 3 drops out mid-protocol; the 3 others still make a sum.
    plain = sum(result["plain"][(1, s)] for s in range(3))
    assert np.abs(result["sums"][1] - plain).max() <= quantisation_bound(result["config"], 3) + 1e-6
    # Round 2: two drop out, fewer than secagg-min-sites survive: nothing is released.
    assert 2 not in result["sums"]
    metrics = json.loads((result["run_dir"] / "metrics.json").read_text())
    assert metrics["2"]["discarded"] is True and metrics["1"]["discarded"] is False
    assert sorted(metrics["1"]["train"]) == ["0", "1", "2"]
    assert "site 3" in metrics["1"]["failed"]
