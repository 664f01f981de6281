"""The accountant: Opacus against dp-accounting, and the distributed discrete Gaussian's bound."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.accounting import Event, epsilon, independent_epsilon, noise_multiplier_for


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(
    "events",
    [
        [Event(1.0, 0.1, 50)],
        [Event(0.8, 0.05, 400)],
        [Event(1.0, 0.1, 10), Event(1.5, 0.25, 8), Event(0.7, 0.1, 30)],
        [Event(0.6, 1.0, 1), Event(1.0, 0.1, 50)],  # a plain Gaussian release, then DP-SGD
    ],
)
def test_an_independent_accountant_reproduces_epsilon_within_two_percent(accountant, events):
    """Google's dp-accounting (PLD for PRV, RDP for RDP) against Opacus."""
    opacus = epsilon(events, 1e-5, accountant)
    google = independent_epsilon(events, 1e-5, accountant)
    assert opacus > 0
    assert abs(opacus - google) / opacus < 0.02


def test_equal_rounds_compose_as_one_event():
    assert epsilon([Event(1.0, 0.1, 10)] * 5, 1e-5, "prv") == epsilon(
        [Event(1.0, 0.1, 50)], 1e-5, "prv"
    )


@pytest.mark.parametrize(
    ("sigma", "rate", "steps"), [(2.3, 0.5, 50), (1.0, 0.1, 50), (0.6, 1.0, 1)]
)
def test_the_discrete_bound_is_never_below_the_continuous_sampled_gaussian(sigma, rate, steps):
    """Zhu and Wang's subsampling bound holds for any mechanism, so it can only exceed the
    sampled Gaussian's (Mironov et al.), which dp-accounting computes independently."""
    discrete = epsilon([Event(sigma, rate, steps, discrete=True)], 1e-5, "prv")
    continuous = independent_epsilon([Event(sigma, rate, steps, discrete=True)], 1e-5, "prv")
    assert continuous <= discrete
    assert discrete <= 1.6 * continuous  # and stays a usable bound


def test_tau_makes_the_discrete_bound_larger():
    clean = epsilon([Event(1.0, 0.1, 10, discrete=True, dimension=1000)], 1e-5, "prv")
    noisy = epsilon([Event(1.0, 0.1, 10, discrete=True, tau=1e-4, dimension=1000)], 1e-5, "prv")
    assert noisy > clean


@pytest.mark.parametrize("discrete", [False, True])
def test_planning_meets_a_target_after_an_earlier_release(discrete):
    before = [Event(0.8, 1.0, 1)]
    sigma = noise_multiplier_for(8.0, 1e-5, "prv", Event(0.0, 0.1, 50, discrete), before)
    spent = epsilon([*before, Event(sigma, 0.1, 50, discrete)], 1e-5, "prv")
    assert 0.98 * 8.0 <= spent <= 8.0


def test_planning_says_when_earlier_releases_leave_no_budget():
    with pytest.raises(ValueError, match="already spend"):
        noise_multiplier_for(1.0, 1e-5, "prv", Event(0.0, 0.1, 50), [Event(0.3, 1.0, 1)])


EVALUATION_IN_A_FRESH_PROCESS = """
import sys, tempfile
from client.app import SiteRound
from common.config import default_config
from common.data import load_dataset
from common.model import build_model
from common.protocol import instruction_values

scratch = tempfile.mkdtemp()
config = default_config(
    synthetic_users=60, site_state_dir=scratch, item_text=False, evaluation="exact"
)
catalogue = load_dataset(config).catalogue
values = instruction_values(config, "r", catalogue.fingerprint(), server_round=0)
site_round = SiteRound.open({"partition-id": 0, "num-partitions": 2}, values)
site_round.evaluate(site_round.model(build_model(catalogue, config).state_dict()))
print(sorted(m for m in ("opacus", "dp_accounting") if m in sys.modules))
"""


def test_an_evaluation_message_imports_no_accountant():
    """In deployment every message is a fresh process; an exact evaluation accounts nothing
    and must not pay Opacus's and dp-accounting's imports (1.3 s of its 3.5 s start). (A
    metric release, ``evaluation = "dp"``, is accounted like any other release.)"""
    done = subprocess.run(
        [sys.executable, "-c", EVALUATION_IN_A_FRESH_PROCESS],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
