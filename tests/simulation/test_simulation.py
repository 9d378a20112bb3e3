"""The seeded fault simulation in CI: a fixed set of seeds must break no invariant (see tests/simulation/runner.py).

Each run is a subprocess with ``PYTHONHASHSEED=0``, exactly as the replay
command a failure prints (``python -m tests.simulation --seed N ...``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.simulation import variants

ROOT = Path(__file__).resolve().parents[2]
CI_SEEDS = 150
"""Seeds run in CI (about 0.3 s each on one core: under a minute)."""
VARIANT_SEEDS = 40
"""Seeds within which every broken variant must be caught."""
HANGING_COMMIT_SEED = 1
"""A seed with a message whose commit always hangs past the handler's deadline (full profile)."""

pytestmark = pytest.mark.simulation


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tests.simulation ARGS`` as a replay would."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "platform")])}
    return subprocess.run(
        [sys.executable, "-m", "tests.simulation", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.timeout(600)
def test_simulation_fixed_seeds_break_no_invariant() -> None:
    result = simulate("--seeds", str(CI_SEEDS), "--profile", "ci")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(variants.VARIANTS))
def test_simulation_broken_variant_is_caught_within_a_few_seeds(name: str) -> None:
    result = simulate("--seeds", str(VARIANT_SEEDS), "--profile", "ci", "--variant", name, "--first")
    assert result.returncode == 1, f"{name} was not caught in {VARIANT_SEEDS} seeds:\n{result.stdout}"


@pytest.mark.timeout(300)
def test_simulation_commit_that_always_hangs_is_held_no_longer_than_the_bound() -> None:
    # Before the fate rewrite (issue 19) this seed failed: the message was held for ever (hold-bound, no-unsettled).
    result = simulate("--seed", str(HANGING_COMMIT_SEED), "--profile", "full")
    assert result.returncode == 0, result.stdout
