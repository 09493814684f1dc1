"""Re-score a finished trial's network with other ``cam.*`` settings (no retraining).

For attributing a change of a reported number to one change of the CAM recipe (e.g.
``cam.normalise=max``, the x/max normalisation used before the thesis's min–max), on the
same trained weights: the trial's test split, and its validation split when it has one. It
selects nothing; settings are chosen on the validation metrics (``val_*``) only.

Prints one JSON object: the trial's own metrics.json values next to the re-scored ones.

Usage::

    .venv/bin/python benchmarks/rescore.py runs/cpu/teacher_student cam.normalise=max
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from training.config import load_trial_config
from training.evaluate import extract_cams, score
from training.loop import configure_threads
from training.paradigms import build_paradigm
from training.trial import load_splits, prepare_data
from training.validation import load_validation, score_validation


def cam_network(run_dir: Path, overrides: list[str]):
    """The trial's CAM network with its trained weights, and the trial config with ``overrides``."""
    cfg = load_trial_config(run_dir / "config.yaml", overrides)
    role = cfg.transfer.cam_network
    alone = cfg.replace(**{
        "transfer.paradigm": "baseline", "transfer.baseline_network": role, "transfer.teacher_data": {},
        f"model.{role}.pretrained": "false",  # every weight comes from the checkpoint
    })  # fmt: skip
    net = build_paradigm(alone).cam_net
    state = torch.load(run_dir / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)["model"]
    net.load_state_dict({k[len("cam_net.") :]: v for k, v in state.items() if k.startswith("cam_net.")})
    return cfg, net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trial", type=Path, help="a finished trial folder (config.yaml, checkpoint/state.pt)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the trial config, e.g. cam.normalise=max")
    args = ap.parse_args()
    configure_threads(1)
    cfg, net = cam_network(args.trial, args.overrides)
    device = torch.device("cpu")
    root = prepare_data(cfg.data)
    _, evalset = load_splits(cfg.data, root)
    metrics = score(extract_cams(net, evalset, cfg.cam, device), evalset, cfg.cam.threshold)
    val = load_validation(cfg.data, root)
    if val is not None:
        metrics |= score_validation(net, val, cfg.cam, device)[0]
    before = json.loads((args.trial / "metrics.json").read_text())
    out = {"trial": str(args.trial), "overrides": args.overrides, "rescored": metrics, "trial_metrics": before}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
