"""The GPU figures of docs/performance.md in one run: training step, packing, CAMs, SAM, machine.

Runs each part of `gpu_parts.py` in a process of its own with a time cap, so a slow part
cannot eat the others' budget and a crash (out of memory, a CUDA error) costs only its part:
its error is recorded and the rest still run. Writes ``gpu_check.json`` (every figure and
error), ``gpu_check.md`` (the same as tables) and ``logs/<part>.log`` under ``--out``, and
prints the tables. Nothing is downloaded: every model is built from scratch (random weights
time the same as trained ones).

``--dry-run`` runs the same code on the CPU at toy sizes (tiny ViT/ResNet at 64 px, 2 steps,
the tests' tiny SAM, two packed CPU processes): it checks the path, its numbers are no GPU
figures.

Usage (normally through ``bash benchmarks/gpu_check.sh``, which finds or installs Python)::

    .venv/bin/python benchmarks/gpu_check.py --out gpu-check                 # on a GPU, ≤ 8 min
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out gpu-dry         # CPU, about a minute idle
    .venv/bin/python benchmarks/gpu_check.py --parts sam --cap sam=300       # one part, another cap
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

# Parts in the order they run (the most wanted first) and their caps in seconds. The GPU caps
# sum to 6.5 min, so the whole check fits 8 min with start-up; measured parts take far less.
PARTS = ("machine", "train_step", "packing", "cams", "sam")
CAPS = {
    "gpu": {"machine": 30, "train_step": 110, "packing": 100, "cams": 60, "sam": 90},
    # a dry run takes well under a minute on an idle 2-core box, but CI's box may be loaded
    "dry-run": {"machine": 120, "train_step": 240, "packing": 240, "cams": 240, "sam": 240},
}
BUDGET_S = {"gpu": 480.0, "dry-run": 1200.0}  # the whole check, its set-up (an install) included
SCRIPT = Path(__file__).resolve()


def run_part(name: str, argv: list[str], cap_s: float, result: Path, log: Path) -> dict:
    """Run one part's process (``argv``) for at most ``cap_s`` seconds.

    The process (and every process it starts: it leads a new session) is killed at the cap.
    Whatever it recorded in ``result`` (figures, errors, settings) is kept either way.

    Returns:
        ``{"status": ok | partial | failed | timed_out, "error", "wall_s", "cap_s",
        "figures", "errors", "settings"}``; ``partial``: the process ended normally but
        some of its cases failed (named in ``errors``).
    """
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        code = None
        try:
            code = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            pass
        finally:  # the cap was hit, or this driver was interrupted: stop the part and its workers
            if code is None:
                _kill_group(proc)
    wall = time.monotonic() - start
    try:
        recorded = json.loads(result.read_text())
    except (OSError, ValueError):
        recorded = {"figures": {}, "errors": {}, "settings": {}}
    if code is None:
        status, error = "timed_out", f"stopped at its cap of {cap_s:.0f} s; the figures before it are kept"
    elif code != 0:
        status, error = "failed", f"exit code {code}: {_last_line(log)} (log: logs/{log.name})"
    else:
        status, error = ("partial" if recorded["errors"] else "ok"), None
    return {"status": status, "error": error, "wall_s": round(wall, 2), "cap_s": cap_s, **recorded}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def skipped(reason: str, cap_s: float) -> dict:
    return {"status": "skipped", "error": reason, "wall_s": 0.0, "cap_s": cap_s,
            "figures": {}, "errors": {}, "settings": {}}


def check(
    plan: str, parts: list[str], caps: dict[str, float], out: Path, budget_s: float, setup_s: float = 0.0
) -> dict:
    """Run ``parts`` one after the other within ``budget_s``; returns the report (also written).

    Args:
        setup_s: seconds spent before (installing), recorded; ``budget_s`` is what is left.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    started = time.monotonic()
    report = {
        "check": "benchmarks/gpu_check.py (issue 18)",
        "plan": plan,
        "command": os.environ.get("GPU_CHECK_COMMAND") or shlex.join([Path(sys.executable).name, *sys.argv]),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "setup_s": setup_s,
        "budget_s": budget_s,
        "parts": {},
    }
    for name in parts:
        left = budget_s - (time.monotonic() - started)
        machine = report["parts"].get("machine", {}).get("figures", {})
        if plan == "gpu" and machine.get("cuda_available") is False:
            result = skipped("no CUDA device is visible (see the machine part); on a CPU use --dry-run", caps[name])
        elif left < 5:
            result = skipped(f"the check's budget of {budget_s:.0f} s was spent before this part", caps[name])
        else:
            cap = min(caps[name], left)
            result_file = out / "logs" / f"{name}.json"
            argv = [sys.executable, str(SCRIPT), "--part", name, "--plan", plan, "--result", str(result_file)]
            result = run_part(name, argv, cap, result_file, out / "logs" / f"{name}.log")
            result_file.unlink(missing_ok=True)  # its content is in the report
        report["parts"][name] = result
        print(f"[gpu_check] {name}: {result['status']} in {result['wall_s']:.1f} s"
              + (f" ({result['error']})" if result["error"] else ""), flush=True)
    report["wall_s"] = round(time.monotonic() - started, 2)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    """The report as markdown: a header, then one table of figures per part."""
    lines = ["# GPU check", ""]
    if report["plan"] == "dry-run":
        lines += ["**DRY RUN on the CPU at toy sizes: these numbers check the code path, they are no GPU figures.**",
                  ""]
    machine = report["parts"].get("machine", {}).get("figures", {})
    lines += [f"- command: `{report['command']}`", f"- started (UTC): {report['started_utc']}",
              f"- wall time: {report.get('wall_s', 0):.1f} s of the {report['budget_s']:.0f} s left after "
              f"{report['setup_s']:.0f} s of set-up"]
    if machine:
        lines.append(f"- machine: {machine.get('gpu')}, driver {machine.get('driver')}, torch {machine.get('torch')}, "
                     f"CUDA {machine.get('cuda')}, cuDNN {machine.get('cudnn')}; {machine.get('line')}")
    for name, part in report["parts"].items():
        lines += ["", f"## {name}: {part['status']} ({part['wall_s']:.1f} s, cap {part['cap_s']:.0f} s)", ""]
        if part["error"]:
            lines += [f"Error: {part['error']}", ""]
        if part["settings"]:
            lines += ["Settings: " + ", ".join(f"{k} {v}" for k, v in part["settings"].items()), ""]
        if part["figures"]:
            lines += ["| figure | value |", "|---|---|"]
            lines += [f"| {key} | {_fmt(value)} |" for key, value in part["figures"].items()]
        for case, err in part["errors"].items():
            lines.append(f"- **{case} failed**: {err}")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _caps(plan: str, items: list[str]) -> dict[str, float]:
    caps = dict(CAPS[plan])
    for item in items:
        name, sep, seconds = item.partition("=")
        if not sep or name not in caps:
            raise SystemExit(f"--cap {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        try:
            caps[name] = float(seconds)
        except ValueError:
            raise SystemExit(f"--cap {item!r}: {seconds!r} is not a number of seconds") from None
    return caps


def _parts(value: str) -> list[str]:
    names = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise SystemExit(f"--parts {value!r}: unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    return [p for p in PARTS if p in names]  # always in the order of PARTS (machine first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at toy sizes")
    ap.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.json/.md and logs/")
    ap.add_argument("--parts", type=_parts, default=list(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="another time cap for a part")
    ap.add_argument("--budget-s", type=float, help="the whole check's time (default: 480 on a GPU, 1200 dry)")
    ap.add_argument("--setup-s", type=float, default=0.0, help="seconds already spent (gpu_check.sh: the install)")
    # internal: one part, or one packed trial, in a process of its own
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--plan", choices=tuple(CAPS), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.part or args.worker is not None:
        import gpu_parts  # torch is imported only here: the driver itself never touches the GPU

        plan = gpu_parts.PLANS[args.plan]
        if args.worker is not None:
            gpu_parts.pack_worker(plan, args.worker, args.ckpt, args.barrier)
            return
        rec = gpu_parts.Recorder(args.result)
        try:
            gpu_parts.PARTS[args.part](plan, rec)
        except BaseException as err:
            rec.error("part", err)
            raise
        return

    plan = "dry-run" if args.dry_run else "gpu"
    budget = (args.budget_s if args.budget_s is not None else BUDGET_S[plan]) - args.setup_s
    report = check(plan, args.parts, _caps(plan, args.cap), args.out, budget, args.setup_s)
    print()
    print(markdown(report), end="")
    print(f"\n[gpu_check] wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    not_ok = [name for name, part in report["parts"].items() if part["status"] != "ok"]
    if not_ok:  # everything is written; the exit code tells a caller that some figures are missing
        raise SystemExit(f"[gpu_check] not every part measured all its figures: {', '.join(not_ok)}")


if __name__ == "__main__":
    main()
