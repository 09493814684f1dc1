"""benchmarks/arm_rows.py: each arm's mean ± sd over the finished trials of several sweep folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_config_dict

from orchestrator.space import expand, load_space
from orchestrator.sweep_dir import SweepDir

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "arm_rows.py"


def _sweep(tmp_path: Path, name: str, seeds: list[int], mious: list[float]) -> Path:
    path = tmp_path / f"{name}.yaml"
    grid = {"transfer.paradigm": ["co_training"], "train.seed": seeds}
    path.write_text(yaml.safe_dump({"name": name, "base": tiny_config_dict(), "grid": grid}, sort_keys=False))
    space = load_space(path)
    trials = expand(space)
    sweep = SweepDir.of(tmp_path / "runs", name)
    sweep.record(space, trials)
    for t, miou in zip(trials, mious, strict=True):
        sweep.trial(t.id).create().write_metrics({"miou": miou})
    return sweep.root


def test_seeds_from_two_sweeps_are_pooled_per_arm(tmp_path: Path) -> None:
    first = _sweep(tmp_path, "a", [42], [0.2])
    second = _sweep(tmp_path, "b", [1, 2, 42], [0.3, 0.4, 0.9])  # seed 42 again: counted from "a"
    other = _sweep(tmp_path, "c", [7], [0.5])
    unfinished = SweepDir(other)
    unfinished.trial(next(iter(unfinished.load_trials()))).metrics.unlink()
    done = subprocess.run([sys.executable, str(SCRIPT), str(first), str(second), str(other), "--metrics", "miou"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    # 0.2, 0.3, 0.4: mean 0.3, sample sd sqrt((0.01 + 0 + 0.01) / 2) = 0.1; the unfinished trial is left out
    assert "| co_training | 0.300 ± 0.100 (3) |" in done.stdout.splitlines()
