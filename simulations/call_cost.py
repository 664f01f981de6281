"""What one site's ClientApp calls cost in one process, without Flower around them.

The scale benchmark's data (6,000 synthetic users over ``--sites`` sites, the GCN
with DP on, the first seed that leaves no site empty): after one warm-up site,
every one of ``--calls`` sites opens round 1, trains, then opens the round again
and evaluates, as its ClientApp does for a train and an evaluate message. Prints
the mean milliseconds per site of each call and of both. ``--threads`` sets
torch's threads; ``--busy-core`` keeps one core busy with a spinning process
meanwhile, as Flower's simulation engine does at 1,000 sites (README, *Scale*).
To time an older code path, run it in a worktree of that commit with this file
and ``scale.py`` copied in.

    python -m simulations.call_cost [--sites 1000] [--calls 20] [--threads 2] [--busy-core]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from client.site_round import SiteRound
from common.config import default_config
from common.data import load_dataset
from common.model import build_model
from common.protocol import instruction_values
from simulations.scale import USERS, first_seed_without_empty_sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=20, help="sites timed after the warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--busy-core", action="store_true", help="spin one core meanwhile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp()
    config = default_config(
        item_graph="none",
        synthetic_users=USERS,
        min_sites=args.sites,
        site_state_dir=f"{scratch}/sites",
        run_dir=f"{scratch}/runs",
    )
    config = first_seed_without_empty_sites(config, args.sites)
    catalogue = load_dataset(config).catalogue
    state = build_model(catalogue, config).state_dict()
    values = instruction_values(config, "call-cost", catalogue.fingerprint(), server_round=1)

    def one_site(site: int) -> np.ndarray:
        """Seconds of the site's train and evaluate calls."""
        node = {"partition-id": site, "num-partitions": args.sites}
        seconds = []
        for handler in (SiteRound.train, SiteRound.evaluate):
            start = time.perf_counter()
            site_round = SiteRound.open(node, values)
            handler(site_round, site_round.model(state))
            seconds.append(time.perf_counter() - start)
        return np.array(seconds)

    one_site(0)
    spin = [sys.executable, "-c", "while True: pass"]
    spinner = subprocess.Popen(spin) if args.busy_core else None
    try:
        total = sum(one_site(site) for site in range(1, args.calls + 1))
    finally:
        if spinner is not None:
            spinner.kill()
    ms = dict(zip(("train", "evaluate"), total / args.calls * 1000, strict=True))
    print(
        f"{args.sites} sites, {args.threads} torch threads"
        f"{', one core busy' if args.busy_core else ''}: train {ms['train']:.0f} ms, "
        f"evaluate {ms['evaluate']:.0f} ms, both {sum(ms.values()):.0f} ms per site"
    )


if __name__ == "__main__":
    main()
