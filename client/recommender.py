r"""A run's saved recommender, as a site serves it to its own users.

What the federation released is all a site needs to score one of its users:
the run's configuration, the public catalogue, the released item graph and the
trained item side (``server.run_directory`` writes them, and
``recommender.json`` says which). The user side never left the site, so a site
scores a user from that user's own interactions, exactly as it did in the run
(``common.graph.features`` for the graph, ``common.model`` for the learned
correction), and nobody else's. A person who is not in the site's data is
scored the same way from the interactions given (fold-in: no training).

- Ranking: the items of highest score.
- Rating: the items of highest predicted rating, less one standard error of
  the item's released offset (a lower confidence bound): with :math:`c_i` the
  item's released count of ratings and :math:`\sigma` the public standard
  deviation of the noise on the released sums, on the reference scale

  .. math:: \hat r_{ui} - \sqrt{(1 + \sigma^2 / c_i) / c_i}, \qquad c_i \ge 1,

  one star of spread per rating plus the noise. The item offsets are already
  shrunk toward their prior (``common.graph.release``), but the largest of 1,682
  noisy offsets is mostly noise: without the bound an item with one or two
  lucky ratings (or lucky DP noise) tops every list. Predictions shown and
  returned by :meth:`Recommender.predict` are the predicted ratings themselves,
  limited to the public scale.

Items the released graph does not cover, and (with ``exclude_seen``) the
items the user already has, are not recommended. With ``item-graph =
"filter+gcn"`` and item text, items nobody touched are scored through their
text; for ranking the filter alone scores them by its text part only without DP,
where it covers every item (under DP it covers the items of largest released degree),
and for ratings through their offsets' prior and text neighbourhood at any privacy
(under DP too low: the README's *The item graph*, items nobody rated).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from client.train import site_graphs, site_model
from common.config import RunConfig, app_defaults
from common.data import load_site
from common.data.dataset import Catalogue, Interactions
from common.data.keys import stable_key
from common.data.site import SiteData
from common.data.site_folder import load_catalogue_folder, load_site_folder
from common.errors import InputError
from common.graph.features import GraphFeatures
from common.graph.release import ItemGraph, rating_settings
from common.text import item_text_vectors
from server.run_directory import RECOMMENDER_FORMAT, RECOMMENDER_VERSION

UserRows = Sequence[str | tuple[str, float]]
"""One user's interactions: item ids (implicit feedback) or ``(item id, rating)`` pairs."""
FOLD_IN = "fedgraphrec/fold-in"
"""The key of a person scored from given interactions (seeds their ego-graph subsample)."""


@dataclass(frozen=True)
class Recommendation:
    """One recommended item: its id, its text where the catalogue has one, and its score
    (the predicted rating on the public scale for ratings)."""

    item: str
    text: str | None
    score: float


def ranked(recommendations: list[Recommendation]) -> list[dict]:
    """``recommendations`` as JSON-ready rows: rank (from 1), item, text, score."""
    return [
        {"rank": rank, "item": r.item, "text": r.text, "score": r.score}
        for rank, r in enumerate(recommendations, 1)
    ]


class Recommender:
    """The recommender a run saved (:func:`load_recommender`).

    Attributes:
        config: the run's configuration.
        catalogue: the public catalogue.
        graph: the released item graph (``None`` with ``item-graph = "none"``).
        model: the trained model, in evaluation mode (``None`` with the filter alone).
    """

    def __init__(
        self,
        config: RunConfig,
        catalogue: Catalogue,
        graph: ItemGraph | None,
        state: dict[str, torch.Tensor] | None,
    ) -> None:
        self.config = config
        self.catalogue = catalogue
        self.graph = graph
        self.item_index = {item: i for i, item in enumerate(catalogue.item_ids)}
        self.model = None
        if state is not None:
            self.model = site_model(catalogue, config, graph=graph).eval()
            self.model.load_state_dict(state)
            with torch.no_grad():
                self.vectors = self.model.catalogue_vectors()

    def recommend(
        self, user: UserRows | SiteData, k: int = 10, exclude_seen: bool = True
    ) -> list[Recommendation]:
        """The top ``k`` items for ``user``: their interactions (fold-in), or one user of a
        site as :meth:`SiteUsers.user` gives them (scored as in the run)."""
        if k <= 0:
            raise InputError(f"k: expected a positive number of items, got {k}")
        person = self.person(user)
        scores = self._scores(person)
        ranking = scores - self.offset_standard_error
        if exclude_seen:
            ranking[person.train.item] = -np.inf
        return self._top(ranking, k, scores)

    def predict(self, user: UserRows | SiteData, items: Sequence[str]) -> np.ndarray:
        """Scores of ``items`` for ``user`` (as in :meth:`recommend`): predicted ratings on
        the public scale for ratings; minus infinity for an item the graph does not cover."""
        scores = self._scores(self.person(user))[self.indices(items)]
        return self.catalogue.limited(scores) if self.rating else scores

    def similar(self, item: str, k: int = 10) -> list[Recommendation]:
        """The ``k`` items most similar to ``item`` in the released item graph (its filter's
        linear part for ranking, the residuals' similarity for ratings)."""
        if k <= 0:
            raise InputError(f"k: expected a positive number of items, got {k}")
        if self.graph is None:
            raise InputError('item-graph = "none": the run released no item graph')
        (index,) = self.indices([item])
        row = self._similarity.getrow(index)
        scores = np.full(self.catalogue.num_items, -np.inf)
        scores[row.indices] = row.data
        scores[index] = -np.inf
        return self._top(scores, k)

    def person(self, user: UserRows | SiteData) -> SiteData:
        """``user`` as a site of one user: a site's user as given, or a person folded in
        from their interactions (no user features; their own key for the subsample)."""
        if isinstance(user, SiteData):
            return user
        empty = Interactions.empty()
        features = np.zeros((1, len(self.catalogue.user_feature_names)), np.float32)
        keys = np.array([stable_key(FOLD_IN)])
        rows = self.rows(user)
        return SiteData(
            0, self.catalogue, keys, features, rows, empty, empty, empty, np.zeros(0, np.int64)
        )

    @property
    def rating(self) -> bool:
        return self.config.task == "rating"

    def indices(self, items: Sequence[str]) -> np.ndarray:
        """Catalogue indices of item ids (an unknown id raises :class:`InputError`)."""
        missing = [str(i) for i in items if str(i) not in self.item_index]
        if missing:
            raise NotFound(
                f"item {missing[0]!r}: not in the run's catalogue "
                f"({self.catalogue.num_items} items){' and others' if len(missing) > 1 else ''}"
            )
        return np.array([self.item_index[str(i)] for i in items], dtype=np.int64)

    def rows(self, user_rows: UserRows) -> Interactions:
        """One user's interactions (user index 0), checked against the catalogue and scale."""
        if len(user_rows) == 0:
            raise InputError("the user has no interactions: nothing to recommend from")
        bare = [r for r in user_rows if isinstance(r, str)]
        if bare and not self.catalogue.implicit:
            low, high = self.catalogue.rating_levels[0], self.catalogue.rating_levels[-1]
            raise InputError(
                f"item {bare[0]!r}: a rating is needed (the scale is {low:g}..{high:g})"
            )
        pairs = [(r, 1.0) if isinstance(r, str) else (str(r[0]), float(r[1])) for r in user_rows]
        items = self.indices([item for item, _ in pairs])
        if len(np.unique(items)) < len(items):
            raise InputError("an item appears twice in the user's interactions")
        ratings = np.array([rating for _, rating in pairs], dtype=np.float32)
        if self.catalogue.implicit:
            ratings[:] = self.catalogue.rating_levels[0]
        else:
            low, high = self.catalogue.rating_levels[0], self.catalogue.rating_levels[-1]
            outside = ratings[(ratings < low) | (ratings > high) | ~np.isfinite(ratings)]
            if len(outside):
                raise InputError(f"rating {outside[0]}: outside the public scale {low:g}..{high:g}")
        return Interactions(np.zeros(len(items), np.int64), items, ratings)

    @torch.no_grad()
    def _scores(self, site: SiteData) -> np.ndarray:
        """``[num_items]`` scores of a site's one user (ratings on the public scale, not
        limited)."""
        settings = rating_settings(self.config)
        n, everyone = self.catalogue.num_items, np.arange(self.catalogue.num_items)
        if self.model is None:
            text = item_text_vectors(self.catalogue, self.config)
            features = GraphFeatures(self.graph, site, settings, text)
            if not self.rating:
                return features.scores(np.zeros(1, np.int64))[0]
            return features.predict(Interactions(np.zeros(n, np.int64), everyone, np.ones(n)))
        graphs = site_graphs(site, self.config, self.graph)
        context = graphs.context(np.zeros(1, np.int64))
        z, user_bias = self.model.user_vectors(context, self.vectors)
        phi = None
        if graphs.features is not None:
            phi = torch.as_tensor(
                graphs.features.of_pairs(np.zeros(n, np.int64), everyone)[None]
                if self.rating
                else graphs.features.of_catalogue(np.zeros(1, np.int64)),
                dtype=torch.float32,
            )
        scores = (self.model.score_catalogue(z, phi, self.vectors) + user_bias[:, None])[0]
        scores = scores.numpy().astype(np.float64)
        return self.catalogue.from_reference_scale(scores) if self.rating else scores

    @cached_property
    def _similarity(self) -> sp.csr_matrix:
        """The released graph's item-item weights (``ItemGraph.propagation_matrix``)."""
        return self.graph.propagation_matrix(self.catalogue.num_items)

    @cached_property
    def offset_standard_error(self) -> np.ndarray:
        """``[num_items]`` the standard error of each item's released offset, on the public
        scale (the module docstring; zero for ranking and without an item graph)."""
        if not self.rating or self.graph is None or self.graph.degrees is None:
            return np.zeros(self.catalogue.num_items)
        counts = np.maximum(self.graph.degrees, 1.0)
        error = np.sqrt((1.0 + self.graph.degree_noise**2 / counts) / counts)
        return error * self.catalogue.reference_unit

    def _top(
        self, ranking: np.ndarray, k: int, scores: np.ndarray | None = None
    ) -> list[Recommendation]:
        """The (at most) ``k`` items of highest finite ``ranking``, best first (ties:
        catalogue order), with their ``scores`` (default: the ranking; ratings limited to
        the public scale)."""
        candidates = np.flatnonzero(np.isfinite(ranking))
        if len(candidates) > k:
            candidates = candidates[np.argpartition(-ranking[candidates], k - 1)[:k]]
        best = candidates[np.lexsort((candidates, -ranking[candidates]))]
        values = (ranking if scores is None else scores)[best]
        if self.rating and scores is not None:
            values = self.catalogue.limited(values)
        text = self.catalogue.item_text
        return [
            Recommendation(self.catalogue.item_ids[i], None if text is None else text[i], float(v))
            for i, v in zip(best, values, strict=True)
        ]


class NotFound(InputError):
    """An item or user that the catalogue or the site does not have."""


class SiteUsers:
    """A site's users, as the site serves them: every interaction the site holds of each
    (training and held-out alike), their attributes, and the key of their original id."""

    def __init__(self, site: SiteData) -> None:
        self.site = site
        parts = (site.train, site.val, site.test, site.cold)
        self.history = Interactions.concat(list(parts))
        self.index = {int(key): i for i, key in enumerate(site.user_keys)}

    def user(self, user_id: str) -> SiteData:
        """The site of the one user ``user_id`` (the id as the data has it)."""
        index = self.index.get(stable_key(str(user_id)))
        if index is None:
            raise NotFound(
                f"user {user_id!r}: not a user of this site ({self.site.num_users} users)"
            )
        rows = self.history.select(self.history.user == index)
        if len(rows) == 0:
            raise InputError(f"user {user_id!r} has no interactions: nothing to recommend from")
        empty = Interactions.empty()
        return SiteData(
            self.site.site_id,
            self.site.catalogue,
            self.site.user_keys[[index]],
            self.site.user_features[[index]],
            Interactions(np.zeros(len(rows), np.int64), rows.item, rows.rating, rows.timestamp),
            empty,
            empty,
            empty,
            np.zeros(0, np.int64),
        )


def site_users(recommender: Recommender, site_folder: str | Path | None = None) -> SiteUsers:
    """The users a site serves: those of its data folder (deployment), or without one
    those of the data the run's configuration names (a simulation: every user)."""
    if site_folder is not None:
        site = load_site_folder(site_folder)
    else:
        site = load_site(recommender.config, 0, 1)
    if site.catalogue.fingerprint() != recommender.catalogue.fingerprint():
        where = site_folder or "the run's configured data"
        raise InputError(f"{where}: its catalogue is not the one the run was trained on")
    return SiteUsers(site)


def load_recommender(run_dir: str | Path) -> Recommender:
    """The recommender that the completed run in ``run_dir`` saved (``recommender.json``).

    Raises :class:`InputError` with one line for a folder that is missing, not a run,
    a run that failed or has not finished, or a format newer than this version reads.
    """
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise InputError(f"{folder}: no such run directory")
    status_path = folder / "status.json"
    if not status_path.is_file():
        raise InputError(f"{folder}: not a run directory (no status.json)")
    status = json.loads(status_path.read_text())
    if status.get("status") != "completed":
        reason = f": {status['reason']}" if status.get("reason") else ""
        raise InputError(f"{folder}: the run is {status.get('status')}{reason}")
    manifest_path = folder / "recommender.json"
    if not manifest_path.is_file():
        raise InputError(
            f"{folder}: no recommender.json (runs saved before fedgraphrec's recommender "
            "format cannot be served; run again)"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != RECOMMENDER_FORMAT:
        raise InputError(f"{manifest_path}: expected format {RECOMMENDER_FORMAT!r}")
    version = manifest.get("version")
    if not isinstance(version, int) or version > RECOMMENDER_VERSION:
        raise InputError(
            f"{manifest_path}: format version {version!r} is newer than this fedgraphrec "
            f"reads ({RECOMMENDER_VERSION}); upgrade fedgraphrec"
        )
    saved = json.loads((folder / manifest["config"]).read_text())
    config = RunConfig.from_mapping(app_defaults() | saved)  # keys added since: defaults
    catalogue = load_catalogue_folder(folder / manifest["catalogue"])
    graph = None
    if manifest["graph"] is not None:
        path = folder / manifest["graph"]
        try:
            graph = ItemGraph.from_bytes(path.read_bytes())
        except InputError as error:
            raise InputError(f"{path}: {error}") from error
    state = None if manifest["model"] is None else torch.load(folder / manifest["model"])
    return Recommender(config, catalogue, graph, state)
