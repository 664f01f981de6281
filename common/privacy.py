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

**Accounting** (``common.accounting``). Every release whose result can reach
the server is composed over all rounds a site ever trained in: the site's
:class:`LedgerEntry` list, kept on the site's disk. A round trained with
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
from common.distributed_noise import IntegerCode
from common.errors import InputError
from common.protocol import (
    DECLINED,
    ITEM_COUNTS,
    ITEM_SIDE,
    NUM_EXAMPLES,
    SECURE_SUM_SHARE,
    SITE_ID,
    TRAIN_LOSS,
)

PRIVACY_UNIT = "one user with all their interactions at one site"
NEIGHBOURING_RELATION = "add or remove one user (with all their interactions) at one site"


@dataclass(frozen=True)
class Mechanism:
    """What a site's DP-SGD releases, fixed by public configuration alone.

    Attributes:
        noise_multiplier: :math:`\\sigma` of what the server sees: every step's
            noised sum, or the secure sum (0 with ``dp = false``).
        noise_share: :math:`\\sigma` the site adds itself: :math:`\\sigma /
            \\sqrt T` under secure aggregation, else :math:`\\sigma`.
        sample_rate: :math:`q`.
        steps_per_round: DP-SGD steps per round (1 under secure aggregation).
        steps_planned: steps over the whole run, if the site trains every round.
        clip_norm: :math:`C`.
        delta: :math:`\\delta`.
        accountant: ``"prv"`` or ``"rdp"``.
        code: the integer code of the secure sum (secure aggregation only).
    """

    noise_multiplier: float
    noise_share: float
    sample_rate: float
    steps_per_round: int
    steps_planned: int
    clip_norm: float
    delta: float
    accountant: str
    code: IntegerCode | None = None

    @property
    def noisy(self) -> bool:
        return self.noise_multiplier > 0

    def event(self, steps: int) -> Event:
        """``steps`` steps as the server sees them (through the secure sum, if any)."""
        if self.code is None:
            return Event(self.noise_multiplier, self.sample_rate, steps)
        return Event(
            self.code.accounted_noise_multiplier,
            self.sample_rate,
            steps,
            discrete=True,
            tau=self.code.tau,
            dimension=self.code.padded,
        )

    def single_message_event(self, steps: int) -> Event:
        """``steps`` steps as one site's message alone shows them (its own noise share)."""
        if self.code is None:
            return Event(self.noise_share, self.sample_rate, steps)
        z = self.code.share_std / self.code.sensitivity
        return Event(z, self.sample_rate, steps, discrete=True, dimension=self.code.padded)


def site_mechanism(config: RunConfig, dimension: int) -> Mechanism:
    """The mechanism of every site under ``config``; ``dimension`` is the number of
    item-side parameters (it sizes the secure sum's integer code)."""
    steps = config.num_server_rounds * config.steps_per_round
    common = {
        "sample_rate": config.sampling_probability,
        "steps_per_round": config.steps_per_round,
        "steps_planned": steps,
        "clip_norm": config.clip_norm,
        "delta": config.delta,
        "accountant": config.accountant,
    }
    if not config.dp:
        return Mechanism(noise_multiplier=0.0, noise_share=0.0, **common)
    if not config.secure_aggregation:
        sigma = config.noise_multiplier
        if config.target_epsilon is not None:
            sigma = _planned(config, Event(0.0, config.sampling_probability, steps))
        return Mechanism(noise_multiplier=sigma, noise_share=sigma, **common)

    def code(sigma: float) -> IntegerCode:
        return IntegerCode(
            dimension, config.clip_norm, config.secagg_bits, sigma, config.secagg_min_sites
        )

    sigma = config.noise_multiplier
    if config.target_epsilon is not None:
        unit = code(1.0)  # the rounding's share of the sensitivity does not depend on sigma
        z = _planned(
            config,
            Event(0.0, config.sampling_probability, steps, discrete=True, dimension=unit.padded),
        )
        sigma = z / unit.accounted_noise_multiplier
    share = sigma / math.sqrt(config.secagg_min_sites)
    return Mechanism(noise_multiplier=sigma, noise_share=share, code=code(sigma), **common)


MAX_NOISE_MULTIPLIER = 100.0
"""Beyond this sigma the noise swamps any gradient: a target that needs more cannot work."""


def _planned(config: RunConfig, planned: Event) -> float:
    """The noise multiplier that meets ``target-epsilon`` over the run, or an InputError that
    says which settings cannot work and what to change."""
    target = config.target_epsilon
    try:
        sigma = noise_multiplier_for(target, config.delta, config.accountant, planned)
    except ValueError:
        sigma = math.inf
    if sigma > MAX_NOISE_MULTIPLIER:
        raise InputError(
            f"target-epsilon: {target} at delta {config.delta:g} over {planned.steps} steps "
            f"({config.num_server_rounds} rounds of {config.steps_per_round} at sample-rate "
            f"{config.sampling_probability:g}) needs noise-multiplier > {MAX_NOISE_MULTIPLIER:g}, "
            "which leaves nothing to learn; raise target-epsilon, or lower num-server-rounds, "
            "local-epochs or sample-rate"
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
        return cls(**{f.name: given[f.name] for f in fields(cls)})

    def metrics(self) -> dict[str, float]:
        """What the site reports of this entry to the server (see :data:`LEDGER_METRICS`)."""
        values = self.as_dict()
        return {k: float(values[k]) for k in LEDGER_METRICS} | {DECLINED: float(not self.trained)}

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
    mechanism: Mechanism, earlier: list[LedgerEntry], run: str, server_round: int, trained: bool
) -> LedgerEntry:
    """The entry of round ``server_round`` after the site's ``earlier`` entries: its
    mechanism and the epsilons of the whole ledger with it (infinite once any round,
    this one included, trained without noise)."""
    steps = mechanism.steps_per_round if trained else 0
    event, single = mechanism.event(steps), mechanism.single_message_event(steps)
    entry = LedgerEntry(
        run=run,
        round=server_round,
        trained=trained,
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate,
        steps=steps,
        clip_norm=mechanism.clip_norm,
        delta=mechanism.delta,
        accountant=mechanism.accountant,
        epsilon=math.inf,
        independent_epsilon=math.inf,
        noise_share=mechanism.noise_share,
        single_message_epsilon=math.inf,
        discrete=event.discrete,
        accounted_noise_multiplier=event.noise_multiplier,
        single_message_noise_multiplier=single.noise_multiplier,
        tau=event.tau,
        dimension=event.dimension,
        run_epsilon=math.inf,
        earlier_epsilon=math.inf,
    )
    entries = [*earlier, entry]
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
    names = [f"{part}-{name}" for part in ("val", "test") for name in base]
    if config.cold_item_fraction > 0:
        names += [f"cold-{name}" for name in base]
        if config.item_text:
            names += [f"cold-{name}-without-text" for name in base]
    return tuple(names)


def released_quantities(config: RunConfig) -> list[Release]:
    """Every value a site sends under ``config``, with its privacy status."""
    identity = "the site's public identity"
    releases = [
        Release("metrics", SITE_ID, "train", True, identity),
        Release("metrics", SITE_ID, "evaluate", True, identity),
    ]
    if not config.dp:
        releases += [
            Release("arrays", ITEM_SIDE, "train", False, "dp = false: trained without noise"),
            Release(
                "arrays",
                ITEM_COUNTS,
                "train",
                False,
                "dp = false: exact per-item interaction counts, for count-weighted averaging",
            ),
            Release("metrics", NUM_EXAMPLES, "train", False, "dp = false: exact user count"),
            Release("metrics", TRAIN_LOSS, "train", False, "dp = false: exact training loss"),
            Release("metrics", NUM_EXAMPLES, "evaluate", False, "dp = false: exact user count"),
        ]
    elif config.secure_aggregation:
        releases += [
            Release(
                "secagg",
                SECURE_SUM_SHARE,
                "train",
                True,
                "integers masked by SecAgg+: the server learns only the sum over at least "
                "secagg-min-sites sites, whose discrete Gaussian noise has standard deviation "
                "noise-multiplier x clip-norm (epsilon); the site's own share carries noise "
                "noise-multiplier / sqrt(secagg-min-sites) (single-message-epsilon)",
            ),
            Release("metrics", NUM_EXAMPLES, "train", True, "the constant public weight 1"),
            Release("metrics", NUM_EXAMPLES, "evaluate", True, "the constant 1"),
        ]
    else:
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
    if config.dp:
        public = "a function of public configuration and of the rounds the site trained in"
        releases += [
            *(
                Release("metrics", key, "train", True, public)
                for key in (
                    "epsilon",
                    "independent-epsilon",
                    "single-message-epsilon",
                    "run-epsilon",
                    "earlier-epsilon",
                )
            ),
            Release("metrics", "delta", "train", True, "public configuration"),
            Release("metrics", "noise-multiplier", "train", True, "planned from public keys"),
            Release("metrics", "steps", "train", True, "public configuration (1/q per epoch)"),
            Release(
                "metrics",
                DECLINED,
                "train",
                True,
                "whether the next round would exceed max-epsilon: a function of the values above",
            ),
        ]
    releases += [
        Release(
            "metrics",
            name,
            "evaluate",
            False,
            "computed on the site's private validation/test interactions without noise",
        )
        for name in metric_names(config)
    ]
    return releases


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
