r"""Item-item graph filters computed from federated sums over users.

GF-CF (Shen et al., CIKM 2021) is LightGCN's propagation in closed form, and
everything it needs is a sum over users: each site sums its own users, the
federation sums the sites, and, under differential privacy, the total is
released once with the Gaussian mechanism. A user's own row never leaves the
site: the site scores its users locally with the released item-side filter.

**One user's rows.** A user :math:`u` has the row :math:`r_u \in \mathbb R^n`
over the :math:`n` catalogue items (1 on the items the user touched for
implicit feedback; ratings or rating residuals otherwise; zero elsewhere).
It enters every sum as the bounded row (:func:`bounded_rows`)

.. math:: x_u = r_u \cdot \min(\lVert r_u \rVert^{-2\eta},\ C / \lVert r_u \rVert),
   \qquad \lVert x_u \rVert = \min(\lVert r_u \rVert^{1 - 2\eta}, C) \le C,

with a public exponent :math:`0 \le \eta \le 1/2` and a public bound :math:`C`
(:math:`C = \infty` without DP). For binary rows :math:`\lVert r_u \rVert^2 =
|N(u)|`, so :math:`\eta = 1/2, C = 1` gives GF-CF's :math:`r_u / \sqrt{|N(u)|}`,
and :math:`\eta = 0` with the degree bound :math:`C_d` gives the degree
contribution :math:`r_u \min(1, C_d / \sqrt{|N(u)|})`.

**Sums a site contributes** (over its users; the federation adds them up):

- item sums :math:`d = \sum_u x_u` (:func:`item_sum`; item degrees for binary
  rows). One user changes it by :math:`x_u`, L2 norm :math:`\le C`.
- the Gram matrix :math:`G = \sum_u x_u x_u^\top` (:func:`gram_sum`), dense
  ``[n, n]`` or ``scipy.sparse`` for large catalogues, optionally over a subset
  of items (restricting a row's columns only lowers its norm). One user changes
  it by :math:`x_u x_u^\top`, Frobenius norm :math:`\lVert x_u \rVert^2 \le C^2`
  (exactly 1 for a binary row at :math:`\eta = 1/2, C = 1`).

The sums are exactly additive over users, so each user's contribution depends
only on that user's data and on public or already released values (the
rating residuals use the released mean and item effects): the bounds above
are the sensitivities under add/remove one user.

**Gaussian release** (:func:`release_vector`, :func:`release_symmetric`): the
sum plus :math:`\mathcal N(0, (z \Delta)^2)` per entry, for a noise
multiplier :math:`z` and sensitivity :math:`\Delta`. A symmetric matrix is
released through the isometry :math:`A \mapsto (A_{ii},\ \sqrt2 A_{ij})_{i<j}`
from the Frobenius norm to the L2 norm: its image of one user's contribution
has L2 norm exactly :math:`\lVert x_u x_u^\top \rVert_F \le \Delta`; noise is
added there and mapped back (post-processing), so the released matrix is
symmetric with noise std :math:`z\Delta` on the diagonal and
:math:`z\Delta/\sqrt2` off it (half the variance of naive noise on the upper
triangle, whose L2 norm is also :math:`\le \lVert \cdot \rVert_F`).
``common.accounting.noise_multiplier_for`` calibrates a release to
:math:`(\varepsilon, \delta)` (a Gaussian event of sampling rate 1). Plain
(unsampled) Gaussian releases compose exactly as one Gaussian with
:math:`1/z^2 = \sum_i 1/z_i^2`; :func:`split_noise_multiplier` gives each
release its share :math:`w_i` of :math:`1/z^2` (:math:`z_i = z/\sqrt{w_i}`).
Everything computed from released values (clamping, selecting items,
normalising, eigen-decomposing, filtering) is post-processing.

**Normalisation** (:func:`degree_normalised`): :math:`P = D^{-\beta} G
D^{-\beta}`, :math:`D = \mathrm{diag}(\max(d, f))` with a floor :math:`f`
(noisy degrees can be small or negative). :math:`\beta = 1/2` is GF-CF's
normalisation, :math:`\beta = 0` the plain Gram (PureSVD); under DP a small
:math:`\beta` keeps the noise on rare items from being amplified.

**Filters** (:class:`ItemFilter`), on the items :math:`S` a filter covers
(the catalogue, or the top-:math:`M` items by released degree, :func:`top_items`):

- graph filter (:func:`graph_filter`): linear part :math:`L = P / \lambda_1`
  (scaled to spectral radius 1, so that :math:`\alpha` means the same for every
  :math:`\beta`) and the ideal low-pass filter on the top-:math:`k`
  eigenvectors :math:`V_k` of :math:`P` (:func:`top_eigenpairs`),
  :math:`D^{-\beta} V_k V_k^\top D^{\beta}`, blended by :math:`\alpha`;
  optionally sharpened (:func:`spectral_filter`): BSPM-EM (Choi et al., SIGIR
  2023) runs :math:`ds/dt = -s L` for a time :math:`T` from the blend, with
  one classical Runge-Kutta (RK4) step, which multiplies the blend by
  :math:`p_T(L) = \sum_{m=0}^{4} (-T L)^m / m!`. The powers of :math:`L` over
  a large catalogue are too dense to ship, so the sharpening acts within
  :math:`V_k` (:math:`L V_k = V_k \operatorname{diag}(\mu)`, :math:`\mu =
  \lambda / \lambda_1`): :math:`p_T(L) \approx I - V_k \operatorname{diag}(\delta)
  V_k^\top` with :math:`\delta = 1 - p_T(\mu)` (:func:`sharpening_damping`),
  exact on :math:`V_k`'s span and the identity on the rest. It takes
  :math:`V_k \operatorname{diag}(w) V_k^\top`, :math:`w = \mu \delta`, off
  :math:`L`, and :math:`S V_k^\top`, :math:`S = (V_k^\top D^\beta V_k)
  \operatorname{diag}(\delta)`, off the low-pass part's :math:`V_k^\top D^\beta`;
- closed-form ridge regression (EASE, Steck 2019; :func:`ease_filter`):
  :math:`L = I - Q\,\mathrm{diag}(1/\mathrm{diag}\,Q)` with
  :math:`Q = (G + \lambda I)^{-1}`, no low-pass part;
- the two blended (:func:`with_ease`): the graph filter's linear part plus
  EASE's weights :math:`B` of a second Gram, scaled to spectral norm
  :math:`w`, :math:`L + w B / \lVert B \rVert_2`;
- top-:math:`N` per row (:func:`keep_top_per_row`): the :math:`N` largest entries
  of each row of :math:`L`, to ship a large catalogue's linear part to sites.

**Scoring** (:meth:`ItemFilter.scores`), at the site, from the user's own row
:math:`r_u` restricted to :math:`S`:

.. math:: s_u = r_u L + \alpha_u (r_u D^{-\beta} V_k) (V_k^\top D^{\beta} - S V_k^\top)
   - (r_u V_k) \operatorname{diag}(w) V_k^\top, \qquad \alpha_u = \alpha\, n_u^{-\nu},

with items outside :math:`S` at :math:`-\infty` (never recommended), :math:`n_u =
\max(1, \sum_i r_{ui})` the user's number of items (binary rows) and
:math:`\nu` the low-pass weight's decay (:meth:`ItemFilter.low_pass_weights`): at :math:`\nu = 0`
GF-CF's and BSPM's blend; at :math:`\nu = 1` the low-pass part reads the user's mean
row :math:`r_u / n_u` while the linear part reads their sum, so the global, smooth part
weighs less the more a user has shown of their own taste.

**Ratings** (after McSherry & Mironov, KDD 2009). Each site computes its
users' shrunk means :math:`m_u` from their own ratings (:func:`user_means`,
prior: the public middle of the scale). The sites' item sums
:math:`\sum_u w_u (r_u - m_u)` and counts :math:`\sum_u w_u 1_{N(u)}`, with
:math:`w_u = \min(1, C / \max(\lVert r_u - m_u \rVert, \sqrt{|N(u)|}))`
(:func:`item_offset_sums`; the pair changes by at most :math:`\sqrt2 C`), give
item offsets :math:`b_i = p_i + (\text{sum}_i - N_i p_i) / (N_i + \lambda + \lambda_\sigma
/ N_i)`, :math:`N_i` the count (:func:`item_offsets`; :math:`\lambda_\sigma` sized to the
counts' noise): each item's mean shrunk toward a prior :math:`p_i = a + c \log(1 + N_i) +
d^\top z_i`, a weighted least-squares fit of the released means on the released counts
and, with item text, the public text's principal components :math:`z_i`
(:func:`offset_prior`, :func:`text_components`), as rarely rated items are often rated
lower and similar texts rated alike. The sites then
recompute :math:`m_u` against the released :math:`b_i`, and
the residual rows :math:`e_{ui} = r_{ui} - m_u - b_i` (:func:`residual_rows`), bounded
as above, enter a released residual Gram (covariance) matrix. A user's rating is
predicted as :math:`m_u + b_i + \hat e_{ui}`, with :math:`\hat e_{ui}` the
neighbourhood average of the user's own residuals weighted by the cosine similarity of
the covariance, optionally shrunk by released co-rating weights :math:`\sum_u z_u
z_u^\top` of the bounded binary rows (:func:`covariance_similarity`,
:func:`neighbourhood_residuals`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh, svds

from common.data.dataset import Interactions

Matrix = np.ndarray | sp.csr_matrix
"""A dense ``numpy`` array or a ``scipy.sparse`` CSR matrix."""
GATHERED_SHARE = 16
""":meth:`ItemFilter.features` gathers the basis rows of a user's candidates while they are
fewer than ``1 / GATHERED_SHARE`` of the covered items, and multiplies the whole basis
beyond: a gathered row costs far more than its share of one product over every item."""


# -- one user's rows and the sums a site contributes ----------------------------


def user_rows(
    interactions: Interactions,
    num_users: int,
    num_items: int,
    values: np.ndarray | None = None,
) -> sp.csr_matrix:
    """``[num_users, num_items]`` rows of the interactions' users (local indices):
    ``values`` at each (user, item), 1 when ``values`` is None (binary rows).

    Every bound in this module assumes one entry per (user, item): a pair given twice
    would add up (a rating of 5 counted as 10) and break the user's bound, so it raises
    ``ValueError`` here, where each user's row is built, whatever the caller checked."""
    data = np.ones(len(interactions)) if values is None else np.asarray(values, np.float64)
    rows = sp.csr_matrix(
        (data, (interactions.user, interactions.item)), shape=(num_users, num_items)
    )
    if rows.nnz != len(interactions):  # the CSR conversion summed repeated pairs
        raise ValueError(
            f"{len(interactions) - rows.nnz} repeated (user, item) pair(s): a user's row "
            "holds each item once (the loaders' on-duplicate decides which rating to keep)"
        )
    return rows


def bounded_rows(rows: sp.csr_matrix, exponent: float, bound: float) -> sp.csr_matrix:
    """Each row ``r`` as ``r * min(|r|^(-2 exponent), bound / |r|)``: L2 norm
    ``min(|r|^(1 - 2 exponent), bound) <= bound`` (``bound`` may be ``inf``)."""
    if not 0.0 <= exponent <= 0.5:
        raise ValueError(f"exponent must lie in [0, 1/2], got {exponent}")
    norm = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
    safe = np.where(norm > 0, norm, 1.0)
    scale = np.minimum(safe ** (-2 * exponent), bound / safe)
    scaled = sp.csr_matrix(rows, dtype=np.float64, copy=True)
    scaled.data *= np.repeat(scale, np.diff(scaled.indptr))
    return scaled


def item_sum(rows: sp.csr_matrix) -> np.ndarray:
    """``sum_u x_u`` over the (bounded) rows: ``[num_items]``."""
    return np.asarray(rows.sum(axis=0)).ravel()


def gram_sum(rows: sp.csr_matrix, dense: bool = True) -> Matrix:
    """``sum_u x_u x_u^T`` over the (bounded) rows: ``[n, n]``, dense or CSR.

    For a subset of items pass ``rows[:, items]`` (bound them after restricting
    to keep each user's full bound on the subset)."""
    gram = (rows.T @ rows).tocsr()
    return gram.toarray() if dense else gram


# -- Gaussian releases ----------------------------------------------------------


def split_noise_multiplier(noise_multiplier: float, shares: list[float]) -> list[float]:
    """Noise multipliers ``z / sqrt(w_i)`` of releases that together cost what one
    release at ``z`` costs (``sum 1/z_i^2 = 1/z^2``); ``shares`` ``w_i`` sum to 1."""
    if not np.isclose(sum(shares), 1.0) or min(shares) <= 0:
        raise ValueError(f"shares must be positive and sum to 1, got {shares}")
    return [noise_multiplier / np.sqrt(share) for share in shares]


def release_vector(
    total: np.ndarray, sensitivity: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """``total`` (any shape) plus Gaussian noise of std ``noise_multiplier * sensitivity``
    per entry; ``sensitivity`` bounds one user's change of ``total`` in L2 norm."""
    return total + rng.normal(0.0, noise_multiplier * sensitivity, size=np.shape(total))


def release_symmetric(
    total: np.ndarray, sensitivity: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """A symmetric ``[n, n]`` sum released through the Frobenius isometry: noise std
    ``z * sensitivity`` on the diagonal and ``z * sensitivity / sqrt(2)`` off it, mirrored;
    ``sensitivity`` bounds one user's change of ``total`` in Frobenius norm."""
    return symmetric(release_vector(isometry(total), sensitivity, noise_multiplier, rng))


def isometry(matrix: np.ndarray) -> np.ndarray:
    """A symmetric ``[m, m]`` matrix as the vector ``(A_ii, sqrt(2) A_ij for i < j)``,
    whose L2 norm is the matrix's Frobenius norm."""
    upper = np.triu_indices(matrix.shape[0], k=1)
    return np.concatenate([np.diag(matrix), np.sqrt(2.0) * matrix[upper]])


def symmetric(vector: np.ndarray) -> np.ndarray:
    """The inverse of :func:`isometry`."""
    m = (math.isqrt(8 * len(vector) + 1) - 1) // 2
    matrix = np.zeros((m, m))
    upper = np.triu_indices(m, k=1)
    matrix[upper] = vector[m:] / np.sqrt(2.0)
    matrix += matrix.T
    matrix[np.diag_indices(m)] = vector[:m]
    return matrix


# -- normalisation, spectrum and item selection ---------------------------------


def top_items(degrees: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` items of largest (released) degree, in catalogue order."""
    order = np.argsort(-degrees, kind="stable")
    return np.sort(order[:count])


def without_negative_entries(gram: np.ndarray) -> np.ndarray:
    """A released (noisy) Gram with its negative entries set to zero: the Gram of
    non-negative rows has none, and this is the nearest such matrix in Frobenius norm
    (post-processing; the rule of when it is applied: ``common.graph.release``)."""
    return np.maximum(gram, 0.0)


def degree_normalised(gram: Matrix, degrees: np.ndarray, exponent: float, floor: float) -> Matrix:
    """``D^-b G D^-b`` with ``D = diag(max(degrees, floor))`` and ``b = exponent``."""
    scale = np.maximum(degrees, floor) ** -exponent
    if sp.issparse(gram):
        return sp.csr_matrix(sp.diags(scale) @ gram @ sp.diags(scale))
    return scale[:, None] * gram * scale[None, :]


def top_eigenpairs(matrix: Matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues of a symmetric matrix (descending) and their
    eigenvectors as columns: LAPACK for dense, Lanczos (``eigsh``) for sparse, in single
    precision (the scores are float32; on Gowalla's 41k-item Gram it halves the time)."""
    n = matrix.shape[0]
    if sp.issparse(matrix) and k < n - 1:
        values, vectors = eigsh(matrix.astype(np.float32), k=k, which="LA")
        values, vectors = values.astype(np.float64), vectors.astype(np.float64)
    else:  # dense, or a sparse matrix's (nearly) every eigenvector, beyond Lanczos
        dense = matrix.toarray() if sp.issparse(matrix) else matrix
        values, vectors = scipy.linalg.eigh(dense, subset_by_index=[n - k, n - 1])
    order = np.argsort(-values)
    return values[order], vectors[:, order]


# -- filters --------------------------------------------------------------------


@dataclass(frozen=True)
class ItemFilter:
    """An item-item filter over the catalogue items ``items`` (see the module docstring).

    Attributes:
        num_items: catalogue size; the scores have one column per catalogue item.
        items: the ``m`` catalogue items the filter covers, ascending; the others
            score ``-inf``.
        linear: ``[m, m]`` linear part ``L`` (dense or CSR), or ``None``.
        eigenvectors: ``[m, k]`` low-pass basis ``V_k`` (``k = 0`` for none).
        alpha: weight of the low-pass part.
        input_scale: ``[m]`` ``D^-b``, applied to a user's row before ``V_k``.
        output_scale: ``[m]`` ``D^b``, of the low-pass part's output basis ``U = D^b V_k -
            V_k S^T``.
        sharpening: ``[k]`` what sharpening takes off the linear part, ``w``, or ``None``.
        low_pass_sharpening: ``[k, k]`` what it takes off the low-pass part, ``S``, or
            ``None``.
        alpha_decay: :math:`\nu`, the low-pass weight's decay with the user's number of
            items (:meth:`low_pass_weights`; 0: the same ``alpha`` for every user).
    """

    num_items: int
    items: np.ndarray
    linear: Matrix | None
    eigenvectors: np.ndarray
    alpha: float
    input_scale: np.ndarray
    output_scale: np.ndarray
    sharpening: np.ndarray | None = None
    low_pass_sharpening: np.ndarray | None = None
    alpha_decay: float = 0.0

    @cached_property
    def positions(self) -> np.ndarray:
        """``[num_items]``: each catalogue item's row in the filter, -1 where not covered."""
        position = np.full(self.num_items, -1, np.int64)
        position[self.items] = np.arange(len(self.items))
        return position

    def features(self, rows: Matrix, candidates: np.ndarray, left_out: int = 0) -> np.ndarray:
        """``[B, C, 2]``: the linear and low-pass parts of each user's scores (``scores`` is
        their sum) at ``candidates`` ``[B, C]`` (catalogue items), from the users' ``[B,
        num_items]`` rows; zero at items the filter does not cover. The low-pass weight is
        that of the rows with ``left_out`` items fewer (:meth:`low_pass_weights`): the
        rows' features less :meth:`item_features` of one of their items at the same
        weights are the features of the rows without it."""
        position = self.positions[candidates]
        covered = position >= 0
        at = np.where(covered, position, 0)
        weights = self.low_pass_weights(rows, left_out)
        rows = rows[:, self.items]
        linear = np.zeros(candidates.shape)
        if self.linear is not None:
            linear = np.take_along_axis(self._linear_part(rows), at, axis=1)
        low_pass = np.zeros(candidates.shape)
        if self._has_low_pass:
            scaled, sharpened = self._low_pass_bases(rows, weights)
            pairs = [(scaled, self._output_basis)]
            if sharpened is not None:
                pairs.append((-sharpened, self.eigenvectors))
            if candidates.shape[1] * GATHERED_SHARE < len(self.items):
                # a few candidates each (a user's targets and negatives, pairs): their rows
                # of the basis, [B, C, k]; a product over every item costs k m per user
                parts = [np.einsum("bk,bck->bc", b, vectors[at]) for b, vectors in pairs]
            else:  # many: every covered item at once, [B, m]
                parts = [np.take_along_axis(b @ vectors.T, at, axis=1) for b, vectors in pairs]
            low_pass = sum(parts)
        return np.where(covered[..., None], np.stack([linear, low_pass], -1), 0.0)

    def item_features(
        self, sources: np.ndarray, targets: np.ndarray, weights: np.ndarray
    ) -> np.ndarray:
        """``[S, C, 2]``: :meth:`features` at ``targets`` ``[S, C]`` of a row holding the one
        item ``sources[s]``, its low-pass part at the weight ``weights[s]``: what one item
        of a user's row adds to the scores (a user's features with item ``i`` left out are
        ``features(row, ., left_out=1) - item_features(i, ., low_pass_weights(row, 1))``)."""
        source, target = self.positions[sources], self.positions[targets]
        covered = (source[:, None] >= 0) & (target >= 0)
        source, target = np.maximum(source, 0), np.where(covered, target, 0)
        linear = np.zeros(target.shape)
        if self.linear is not None:
            values = self.linear[np.repeat(source, target.shape[1]), target.ravel()]
            linear = np.asarray(values).reshape(target.shape)
        low_pass = np.zeros(target.shape)
        if self._has_low_pass:
            source_vectors = self.eigenvectors[source]  # [S, k]
            scaled = (weights * self.input_scale[source])[:, None] * source_vectors
            low_pass = np.einsum("sk,sck->sc", scaled, self._output_basis[target])
            if self.sharpening is not None:
                sharpened = source_vectors * self.sharpening
                low_pass -= np.einsum("sk,sck->sc", sharpened, self.eigenvectors[target])
        return np.where(covered[..., None], np.stack([linear, low_pass], -1), 0.0)

    def catalogue_features(self, rows: Matrix, out: np.ndarray) -> None:
        """Write :meth:`features` at every catalogue item into ``out[:, :, :2]`` (``out``:
        ``[B, num_items, F >= 2]``, zeros at the items the filter does not cover), computed
        over the covered items at once (no per-candidate gathers)."""
        covered = self._covered(out)
        linear, low_pass = self._covered_parts(rows)
        if linear is not None:
            out[:, covered, 0] = linear
        if low_pass is not None:
            out[:, covered, 1] = low_pass

    def scores(self, rows: Matrix, batch_size: int = 1024) -> np.ndarray:
        """``[B, num_items]`` float32 scores of users given their ``[B, num_items]``
        rows (dense or CSR), ``batch_size`` users at a time."""
        out = np.full((rows.shape[0], self.num_items), -np.inf, np.float32)
        covered = self._covered(out)
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start : start + batch_size]
            linear, low_pass = self._covered_parts(batch)
            scores = np.zeros((batch.shape[0], len(self.items)))
            for part in (linear, low_pass):
                if part is not None:
                    scores += part
            out[start : start + batch.shape[0], covered] = scores
        return out

    def _covered(self, out: np.ndarray) -> slice | np.ndarray:
        """The catalogue columns of ``out`` the filter covers: a slice when it covers them all."""
        return slice(None) if len(self.items) == out.shape[1] else self.items

    def _covered_parts(self, rows: Matrix) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The linear and low-pass parts ``[B, m]`` at the covered items of users' ``[B,
        num_items]`` rows (``None`` for a part the filter does not have)."""
        weights = self.low_pass_weights(rows)
        rows = rows[:, self.items]
        linear = None if self.linear is None else self._linear_part(rows)
        low_pass = None
        if self._has_low_pass:
            scaled, sharpened = self._low_pass_bases(rows, weights)
            bases = scaled if sharpened is None else np.hstack([scaled, -sharpened])
            low_pass = bases.astype(np.float32) @ self._low_pass_products
        return linear, low_pass

    @cached_property
    def _output_basis(self) -> np.ndarray:
        """``[m, k]`` ``U = D^b V_k - V_k S^T``: the low-pass part is ``alpha (r_u D^-b V_k)
        U^T`` (``S = 0`` without sharpening); computed once, so that a candidate's row of it
        is a gather."""
        output = self.eigenvectors * self.output_scale[:, None]
        if self.low_pass_sharpening is not None:
            output -= self.eigenvectors @ self.low_pass_sharpening.T
        return output

    @cached_property
    def _low_pass_products(self) -> np.ndarray:
        """``[k, m]`` float32 ``U^T``, and ``[2k, m]`` with ``V_k^T`` stacked under it when
        there is sharpening: what :meth:`_low_pass_bases` multiply, in one float32 product
        (the scores are float32; over Gowalla's 41k items this product is most of an
        evaluation)."""
        products = self._output_basis.T
        if self.sharpening is not None:
            products = np.vstack([products, self.eigenvectors.T])
        return np.ascontiguousarray(products, dtype=np.float32)

    @property
    def _has_low_pass(self) -> bool:
        return bool(self.eigenvectors.shape[1] and (self.alpha or self.sharpening is not None))

    def _linear_part(self, rows: Matrix) -> np.ndarray:
        """``r_u L`` ``[B, m]`` of rows restricted to the covered items."""
        product = rows @ self.linear
        return product.toarray() if sp.issparse(product) else np.asarray(product)

    def low_pass_weights(self, rows: Matrix, left_out: int = 0) -> np.ndarray:
        r"""``[B]`` :math:`\alpha_u = \alpha\, n_u^{-\nu}` of users' ``[B, num_items]`` rows,
        :math:`n_u` the row's sum less ``left_out``, at least 1 (the module docstring)."""
        if not self.alpha_decay:
            return np.full(rows.shape[0], self.alpha)
        counts = np.asarray(rows.sum(axis=1), np.float64).ravel() - left_out
        return self.alpha * np.maximum(counts, 1.0) ** -self.alpha_decay

    def _low_pass_bases(
        self, rows: Matrix, weights: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``alpha_u (r_u D^-b) V_k`` and ``(r_u V_k) diag(w)`` (None without sharpening),
        ``[B, k]`` each, of rows restricted to the covered items: what ``U^T`` and
        ``-V_k^T`` multiply."""
        scaled = rows @ sp.diags(self.input_scale) if sp.issparse(rows) else rows * self.input_scale
        sharpened = None
        if self.sharpening is not None:
            sharpened = np.asarray(rows @ self.eigenvectors) * self.sharpening
        return weights[:, None] * np.asarray(scaled @ self.eigenvectors), sharpened


def sharpening_damping(mu: np.ndarray, time: float) -> np.ndarray:
    r"""``[k]`` :math:`\delta = 1 - p_T(\mu)`: the share of each eigenvector's component
    that BSPM's sharpening, one RK4 step of :math:`ds/dt = -s L` over a time :math:`T`,
    takes off a score, :math:`\mu` the eigenvalues of :math:`L`: RK4 on a linear ODE
    multiplies by the degree-4 Taylor polynomial :math:`p_T(x) = \sum_{m=0}^{4} (-T x)^m /
    m!` of :math:`e^{-T x}`."""
    return 1.0 - sum((-time * mu) ** m / math.factorial(m) for m in range(5))


def graph_filter(
    gram: Matrix,
    degrees: np.ndarray,
    exponent: float,
    k: int,
    alpha: float,
    num_items: int,
    items: np.ndarray | None = None,
    floor: float = 1.0,
    sharpening: float = 0.0,
    alpha_decay: float = 0.0,
) -> ItemFilter:
    """GF-CF's filter (``exponent`` = 1/2) or its degree-weighted variants, from the
    (released) Gram matrix and degrees over ``items`` (default: the whole catalogue),
    sharpened for a time ``T = sharpening`` within its low-pass basis (0: not at all), its
    low-pass weight decaying as ``alpha n_u^-alpha_decay`` (``ItemFilter.low_pass_weights``)."""
    spectrum = normalised_spectrum(gram, degrees, exponent, k, floor)
    return spectral_filter(*spectrum, alpha, num_items, items, sharpening, alpha_decay)


def normalised_spectrum(
    gram: Matrix, degrees: np.ndarray, exponent: float, k: int, floor: float = 1.0
) -> tuple[Matrix, np.ndarray, np.ndarray, np.ndarray]:
    r"""What :func:`spectral_filter` is built from: the linear part :math:`L = D^{-\beta}
    G D^{-\beta} / \lambda_1` (spectral radius 1), its top ``k`` eigenvalues
    :math:`\mu = \lambda / \lambda_1` (descending) and eigenvectors :math:`V_k`, and the
    degree scale :math:`D^\beta`, ``D = diag(max(degrees, floor))``."""
    normalised = degree_normalised(gram, degrees, exponent, floor)
    values, vectors = top_eigenpairs(normalised, max(k, 1))
    return (
        normalised / values[0],
        values[:k] / values[0],
        vectors[:, :k],
        np.maximum(degrees, floor) ** exponent,
    )


def spectral_filter(
    linear: Matrix,
    mu: np.ndarray,
    eigenvectors: np.ndarray,
    degree_scale: np.ndarray,
    alpha: float,
    num_items: int,
    items: np.ndarray | None = None,
    sharpening: float = 0.0,
    alpha_decay: float = 0.0,
) -> ItemFilter:
    r"""The graph filter of a linear part :math:`L` (spectral radius 1), its top
    eigenpairs :math:`(\mu, V_k)` and the degree scale :math:`D^\beta` (``[m]``), the
    low-pass part of weight :math:`\alpha n_u^{-\nu}` (``alpha``, ``alpha_decay``),
    sharpened for a time ``T = sharpening`` within :math:`V_k` (0: not at all): :math:`w =
    \mu \delta`, :math:`S = (V_k^\top D^\beta V_k) \operatorname{diag}(\delta)`,
    :math:`\delta` of :func:`sharpening_damping`."""
    vectors = np.ascontiguousarray(eigenvectors)  # else scipy copies it per product
    damping = sharpening_damping(mu, sharpening) if sharpening else None
    return ItemFilter(
        num_items=num_items,
        items=np.arange(num_items) if items is None else items,
        linear=linear,
        eigenvectors=vectors,
        alpha=alpha,
        input_scale=1.0 / degree_scale,
        output_scale=degree_scale,
        sharpening=None if damping is None else mu * damping,
        low_pass_sharpening=(
            None if damping is None or not alpha else (vectors.T * degree_scale) @ vectors * damping
        ),
        alpha_decay=alpha_decay,
    )


def ease_weights(gram: np.ndarray, ridge: float) -> np.ndarray:
    """EASE's item-item weights ``I - Q diag(1/diag Q)``, ``Q = (G + ridge I)^-1``
    (zero diagonal)."""
    inverse = np.linalg.inv(gram + ridge * np.eye(gram.shape[0]))
    weights = -inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


def ease_filter(
    gram: np.ndarray, ridge: float, num_items: int, items: np.ndarray | None = None
) -> ItemFilter:
    """EASE from the (released) Gram matrix over ``items`` (default: the catalogue)."""
    m = gram.shape[0]
    return ItemFilter(
        num_items=num_items,
        items=np.arange(num_items) if items is None else items,
        linear=ease_weights(gram, ridge),
        eigenvectors=np.zeros((m, 0)),
        alpha=0.0,
        input_scale=np.ones(m),
        output_scale=np.ones(m),
    )


def with_ease(item_filter: ItemFilter, gram: np.ndarray, ridge: float, weight: float) -> ItemFilter:
    r"""``item_filter`` with EASE's weights :math:`B` (:func:`ease_weights` of ``gram``,
    over the same items) added to its dense linear part, scaled to spectral norm
    ``weight``: :math:`L + w B / \lVert B \rVert_2` (:math:`L`'s spectral norm is 1)."""
    weights = ease_weights(gram, ridge)
    start = np.ones(len(weights))  # a fixed start: the same norm in every process
    norm = svds(weights, k=1, v0=start, return_singular_vectors=False)[0]
    return replace(item_filter, linear=item_filter.linear + weight / norm * weights)


def keep_top_per_row(matrix: Matrix, count: int, magnitude: bool = False) -> sp.csr_matrix:
    """``matrix`` with only the ``count`` largest entries of each row kept (CSR), by
    absolute value with ``magnitude``, ties broken by position in the row: a row's
    ``count``-th largest value by partition, not a sort (on Gowalla's 42M-entry filter, 3 s
    where a sort of every entry took 34 s)."""
    matrix = sp.csr_matrix(matrix)
    lengths = np.diff(matrix.indptr)
    keep = np.ones(matrix.nnz, bool)
    for row in np.flatnonzero(lengths > count):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        values = np.abs(matrix.data[start:end]) if magnitude else matrix.data[start:end]
        threshold = np.partition(values, len(values) - count)[len(values) - count]
        kept = values > threshold
        kept[np.flatnonzero(values == threshold)[: count - kept.sum()]] = True
        keep[start:end] = kept
    indptr = np.concatenate([[0], np.cumsum(np.minimum(lengths, count))])
    return sp.csr_matrix((matrix.data[keep], matrix.indices[keep], indptr), shape=matrix.shape)


def strongest_neighbours(matrix: Matrix, hops: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    r"""``[hops, n, count]`` neighbours and weights of every item in :math:`\hat P^k`,
    :math:`k = 1..` ``hops``: each row of ``matrix`` keeps its ``count`` entries of largest
    absolute value, scaled so that their absolute values sum to 1 (a row of zeros stays
    zero), and hop :math:`k` is hop :math:`k - 1` times hop 1, kept and scaled the same way."""
    one = _strongest(sp.csr_matrix(matrix), count)
    current, neighbours, weights = one, [], []
    for _ in range(hops):
        ids, values = _as_lists(current, count)
        neighbours.append(ids)
        weights.append(values)
        current = _strongest(current @ one, count)
    return np.stack(neighbours), np.stack(weights)


def _strongest(matrix: sp.csr_matrix, count: int) -> sp.csr_matrix:
    """Each row's ``count`` entries of largest absolute value (ties: the first by column),
    scaled to absolute sum 1."""
    matrix = sp.csr_matrix(matrix)
    matrix.eliminate_zeros()
    matrix.sort_indices()
    kept = keep_top_per_row(matrix, count, magnitude=True)
    total = np.asarray(abs(kept).sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / np.where(total > 0, total, 1.0)) @ kept)


def _as_lists(matrix: sp.csr_matrix, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A CSR matrix with at most ``count`` entries per row as ``[n, count]`` column ids
    and values (padded with item 0 at weight 0)."""
    n = matrix.shape[0]
    ids, values = np.zeros((n, count), np.int64), np.zeros((n, count))
    lengths = np.diff(matrix.indptr)
    rows = np.repeat(np.arange(n), lengths)
    slots = np.arange(len(rows)) - matrix.indptr[rows]
    ids[rows, slots], values[rows, slots] = matrix.indices, matrix.data
    return ids, values


# -- ratings --------------------------------------------------------------------


def user_means(
    interactions: Interactions,
    num_users: int,
    item_offsets: np.ndarray,
    prior: float,
    shrinkage: float,
) -> np.ndarray:
    """Each user's mean ``m_u = (sum_i (r_ui - b_i) + prior * shrinkage) / (|N(u)| +
    shrinkage)``, computed at the site from the user's own ratings (``b = 0`` before
    the item offsets are released)."""
    shifted = interactions.rating - item_offsets[interactions.item]
    counts = np.bincount(interactions.user, minlength=num_users)
    total = np.bincount(interactions.user, shifted, num_users)
    return (total + prior * shrinkage) / (counts + shrinkage)


def item_offset_sums(
    interactions: Interactions,
    num_users: int,
    num_items: int,
    user_mean: np.ndarray,
    bound: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The site's item sums ``sum_u w_u (r_u - m_u)`` and counts ``sum_u w_u 1_u``
    (:func:`offset_weights`): one user changes the pair by at most ``sqrt(2) * bound`` in L2."""
    centred = user_rows(
        interactions, num_users, num_items, interactions.rating - user_mean[interactions.user]
    )
    binary = user_rows(interactions, num_users, num_items)
    weight = sp.diags(offset_weights(interactions, num_users, user_mean, bound))
    return item_sum(weight @ centred), item_sum(weight @ binary)


def offset_weights(
    interactions: Interactions, num_users: int, user_mean: np.ndarray, bound: float
) -> np.ndarray:
    """Each user's weight in the item sums, ``w_u = min(1, bound / max(|r_u - m_u|,
    sqrt(|N(u)|)))``."""
    centred = interactions.rating - user_mean[interactions.user]
    squared = np.bincount(interactions.user, centred**2, num_users)
    counts = np.bincount(interactions.user, minlength=num_users)
    norm = np.sqrt(np.maximum(squared, counts))
    return np.minimum(1.0, bound / np.where(norm > 0, norm, 1.0))


def item_offsets(
    sums: np.ndarray,
    counts: np.ndarray,
    shrinkage: float,
    noise_shrinkage: float = 0.0,
    prior: np.ndarray | None = None,
    covariates: np.ndarray | None = None,
    unrated_popularity: float | np.ndarray | None = None,
) -> np.ndarray:
    r"""Item offsets from users' means, :math:`b_i = p_i + (\text{sum}_i - N_i p_i) / d_i`
    (:func:`offset_denominators`): the mean :math:`\text{sum}_i / N_i` shrunk toward the
    prior :math:`p_i` of the coefficients ``prior`` ``[..., p]`` (:func:`prior_offsets`,
    :func:`offset_prior`; broadcast against the items), the items' ``covariates`` and
    ``unrated_popularity``, or toward zero (``prior`` None). An item whose :math:`d_i` is
    infinite gets :math:`p_i`."""
    denominator = offset_denominators(counts, shrinkage, noise_shrinkage)
    if prior is None:
        return sums / denominator
    at_prior = prior_offsets(prior, counts, covariates, unrated_popularity)
    return at_prior + (sums - np.maximum(counts, 0.0) * at_prior) / denominator


def prior_design(
    counts: np.ndarray,
    covariates: np.ndarray | None = None,
    unrated_popularity: float | np.ndarray | None = None,
) -> np.ndarray:
    r"""``[..., p]``: the prior's regressors :math:`x_i = (1, \log(1 + N_i), z_i)` of items
    with ``counts`` :math:`N_i` (floored at zero) and ``covariates`` :math:`z_i` ``[..., q]``
    (none: :math:`p = 2`); an item without a positive count at ``unrated_popularity`` in
    place of :math:`\log(1 + N_i) = 0` where given (:func:`mean_popularity`)."""
    positive = np.maximum(counts, 0.0)
    popularity = np.log1p(positive)
    if unrated_popularity is not None:
        popularity = np.where(positive > 0, popularity, unrated_popularity)
    design = np.stack([np.ones_like(positive), popularity], -1)
    return design if covariates is None else np.concatenate([design, covariates], -1)


def prior_offsets(
    prior: np.ndarray,
    counts: np.ndarray,
    covariates: np.ndarray | None = None,
    unrated_popularity: float | np.ndarray | None = None,
) -> np.ndarray:
    r""":math:`p_i = x_i^\top \beta` (:func:`prior_design`) of the coefficients ``prior``
    :math:`\beta`: :math:`a + c \log(1 + N_i) + d^\top z_i`."""
    return np.sum(prior_design(counts, covariates, unrated_popularity) * prior, -1)


def offset_prior_terms(
    sums: np.ndarray,
    counts: np.ndarray,
    noise_std: float,
    covariates: np.ndarray | None = None,
) -> np.ndarray:
    r"""``[n, p, p + 1]``: each item's terms :math:`\omega_i x_i (x_i^\top, y_i)` of
    :func:`offset_prior`'s weighted least squares, :math:`x_i` its regressors
    (:func:`prior_design`), :math:`y_i = \text{sum}_i / N_i` its raw mean and
    :math:`\omega_i = N_i^2 / (N_i + \sigma^2)` its precision (for unit variance per
    rating and noise of std :math:`\sigma` on the sum); zero where :math:`N_i \le 0`."""
    positive = np.maximum(counts, 0.0)
    known = positive > 0
    mean = np.divide(sums, positive, out=np.zeros(len(sums)), where=known)
    weight = np.divide(positive**2, positive + noise_std**2, out=np.zeros(len(sums)), where=known)
    design = prior_design(counts, covariates)
    targets = np.concatenate([design, mean[:, None]], -1)
    return weight[:, None, None] * design[:, :, None] * targets[:, None, :]


def offset_prior(terms: np.ndarray) -> np.ndarray:
    r"""``[..., p]``: the prior's coefficients :math:`\beta = (\sum_i \omega_i x_i
    x_i^\top)^+ \sum_i \omega_i x_i y_i`, the weighted least-squares fit of the items' raw
    means on their regressors, from their summed :func:`offset_prior_terms` ``[..., p, p +
    1]``: where items of every popularity are rated alike, :math:`c \approx 0` and the
    prior is their mean offset; where rarely rated items are rated lower (MovieLens), it
    says so. The pseudo-inverse gives the least-norm fit where the regressors do not vary
    (the weighted mean, where no count does), and zero without any positive count."""
    gram, moments = terms[..., :-1], terms[..., -1:]
    return (np.linalg.pinv(gram, rtol=1e-9, hermitian=True) @ moments)[..., 0]


def mean_popularity(terms: np.ndarray) -> np.ndarray:
    r"""``[...]``: the rated items' mean popularity :math:`\sum_i \omega_i \log(1 + N_i) /
    \sum_i \omega_i` from their summed :func:`offset_prior_terms`, the popularity an item
    without a positive count is given when its count says it is new rather than rare
    (zero without any positive count)."""
    weight, popularity = terms[..., 0, 0], terms[..., 0, 1]
    return np.divide(popularity, weight, out=np.zeros(np.shape(weight)), where=weight > 0)


def text_components(text: np.ndarray, count: int) -> np.ndarray:
    r"""``[n, count]``: the items' coordinates :math:`z_i` on the top ``count`` principal
    components of their text vectors (centred), public regressors of :func:`offset_prior`."""
    centred = text.astype(np.float64) - text.mean(0, dtype=np.float64)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:count].T


def offset_denominators(
    counts: np.ndarray, shrinkage: float, noise_shrinkage: float = 0.0
) -> np.ndarray:
    r""":math:`d_i = N_i + \lambda + \lambda_\sigma / N_i`, :math:`N_i = \max(\text{count}_i,
    0)`: the offsets' shrinkage :math:`\lambda` plus :math:`\lambda_\sigma / N_i`, which grows
    as an item's count falls toward its noise (infinite, an offset of zero, at
    :math:`N_i = 0` when :math:`\lambda_\sigma > 0`)."""
    counts = np.maximum(counts, 0.0)
    if not noise_shrinkage:
        return counts + shrinkage
    noisy = np.divide(noise_shrinkage, counts, out=np.full(counts.shape, np.inf), where=counts > 0)
    return counts + shrinkage + noisy


def residual_rows(
    interactions: Interactions,
    num_users: int,
    num_items: int,
    user_mean: np.ndarray,
    item_offset: np.ndarray,
) -> sp.csr_matrix:
    """Rows of residuals ``r_ui - m_u - b_i`` on the users' rated items."""
    residual = interactions.rating - user_mean[interactions.user] - item_offset[interactions.item]
    return user_rows(interactions, num_users, num_items, residual)


def covariance_similarity(
    covariance: np.ndarray,
    co_counts: np.ndarray | None,
    shrinkage: float,
    diagonal_floor: float,
) -> np.ndarray:
    """Cosine similarity of the (released) residual covariance (:func:`cosine_block` of the
    whole matrix), zero diagonal."""
    variances = np.diag(covariance)
    similarity = cosine_block(
        covariance, variances, variances, co_counts, shrinkage, diagonal_floor
    )
    np.fill_diagonal(similarity, 0.0)
    return similarity


def cosine_block(
    covariance: np.ndarray,
    row_variances: np.ndarray,
    column_variances: np.ndarray,
    co_counts: np.ndarray | None,
    shrinkage: float,
    diagonal_floor: float,
) -> np.ndarray:
    """``C_ij / sqrt(C_ii C_jj)`` of a block of a covariance, given the variances of its
    rows and columns, each clamped to ``diagonal_floor`` (noisy variances can be tiny or
    negative); with (released) co-rating weights ``n_ij`` of the same block, each entry
    shrunk by ``n_ij / (n_ij + shrinkage)``."""
    row_scale = np.sqrt(np.maximum(row_variances, diagonal_floor))
    column_scale = np.sqrt(np.maximum(column_variances, diagonal_floor))
    similarity = covariance / row_scale[:, None] / column_scale[None, :]
    if co_counts is not None:
        positive = np.maximum(co_counts, 0.0)
        similarity *= positive / (positive + shrinkage)
    return similarity


def neighbourhood_residuals(
    similarity: Matrix,
    residuals: sp.csr_matrix,
    users: np.ndarray,
    items: np.ndarray,
    neighbours: int,
    damping: float,
    mean_shifts: np.ndarray | None = None,
) -> np.ndarray:
    """Predicted residual of each ``(users[j], items[j])``: the similarity-weighted mean
    of the user's own residuals on the ``neighbours`` rated items most similar (in
    absolute value) to the item (:func:`neighbour_mean`), each shifted by
    ``mean_shifts[j]`` where given (a user's mean without the pair's own rating)."""
    predicted = np.zeros(len(users))
    for user in np.unique(users):
        pairs = np.flatnonzero(users == user)
        start, end = residuals.indptr[user], residuals.indptr[user + 1]
        rated, values = residuals.indices[start:end], residuals.data[start:end]
        weights = similarity[items[pairs]][:, rated]
        weights = weights.toarray() if sp.issparse(weights) else weights
        if mean_shifts is not None:
            values = values[None, :] + mean_shifts[pairs, None]
        predicted[pairs] = neighbour_mean(weights, values, neighbours, damping)
    return predicted


def neighbour_mean(
    weights: np.ndarray, values: np.ndarray, neighbours: int, damping: float
) -> np.ndarray:
    """``[P]``: for each row of ``weights`` ``[P, R]`` (one item against the user's ``R``
    rated items), the weighted mean of ``values`` (``[R]``, or ``[P, R]``) over the
    ``neighbours`` largest weights in absolute value, shrunk by ``w / (w + damping)`` with
    ``w`` the sum of absolute weights kept."""
    if weights.shape[1] == 0:
        return np.zeros(len(weights))
    if neighbours < weights.shape[1]:
        cut = -np.partition(-np.abs(weights), neighbours - 1, axis=1)[:, neighbours - 1]
        weights = np.where(np.abs(weights) >= cut[:, None], weights, 0.0)
    total = np.abs(weights).sum(axis=1)
    return (weights * values).sum(axis=1) / (total + damping)
