r"""The privacy contract, stated once: unit, mechanism, ledger, releases, assumptions.

**Privacy unit.** One user together with all of that user's interactions at one
site. Neighbouring datasets differ by adding or removing one user (and all
their interactions) at that site.

**Mechanism** (:func:`site_mechanism`). Each site runs DP-SGD (Opacus) over
its own users: at every step each user is included independently with
probability :math:`q` (``sample-rate``); the gradient of each included user's
loss is clipped to norm :math:`C` (``clip-norm``); Gaussian noise
:math:`\mathcal N(0, \sigma^2 C^2 I)` is added to the sum. A user's gradient
depends only on that user's data and on parameters the server has already
released (``common.model``), so clipping bounds the user's influence.

- Without secure aggregation every site adds all of :math:`\sigma` itself and
  releases its item side after ``local-epochs / q`` steps.
- With secure aggregation (``secure-aggregation = true``) every round is one
  step whose noised sum the site encodes as integers with its share
  :math:`\sigma / \sqrt T` of the noise, :math:`T` = ``secagg-min-sites``, as a
  distributed discrete Gaussian (``common.distributed_noise``); SecAgg+ releases
  only the sum over at least :math:`T` sites, which carries all of
  :math:`\sigma`.

Everything the mechanism uses is public configuration: :math:`q`, :math:`C`,
the steps, :math:`\sigma` (``noise-multiplier``, or planned from
``target-epsilon`` over every step of the run) and :math:`\delta` (a number,
or ``"auto"``: the largest power of ten at most :math:`1/(10 n)` for the
public bound :math:`n` = ``max-users-per-site``). None of it depends on how
many users a site has, so the guarantee holds under add/remove-one-user, and
the epsilon, delta and sigma a site reports reveal nothing about its data.

**Evaluation** (``evaluation``). Under DP a site releases its held-out metrics
only as per-user sums with Gaussian noise (``"dp"``, the default;
``common.metric_release``), one Gaussian release per evaluation round, or sends
none (``"off"``); ``"exact"`` sends exact metrics, which the guarantee does not
cover and the report says so first.

**Accounting** (``common.accounting``). Every release whose result can reach
the server (statistics rounds, DP-SGD steps, metric releases) is composed over
all rounds a site ever took part in: the site's :class:`LedgerEntry` list,
kept on the site's disk. A round trained with
``dp = false`` makes every later epsilon infinite. Releasing the item-side
parameters after every round, and anything computed from them, is
post-processing.

**Releases** (:func:`released_quantities`). Every value a site sends, each
marked covered by the guarantee or not; the site refuses to send a key that is
not listed. **Assumptions** (:func:`assumptions`): what the guarantee rests on,
as the privacy report states it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

from common.accounting import Event, epsilon, independent_epsilon, noise_multiplier_for
from common.config import RunConfig
from common.distributed_noise import ROUNDING_INFLATION, IntegerCode
from common.errors import InputError
from common.graph.filters import split_noise_multiplier
from common.metric_release import evaluation_parts, sum_names
from common.metric_release import sensitivity as evaluation_sensitivity
from common.protocol import (
    DECLINED,
    ITEM_COUNTS,
    ITEM_SIDE,
    NUM_EXAMPLES,
    SECURE_SUM_SHARE,
    SITE_ID,
    STATISTICS,
    STATISTICS_COLUMNS,
    STATISTICS_ROWS,
    TRAIN_LOSS,
)

PRIVACY_UNIT = "one user with all their interactions at one site"
NEIGHBOURING_RELATION = "add or remove one user (with all their interactions) at one site"


@dataclass(frozen=True)
class RoundRelease:
    """What a site releases about its users in one round, as its ledger records it.

    Attributes:
        name: ``"dp-sgd"``, ``"item-graph statistics <k>"`` or ``"evaluation"``.
        noise_multiplier: the noise of what the server sees, over the sensitivity.
        noise_share: the noise this site adds itself (all of it without secure
            aggregation).
        sample_rate, steps: Poisson rate of users and releases in the round.
        sensitivity: one user's L2 bound (the clip norm for DP-SGD).
        event, single_message_event: the round as the accountant sees it, through
            the server's eyes and as this site's message alone shows it.
    """

    name: str
    noise_multiplier: float
    noise_share: float
    sample_rate: float
    steps: int
    sensitivity: float
    event: Event
    single_message_event: Event


@dataclass(frozen=True)
class Mechanism:
    r"""Everything a site releases about its users, fixed by public configuration alone.

    Attributes:
        noise_multiplier: :math:`\sigma` of each DP-SGD step the server sees: every
            step's noised sum, or the secure sum (0 with ``dp = false``).
        noise_share: :math:`\sigma` the site adds itself: :math:`\sigma /
            \sqrt T` under secure aggregation, else :math:`\sigma`.
        sample_rate: :math:`q`.
        steps_per_round: DP-SGD steps per training round (1 under secure
            aggregation).
        steps_planned: DP-SGD steps over the whole run, if the site trains every round.
        clip_norm: :math:`C`.
        delta: :math:`\delta`.
        accountant: ``"prv"`` or ``"rdp"``.
        statistics_noise: the noise multiplier of each item-graph statistics round
            (``common.graph.release``; empty without an item graph).
        dimension: the item side's size, the length of a DP-SGD secure share.
        secure_sum: ``(secagg-bits, secagg-min-sites)`` under secure aggregation.
        evaluation_noise, evaluation_sensitivity: the noise multiplier and the
            sensitivity of each release of metric sums (``evaluation = "dp"``;
            noise 0 otherwise).
    """

    noise_multiplier: float
    noise_share: float
    sample_rate: float
    steps_per_round: int
    steps_planned: int
    clip_norm: float
    delta: float
    accountant: str
    statistics_noise: tuple[float, ...] = ()
    dimension: int = 0
    secure_sum: tuple[int, int] | None = None
    evaluation_noise: float = 0.0
    evaluation_sensitivity: float = 0.0

    @property
    def noisy(self) -> bool:
        return self.noise_multiplier > 0 or any(z > 0 for z in self.statistics_noise)

    def evaluation(self) -> RoundRelease:
        """One release of a site's metric sums (``common.metric_release``): a Gaussian
        release over every user, outside any secure sum."""
        return self._release(
            "evaluation", self.evaluation_noise, 1.0, 1, self.evaluation_sensitivity, None
        )

    def integer_code(self, dimension: int, sensitivity: float, noise: float) -> IntegerCode:
        """The secure sum's integer code for a vector of ``dimension`` values."""
        bits, sites = self.secure_sum
        return IntegerCode(dimension, sensitivity, bits, noise, sites)

    @property
    def code(self) -> IntegerCode | None:
        """The integer code of a DP-SGD secure share (secure aggregation only)."""
        if self.secure_sum is None:
            return None
        return self.integer_code(self.dimension, self.clip_norm, self.noise_multiplier)

    def training(self) -> RoundRelease:
        """A DP-SGD round."""
        return self._release(
            "dp-sgd",
            self.noise_multiplier,
            self.sample_rate,
            self.steps_per_round,
            self.clip_norm,
            self.code,
        )

    def statistics(self, server_round: int, dimension: int, sensitivity: float) -> RoundRelease:
        """Item-graph statistics round ``server_round``: one release of a vector of
        ``dimension`` values with sensitivity ``sensitivity``."""
        noise = self.statistics_noise[server_round - 1]
        code = self.statistics_code(server_round, dimension, sensitivity)
        return self._release(
            f"item-graph statistics {server_round}", noise, 1.0, 1, sensitivity, code
        )

    def statistics_code(
        self, server_round: int, dimension: int, sensitivity: float
    ) -> IntegerCode | None:
        """The integer code of statistics round ``server_round``'s secure sum (secure
        aggregation only)."""
        if self.secure_sum is None:
            return None
        noise = self.statistics_noise[server_round - 1]
        return self.integer_code(dimension, sensitivity, noise)

    def _release(
        self,
        name: str,
        noise: float,
        rate: float,
        steps: int,
        sensitivity: float,
        code: IntegerCode | None,
    ) -> RoundRelease:
        if code is None:
            events = (Event(noise, rate, steps), Event(noise, rate, steps))
            share = noise
        else:
            single = code.share_std / code.sensitivity
            events = (
                Event(code.accounted_noise_multiplier, rate, steps, True, code.tau, code.padded),
                Event(single, rate, steps, True, 0.0, code.padded),
            )
            share = noise / math.sqrt(code.min_sites)
        return RoundRelease(name, noise, share, rate, steps, sensitivity, *events)


def site_mechanism(config: RunConfig, dimension: int) -> Mechanism:
    """The mechanism of every site under ``config``; ``dimension`` is the number of
    item-side parameters (it sizes the DP-SGD secure share).

    The metric releases of ``evaluation = "dp"`` (one per evaluation round) have the
    fixed noise ``evaluation-noise-multiplier``. With ``target-epsilon`` the rest of
    the budget is planned over the whole run, after them: the item graph's
    statistics rounds (everything up to the target with ``item-graph = "filter"``,
    else up to ``item-graph-budget-share`` of it, split between the two rounds by
    ``item-graph-degree-share`` of :math:`1/z^2`, so that together they cost what
    one Gaussian release of noise :math:`z` costs), then the DP-SGD steps, whose
    noise is planned so that everything composes to the target in one
    accountant. Without it every other release uses ``noise-multiplier``.
    """
    steps = config.training_rounds * config.steps_per_round
    secure = config.secure_aggregation
    shares = (config.first_statistics_share, 1.0 - config.first_statistics_share)
    shares = shares[: config.statistics_rounds]
    common = {
        "sample_rate": config.sampling_probability,
        "steps_per_round": config.steps_per_round,
        "steps_planned": steps,
        "clip_norm": config.clip_norm,
        "delta": config.delta,
        "accountant": config.accountant,
        "dimension": dimension,
        "secure_sum": (config.secagg_bits, config.secagg_min_sites) if secure else None,
    }
    if not config.dp:
        return Mechanism(0.0, 0.0, statistics_noise=tuple(0.0 for _ in shares), **common)
    if config.evaluation == "dp":
        common |= {
            "evaluation_noise": config.evaluation_noise_multiplier,
            "evaluation_sensitivity": evaluation_sensitivity(config),
        }
    sigma = statistics = config.noise_multiplier
    if config.target_epsilon is not None:
        # plan on the accountant's scale; the integer code's rounding costs ROUNDING_INFLATION
        before = evaluation_events(config)
        if shares:
            share = 1.0 if not steps else config.graph_budget_share
            planned = Event(0.0, 1.0, 1, discrete=secure)
            statistics = _planned(config, planned, config.target_epsilon * share, before)
            before += [
                Event(z, 1.0, 1, discrete=secure)
                for z in split_noise_multiplier(statistics, shares)
            ]
        if steps:
            planned = Event(0.0, config.sampling_probability, steps, discrete=secure)
            sigma = _planned(config, planned, config.target_epsilon, before)
        if secure:
            sigma, statistics = sigma * ROUNDING_INFLATION, statistics * ROUNDING_INFLATION
    share = sigma / math.sqrt(config.secagg_min_sites) if secure else sigma
    return Mechanism(
        sigma,
        share,
        statistics_noise=tuple(split_noise_multiplier(statistics, list(shares)) if shares else ()),
        **common,
    )


def evaluation_events(config: RunConfig) -> list[Event]:
    """The metric releases a run plans (``evaluation = "dp"``): one Gaussian release of
    noise ``evaluation-noise-multiplier`` over every user per evaluation round."""
    rounds = len(config.metric_release_rounds)
    if not config.dp or config.evaluation != "dp" or not rounds:
        return []
    return [Event(config.evaluation_noise_multiplier, 1.0, rounds)]


MAX_NOISE_MULTIPLIER = 100.0
"""Beyond this sigma the noise swamps any gradient: a target that needs more cannot work."""


def _planned(
    config: RunConfig, planned: Event, target: float, before: list[Event] | None = None
) -> float:
    """The noise multiplier of ``planned`` that meets ``target`` after ``before``, or an
    InputError that says which settings cannot work and what to change."""
    try:
        sigma = noise_multiplier_for(target, config.delta, config.accountant, planned, before or ())
    except ValueError:
        sigma = math.inf
    if sigma > MAX_NOISE_MULTIPLIER:
        what = (
            f"{planned.steps} DP-SGD steps ({config.training_rounds} rounds of "
            f"{config.steps_per_round} at sample-rate {config.sampling_probability:g})"
            if planned.sample_rate < 1
            else "the item graph's statistics"
        )
        evaluations = (
            f" after {len(config.metric_release_rounds)} metric releases at "
            f"evaluation-noise-multiplier = {config.evaluation_noise_multiplier:g}"
            if config.evaluation == "dp"
            else ""
        )
        raise InputError(
            f"target-epsilon: {target:g} at delta {config.delta:g} for {what}{evaluations} "
            f"needs noise-multiplier > {MAX_NOISE_MULTIPLIER:g}, which leaves nothing to "
            "learn; raise target-epsilon or evaluation-noise-multiplier, or lower "
            "num-server-rounds, local-epochs, sample-rate or the evaluations (evaluate-every, "
            'evaluation = "off")'
        )
    return sigma


@dataclass(frozen=True)
class LedgerEntry:
    """One round at one site, as its ledger records it.

    Attributes:
        run: name of the run (its run directory).
        round: the server round.
        trained: False when the site declined to train (``max-epsilon``).
        noise_multiplier, noise_share, sample_rate, steps, clip_norm, delta,
            accountant: the mechanism of the round (:class:`Mechanism`;
            ``steps`` is 0 when the site declined).
        epsilon: epsilon of everything in the ledger up to this entry.
        independent_epsilon: its recomputation by ``dp-accounting``.
        single_message_epsilon: epsilon against a party that sees this site's
            messages alone (its own noise share); equal to ``epsilon``
            without secure aggregation.
        run_epsilon, earlier_epsilon: epsilon of this run's entries alone and of
            the entries of earlier runs alone (``epsilon`` composes both), so a
            report can say how much of the total this run spent.
        release: what the round released: ``"dp-sgd"`` or ``"item-graph
            statistics <k>"`` (``clip_norm`` is then that release's sensitivity).
        discrete, accounted_noise_multiplier, single_message_noise_multiplier,
            tau, dimension: the accountant's view of the round
            (``common.accounting.Event``), for both epsilons.
    """

    run: str
    round: int
    trained: bool
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    epsilon: float
    independent_epsilon: float
    noise_share: float
    single_message_epsilon: float
    discrete: bool
    accounted_noise_multiplier: float
    single_message_noise_multiplier: float
    tau: float
    dimension: int
    run_epsilon: float
    earlier_epsilon: float
    release: str

    def as_dict(self) -> dict[str, object]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> LedgerEntry:
        """Read an entry; entries written before the accountant's fields existed were
        continuous Gaussian rounds and read as such."""
        given = {k.replace("-", "_"): v for k, v in values.items()}
        given.setdefault("discrete", False)
        given.setdefault("accounted_noise_multiplier", given["noise_multiplier"])
        given.setdefault("single_message_noise_multiplier", given["noise_share"])
        given.setdefault("tau", 0.0)
        given.setdefault("dimension", 0)
        given.setdefault("run_epsilon", math.nan)
        given.setdefault("earlier_epsilon", math.nan)
        given.setdefault("release", "dp-sgd")
        return cls(**{f.name: given[f.name] for f in fields(cls)})

    def metrics(self) -> dict[str, float]:
        """What the site reports of this entry to the server (see :data:`LEDGER_METRICS`)."""
        values = self.as_dict()
        return {k: float(values[k]) for k in LEDGER_METRICS} | {DECLINED: float(not self.trained)}

    def same_release(self, other: LedgerEntry) -> bool:
        """Whether both record one release: the same run, round and release (every
        simulated site of a round records it in the dataset's shared ledger)."""
        return (self.run, self.round, self.release) == (other.run, other.round, other.release)

    @property
    def without_noise(self) -> bool:
        """A round trained with ``dp = false``: no bound on what it revealed."""
        return self.trained and self.noise_multiplier == 0

    def event(self, single_message: bool = False) -> Event:
        """The round as the accountant sees it: through the server's eyes, or (with
        ``single_message``) as this site's messages alone show it."""
        return Event(
            self.single_message_noise_multiplier
            if single_message
            else self.accounted_noise_multiplier,
            self.sample_rate,
            self.steps,
            discrete=self.discrete,
            tau=0.0 if single_message else self.tau,
            dimension=self.dimension,
        )


LEDGER_METRICS = (
    "epsilon",
    "independent-epsilon",
    "single-message-epsilon",
    "run-epsilon",
    "earlier-epsilon",
    "delta",
    "noise-multiplier",
    "steps",
)
"""What a site reports of each round's ledger entry (with ``declined``)."""


def ledger_events(entries: Iterable[LedgerEntry], single_message: bool = False) -> list[Event]:
    """The accountant's events of every round a site trained in with DP."""
    return [e.event(single_message) for e in entries if e.trained and not e.without_noise]


def ledger_entry(
    mechanism: Mechanism,
    release: RoundRelease,
    earlier: list[LedgerEntry],
    run: str,
    server_round: int,
    trained: bool,
) -> LedgerEntry:
    r"""The entry of round ``server_round``, which ``release``\ s (or declines to), after the
    site's ``earlier`` entries: its mechanism and the epsilons of the whole ledger with it
    (infinite once any round, this one included, trained without noise). An earlier entry
    of the same release (:meth:`LedgerEntry.same_release`) is this one, not counted twice."""
    steps = release.steps if trained else 0
    entry = LedgerEntry(
        run=run,
        round=server_round,
        trained=trained,
        noise_multiplier=release.noise_multiplier,
        sample_rate=release.sample_rate,
        steps=steps,
        clip_norm=release.sensitivity,
        delta=mechanism.delta,
        accountant=mechanism.accountant,
        epsilon=math.inf,
        independent_epsilon=math.inf,
        noise_share=release.noise_share,
        single_message_epsilon=math.inf,
        discrete=release.event.discrete,
        accounted_noise_multiplier=release.event.noise_multiplier,
        single_message_noise_multiplier=release.single_message_event.noise_multiplier,
        tau=release.event.tau,
        dimension=release.event.dimension,
        run_epsilon=math.inf,
        earlier_epsilon=math.inf,
        release=release.name,
    )
    entries = [*(e for e in earlier if not e.same_release(entry)), entry]
    if any(e.without_noise for e in entries):
        return entry
    events, singles = ledger_events(entries), ledger_events(entries, single_message=True)
    delta, kind = mechanism.delta, mechanism.accountant
    this_run = ledger_events(e for e in entries if e.run == run)
    before = ledger_events(e for e in entries if e.run != run)
    return LedgerEntry(
        **{
            **asdict(entry),
            "epsilon": epsilon(events, delta, kind),
            "independent_epsilon": independent_epsilon(events, delta, kind),
            "single_message_epsilon": epsilon(singles, delta, kind),
            "run_epsilon": epsilon(this_run, delta, kind),
            "earlier_epsilon": epsilon(before, delta, kind),
        }
    )


@dataclass(frozen=True)
class Release:
    """One value a site sends to the server.

    Attributes:
        record: ``"arrays"``, ``"metrics"`` or ``"secagg"`` (inside SecAgg+).
        key: the key in that record; ``"<item-side parameters>"`` stands for
            every shared parameter of the model.
        message: ``"train"`` or ``"evaluate"`` reply.
        covered: whether the (epsilon, delta) guarantee covers it.
        why: the reason, in words a privacy officer can check.
    """

    record: str
    key: str
    message: str
    covered: bool
    why: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def metric_names(config: RunConfig) -> tuple[str, ...]:
    """Names of the evaluation metrics of the task, e.g. ``val-rmse``, ``test-ndcg@20``,
    and with cold-start items ``cold-rmse`` (and ``cold-rmse-without-text``)."""
    base = (
        ("rmse", "mae")
        if config.task == "rating"
        else (f"recall@{config.top_k}", f"ndcg@{config.top_k}")
    )
    return tuple(
        f"{prefix}{name}{suffix}" for prefix, suffix in evaluation_parts(config) for name in base
    )


def released_quantities(config: RunConfig) -> list[Release]:
    """Every value a site sends under ``config``, with its privacy status."""
    identity = "the site's public identity"
    releases = [Release("metrics", SITE_ID, "train", True, identity)]
    trains = config.training_rounds > 0
    if not config.dp:
        releases += [
            Release("metrics", NUM_EXAMPLES, "train", False, "dp = false: exact user count"),
        ]
        releases += [
            Release("arrays", ITEM_SIDE, "train", False, "dp = false: trained without noise"),
            Release(
                "arrays",
                ITEM_COUNTS,
                "train",
                False,
                "dp = false: exact per-item interaction counts, for count-weighted averaging",
            ),
            Release("metrics", TRAIN_LOSS, "train", False, "dp = false: exact training loss"),
        ][: 3 if trains else 0]
    elif config.secure_aggregation:
        releases += [
            Release(
                "secagg",
                SECURE_SUM_SHARE,
                "train",
                True,
                "integers masked by SecAgg+ (one DP-SGD step's clipped gradient sum, or the "
                "item graph's statistics): the server learns only the sum over at least "
                "secagg-min-sites sites, whose discrete Gaussian noise has standard deviation "
                "noise-multiplier x sensitivity (epsilon); the site's own share carries noise "
                "noise-multiplier / sqrt(secagg-min-sites) (single-message-epsilon)",
            ),
            Release("metrics", NUM_EXAMPLES, "train", True, "the constant public weight 1"),
        ]
    elif trains:
        releases.append(
            Release(
                "arrays",
                ITEM_SIDE,
                "train",
                True,
                "result of DP-SGD over the site's users (noised sums of clipped per-user "
                "gradients, then post-processing)",
            )
        )
    if config.item_graph != "none" and not config.secure_aggregation:
        statistics = (
            [STATISTICS] if config.dp else [STATISTICS, STATISTICS_ROWS, STATISTICS_COLUMNS]
        )
        releases += [
            Release(
                "arrays",
                key,
                "train",
                config.dp,
                "the item graph's statistics (sums over the site's users, each user bounded) "
                "with the site's Gaussian noise"
                if config.dp
                else "dp = false: the item graph's exact statistics",
            )
            for key in statistics
        ]
    if config.dp:
        releases += _ledger_releases("train")
    return releases + _evaluation_releases(config)


def _ledger_releases(message: str) -> list[Release]:
    """The ledger values a site reports with a ``message`` reply under DP."""
    public = "a function of public configuration and of the releases the site made"
    return [
        *(
            Release("metrics", key, message, True, public)
            for key in (
                "epsilon",
                "independent-epsilon",
                "single-message-epsilon",
                "run-epsilon",
                "earlier-epsilon",
            )
        ),
        Release("metrics", "delta", message, True, "public configuration"),
        Release("metrics", "noise-multiplier", message, True, "planned from public keys"),
        Release("metrics", "steps", message, True, "public configuration (1/q per epoch)"),
        Release(
            "metrics",
            DECLINED,
            message,
            True,
            "whether the release would exceed max-epsilon: a function of the values above",
        ),
    ]


def _evaluation_releases(config: RunConfig) -> list[Release]:
    """What an evaluation reply holds (``evaluation``; with ``"off"`` only round 0's
    check-in, the site's id)."""
    releases = [Release("metrics", SITE_ID, "evaluate", True, "the site's public identity")]
    if config.evaluation == "off":
        return releases  # round 0's check-in
    if config.evaluation == "dp":
        why = (
            "sum over the site's users of per-user values, each user bounded "
            "(common.metric_release), with Gaussian noise of evaluation-noise-multiplier x "
            "sensitivity; one release per evaluation round, in the site's epsilon"
        )
        releases += [Release("metrics", name, "evaluate", True, why) for name in sum_names(config)]
        return releases + _ledger_releases("evaluate")
    if not config.dp:
        why = "dp = false: exact user count"
        releases.append(Release("metrics", NUM_EXAMPLES, "evaluate", False, why))
    elif config.secure_aggregation:
        releases.append(Release("metrics", NUM_EXAMPLES, "evaluate", True, "the constant 1"))
    why = (
        'evaluation = "exact": computed on the site\'s private validation/test interactions '
        "without noise"
    )
    return releases + [
        Release("metrics", name, "evaluate", False, why) for name in metric_names(config)
    ]


def undeclared_releases(
    config: RunConfig,
    message: str,
    array_keys: Iterable[str],
    metric_keys: Iterable[str],
    item_side_keys: Iterable[str],
) -> list[str]:
    """Keys of a reply that :func:`released_quantities` does not list (should be empty)."""
    declared = {(r.record, r.key) for r in released_quantities(config) if r.message == message}
    item_side = set(item_side_keys)
    found = [("arrays", ITEM_SIDE if k in item_side else k) for k in array_keys]
    found += [("metrics", k) for k in metric_keys]
    return [f"{record}/{key}" for record, key in found if (record, key) not in declared]


def assumptions(config: RunConfig) -> list[str]:
    """What the guarantee rests on, in words (the privacy report's ``assumptions``)."""
    stated = [
        "The server and anyone watching the network are honest-but-curious: they see every "
        "message a site sends and nothing else of the site.",
        "Each site runs this code unmodified; its training data, user attributes and private "
        "state never leave it.",
        "Sampling rate, steps, clip norm, noise multiplier and delta are public and do not "
        "depend on any site's data; delta is meaningful while every site has at most "
        f"max-users-per-site = {config.max_users_per_site} users.",
        "Noise and Poisson sampling come from generators seeded with operating-system "
        "entropy; Opacus's secure_mode (a cryptographic generator that also resists "
        "floating-point attacks) is not available for current PyTorch.",
        "The guarantee is per site: a person who is a user at several sites is protected by "
        "the composition of those sites' guarantees, which no site can see.",
        "Item ids, item text and the rating scale are public.",
        "Hyper-parameters chosen by looking at private results spend budget that this report "
        "does not charge.",
    ]
    if config.secure_aggregation:
        stated += [
            "Secure aggregation: the server colludes with no site. SecAgg+ releases only sums "
            f"over at least secagg-min-sites = {config.secagg_min_sites} sites, each site "
            "checking the reconstruction threshold of every round before it sends; a server "
            "that also saw c of those sites' shares would face noise sigma * "
            "sqrt((T - c) / T), and one site's message alone is covered by the "
            "single-message epsilon.",
            "Secure aggregation's noise is a distributed discrete Gaussian on integers modulo "
            f"2^{config.secagg_bits} after a public random rotation (Kairouz, Liu and Steinke "
            "2021); its epsilon is their Renyi bound with Zhu and Wang's subsampling bound, "
            "and the sensitivity includes the rounding to integers.",
        ]
    return stated
