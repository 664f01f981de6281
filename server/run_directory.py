"""The run directory: everything a run leaves behind, rewritten after every round.

``<run-dir>/<UTC time>-<dataset>-<task>/`` holds

- ``status.json``: ``running`` (from before the data is loaded), then
  ``completed``, ``failed`` with the reason, or ``stopped-budget`` with the reason
  (no site could train within ``max-epsilon``), the dataset the run is on (in deployment the one the
  coordinator's catalogue folder was written from), and what of its
  catalogue was taken from the interactions (``derived-from-data``; only
  without DP);
- ``config.json``: the run configuration;
- ``traceback.txt``: where a run failed, the traceback behind its one-line reason;
- ``catalogue/``: the public catalogue the run used (``items.csv`` with the item
  text where the data has it, ``catalogue.json``), as in a site folder;
- ``releases.json``: every value a site sends, and whether DP covers it;
- ``metrics.json``: per round, each site's training and evaluation metrics,
  the aggregated evaluation metrics, rejected updates and failures;
- ``ledger.json``: per site, each release's ledger entry as the site reported
  it (its round, ``message``: ``train`` for statistics and DP-SGD, ``evaluate``
  for a metric release; epsilon after it, its independent recomputation,
  delta, noise multiplier, steps, or that the site declined), with the privacy
  unit and mechanism;
- ``item_graph.npz``: the released item graph (``common.graph.release.ItemGraph``;
  ``ItemGraph.from_bytes`` reads it), once its statistics rounds are complete;
- ``model.pt``: the latest global item-side parameters (``torch.load`` gives a
  state dict for :class:`common.model.EgoGraphRecommender`; not written with
  ``item-graph = "filter"``, which trains nothing); with
  ``keep_models`` also ``model-<round>.pt`` for every round (benchmarks choose
  a round by validation);
- ``best-model.pt``: the global model of the training round with the best
  validation metric so far (``val-rmse`` for ratings, ``val-ndcg@K`` for
  ranking), its round in ``status.json`` as ``best-round``: without DP, or under
  DP with ``evaluation = "dp"``, whose noisy metrics the guarantee covers (the
  choice is post-processing). With ``evaluation = "exact"`` under DP the
  metrics are not covered, so no round is chosen by them: use the last round's
  ``model.pt``.

- ``recommender.json``, once the run has completed: the saved recommender's
  manifest (:data:`RECOMMENDER_FORMAT`, version :data:`RECOMMENDER_VERSION`):
  the pipeline and task, and which of the files above a site scores with (the
  configuration, the catalogue, the item graph, and the model:
  ``best-model.pt`` where a round was chosen, else ``model.pt``, none with the
  filter alone). ``client.recommender.load_recommender`` reads it.

Files are replaced atomically (write, then rename), so a crash leaves the
previous round's complete files.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.data.dataset import Catalogue
from common.data.site_folder import write_catalogue_folder
from common.files import replacing, write_json
from common.privacy import (
    LEDGER_METRICS,
    NEIGHBOURING_RELATION,
    PRIVACY_UNIT,
    released_quantities,
)
from common.protocol import DECLINED
from server.round_book import RoundBook

RECOMMENDER_FORMAT = "fedgraphrec-recommender"
RECOMMENDER_VERSION = 1
"""The saved recommender's format and version (``recommender.json``): a reader refuses a
version newer than its own."""


class RunDirectory:
    """Writes one run's outputs (see the module docstring)."""

    def __init__(self, path: Path, config: RunConfig, keep_models: bool = False) -> None:
        self.path = path
        self.config = config
        self.keep_models = keep_models
        self.best_score = -float("inf")
        path.mkdir(parents=True, exist_ok=False)
        self.status = {"status": "running", "reason": None, "dataset": None}
        self.status |= {"derived-from-data": [], "started": _now(), "finished": None}
        write_json(path / "status.json", self.status)
        write_json(path / "config.json", config.to_mapping())
        write_json(path / "releases.json", [r.as_dict() for r in released_quantities(config)])

    def describe(self, dataset: str, catalogue: Catalogue) -> None:
        """Record the data the run is on, once loaded: its name, what of its catalogue
        was taken from the interactions, and the catalogue itself."""
        self.status |= {"dataset": dataset}
        self.status["derived-from-data"] = list(catalogue.derived_from_data)
        write_json(self.path / "status.json", self.status)
        write_catalogue_folder(catalogue, dataset, self.path / "catalogue")

    @classmethod
    def create(cls, config: RunConfig, dataset: str, keep_models: bool = False) -> RunDirectory:
        """A new folder ``<run-dir>/<UTC time>-<dataset>-<task>`` (suffixed if taken),
        made before the data is loaded, so that a run that fails on its data has one."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        root = Path(config.run_dir).expanduser()
        path = root / f"{stamp}-{dataset}-{config.task}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = root / f"{stamp}-{dataset}-{config.task}-{suffix}"
        return cls(path, config, keep_models)

    def write_item_graph(self, graph: bytes) -> None:
        """Persist the released item graph (the recommender itself with ``item-graph =
        "filter"``)."""
        with replacing(self.path / "item_graph.npz") as tmp:
            tmp.write_bytes(graph)

    def finish(
        self, failed: str | None = None, trace: str | None = None, stopped: str | None = None
    ) -> None:
        """Mark the run ``completed``, ``failed`` with the reason (a failure's ``trace``
        goes to ``traceback.txt``), or ``stopped-budget`` with the reason (no site could
        train within ``max-epsilon``), in ``status.json``."""
        if trace is not None:
            (self.path / "traceback.txt").write_text(trace)
        status = "failed" if failed else "stopped-budget" if stopped else "completed"
        self.status |= {"status": status, "reason": failed or stopped}
        self.status["finished"] = _now()
        if status == "completed":
            write_json(self.path / "recommender.json", self.recommender())
        write_json(self.path / "status.json", self.status)

    def recommender(self) -> dict[str, Any]:
        """The saved recommender's manifest (the module docstring)."""
        model = None
        if self.config.training_rounds:
            model = "best-model.pt" if "best-round" in self.status else "model.pt"
        return {
            "format": RECOMMENDER_FORMAT,
            "version": RECOMMENDER_VERSION,
            "task": self.config.task,
            "item-graph": self.config.item_graph,
            "config": "config.json",
            "catalogue": "catalogue",
            "graph": "item_graph.npz" if self.config.item_graph != "none" else None,
            "model": model,
            "round": self.status.get("best-round"),
        }

    def write_round(self, arrays: ArrayRecord, book: RoundBook) -> None:
        """Persist the global model and everything logged up to now."""
        rounds = {str(r): asdict(record) for r, record in sorted(book.rounds.items())}
        write_json(self.path / "metrics.json", rounds)
        write_json(self.path / "ledger.json", self.ledger(book))
        if not self.config.training_rounds:
            return  # the item graph's filter alone trains nothing: item_graph.npz is it
        with replacing(self.path / "model.pt") as tmp:
            torch.save(arrays.to_torch_state_dict(), tmp)
        if not book.rounds:
            return
        latest = max(book.rounds)
        if self.keep_models:
            shutil.copy(self.path / "model.pt", self.path / f"model-{latest}.pt")
        score = self.validation_score(latest, book)
        if score is not None and score > self.best_score:
            self.best_score = score
            shutil.copy(self.path / "model.pt", self.path / "best-model.pt")
            self.status["best-round"] = latest
            write_json(self.path / "status.json", self.status)

    def stop_if_no_gain(self, server_round: int, book: RoundBook) -> None:
        """Early stopping, without DP only: stop training after ``server_round`` when the
        best validation round is ``early-stopping-rounds`` rounds behind it (the run keeps
        the best round's ``best-model.pt``). Under DP the rounds are planned, and chosen
        on validation splits in the benchmarks."""
        config, best = self.config, self.status.get("best-round")
        patience = config.early_stopping_rounds
        if config.dp or not patience or best is None or server_round >= config.total_rounds:
            return
        if server_round - best >= patience:
            reason = (
                f"the validation metric has not improved for {server_round - best} rounds "
                f"since round {best} (early-stopping-rounds = {patience})"
            )
            book.stop_early(server_round, reason)
            self.status["stopped-early"] = reason
            write_json(self.path / "status.json", self.status)

    def validation_score(self, server_round: int, book: RoundBook) -> float | None:
        """A round's validation metric, higher is better (minus the RMSE for ratings): a
        training round's, or the item graph's last statistics round's (the learned model
        then is the released graph's score); None for other rounds, without validation
        metrics, or under DP unless the metrics were released under it (``evaluation =
        "dp"``)."""
        config = self.config
        uncovered = config.dp and config.evaluation != "dp"
        if uncovered or server_round < config.statistics_rounds:
            return None
        metric = "val-rmse" if config.task == "rating" else f"val-ndcg@{config.top_k}"
        value = book.round(server_round).aggregated.get(metric)
        if value is None:
            return None
        return -value if config.task == "rating" else value

    def ledger(self, book: RoundBook) -> dict[str, Any]:
        """The server's copy of every site's ledger entries for this run."""
        config = self.config
        sites: dict[str, list[dict[str, Any]]] = {}
        for server_round, record in sorted(book.rounds.items()):
            replies = [
                *(("train", False, site, m) for site, m in record.train.items()),
                *(("train", True, site, m) for site, m in record.declined.items()),
                *(
                    ("evaluate", m.get(DECLINED) == 1.0, site, m)
                    for site, m in record.evaluate.items()
                    if "epsilon" in m  # a metric release (evaluation = "dp")
                ),
            ]
            for message, declined, site_id, metrics in replies:
                entry = {"round": server_round, "message": message, "declined": declined}
                entry |= {k: metrics[k] for k in LEDGER_METRICS if k in metrics}
                sites.setdefault(str(site_id), []).append(entry)
        return {
            "dp": config.dp,
            "privacy-unit": PRIVACY_UNIT,
            "neighbouring-relation": NEIGHBOURING_RELATION,
            "accountant": config.accountant,
            "sample-rate": config.sampling_probability,
            "steps-per-round": config.steps_per_round,
            "secure-aggregation": config.secure_aggregation,
            "clip-norm": config.clip_norm,
            "stopped-after-round": None if book.stopped_early else book.stopped_after,
            "sites": {k: sorted(v, key=lambda e: e["round"]) for k, v in sites.items()},
        }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
