"""MLflow cost benchmark: the share of a trial's wall time spent logging to MLflow.

In one process, against a fresh sqlite tracking store in a temporary folder:

1. runs one trial (``training.trial.run_trial``) the way a sweep trial does: find or create
   the child run with its params, then every tracker call of the trial (params, per-epoch
   and final metrics in ``log_batch`` requests, gallery/config/metrics artifacts), then
   closing the run. Every call into MLflow is timed; the figure is logging seconds ÷ trial
   wall seconds (goal ≤ 2 %);
2. replays the very same events into a second child run one value per request
   (``log_param`` / ``log_metric``), the unbatched reference, and prints the ratio.

Usage::

    .venv/bin/python benchmarks/mlflow_cost.py      # cpu.yaml models, 256 train / 64 test images, 3 epochs
    .venv/bin/python benchmarks/mlflow_cost.py --epochs 1 --n-train 64 --n-test 16   # a quick check
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# `python benchmarks/x.py` puts benchmarks/ first on sys.path, so the sibling module imports as is.
from _common import machine, trial_config


class Timed:
    """Forwards to a tracker, adding the seconds of every call to ``seconds`` and keeping the events."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0
        self.by_kind: dict[str, float] = {}
        self.events: list[tuple[str, tuple]] = []

    def _call(self, name: str, *args):
        self.events.append((name, args))
        start = time.perf_counter()
        try:
            return getattr(self.inner, name)(*args)
        finally:
            took = time.perf_counter() - start
            self.seconds += took
            self.by_kind[name] = self.by_kind.get(name, 0.0) + took
            self.calls += 1

    def log_params(self, params):
        return self._call("log_params", params)

    def log_metrics(self, metrics, step=None):
        return self._call("log_metrics", metrics, step)

    def log_artifact(self, path, artifact_path=None):
        return self._call("log_artifact", path, artifact_path)

    def set_tags(self, tags):
        return self._call("set_tags", tags)


def replay_unbatched(client, run_id: str, events: list[tuple[str, tuple]]) -> tuple[float, int]:
    """The same events, one request per value: (seconds, requests)."""
    from orchestrator.tracking import flatten

    seconds, requests = 0.0, 0
    for name, args in events:
        start = time.perf_counter()
        if name == "log_params":
            for k, v in flatten(args[0]).items():
                client.log_param(run_id, k, v[:6000])
                requests += 1
        elif name == "log_metrics":
            for k, v in args[0].items():
                client.log_metric(run_id, k, float(v), step=args[1] or 0)
                requests += 1
        elif name == "log_artifact":
            client.log_artifact(run_id, str(args[0]), args[1])
            requests += 1
        elif name == "set_tags":
            for k, v in args[0].items():
                client.set_tag(run_id, k, v)
                requests += 1
        seconds += time.perf_counter() - start
    return seconds, requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from orchestrator.tracking import SweepTracking
    from training.trial import run_trial

    tmp = Path(tempfile.mkdtemp(prefix="wsss-mlflow-bench-"))
    os.environ["WSSS_CACHE"] = str(tmp / "cache")
    cfg = trial_config("cpu", **{
        "transfer.paradigm": "baseline", "train.epochs": args.epochs, "train.threads": args.threads,
        "train.device": "cpu", "data.synth.n_train": args.n_train, "data.synth.n_test": args.n_test,
        "data.synth.size": 64, "cam.gallery": 8,
    })  # fmt: skip
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking = SweepTracking.open(uri, "bench", "bench", space={"base": "bench"})  # driver-side, not timed
    from training.trial import load_splits, prepare_data

    load_splits(cfg.data, prepare_data(cfg.data))  # generate the data outside the timed trial

    start = time.perf_counter()
    t0 = time.perf_counter()
    run_id = tracking.child_run("000-bench", run_name="bench", params=cfg.to_dict())
    tracker = Timed(tracking.tracker(run_id))
    open_s = time.perf_counter() - t0
    run_trial(cfg, tmp / "trial", tracker=tracker)
    t0 = time.perf_counter()
    tracking.finish(run_id, "FINISHED")
    close_s = time.perf_counter() - t0
    wall = time.perf_counter() - start
    logging = open_s + tracker.seconds + close_s

    ref_id = tracking.child_run("001-unbatched", run_name="unbatched", params={})
    unbatched, requests = replay_unbatched(tracking.client, ref_id, tracker.events)
    unbatched += open_s + close_s

    metric_values = sum(len(a[0]) for n, a in tracker.events if n == "log_metrics")
    artifacts = sum(n == "log_artifact" for n, _ in tracker.events)
    print(f"machine: {machine()}")
    print(f"trial: cpu.yaml models, baseline ViT, {args.n_train} train / {args.n_test} test images of 64 px, "
          f"{args.epochs} epochs, {args.threads} thread(s); tracking store {uri}")
    print(f"trial wall time {wall:.2f} s; tracker calls {tracker.calls} ({metric_values} metric values, "
          f"{artifacts} artifacts); open child run {open_s * 1000:.0f} ms, close {close_s * 1000:.0f} ms")
    print(f"{'logging':<38} {'seconds':>8} {'share of trial':>15} {'ratio':>7}")
    print(f"{'batched (MlflowTracker, as shipped)':<38} {logging:8.3f} {logging / wall:14.2%} {1.0:7.2f}")
    print(f"{'one request per value (reference)':<38} {unbatched:8.3f} {unbatched / wall:14.2%} "
          f"{unbatched / logging:7.2f}   ({requests} requests)")
    kinds = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in tracker.by_kind.items())
    print(f"batched logging by call: open {open_s * 1000:.0f} ms, {kinds}, close {close_s * 1000:.0f} ms")
    per_epoch = tracker.by_kind.get("log_metrics", 0.0) / (args.epochs + 1)  # epochs + the final scores
    print(f"metrics cost ~{per_epoch * 1000:.0f} ms per epoch; the rest is fixed per trial. "
          f"This logging is ≤ 2 % of any trial longer than {logging / 0.02:.0f} s")
    print(f"goal: logging ≤ 2 % of the trial's wall time: {'met' if logging / wall <= 0.02 else 'NOT met'}")


if __name__ == "__main__":
    main()
