"""Helpers for tests that run Flower: in-process simulation, ports, process cleanup."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import psutil
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from client.app import make_app
from client.secure_aggregation import secure_aggregation_mod
from server.app import run


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

    return make_app([record, secure_aggregation_mod])


def simulate(config, num_sites: int, record_to: Path, client_app: ClientApp | None = None) -> Path:
    """Run the federation in process with the recording site app (or ``client_app``);
    returns the run directory (an exception of the ServerApp propagates)."""
    out: list[Path] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        out.append(run(grid, config, context))

    run_simulation(
        server_app=server_app,
        client_app=client_app or recording_client_app(record_to),
        num_supernodes=num_sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return out[0]


REPO = Path(__file__).resolve().parents[1]


def child_environment(**variables: str) -> dict[str, str]:
    """This process's environment for the Flower processes a test starts, plus ``variables``.

    The folder of this interpreter comes first on ``PATH``: the SuperLink starts
    ``flower-superexec`` by name (and that starts ``flwr-serverapp``), so a test
    run with a virtual environment's python, not activated, would otherwise fail
    with "No such file or directory: 'flower-superexec'". The repository comes
    first on ``PYTHONPATH``, so that the children import this checkout's code.
    """
    path = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return os.environ | {"PATH": path, "PYTHONPATH": python_path, **variables}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_tree(pid: int, sig: int = signal.SIGTERM) -> list[int]:
    """Send ``sig`` to a process and all its descendants; kill what outlives 10 s."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    stopped = []
    for member in family:
        try:
            member.send_signal(sig)
            stopped.append(member.pid)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=10)
    for member in alive:
        member.kill()
    return stopped


def stop_processes_of(marker: str | Path) -> list[int]:
    """Stop every process whose command line contains ``marker`` (e.g. a FLWR_HOME)."""
    stopped = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if str(marker) in " ".join(process.info["cmdline"] or []):
            stopped += stop_process_tree(process.info["pid"])
    return stopped


def wait_for(condition, timeout: float, what: str, every: float = 1.0) -> None:
    """Poll ``condition()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
