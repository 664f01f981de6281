"""Accounting, noise planning, the site ledger and the release inventory."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from client.site_state import SiteState
from common.config import default_config
from common.data import load_site
from common.privacy import (
    LedgerEntry,
    epsilon_spent,
    independent_epsilon,
    ledger_history,
    noise_multiplier_for,
    planned_steps,
    released_quantities,
    site_delta,
)


@pytest.mark.parametrize(("users", "delta"), [(94, 1e-3), (300, 1e-4), (1000, 1e-4), (29858, 1e-6)])
def test_auto_delta_is_a_power_of_ten_below_one_over_ten_users(users, delta):
    value = site_delta(default_config(), users)
    assert value == pytest.approx(delta)
    assert value <= 1 / (10 * users)
    assert site_delta(default_config(delta=1e-7), users) == 1e-7


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 0.1, 50)],
        [(0.8, 0.05, 400)],
        [(1.0, 0.1, 10), (1.5, 0.25, 8), (0.7, 0.1, 30)],
    ],
)
def test_an_independent_accountant_reproduces_epsilon_within_two_percent(accountant, history):
    """Google's dp-accounting (PLD for PRV, RDP for RDP) against Opacus."""
    opacus = epsilon_spent(accountant, history, 1e-5)
    google = independent_epsilon(accountant, history, 1e-5)
    assert opacus > 0
    assert abs(opacus - google) / opacus < 0.02


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_target_epsilon_plans_sigma_so_the_whole_run_lands_at_or_under_target(target):
    config = default_config(target_epsilon=target, num_server_rounds=6, local_epochs=2)
    sigma = noise_multiplier_for(config, 1e-5)
    spent = epsilon_spent(
        config.accountant, [(sigma, config.sampling_probability, planned_steps(config))], 1e-5
    )
    assert spent <= target
    assert spent >= 0.97 * target  # and does not waste budget
    assert planned_steps(config) == 6 * 2 * 10


def test_without_target_the_configured_sigma_is_used():
    assert noise_multiplier_for(default_config(noise_multiplier=1.7), 1e-5) == 1.7


def entry(round_, trained=True, sigma=1.0) -> LedgerEntry:
    return LedgerEntry(
        run="r",
        round=round_,
        trained=trained,
        noise_multiplier=sigma,
        sample_rate=0.1,
        steps=10 if trained else 0,
        clip_norm=0.1,
        delta=1e-5,
        accountant="prv",
        epsilon=1.0,
        independent_epsilon=1.0,
        noise_share=sigma,
        single_message_epsilon=1.0,
    )


def test_site_ledger_persists_appends_and_survives_a_new_process(tmp_path):
    state = SiteState(tmp_path / "site")
    state.record(entry(1))
    state.record(entry(2, trained=False))
    state.record(entry(3))
    again = SiteState(tmp_path / "site")  # as a restarted SuperNode would see it
    assert [e.round for e in again.ledger()] == [1, 2, 3]
    assert ledger_history(again.ledger()) == [(1.0, 0.1, 10), (1.0, 0.1, 10)]
    content = json.loads((tmp_path / "site" / "ledger.json").read_text())
    assert content["privacy-unit"].startswith("one user")
    assert not list((tmp_path / "site").glob("*.tmp"))


def test_a_round_without_noise_is_unbounded_and_not_in_the_history():
    plain = entry(1, sigma=0.0)
    assert plain.without_noise
    assert ledger_history([plain, entry(2)]) == [(1.0, 0.1, 10)]


def test_private_embeddings_follow_their_users(tmp_path):
    state = SiteState(tmp_path)
    keys = np.array([10, 20, 30])
    state.save_private_embeddings(keys, torch.arange(6, dtype=torch.float32).reshape(3, 2))
    table = state.private_embeddings(np.array([30, 99, 10]), 2)
    assert table.tolist() == [[4.0, 5.0], [0.0, 0.0], [0.0, 1.0]]


def test_auto_delta_marks_what_depends_on_it_as_not_covered():
    auto = {r.key: r.covered for r in released_quantities(default_config()) if r.message == "train"}
    fixed = {
        r.key: r.covered
        for r in released_quantities(default_config(delta=1e-5))
        if r.message == "train"
    }
    for key in ("epsilon", "independent-epsilon", "delta"):
        assert not auto[key] and fixed[key]
    assert all(fixed[k] for k in ("epsilon", "noise-multiplier", "steps", "declined"))


def test_ledger_metrics_are_what_a_site_reports():
    metrics = entry(4, trained=False).metrics()
    assert metrics["declined"] == 1.0 and metrics["steps"] == 0.0
    assert set(metrics) == {
        "epsilon",
        "independent-epsilon",
        "single-message-epsilon",
        "delta",
        "noise-multiplier",
        "steps",
        "declined",
    }
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


ML_100K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"


@pytest.mark.skipif(not ML_100K.is_dir(), reason=f"MovieLens-100K not found at {ML_100K}")
def test_the_same_users_keep_one_ledger_whatever_the_seed_or_path_spelling(tmp_path):
    """The ledger folder depends on who the users are, not on how the run was configured."""
    folders = set()
    for seed, path in ((0, f"{ML_100K}"), (1, f"{ML_100K}/"), (0, f"{ML_100K.parent}//ml-100k")):
        config = default_config(dataset="ml-100k", data_path=path, seed=seed, implicit=seed == 1)
        folders.add(SiteState.in_simulation(tmp_path, load_site(config, 0, 1)).folder)
    assert len(folders) == 1


def test_site_state_files_are_private_to_the_operator(tmp_path):
    state = SiteState(tmp_path / "site")
    state.record(entry(1))
    state.record(entry(2))
    state.save_private_embeddings(np.array([1, 2]), torch.zeros(2, 3))
    for path in (state.ledger_path, state.private_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(state.folder.stat().st_mode) == 0o700
