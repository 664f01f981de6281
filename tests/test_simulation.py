"""End to end: Flower's simulation engine in process, and the `flwr run` CLI.

The in-process run also records every message each site sends (a client mod
writes a summary of each reply to disk), and checks it against the release
inventory: only item-side arrays, no user-sized array, no counts with DP on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

import client.app as site_app
from common.config import default_config
from common.data import load_site
from common.model import build_model
from common.privacy import ITEM_SIDE, released_quantities
from server.app import run

REPO = Path(__file__).resolve().parents[1]


def recording_client_app(folder: Path) -> ClientApp:
    """The project's ClientApp with a mod that writes a summary of every reply."""

    def record(msg, context, call_next):
        reply = call_next(msg, context)
        content = reply.content
        summary = {
            "type": reply.metadata.message_type,
            "partition-id": context.node_config["partition-id"],
            "records": sorted(content.keys()),
            "arrays": {
                key: {"shape": list(array.shape), "dtype": array.dtype}
                for record in content.array_records.values()
                for key, array in record.items()
            },
            "metrics": {
                key: value
                for record in content.metric_records.values()
                for key, value in record.items()
            },
            "configs": sorted(content.config_records),
        }
        (folder / f"{uuid.uuid4().hex}.json").write_text(json.dumps(summary))
        return reply

    recording = ClientApp(mods=[record])
    recording.train()(site_app.train)
    recording.evaluate()(site_app.evaluate)
    return recording


def simulate(config, num_sites: int, record_to: Path) -> Path:
    out: list[Path] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        out.append(run(grid, config))

    run_simulation(
        server_app=server_app,
        client_app=recording_client_app(record_to),
        num_supernodes=num_sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return out[0]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("dp-run")
    (base / "messages").mkdir()
    config = default_config(
        num_server_rounds=3, min_sites=3, run_dir=str(base / "runs"), private_user_embedding=True
    )
    return config, simulate(config, 3, base / "messages"), base / "messages"


def test_three_sites_three_rounds_improve_on_round_zero(dp_run):
    config, run_dir, _ = dp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(metrics) == ["0", "1", "2", "3"]
    for server_round in ("1", "2", "3"):
        assert sorted(metrics[server_round]["train"]) == ["0", "1", "2"]
        assert metrics[server_round]["rejected"] == {} and metrics[server_round]["failed"] == []
    assert metrics["3"]["aggregated"]["val-rmse"] < metrics["0"]["aggregated"]["val-rmse"]

    privacy = json.loads((run_dir / "privacy.json").read_text())
    for site in ("0", "1", "2"):
        epsilon = privacy["sites"][site]["epsilon"]
        assert privacy["sites"][site]["rounds"] == [1, 2, 3]
        assert epsilon == sorted(epsilon) and epsilon[0] > 0
    assert json.loads((run_dir / "config.json").read_text()) == config.to_mapping()
    assert (run_dir / "model.pt").is_file()


def test_every_message_a_site_sends_is_item_side_or_declared(dp_run):
    config, _, messages = dp_run
    replies = [json.loads(p.read_text()) for p in messages.glob("*.json")]
    assert {r["type"] for r in replies} == {"train", "evaluate"}
    assert len([r for r in replies if r["type"] == "train"]) == 3 * 3

    site = load_site(config, 0, 3)
    item_side = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in build_model(site.catalogue, config).state_dict().items()
    }
    sizes = {load_site(config, s, 3).num_users for s in range(3)}
    declared = {(r.message, r.record, r.key): r for r in released_quantities(config)}
    for reply in replies:
        assert reply["configs"] == [], "no ConfigRecord may leave a site"
        if reply["type"] == "train":
            assert reply["records"] == ["arrays", "metrics"]
            assert reply["arrays"] == item_side, "only the item side, with its global shapes"
            assert (reply["type"], "arrays", ITEM_SIDE) in declared
        else:
            assert reply["records"] == ["metrics"]
        for key in reply["metrics"]:
            assert (reply["type"], "metrics", key) in declared, key
        # With DP on no exact count leaves a site.
        assert "num-examples" not in reply["metrics"]
        for shape in (a["shape"] for a in reply["arrays"].values()):
            assert not sizes & set(shape), "no array may have one row per user"


def test_epsilon_sent_is_a_function_of_public_configuration_only(dp_run):
    """Sites of different sizes report the same epsilon: it reveals nothing about them."""
    config, _, messages = dp_run
    sizes = [load_site(config, s, 3).num_users for s in range(3)]
    assert len(set(sizes)) > 1 or sizes[0] > 0
    replies = [json.loads(p.read_text()) for p in messages.glob("*.json")]
    epsilons = {}
    for reply in replies:
        if reply["type"] == "train":
            epsilons.setdefault(round(reply["metrics"]["epsilon"], 9), set()).add(
                reply["partition-id"]
            )
    assert len(epsilons) == 3  # one value per round, shared by all three sites
    assert all(sites == {0, 1, 2} for sites in epsilons.values())


def test_without_dp_counts_are_sent_and_declared_not_covered(tmp_path):
    (tmp_path / "messages").mkdir()
    config = default_config(
        dp=False, num_server_rounds=1, min_sites=2, run_dir=str(tmp_path / "runs"),
        synthetic_users=120, synthetic_items=60,
    )  # fmt: skip
    run_dir = simulate(config, 2, tmp_path / "messages")
    replies = [json.loads(p.read_text()) for p in (tmp_path / "messages").glob("*.json")]
    train = [r for r in replies if r["type"] == "train"]
    assert all("item-counts" in r["arrays"] and "num-examples" in r["metrics"] for r in train)
    not_covered = {r.key for r in released_quantities(config) if not r.covered}
    assert {"item-counts", "num-examples", "train-loss", ITEM_SIDE} <= not_covered
    releases = json.loads((run_dir / "releases.json").read_text())
    assert {r["key"] for r in releases if not r["covered"]} == not_covered


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_processes_of(flwr_home: Path) -> list[int]:
    """Stop every process whose command line names ``flwr_home``, and its children."""
    stopped = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if str(flwr_home) in " ".join(process.info["cmdline"] or []):
            family = [process, *process.children(recursive=True)]
            for member in family:
                try:
                    member.send_signal(signal.SIGTERM)
                    stopped.append(member.pid)
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(family, timeout=10)
            for member in alive:
                member.kill()
    return stopped


def test_flwr_run_cli_with_isolated_flwr_home(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    env = os.environ | {
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    runs = tmp_path / "runs"
    command = [
        str(Path(sys.executable).with_name("flwr")), "run", str(REPO), "--stream",
        "--federation-config", "num-supernodes=2",
        "--run-config", f'num-server-rounds=1 synthetic-users=150 run-dir="{runs}"',
    ]  # fmt: skip
    try:
        finished = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
    finally:
        stopped = stop_processes_of(flwr_home)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert stopped, "flwr run leaves a SuperLink running; the test must have stopped it"
    assert not any(
        str(flwr_home) in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
    )
    (run_dir,) = runs.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(metrics) == ["0", "1"]
    assert sorted(metrics["1"]["train"]) == ["0", "1"]
    assert np.isfinite(metrics["1"]["aggregated"]["val-rmse"])
