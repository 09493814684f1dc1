"""The ``wsss`` command line: one entry point, a subcommand per job.

Heavy imports (torch, Ray, MLflow) happen inside the subcommands so that
``wsss --help`` and ``wsss validate`` answer quickly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.errors import ConfigError, WsssError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except WsssError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss", description="Sweeps of cross-architecture consistency for WSSS of smoke.")
    sub = p.add_subparsers(title="commands")
    _add_trial(sub)
    _add_pretrain(sub)
    _add_data(sub)
    from orchestrator import commands

    commands.add_sweep_commands(sub)
    return p


# ---------------------------------------------------------------- trial


def _add_trial(sub) -> None:
    t = sub.add_parser("trial", help="run one trial locally, without Ray")
    t.add_argument("config", nargs="?", type=Path, help="trial YAML (omit with --from-sweep)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. transfer.lam=0.5")
    t.add_argument("--out", type=Path, help="output folder (default: runs/trials/<name>)")
    t.add_argument("--from-sweep", metavar="NAME", help="rerun a trial of this sweep with its resolved config")
    t.add_argument("--trial", metavar="ID", help="with --from-sweep: the trial id")
    t.add_argument("--storage", type=Path, help="with --from-sweep: the sweep's storage folder")
    t.set_defaults(run=run_trial_command)


def run_trial_command(args) -> int:
    from training.config import load_trial_config
    from training.trial import run_trial

    if args.from_sweep:
        from orchestrator.commands import resolve_sweep_trial

        cfg_path, teacher = resolve_sweep_trial(args.from_sweep, args.trial, args.storage)
        overrides = ([str(args.config)] if args.config else []) + list(args.overrides)
        cfg = load_trial_config(cfg_path, overrides)
    elif args.config is None:
        raise ConfigError("wsss trial: give a trial YAML, or --from-sweep NAME --trial ID")
    else:
        refuse_sweep_file(args.config)
        cfg, teacher = load_trial_config(args.config, args.overrides), None
    out = args.out or Path("runs") / "trials" / (f"{args.from_sweep}-{args.trial}" if args.from_sweep else cfg.name)
    metrics = run_trial(cfg, out, teacher_checkpoint=teacher)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    print(f"results in {out.resolve()}")
    return 0


def refuse_sweep_file(path: Path) -> None:
    """A sweep file given to `wsss trial`: say what it is and the commands that run it."""
    from training.config import load_yaml
    from training.config.sweep import SECTIONS

    data = load_yaml(path)
    sweep_keys = sorted(set(data) & (set(SECTIONS) - {"name", "description"})) if isinstance(data, dict) else []
    if not sweep_keys:
        return
    base = data.get("base")
    if isinstance(base, str):
        base_path = _shown(Path(path).parent / base)
        one = f"one trial of its base config:  wsss trial {base_path} [key=value ...]"
    else:
        one = f"its base config is inline; list its trials with:  wsss validate {path} --list"
    raise ConfigError(
        f"{path}: this is a sweep file (it has {', '.join(sweep_keys)}), not a trial config. "
        f"Run the sweep with:  wsss sweep {path}   or {one}"
    )


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (what a user would type)."""
    path = path.resolve()
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path

# ---------------------------------------------------------------- pretrain


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train a backbone on the fractal corpus (cached); print its checkpoint")
    p.add_argument("config", help="pretrain YAML, or the name of a shipped one (search_spaces/pretrain/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 corpus.classes=50")
    p.add_argument("--preview", type=Path, help="also save a PNG grid of corpus images (a row per class)")
    p.set_defaults(run=run_pretrain_command)


def run_pretrain_command(args) -> int:
    from training.config.pretrain import load_pretrain_config
    from training.pretrain import ensure_pretrained, pretrained_path
    from training.trial import cache_root
    from training.trial_dir import TrialDir

    cfg = load_pretrain_config(args.config, args.overrides)
    if args.preview:
        _save_corpus_preview(cfg.corpus, args.preview)
    cached = pretrained_path(cfg, cache_root()).is_file()
    path = ensure_pretrained(cfg, cache_root())
    run = TrialDir(path.with_suffix(""))
    if run.finished():
        print(run.metrics.read_text().strip())
    print(f"pre-trained backbone{' (cached)' if cached else ''}: {path}")
    ref = f"pretrain:{args.config}" if not args.overrides else str(path)
    print(f"use it in a trial of this network: model.student.pretrained={ref} (or model.teacher.pretrained=...)")
    return 0


def _save_corpus_preview(corpus, out: Path) -> None:
    import cv2

    from training.fractals import cached_corpus, load_corpus, preview
    from training.trial import cache_root

    cv2.imwrite(str(out), preview(load_corpus(cached_corpus(corpus, cache_root())))[..., ::-1])
    print(f"corpus preview in {out}")


# ---------------------------------------------------------------- data


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="make, check and cut datasets").add_subparsers(title="data commands")
    s = d.add_parser("synth", help="write the synthetic smoke/chimney benchmark")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--size", type=int)
    s.add_argument("--n-train", type=int)
    s.add_argument("--n-test", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--chimney-in-clean", type=float, help="probability a clean image shows a chimney")
    s.add_argument("--preview", type=Path, help="also save a PNG grid of test images")
    s.set_defaults(run=run_synth)
    c = d.add_parser("check", help="read every file of a dataset folder and report every problem")
    c.add_argument("root", type=Path)
    c.add_argument("--json", action="store_true", help="print counts and problems as JSON")
    c.set_defaults(run=run_check)
    w = d.add_parser("windows", help="cut large test images into windows, keeping those with smoke")
    w.add_argument("src", type=Path)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--size", type=int, default=512)
    w.add_argument("--stride", type=int, default=512)
    w.add_argument("--min-smoke", type=float, default=0.005, help="smallest smoke fraction kept")
    w.set_defaults(run=run_windows)


def run_synth(args) -> int:
    import dataclasses

    import cv2

    from training.synth import SynthConfig, generate, preview

    given = {"size": args.size, "n_train": args.n_train, "n_test": args.n_test, "seed": args.seed}
    given["chimney_in_clean"] = args.chimney_in_clean
    cfg = dataclasses.replace(SynthConfig(), **{k: v for k, v in given.items() if v is not None})
    root = generate(cfg, args.out)
    print(f"synthetic dataset in {root}")
    if args.preview:
        cv2.imwrite(str(args.preview), preview(root)[..., ::-1])
        print(f"preview in {args.preview}")
    return 0


def run_check(args) -> int:
    from training.data_check import check_dataset
    from training.errors import DataError

    report = check_dataset(args.root)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.render())
    if not report.ok:
        raise DataError(f"{report.root}: {len(report.problems)} problem(s) found, listed above; fix them and rerun")
    return 0


def run_windows(args) -> int:
    from training.data import cut_windows

    n = cut_windows(args.src, args.out, size=args.size, stride=args.stride, min_smoke=args.min_smoke)
    print(f"{n} windows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
