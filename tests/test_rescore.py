"""benchmarks/rescore.py: a finished trial's network re-scored with other CAM settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.tracker import RecordingTracker
from training.trial import run_trial

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "rescore.py"


def _rescore(run: Path, *overrides: str) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), *overrides], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_rescoring_reproduces_the_trial_and_isolates_the_normalisation(make_config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = run_trial(make_config(**{"cam.gallery": 0}), run, tracker=RecordingTracker())
    same = _rescore(run)
    assert same["rescored"] == pytest.approx(metrics, abs=1e-9)
    # the golden run of test_trial.py: with x/max instead of min–max, miou 0.092173 and context_fp
    # 0.754158 (the numbers before issue 12), against 0.084935 / 0.612691 with min–max
    old = _rescore(run, "cam.normalise=max")["rescored"]
    assert (old["miou"], old["context_fp"]) == pytest.approx((0.092173, 0.754158), abs=1e-6)
    assert old["accuracy"] == metrics["accuracy"]  # the logits do not depend on the CAM recipe
