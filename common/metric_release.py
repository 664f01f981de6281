r"""Evaluation metrics under user-level DP: per-user sums, released with Gaussian noise.

With ``evaluation = "dp"`` (the default under DP) a site sends no metric. For
each held-out part :math:`p` (:func:`evaluation_parts`: validation, test, the
warm test rows with a test file of one's own, and with cold-start items the
cold part, with and without text) it sums one vector
per user :math:`u` with held-out items in :math:`p`:

- rating: :math:`(\min(\mathrm{mse}_u, B^2),\ \min(\mathrm{mae}_u, B),\ 1)`, the
  user's mean squared and mean absolute error on the reference scale 1..5
  (``common.data.dataset.REFERENCE_SCALE``), :math:`B` = :data:`ERROR_BOUND`;
- ranking: :math:`(\mathrm{Recall@K}_u,\ \mathrm{NDCG@K}_u,\ 1)`, each in [0, 1].

A user's vector depends only on that user's own rows and on released values
(the global item side, the released item graph): adding or removing one user
changes the site's sums over all :math:`P` parts together by at most

.. math::
    \Delta = \sqrt{P\,(B^4 + B^2 + 1)} \ \text{(rating)}, \qquad
    \Delta = \sqrt{3P} \ \text{(ranking)}

in L2 norm (:func:`sensitivity`). The site adds Gaussian noise of standard
deviation :math:`\sigma_e \Delta` to every sum (:math:`\sigma_e` =
``evaluation-noise-multiplier``), once per evaluation round: a Gaussian
mechanism that the site's ledger composes with everything else it released,
and records before the reply leaves (``client.site_round``). The rating sums
are then scaled from the reference scale to the public one (post-processing).

The server adds the sites' noisy sums and divides (post-processing,
:func:`metrics_from_sums`): :math:`\mathrm{RMSE} = \sqrt{\max(S_{\mathrm{mse}}, 0)
/ N}`, MAE, Recall@K and NDCG@K :math:`= S / N`, with :math:`N` the noisy
number of users; a part whose noisy :math:`N` is below 1 gives no metric. The
ranking metrics are the same averages over users as the exact ones
(``common.evaluation``); the rating metrics average each user's error, where
the exact ones average every rating.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import numpy as np

from common.config import RunConfig
from common.evaluation import RankingSums, RatingErrors

ERROR_BOUND = 2.0
""":math:`B`: a user's RMSE and MAE on the reference scale count up to 2 stars."""

Part = tuple[str, str]
"""A held-out part as the prefix and suffix of its metric names: ``("val-", "")``."""


def evaluation_parts(config: RunConfig) -> list[Part]:
    """The held-out parts a site evaluates under ``config``: validation and test (with a
    test file of one's own, ``test-path``, also its warm rows: user and item both in the
    training data), and with ``cold-item-fraction`` the cold-start items (also without
    text, if the model reads item text). Public: the same at every site."""
    parts = [("val-", ""), ("test-", "")]
    if config.test_path:
        parts.append(("test-", "-warm"))
    if config.cold_item_fraction > 0:
        parts.append(("cold-", ""))
        if config.item_text:
            parts.append(("cold-", "-without-text"))
    return parts


def _quantities(config: RunConfig) -> tuple[str, str]:
    if config.task == "rating":
        return ("squared-error", "absolute-error")
    return (f"recall@{config.top_k}", f"ndcg@{config.top_k}")


def sum_names(config: RunConfig) -> list[str]:
    """The keys of a site's noisy sums, in release order: per part, the two per-user
    metrics' sums and the number of users (``val-squared-error-sum``, ``val-users``)."""
    return [
        name
        for prefix, suffix in evaluation_parts(config)
        for name in (
            *(f"{prefix}{quantity}-sum{suffix}" for quantity in _quantities(config)),
            f"{prefix}users{suffix}",
        )
    ]


def sensitivity(config: RunConfig) -> float:
    """:math:`\\Delta`: one user's largest change of a site's sums, in L2 norm."""
    per_user = (
        ERROR_BOUND**4 + ERROR_BOUND**2 + 1.0 if config.task == "rating" else 3.0
    )  # squared bounds of the three coordinates
    return math.sqrt(len(evaluation_parts(config)) * per_user)


def user_sums(result: RatingErrors | RankingSums) -> np.ndarray:
    """The three sums of one part, before noise (rating: on the reference scale)."""
    if isinstance(result, RankingSums):
        return np.array([result.recall, result.ndcg, float(result.users)])
    users, inverse = np.unique(result.users, return_inverse=True)
    errors = result.errors / result.unit
    counts = np.bincount(inverse, minlength=len(users))
    squared = np.bincount(inverse, errors**2, len(users)) / np.maximum(counts, 1)
    absolute = np.bincount(inverse, np.abs(errors), len(users)) / np.maximum(counts, 1)
    return np.array(
        [
            np.minimum(squared, ERROR_BOUND**2).sum(),
            np.minimum(absolute, ERROR_BOUND).sum(),
            float(len(users)),
        ]
    )


def noisy_sums(
    config: RunConfig,
    results: Mapping[Part, RatingErrors | RankingSums],
    noise_multiplier: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """The site's release: every part's sums plus Gaussian noise of standard deviation
    ``noise_multiplier`` x :func:`sensitivity`, the rating sums then scaled to the
    public scale."""
    parts = [results[part] for part in evaluation_parts(config)]
    exact = np.concatenate([user_sums(result) for result in parts])
    noisy = exact + rng.normal(0.0, noise_multiplier * sensitivity(config), exact.shape)
    if isinstance(parts[0], RatingErrors):
        unit = parts[0].unit
        noisy = noisy * np.tile([unit**2, unit, 1.0], len(parts))
    return dict(zip(sum_names(config), noisy.tolist(), strict=True))


_SUM = re.compile(r"^(?P<prefix>[a-z]+-)(?P<quantity>.+)-sum(?P<suffix>-without-text)?$")
_USERS = re.compile(r"^[a-z]+-users(-without-text)?$")


def is_sum(key: str) -> bool:
    """Whether ``key`` names one of the noisy sums of :func:`sum_names`."""
    return bool(_SUM.match(key) or _USERS.match(key))


def metrics_from_sums(records: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The federation's metrics from the sites' noisy sums (module docstring): each
    ``<part><quantity>-sum`` added over sites, over the added ``<part>users``."""
    totals: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if is_sum(key):
                totals[key] = totals.get(key, 0.0) + float(value)
    metrics = {}
    for key, total in totals.items():
        match = _SUM.match(key)
        if match is None:
            continue
        prefix, quantity, suffix = match["prefix"], match["quantity"], match["suffix"] or ""
        users = totals.get(f"{prefix}users{suffix}", 0.0)
        if users < 1.0:
            continue
        if quantity == "squared-error":
            metrics[f"{prefix}rmse{suffix}"] = math.sqrt(max(total, 0.0) / users)
        elif quantity == "absolute-error":
            metrics[f"{prefix}mae{suffix}"] = total / users
        else:
            metrics[f"{prefix}{quantity}{suffix}"] = total / users
    return metrics
