"""Accounting, noise planning, the site ledger and the release inventory."""

from __future__ import annotations

import concurrent.futures
import json
import math
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from client.site_state import SiteState
from common.accounting import Event, epsilon, independent_epsilon
from common.config import default_config
from common.data import load_site
from common.errors import InputError
from common.model import item_side_size
from common.privacy import (
    LedgerEntry,
    evaluation_events,
    ledger_entry,
    ledger_events,
    released_quantities,
    site_mechanism,
)


@pytest.mark.parametrize(("bound", "delta"), [(94, 1e-3), (1000, 1e-4), (100_000, 1e-6)])
def test_auto_delta_comes_from_the_public_bound_on_users_per_site(bound, delta):
    assert default_config(item_graph="none", max_users_per_site=bound).delta == pytest.approx(delta)
    assert default_config(item_graph="none", max_users_per_site=bound).delta <= 1 / (10 * bound)
    assert default_config(item_graph="none", delta=1e-7, max_users_per_site=bound).delta == 1e-7


def test_the_mechanism_does_not_depend_on_how_many_users_a_site_has():
    """Sites of 1,000 and 1,001 users plan the same sigma: the review found 1.036 vs 1.146
    when delta came from the private user count."""
    config = default_config(item_graph="none", target_epsilon=4.0, synthetic_users=2001)
    sizes, mechanisms = set(), set()
    for site_id in (0, 1):
        site = load_site(config, site_id, 2)
        sizes.add(site.num_users)
        mechanisms.add(site_mechanism(config, item_side_size(site.catalogue, config)))
    assert len(sizes) == 2 and len(mechanisms) == 1
    assert all(r.covered for r in released_quantities(config) if r.message == "train")


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_target_epsilon_plans_sigma_so_the_whole_run_lands_at_or_under_target(target):
    config = default_config(
        item_graph="none",
        target_epsilon=target,
        num_server_rounds=6,
        local_epochs=2,
        evaluate_every=6,  # one metric release, after the last round
    )
    mechanism = site_mechanism(config, 1000)
    assert mechanism.steps_planned == 6 * 2 * 10
    assert evaluation_events(config) == [Event(10.0, 1.0, 1)]
    events = [whole_run(mechanism), *evaluation_events(config)]
    spent = epsilon(events, config.delta, config.accountant)
    assert 0.97 * target <= spent <= target  # within target, and no budget wasted
    assert epsilon([whole_run(mechanism)], config.delta, config.accountant) < spent


def test_a_target_too_small_for_the_metric_releases_names_them():
    config = default_config(item_graph="none", target_epsilon=1.0, num_server_rounds=6)
    with pytest.raises(InputError, match="after 6 metric releases at evaluation-noise-mult"):
        site_mechanism(config, 1000)
    off = default_config(
        item_graph="none", target_epsilon=1.0, num_server_rounds=6, evaluation="off"
    )
    assert evaluation_events(off) == [] and site_mechanism(off, 1000).evaluation_noise == 0


def whole_run(mechanism) -> Event:
    """Every DP-SGD step of the run as one event."""
    return replace(mechanism.training().event, steps=mechanism.steps_planned)


def test_without_target_the_configured_sigma_is_used():
    assert (
        site_mechanism(
            default_config(item_graph="none", noise_multiplier=1.7), 1000
        ).noise_multiplier
        == 1.7
    )


def test_secure_aggregation_plans_the_discrete_sum_and_shares_its_noise():
    config = default_config(
        item_graph="none", secure_aggregation=True, secagg_min_sites=4, target_epsilon=4.0
    )
    mechanism = site_mechanism(config, 5000)
    spent = epsilon([whole_run(mechanism), *evaluation_events(config)], config.delta, "rdp")
    assert 0.97 * 4.0 <= spent <= 4.0
    assert mechanism.noise_share == pytest.approx(mechanism.noise_multiplier / 2)
    assert mechanism.training().event.discrete and mechanism.code.min_sites == 4


def statistics_events(mechanism, single_message=False) -> list[Event]:
    releases = [mechanism.statistics(r, 1000, 1.0) for r in (1, 2)]
    return [r.single_message_event if single_message else r.event for r in releases]


@pytest.mark.parametrize("secure", [False, True])
def test_the_item_graph_alone_spends_the_whole_target_split_between_its_rounds(secure):
    config = default_config(
        item_graph="filter",
        target_epsilon=8.0,
        item_graph_degree_share=0.1,
        secure_aggregation=secure,
        secagg_min_sites=3,
    )
    mechanism = site_mechanism(config, 5000)
    assert mechanism.steps_planned == 0
    first, second = mechanism.statistics_noise
    assert (first / second) ** 2 == pytest.approx(0.9 / 0.1)  # shares of 1/z^2
    assert evaluation_events(config) == [Event(10.0, 1.0, 2)]  # the baseline's, the graph's
    events = [*statistics_events(mechanism), *evaluation_events(config)]
    spent = epsilon(events, config.delta, config.accountant)
    assert 0.97 * 8.0 <= spent <= 8.0


@pytest.mark.parametrize(
    ("task", "pipeline", "share"),
    [("ranking", "filter", 0.1), ("ranking", "filter+gcn", 0.1), ("rating", "filter", 0.95),
     ("rating", "filter+gcn", 0.95)],
)  # fmt: skip
def test_round_1_takes_the_validated_share_of_the_task(task, pipeline, share):
    config = default_config(task=task, item_graph=pipeline, target_epsilon=8.0)
    first, second = site_mechanism(config, 5000).statistics_noise
    assert (second / first) ** 2 == pytest.approx(share / (1 - share))  # shares of 1/z^2
    keyed = config.replace(item_graph_degree_share=0.5)
    first, second = site_mechanism(keyed, 5000).statistics_noise
    assert first == pytest.approx(second)


def test_statistics_and_dp_sgd_compose_to_the_target_and_match_dp_accounting():
    """One target split between the item graph's releases and the DP-SGD steps, composed
    by one accountant (Opacus PRV), within 2 % of dp-accounting's PLD."""
    config = default_config(
        item_graph="filter+gcn",
        target_epsilon=8.0,
        item_graph_budget_share=0.5,
        num_server_rounds=5,
        delta=1e-5,
    )
    mechanism = site_mechanism(config, 5000)
    statistics = [*statistics_events(mechanism), *evaluation_events(config)]
    alone = epsilon(statistics, config.delta, "prv")
    assert 0.97 * 4.0 <= alone <= 4.0  # half the target for the statistics and metrics
    events = [*statistics, whole_run(mechanism)]
    spent = epsilon(events, config.delta, "prv")
    assert 0.97 * 8.0 <= spent <= 8.0
    assert abs(spent - independent_epsilon(events, config.delta, "prv")) / spent < 0.02


@pytest.mark.parametrize(("task", "share"), [("ranking", 0.9), ("rating", 0.97), ("rating", 0.5)])
def test_the_item_graph_takes_the_validated_budget_share_of_the_task(task, share):
    """``item-graph-budget-share = 0`` is the share validation chose for the task (0.9
    ranking, 0.97 rating); a share that is set replaces it."""
    changes = {"item_graph_budget_share": share} if share == 0.5 else {}
    config = default_config(
        task=task,
        item_graph="filter+gcn",
        target_epsilon=8.0,
        num_server_rounds=5,
        delta=1e-5,
        **changes,
    )
    assert config.graph_budget_share == share
    mechanism = site_mechanism(config, 5000)
    statistics = [*statistics_events(mechanism), *evaluation_events(config)]
    alone = epsilon(statistics, config.delta, "prv")
    assert 0.97 * share * 8.0 <= alone <= share * 8.0


def entry(round_, trained=True, sigma=1.0, earlier=(), run="r") -> LedgerEntry:
    mechanism = site_mechanism(
        default_config(item_graph="none", noise_multiplier=sigma, dp=sigma > 0), 1000
    )
    return ledger_entry(mechanism, mechanism.training(), list(earlier), run, round_, trained)


def record(state: SiteState, round_, trained=True, run="r") -> LedgerEntry:
    """Record a DP-SGD round in ``state``'s ledger, composed with what it holds."""
    return state.record(lambda earlier: entry(round_, trained, earlier=earlier, run=run))


def test_site_ledger_persists_appends_and_survives_a_new_process(tmp_path):
    state = SiteState(tmp_path / "site")
    record(state, 1)
    record(state, 2, trained=False)
    record(state, 3)
    again = SiteState(tmp_path / "site")  # as a restarted SuperNode would see it
    assert [e.round for e in again.ledger()] == [1, 2, 3]
    assert ledger_events(again.ledger()) == [Event(1.0, 0.1, 10), Event(1.0, 0.1, 10)]
    content = json.loads((tmp_path / "site" / "ledger.json").read_text())
    assert content["privacy-unit"].startswith("one user")
    assert not list((tmp_path / "site").glob("*.tmp"))


def test_a_round_without_noise_is_unbounded_and_not_in_the_history():
    plain = entry(1, sigma=0.0)
    assert plain.without_noise and plain.epsilon == math.inf
    assert ledger_events([plain, entry(2)]) == [Event(1.0, 0.1, 10)]
    mechanism = site_mechanism(default_config(item_graph="none"), 1000)
    assert ledger_entry(mechanism, mechanism.training(), [plain], "r", 2, True).epsilon == math.inf


def test_ledger_entries_written_before_the_accountant_fields_read_as_continuous_rounds():
    old = {k: v for k, v in entry(1).as_dict().items() if k not in ("discrete", "tau")}
    old.pop("accounted-noise-multiplier")
    old.pop("single-message-noise-multiplier")
    old.pop("dimension")
    assert LedgerEntry.from_dict(old) == entry(1)


def test_private_embeddings_follow_their_users(tmp_path):
    state = SiteState(tmp_path)
    keys = np.array([10, 20, 30])
    state.save_private_embeddings(keys, torch.arange(6, dtype=torch.float32).reshape(3, 2))
    table = state.private_embeddings(np.array([30, 99, 10]), 2)
    assert table.tolist() == [[4.0, 5.0], [0.0, 0.0], [0.0, 1.0]]


def test_ledger_metrics_are_what_a_site_reports():
    metrics = entry(4, trained=False).metrics()
    assert metrics["declined"] == 1.0 and metrics["steps"] == 0.0
    assert set(metrics) == {
        "epsilon",
        "independent-epsilon",
        "single-message-epsilon",
        "run-epsilon",
        "earlier-epsilon",
        "delta",
        "noise-multiplier",
        "steps",
        "declined",
    }
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


ML_100K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"


@pytest.mark.skipif(not ML_100K.is_dir(), reason=f"MovieLens-100K not found at {ML_100K}")
def test_a_dataset_keeps_one_ledger_whatever_the_seed_partition_site_or_users(tmp_path):
    """In simulation the ledger follows the dataset, never who a site's users are: a new
    seed repartitions them, and a ledger keyed on them would start again at zero."""
    ledgers, sites = set(), set()
    for seed, path, num_sites in (
        (0, f"{ML_100K}", 1),
        (1, f"{ML_100K}/", 3),
        (0, f"{ML_100K.parent}//ml-100k", 2),
    ):
        config = default_config(
            item_graph="none", dataset="ml-100k", data_path=path, seed=seed, implicit=seed == 1
        )
        for site_id in range(num_sites):
            state = SiteState.in_simulation(tmp_path, load_site(config, site_id, num_sites))
            ledgers.add(state.ledger_path)
            sites.add(state.folder)
    assert len(ledgers) == 1 and len(sites) == 3  # private embeddings stay per site


def test_a_release_recorded_by_several_sites_is_one_release(tmp_path):
    """Every simulated site of a round records it in the shared ledger: kept once, and a
    made release replaces a declined one."""
    state = SiteState(tmp_path / "dataset")
    first = record(state, 1)
    assert record(state, 1) == first and record(state, 1, trained=False) == first
    record(state, 2, trained=False)
    made = record(state, 2)
    assert [(e.round, e.trained) for e in state.ledger()] == [(1, True), (2, True)]
    assert made.epsilon == entry(2, earlier=[first]).epsilon  # composed once, not twice


def test_records_from_parallel_processes_all_land(tmp_path):
    """Simulated sites run in parallel processes and share the dataset's ledger."""
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        list(pool.map(record_in, [tmp_path] * 8, range(1, 9)))
    rounds = sorted(e.round for e in SiteState(tmp_path).ledger())
    assert rounds == list(range(1, 9))


def record_in(folder: Path, round_: int) -> None:
    record(SiteState(folder), round_)


def test_site_state_files_are_private_to_the_operator(tmp_path):
    state = SiteState(tmp_path / "site")
    record(state, 1)
    record(state, 2)
    state.save_private_embeddings(np.array([1, 2]), torch.zeros(2, 3))
    for path in (state.ledger_path, state.private_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(state.folder.stat().st_mode) == 0o700


def test_the_secure_sum_needs_every_site_unless_told_otherwise():
    """secagg-min-sites was 2 by default, so with 10 sites each one's noise share was
    sized for 2 survivors; it now defaults to min-sites."""
    assert default_config(min_sites=10).secagg_min_sites == 10
    assert default_config(min_sites=10, secagg_min_sites=4).secagg_min_sites == 4
    assert default_config(min_sites=10).to_mapping()["secagg-min-sites"] == 10


def test_num_server_rounds_means_the_pipelines_training_rounds():
    """0 (the default) is each pipeline's own; the filter alone trains nothing and says so
    when asked for rounds instead of ignoring the key."""
    assert default_config(item_graph="filter").total_rounds == 2
    assert default_config(item_graph="filter+gcn").total_rounds == 2 + 5
    assert default_config(item_graph="filter+gcn", num_server_rounds=3).total_rounds == 5
    assert default_config(item_graph="none").total_rounds == 5
    with pytest.raises(InputError, match='num-server-rounds: item-graph = "filter" trains'):
        default_config(item_graph="filter", num_server_rounds=3)
