"""The one-run canary audit: its statistics, and that it is both sound and powerful here."""

from __future__ import annotations

import json

import pytest

from cli import main as fedgraphrec
from client.audit import audit_site, epsilon_lower_bound, p_value
from common.config import default_config


def test_p_value_is_binomial_tail_plus_delta_term():
    assert p_value(100, 10, 5, 0.0, 0.0) == pytest.approx(0.623046875)  # P[Bin(10, 1/2) >= 5]
    assert p_value(100, 10, 5, 0.0, 1e-3) > p_value(100, 10, 5, 0.0, 0.0)
    assert p_value(100, 40, 30, 2.0, 0.0) > p_value(100, 40, 30, 1.0, 0.0)


def test_lower_bound_is_zero_for_chance_and_grows_with_correct_guesses():
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    low = epsilon_lower_bound(1000, 100, 75, 1e-5)
    high = epsilon_lower_bound(1000, 100, 95, 1e-5)
    assert 0 < low < high
    assert p_value(1000, 100, 95, high, 1e-5) <= 0.05 + 1e-9


def small(**changes):
    return default_config(
        synthetic_users=150, synthetic_items=80, num_server_rounds=3, delta=1e-5, **changes
    )


def test_audit_without_dp_finds_leakage(tmp_path):
    result = audit_site(small(dp=False, site_state_dir=str(tmp_path)), 1, 0, 200, 40, seed=1)
    assert result["correct"] == result["guesses"] == 80
    assert result["epsilon-lower-bound"] > 2.0  # clearly above 0: the audit has power
    assert result["accountant-epsilon"] is None


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_audit_of_dp_never_exceeds_the_accountant(tmp_path, sigma):
    result = audit_site(
        small(noise_multiplier=sigma, site_state_dir=str(tmp_path)), 1, 0, 200, 40, seed=2
    )
    assert 0 <= result["epsilon-lower-bound"] <= result["accountant-epsilon"]


def test_audit_command_adds_the_bound_to_the_report(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = small(site_state_dir=str(tmp_path / "sites"))
    (run_dir / "config.json").write_text(json.dumps(config.to_mapping()))
    (run_dir / "ledger.json").write_text(
        json.dumps(
            {
                "dp": True,
                "privacy-unit": "one user with all their interactions at one site",
                "neighbouring-relation": "add or remove one user",
                "accountant": "prv",
                "sample-rate": 0.1,
                "steps-per-round": 10,
                "clip-norm": 0.1,
                "stopped-after-round": None,
                "sites": {},
            }
        )
    )
    (run_dir / "metrics.json").write_text(json.dumps({}))
    (run_dir / "releases.json").write_text(json.dumps([]))
    args = ["audit", str(run_dir), "--sites", "2", "--canaries", "100", "--guesses", "20"]
    assert fedgraphrec(args) == 0
    assert "empirical epsilon >=" in capsys.readouterr().out
    audit = json.loads((run_dir / "audit.json").read_text())
    assert audit["canaries"] == 100 and audit["guesses"] == 40
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["audit"] == audit
    assert "## Empirical audit" in (run_dir / "privacy_report.md").read_text()
