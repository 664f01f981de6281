"""How the suite runs on two pytest-xdist workers (``-n 2``, set in ``pyproject.toml``).

- One worker runs the deployment tests (real SuperLink and SuperNode processes) and the
  other everything else (Flower's simulation engine): ``--dist loadgroup`` with one
  group per side, so that two simulation engines (two Ray instances) never run at once.
- Each worker, and every process it starts, uses one BLAS and one OpenMP thread: two
  workers with two spinning threads each on a 2-core machine once stalled a run for
  over 15 minutes (issue 27.7).

The variables are set here, when the worker imports this file, before numpy or torch
are imported, so that they take effect.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups from the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = "deployment" if item.path.name == "test_deployment.py" else "simulation"
        item.add_marker(pytest.mark.xdist_group(group))
