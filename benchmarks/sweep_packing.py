"""Sweep packing benchmark: N equal trials on k one-thread slots vs the sum of their times.

In one process, for a grid of ``--trials`` equal trials (the cpu.yaml models, a ViT
baseline; only ``train.seed`` differs, so every trial does the same work):

1. runs each trial alone, one after the other, with one torch thread
   (``training.trial.run_trial``): their sum is the serial work;
2. runs the same grid as a sweep (``orchestrator.driver.run_sweep``) on a fresh local Ray
   with ``--slots`` CPUs and ``resources: {cpu: 1}`` (one thread per trial), MLflow in a
   sqlite file, and times it end to end, ``ray.init`` and shutdown included.

Prints the sweep's wall time against the ideal ``sum of trial times / k`` (goal ≤ 1.15),
and each trial's own time inside the sweep (from Tune's ``result.json``), which shows
how much of the gap is trials slowing each other down (shared cores, memory bandwidth)
and how much is start-up and scheduling.

Usage::

    .venv/bin/python benchmarks/sweep_packing.py                 # 4 trials on 2 slots
    .venv/bin/python benchmarks/sweep_packing.py --trials 8 --slots 2 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

# `python benchmarks/x.py` puts benchmarks/ first on sys.path, so the sibling module imports as is.
from _common import machine, trial_config


def tune_trial_seconds(sweep) -> dict[str, float]:
    """Each trial's own wall time inside the sweep (Tune's time_total_s of its last result)."""
    out = {}
    for result in sweep.tune.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            out[result.parent.name] = lines[-1]["time_total_s"]
    return out


def time_phases(module, names: list[str]) -> dict[str, float]:
    """Wrap ``module.<name>`` functions so their seconds add up in the returned dict."""
    spent: dict[str, float] = {}
    for name in names:
        real = getattr(module, name)

        def timed(*a, _real=real, _name=name, **kw):
            start = time.perf_counter()
            try:
                return _real(*a, **kw)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - start

        setattr(module, name, timed)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=32)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="wsss-packing-"))
    os.environ["WSSS_CACHE"] = str(tmp / "cache")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from orchestrator import cluster, driver
    from orchestrator.driver import run_sweep
    from orchestrator.space import load_space
    from training.tracker import RecordingTracker
    from training.trial import load_splits, prepare_data, run_trial

    cfg = trial_config("cpu", **{
        "transfer.paradigm": "baseline", "train.epochs": args.epochs, "train.threads": 1, "train.device": "cpu",
        "data.synth.n_train": args.n_train, "data.synth.n_test": args.n_test, "data.synth.size": 64,
        "cam.gallery": 0,
    })  # fmt: skip
    load_splits(cfg.data, prepare_data(cfg.data))  # the data exists before anything is timed
    seeds = list(range(1, args.trials + 1))

    alone = []
    for seed in seeds:
        start = time.perf_counter()
        run_trial(cfg.replace(**{"train.seed": seed}), tmp / "alone" / str(seed), tracker=RecordingTracker())
        alone.append(time.perf_counter() - start)

    space_file = tmp / "space.yaml"
    space_file.write_text(yaml.safe_dump({
        "name": "packing", "base": cfg.to_dict(), "grid": {"train.seed": seeds},
        "resources": {"cpu": 1, "gpu": 0}, "max_failures": 0,
    }))  # fmt: skip
    space = load_space(space_file)
    phases = time_phases(cluster, ["start_ray"])
    prep = time_phases(driver, ["prepare", "run_trials", "settle"])
    start = time.perf_counter()
    outcome = run_sweep(space, name="packing", storage=tmp / "runs", tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                        num_cpus=args.slots)  # fmt: skip
    wall = time.perf_counter() - start
    if not outcome.complete:
        raise SystemExit(f"sweep incomplete: {len(outcome.status.finished)}/{outcome.status.total} trials finished")
    inside = tune_trial_seconds(outcome.sweep)

    ideal = sum(alone) / args.slots
    ideal_inside = sum(inside.values()) / args.slots
    print(f"machine: {machine()}")
    print(f"{args.trials} equal trials (cpu.yaml models, ViT baseline, {args.n_train} train / {args.n_test} test "
          f"images, {args.epochs} epochs), {args.slots} slots of 1 CPU, 1 thread per trial")
    print(f"trial alone (s): {', '.join(f'{t:.2f}' for t in alone)}; sum {sum(alone):.2f}")
    print(f"trial inside the sweep (s): {', '.join(f'{t:.2f}' for t in sorted(inside.values()))}; "
          f"sum {sum(inside.values()):.2f} ({sum(inside.values()) / sum(alone):.2f}× alone)")
    print(f"{'measure':<48} {'seconds':>8} {'ratio':>7}")
    print(f"{'ideal: sum of trial times alone / k':<48} {ideal:8.2f} {1.0:7.2f}")
    print(f"{'sweep wall time (ray.init, MLflow, shutdown incl.)':<48} {wall:8.2f} {wall / ideal:7.2f}")
    print(f"{'ideal with in-sweep trial times / k':<48} {ideal_inside:8.2f} {ideal_inside / ideal:7.2f}")
    print(f"fixed cost of the sweep (wall − in-sweep ideal): {wall - ideal_inside:.2f} s")
    phases |= prep
    rest = wall - sum(phases.values())
    print("where the sweep's wall time went (s): " + ", ".join(f"{k.strip('_')} {v:.2f}" for k, v in phases.items())
          + f", other (ray.shutdown, checks) {rest:.2f}")
    print(f"goal: wall ≤ 1.15 × sum/k: {'met' if wall / ideal <= 1.15 else 'NOT met'} ({wall / ideal:.2f})")
    # The same wall time against the trials' own in-sweep times: how well the slots were kept busy,
    # without the slowdown two trials cause each other on shared cores and memory.
    print(f"packing (scheduling) efficiency: wall / (in-sweep sum / k) = {wall / ideal_inside:.2f}")


if __name__ == "__main__":
    main()
