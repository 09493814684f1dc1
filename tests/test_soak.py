"""benchmarks/soak.py: the seeded fault plan (the soak itself runs for tens of minutes; not in the suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from fault_plugin import parse_faults

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "soak.py"
_spec = importlib.util.spec_from_file_location("soak", SCRIPT)
soak = sys.modules.setdefault("soak", importlib.util.module_from_spec(_spec))  # dataclasses look it up there
_spec.loader.exec_module(soak)

TRIALS = [f"{i:03d}-seed{i}" for i in range(24)]


def test_the_same_seed_draws_the_same_plan_and_another_seed_another():
    plans = [soak.draw_faults(TRIALS, units=144, seed=seed) for seed in (0, 0, 1)]
    assert plans[0] == plans[1]
    assert plans[0] != plans[2]


@pytest.mark.parametrize("seed", range(20))
def test_every_plan_has_each_fault_kind_mid_grid(seed):
    plan = soak.draw_faults(TRIALS, units=144, seed=seed, crashes=4, epochs=2)
    crashed = [trial for trial, _ in plan.crashes]
    assert len(set(crashed)) == 4 and set(crashed) <= set(TRIALS)
    assert all(epoch in (1, 2) for _, epoch in plan.crashes)
    # Both thresholds fall strictly inside the grid (some finished, some still to run) and apart.
    assert 1 <= plan.restart_after <= 22 and 1 <= plan.sigint_after <= 22
    assert plan.restart_after != plan.sigint_after
    assert 3.0 <= plan.down_s <= 10.0
    assert 1 <= plan.kill_after_units <= 72  # in the first half of the refinement
    # What the trials are given is what fault_plugin reads back.
    assert parse_faults(plan.inject()) == {trial: {"crash_once": str(epoch)} for trial, epoch in plan.crashes}


def test_the_smallest_grid_has_its_two_points_mid_grid_and_fewer_trials_are_refused():
    plan = soak.draw_faults(TRIALS[:4], units=24, seed=0)
    assert {plan.restart_after, plan.sigint_after} == {1, 2}  # of 4: one finished at least, one left at least
    with pytest.raises(ValueError, match="expected at least 4 trials, got 3"):
        soak.draw_faults(TRIALS[:3], units=18)
