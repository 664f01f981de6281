"""The run directory: everything a run leaves behind, rewritten after every round.

``<run-dir>/<UTC time>-<dataset>-<task>/`` holds

- ``config.json``: the run configuration;
- ``releases.json``: every value a site sends, and whether DP covers it;
- ``metrics.json``: per round, each site's training and evaluation metrics,
  the aggregated evaluation metrics, rejected updates and failures;
- ``privacy.json``: per site, the epsilon spent after each round it trained in,
  with delta, accountant, privacy unit and mechanism parameters;
- ``model.pt``: the latest global item-side parameters (``torch.load`` gives a
  state dict for :class:`common.model.EgoGraphRecommender`).

Files are replaced atomically (write, then rename), so a crash leaves the
previous round's complete files.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.privacy import (
    NEIGHBOURING_RELATION,
    PRIVACY_UNIT,
    metric_names,
    released_quantities,
)
from server.strategy import ItemSideFedAvg


class RunDirectory:
    """Writes one run's outputs (see the module docstring)."""

    def __init__(self, path: Path, config: RunConfig) -> None:
        self.path = path
        self.config = config
        path.mkdir(parents=True, exist_ok=False)
        write_json(path / "config.json", config.to_mapping())
        write_json(path / "releases.json", [r.as_dict() for r in released_quantities(config)])

    @classmethod
    def create(cls, config: RunConfig) -> RunDirectory:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        root = Path(config.run_dir).expanduser()
        path = root / f"{stamp}-{config.dataset}-{config.task}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = root / f"{stamp}-{config.dataset}-{config.task}-{suffix}"
        return cls(path, config)

    def write_round(self, arrays: ArrayRecord, strategy: ItemSideFedAvg) -> None:
        """Persist the global model and everything logged up to now."""
        rounds = {str(r): asdict(record) for r, record in sorted(strategy.log.items())}
        write_json(self.path / "metrics.json", rounds)
        write_json(self.path / "privacy.json", self.privacy(strategy))
        tmp = self.path / "model.pt.tmp"
        torch.save(arrays.to_torch_state_dict(), tmp)
        os.replace(tmp, self.path / "model.pt")

    def privacy(self, strategy: ItemSideFedAvg) -> dict[str, Any]:
        config = self.config
        return {
            "dp": config.dp,
            "privacy-unit": PRIVACY_UNIT,
            "neighbouring-relation": NEIGHBOURING_RELATION,
            "accountant": config.accountant if config.dp else None,
            "delta": config.delta if config.dp else None,
            "noise-multiplier": config.noise_multiplier if config.dp else 0.0,
            "clip-norm": config.clip_norm if config.dp else None,
            "sample-rate": config.sample_rate,
            "steps-per-round": config.steps_per_epoch * config.local_epochs,
            "sites": privacy_by_site(strategy),
        }


def privacy_by_site(strategy: ItemSideFedAvg) -> dict[str, dict[str, list]]:
    """For each site: the rounds it trained in and its epsilon after each."""
    sites: dict[str, dict[str, list]] = {}
    for server_round, record in sorted(strategy.log.items()):
        for site_id, metrics in record.train.items():
            site = sites.setdefault(str(site_id), {"rounds": [], "epsilon": []})
            site["rounds"].append(server_round)
            site["epsilon"].append(metrics.get("epsilon"))
    return sites


def summary(strategy: ItemSideFedAvg, config: RunConfig) -> str:
    """A table of the aggregated metrics per round and each site's epsilon."""
    names = metric_names(config)
    lines = ["round  " + "  ".join(f"{n:>12}" for n in names) + "  sites"]
    for server_round, record in sorted(strategy.log.items()):
        values = [record.aggregated.get(n) for n in names]
        cells = "  ".join("           -" if v is None else f"{v:12.4f}" for v in values)
        lines.append(f"{server_round:>5}  {cells}  {len(record.train) or len(record.evaluate)}")
        for site, reason in record.rejected.items():
            lines.append(f"       rejected {site}: {reason}")
    if config.dp:
        lines.append(f"epsilon at delta={config.delta:g} ({config.accountant.upper()} accountant):")
        for site, entry in sorted(privacy_by_site(strategy).items()):
            lines.append(
                f"  site {site}: {entry['epsilon'][-1]:.3f} after rounds {entry['rounds']}"
            )
    else:
        lines.append("dp = false: no privacy guarantee")
    return "\n".join(lines)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)
