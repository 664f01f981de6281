"""What one site's ClientApp calls cost in one process, without Flower around them.

The scale benchmark's data (6,000 synthetic users over ``--sites`` sites, the GCN
with DP on, the first seed that leaves no site empty): after one warm-up site,
every one of ``--calls`` sites opens round 1, trains, then opens the round again
and evaluates, as its ClientApp does for a train and an evaluate message. Prints
the mean milliseconds per site (both calls). To time an older code path, run it
in a worktree of that commit with this file and ``scale.py`` copied in.

    python -m simulations.call_cost [--sites 1000] [--calls 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from client.site_round import SiteRound
from common.config import default_config
from common.data import load_dataset
from common.model import build_model
from common.protocol import CATALOGUE_FINGERPRINT, RUN_NAME, SERVER_ROUND
from simulations.scale import USERS, first_seed_without_empty_sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=20, help="sites timed after the warm-up")
    args = parser.parse_args()
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
    values = config.to_mapping() | {
        SERVER_ROUND: 1,
        RUN_NAME: "call-cost",
        CATALOGUE_FINGERPRINT: catalogue.fingerprint(),
    }

    def one_site(site: int) -> None:
        node = {"partition-id": site, "num-partitions": args.sites}
        for handler in (SiteRound.train, SiteRound.evaluate):
            site_round = SiteRound.open(node, values)
            handler(site_round, site_round.model(state))

    one_site(0)
    start = time.perf_counter()
    for site in range(1, args.calls + 1):
        one_site(site)
    milliseconds = (time.perf_counter() - start) / args.calls * 1000
    print(f"{args.sites} sites: {milliseconds:.0f} ms per site (train + evaluate)")


if __name__ == "__main__":
    main()
