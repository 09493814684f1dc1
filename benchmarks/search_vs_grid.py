"""The full grid against Optuna (TPE) + ASHA with a third of its trial budget, over several search seeds.

The same base trial and the same question: which ``transfer.metric`` × λ
gives the best CAMs? The grid runs every cell of metric × λ; each search draws
``transfer.metric`` from the same choices and λ log-uniformly over the grid's
range, with ``num_trials`` = ⌈grid / 3⌉ and ASHA on the per-epoch validation mIoU.
Settings are chosen on the validation split (``val_miou``); the chosen trial's
test mIoU is reported beside it.

Each sweep is a real ``wsss sweep`` (a fresh local Ray, one CPU, one trial at a
time, MLflow in a sqlite file). Compute is the sum of the trials' own seconds
(Tune's ``time_total_s``, stopped trials included) and the sweep's wall time;
with one CPU and one trial at a time both are CPU time on one core.

Usage::

    .venv/bin/python benchmarks/search_vs_grid.py --out <scratch>/svg             # tiny preset, seeds 0 1 2
    .venv/bin/python benchmarks/search_vs_grid.py --out <scratch>/svg --lams 0.1 0.3 1 3 --n-train 96

The ``tiny`` preset is search_spaces/trials/tiny.yaml (co-training, 48 px
synthetic images, a 4-stage ResNet-10t and a 2-block ViT) with more training
images: small enough for a 2-core machine, too small to say anything about the
thesis's scale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
METRICS = ("cosine", "l1", "l2")


def base_config(n_train: int, epochs: int) -> dict:
    base = yaml.safe_load((REPO / "search_spaces" / "trials" / "tiny.yaml").read_text())
    base["data"]["synth"]["n_train"] = n_train
    base["data"]["val_fraction"] = 0.25
    base["transfer"]["paradigm"] = "co_training"
    base["train"]["epochs"] = epochs
    return base


def sweep_files(folder: Path, args) -> dict[str, Path]:
    """The grid's file and one search file per seed."""
    base = base_config(args.n_train, args.epochs)
    common = {"base": base, "resources": {"cpu": 1}, "max_concurrent": 1}
    grid_size = len(METRICS) * len(args.lams)
    files = {"grid": {"name": "grid", "grid": {"transfer.metric": list(METRICS), "transfer.lam": args.lams}}}
    for seed in args.seeds:
        files[f"search-{seed}"] = {
            "name": f"search-{seed}",
            "sample": {"transfer.metric": {"choice": list(METRICS)},
                       "transfer.lam": {"loguniform": [min(args.lams), max(args.lams)]}},
            "search": {"algorithm": "optuna", "metric": "val_miou", "mode": "max",
                       "num_trials": math.ceil(grid_size / 3), "seed": seed, "startup_trials": 2},
            "scheduler": {"type": "asha", "metric": "val_miou_1x", "grace_period": 1, "reduction_factor": 2},
        }  # fmt: skip
    out = {}
    for name, body in files.items():
        out[name] = folder / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(common | body, sort_keys=False))
    return out


def run(folder: Path, name: str, path: Path) -> float:
    """``wsss sweep`` in ``folder``; returns its wall seconds."""
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    log = (folder / f"{name}.log").open("w")
    code = subprocess.call([sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--num-cpus", "1"],
                           cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    if code != 0:
        raise SystemExit(f"{name}: wsss sweep exited {code}; see {folder / f'{name}.log'}")
    return time.monotonic() - start


def measure(folder: Path, name: str, wall: float) -> dict:
    """Best val_miou, the chosen trial's test miou, trials, epochs and trial seconds of one sweep."""
    root = folder / "runs" / name
    trials = json.loads((root / "trials.json").read_text())
    rows, epochs, seconds = [], 0, 0.0
    for trial_id in trials:
        folder_t = root / "trials" / trial_id
        if (folder_t / "metrics.json").is_file():
            rows.append((trial_id, json.loads((folder_t / "metrics.json").read_text())))
            epochs += trials[trial_id]["config"]["train"]["epochs"]
        elif (folder_t / "stopped.json").is_file():
            epochs += json.loads((folder_t / "stopped.json").read_text())["epoch"]
        result = root / "tune" / trial_id / "result.json"
        if result.is_file():
            lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
            seconds += lines[-1]["time_total_s"] if lines else 0.0
    best_id, best = max(rows, key=lambda r: r[1]["val_miou"])
    return {"sweep": name, "trials": len(trials), "finished": len(rows), "epochs": epochs, "trial_s": seconds,
            "wall_s": wall, "best": best_id, "val_miou": best["val_miou"], "test_miou": best["miou"]}  # fmt: skip


def table(results: list[dict]) -> str:
    grid = results[0]
    lines = ["| sweep | trials (finished) | epochs trained | trial CPU s | wall s | compute vs grid | best trial | "
             "val mIoU | its test mIoU | Δ val mIoU vs grid (points) |", "|---" * 10 + "|"]  # fmt: skip
    for r in results:
        lines.append(
            f"| {r['sweep']} | {r['trials']} ({r['finished']}) | {r['epochs']} | {r['trial_s']:.0f} "
            f"| {r['wall_s']:.0f} | {r['trial_s'] / grid['trial_s']:.2f} | {r['best']} | {100 * r['val_miou']:.2f} | "
            f"{100 * r['test_miou']:.2f} | {100 * (r['val_miou'] - grid['val_miou']):+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the sweeps (runs/, mlflow.db, logs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lams", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WSSS_CACHE", str(args.out / "cache"))
    results = []
    for name, path in sweep_files(args.out.resolve(), args).items():
        wall = run(args.out.resolve(), name, path)
        results.append(measure(args.out.resolve(), name, wall))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    (args.out / "search_vs_grid.md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
