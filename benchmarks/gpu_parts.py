"""The five parts of `gpu_check.py`, each run in a process of its own by the driver.

Every part takes a `Plan` (the GPU sizes, or a CPU dry run of the same code at toy sizes) and
a `Recorder`, and records its figures one at a time, so a part stopped at its time cap keeps
what it had measured. The workloads come from the project and the other benchmarks, not
copies of them: the thesis trial config (`search_spaces/trials/thesis.yaml`), the trial's own
training step (`_common.timed_steps` → `training.loop.train_epoch`), the multi-scale CAM hot
loop of `training.evaluate.extract_cams`, and the SAM proposal backend of `postproc.proposals`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# `python benchmarks/x.py` puts benchmarks/ first on sys.path, so the sibling module imports as is.
from _common import TensorImages, interleaved, machine, median, random_teacher_checkpoint, sync, timed_steps

GiB = 1024**3
ROOT = Path(__file__).resolve().parents[1]
THESIS = ROOT / "search_spaces" / "trials" / "thesis.yaml"
DRIVER = ROOT / "benchmarks" / "gpu_check.py"  # its --worker mode runs one packed trial
# Models built from scratch: no weights can be fetched, and random weights time the same.
FROM_SCRATCH = {"model.teacher.pretrained": "false", "model.student.pretrained": "false", "model.teacher.pcm": True}
TINY_VIT = {"name": "vit_tiny_patch16_224", "options": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}}
TINY_CNN = {
    "name": "resnet10t",
    "output_stride": 8,
    "pcm": True,
    "options": {"channels": [8, 16, 32, 64], "stem_width": 8},
}


@dataclass(frozen=True)
class Plan:
    """What the check runs.

    Attributes:
        overrides: dotted keys applied to trials/thesis.yaml.
        warmup / steps: training steps before timing / timed steps (at least) per case.
        pack_seconds: how long each packed trial is timed (both start together).
        pack_threads: torch threads of a packed trial (a sweep gives `resources.cpu`).
        cam_images / cam_rounds: images per CAM pass, interleaved rounds (median taken).
        sam_model: ``vit_b`` (segment-anything's registry) or ``tiny`` (tests/tiny_sam.py).
        sam_image / sam_points / sam_repeats: image side, point grids, timed images per grid.
        threads: torch threads of every other part (0 = torch's default).
    """

    name: str
    device: str
    overrides: dict[str, Any] = field(default_factory=dict)
    warmup: int = 5
    steps: int = 20
    pack_seconds: float = 15.0
    pack_threads: int = 4
    cam_images: int = 32
    cam_rounds: int = 3
    sam_model: str = "vit_b"
    sam_image: int = 1024
    sam_points: tuple[int, ...] = (16, 32)
    sam_repeats: int = 2
    threads: int = 0

    def config(self):
        """The thesis trial config with this plan's overrides."""
        from training.config import load_trial_config

        return load_trial_config(THESIS, dict(self.overrides))


PLANS = {
    "gpu": Plan("gpu", "cuda", {**FROM_SCRATCH, "train.device": "cuda"}),
    "dry-run": Plan(
        "dry-run",
        "cpu",
        {
            **FROM_SCRATCH,
            "model.student": TINY_VIT,
            "model.teacher": TINY_CNN,
            "data.image_size": 64,
            "train.batch_size": 4,
            "train.device": "cpu",
            "train.threads": 1,
            "cam.batch_size": 4,
        },
        warmup=1,
        steps=2,
        pack_seconds=1.0,
        pack_threads=1,
        cam_images=4,
        cam_rounds=1,
        sam_model="tiny",
        sam_image=64,
        sam_points=(4, 8),  # 16 and 32 cost 10 s here: the generator's per-mask Python loop
        sam_repeats=1,
        threads=1,
    ),
}


class Recorder:
    """A part's figures, errors and settings, rewritten to ``path`` (JSON) after every change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.figures: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.settings: dict[str, Any] = {}
        self.flush()

    def put(self, key: str, value: Any) -> None:
        self.figures[key] = value
        self.flush()

    def error(self, key: str, err: BaseException) -> None:
        self.errors[key] = f"{type(err).__name__}: {err}".strip()
        self.flush()

    def note(self, **settings: Any) -> None:
        self.settings.update(settings)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"figures": self.figures, "errors": self.errors, "settings": self.settings}))
        os.replace(tmp, self.path)


def _memory_counter(device: torch.device) -> str:
    """What the ``*_peak_gib`` figures count on ``device`` (see `_common.PeakMemory`)."""
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (CPU stand-in)"


def _device(plan: Plan) -> torch.device:
    from training.loop import configure_threads, pick_device

    configure_threads(plan.threads)
    return pick_device(plan.device)


def part_machine(plan: Plan, rec: Recorder) -> None:
    """GPU model, driver, torch / CUDA / cuDNN versions, and the benchmarks' machine line."""
    cuda = torch.cuda.is_available()
    rec.put("cuda_available", cuda)
    rec.put("gpu", torch.cuda.get_device_name(0) if cuda else "none (CPU)")
    if cuda:
        rec.put("gpu_memory_gib", torch.cuda.get_device_properties(0).total_memory / GiB)
    rec.put("driver", _driver())
    rec.put("torch", torch.__version__)
    rec.put("cuda", torch.version.cuda or "none")
    rec.put("cudnn", str(torch.backends.cudnn.version() or "none"))
    rec.put("python", platform.python_version())
    rec.put("line", machine())


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown (nvidia-smi: {type(err).__name__})"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown (nvidia-smi printed nothing)"


def part_train_step(plan: Plan, rec: Recorder) -> None:
    """Teacher-student step: fp32 / bf16 × teacher in the step (contiguous, channels-last) or cached."""
    device = _device(plan)
    base = plan.config()
    bs = base.train.batch_size
    rec.note(student=base.model.student.name, teacher=_teacher_name(base), image_size=base.data.image_size,
             batch_size=bs, warmup=plan.warmup, steps=plan.steps, cache_dtype=base.train.teacher_cache,
             memory=_memory_counter(device))
    step_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="wsss-gpu-check-") as tmp:
        ckpt = random_teacher_checkpoint(base, Path(tmp))
        for precision in ("fp32", "bf16"):
            # the teacher does not run in a cached step, so its memory format does not matter there
            for cached, channels_last in ((False, False), (False, True), (True, False)):
                case = f"{precision}_{'cached' if cached else 'uncached'}{'_channels_last' if channels_last else ''}"
                cfg = base.replace(**{"train.precision": precision, "train.channels_last": channels_last})
                try:
                    run = timed_steps(cfg, ckpt, device, cached=cached, warmup=plan.warmup, steps=plan.steps)
                except Exception as err:  # e.g. out of memory: the other cases still run
                    rec.error(case, err)
                    continue
                step_s[case] = run.median_s
                rec.put(f"{case}_step_s", run.median_s)
                rec.put(f"{case}_images_s", bs / run.median_s)
                rec.put(f"{case}_peak_gib", run.peak_bytes / GiB)
                if run.reserved_bytes is not None:
                    rec.put(f"{case}_reserved_gib", run.reserved_bytes / GiB)
    for precision in ("fp32", "bf16"):
        _ratio(rec, f"{precision}_cached_vs_uncached", step_s, f"{precision}_cached", f"{precision}_uncached")
        _ratio(rec, f"{precision}_channels_last_vs_contiguous", step_s,
               f"{precision}_uncached_channels_last", f"{precision}_uncached")
    _ratio(rec, "bf16_vs_fp32_uncached", step_s, "bf16_uncached", "fp32_uncached")


def _ratio(rec: Recorder, key: str, times: dict[str, float], num: str, den: str) -> None:
    """Step time ``num`` / step time ``den`` (below 1: ``num`` is faster), when both were measured."""
    if num in times and den in times:
        rec.put(key, times[num] / times[den])


def _teacher_name(cfg) -> str:
    return cfg.model.teacher.name + (" + PCM" if cfg.model.teacher.pcm else "")


def part_packing(plan: Plan, rec: Recorder) -> None:
    """Two trials on one GPU at once (what `resources: {gpu: 0.5}` does) against one alone.

    Each trial is its own process running the default thesis step (fp32, cached float16 teacher
    features, as a trial runs it), timed for ``plan.pack_seconds`` from a common start.
    """
    cfg = plan.config()
    rec.note(step=f"{cfg.train.precision}, cached teacher ({cfg.train.teacher_cache})",
             seconds_timed=plan.pack_seconds, threads_per_trial=plan.pack_threads,
             memory=_memory_counter(torch.device(plan.device)))
    with tempfile.TemporaryDirectory(prefix="wsss-gpu-check-") as tmp:
        ckpt = random_teacher_checkpoint(cfg, Path(tmp))
        for label, n in (("alone", 1), ("packed", 2)):
            runs = _run_workers(n, plan, ckpt, Path(tmp) / label)
            images = sum(r["images"] for r in runs)
            window = max(r["end"] for r in runs) - min(r["start"] for r in runs)
            rec.put(f"{label}_images_s", images / window)
            for i, r in enumerate(runs):
                tag = label if n == 1 else f"{label}{i}"
                if n > 1:
                    rec.put(f"{tag}_images_s", r["images"] / (r["end"] - r["start"]))
                rec.put(f"{tag}_peak_gib", r["peak_bytes"] / GiB)
                if r["reserved_bytes"] is not None:
                    rec.put(f"{tag}_reserved_gib", r["reserved_bytes"] / GiB)
    rec.put("throughput_ratio", rec.figures["packed_images_s"] / rec.figures["alone_images_s"])


def _run_workers(n: int, plan: Plan, ckpt: Path, barrier: Path) -> list[dict]:
    """Start ``n`` worker processes, release them together once all are warm, and read their results."""
    barrier.mkdir()
    procs = [
        subprocess.Popen([sys.executable, str(DRIVER), "--worker", str(i), "--plan", plan.name,
                          "--ckpt", str(ckpt), "--barrier", str(barrier)])
        for i in range(n)
    ]
    try:
        while not all((barrier / f"ready{i}").exists() for i in range(n)):
            dead = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"packed trial {dead[0][0]} exited with code {dead[0][1]} before it was warm")
            time.sleep(0.05)
        (barrier / "go").touch()
        for i, p in enumerate(procs):
            if p.wait() != 0:
                raise RuntimeError(f"packed trial {i} exited with code {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((barrier / f"worker{i}.json").read_text()) for i in range(n)]


def pack_worker(plan: Plan, worker: int, ckpt: Path, barrier: Path) -> None:
    """One packed trial: warm up, say ready, wait for ``go``, time steps, write ``worker<i>.json``."""
    from training.loop import configure_threads, pick_device

    configure_threads(plan.pack_threads)
    device = pick_device(plan.device)

    def ready_then_wait() -> None:
        (barrier / f"ready{worker}").touch()
        while not (barrier / "go").exists():
            time.sleep(0.005)

    cfg = plan.config()
    run = timed_steps(cfg, ckpt, device, cached=True, warmup=plan.warmup, steps=plan.steps,
                      min_seconds=plan.pack_seconds, before_timing=ready_then_wait)
    out = {"images": len(run.seconds) * cfg.train.batch_size, "start": run.start, "end": run.end,
           "peak_bytes": run.peak_bytes, "reserved_bytes": run.reserved_bytes}
    (barrier / f"worker{worker}.json").write_text(json.dumps(out))


def part_cams(plan: Plan, rec: Recorder) -> None:
    """Multi-scale CAMs (the config's scales), Grad-CAM and weight CAM, of the student and the teacher."""
    from training.cams import multiscale_cams_and_logits
    from training.config import CamConfig
    from training.models import build_net

    device = _device(plan)
    cfg = plan.config()
    size = cfg.data.image_size
    torch.manual_seed(0)
    nets = {
        "student": build_net(cfg.model.student, image_size=size).to(device).eval(),
        "teacher": build_net(cfg.model.teacher, image_size=size).to(device).eval(),
    }
    images = TensorImages(plan.cam_images, size).images.to(device)
    bs = cfg.cam.batch_size
    rec.note(student=cfg.model.student.name, teacher=_teacher_name(cfg), image_size=size, scales=list(cfg.cam.scales),
             batch_size=bs, images=plan.cam_images, rounds=plan.cam_rounds, precision="fp32 (as extract_cams runs)")

    def extraction(net, cam_cfg):
        @torch.no_grad()
        def run() -> None:  # the hot loop of training.evaluate.extract_cams, on resident images
            for start in range(0, len(images), bs):
                cams, logits = multiscale_cams_and_logits(net, images[start : start + bs], cam_cfg)
                cams.cpu().numpy()
                logits[:, 0].float().cpu()

        return run

    variants = {}
    for net_name, net in nets.items():
        for method in ("gradcam", "weight"):
            run = extraction(net, CamConfig(method=method, scales=cfg.cam.scales, batch_size=bs))
            try:
                run()  # warm-up; a variant that fails here (out of memory) is left out of the timing
            except Exception as err:
                rec.error(f"{net_name}_{method}", err)
                continue
            variants[f"{net_name}_{method}"] = run
    for name, ts in interleaved(variants, plan.cam_rounds, device).items():
        rec.put(f"{name}_images_s", len(images) / median(ts))


def part_sam(plan: Plan, rec: Recorder) -> None:
    """`SamAutomaticMaskGenerator` through the SAM proposal backend, random weights: timing only."""
    from postproc.proposals import SamProposals

    device = _device(plan)
    model = _sam_model(plan.sam_model)
    image = np.random.default_rng(0).integers(0, 256, (plan.sam_image, plan.sam_image, 3), dtype=np.uint8)
    # random weights predict low IoUs and unstable masks: opened thresholds let masks come out,
    # so the whole generator runs (decoder, filtering, NMS, RLE); their count is recorded
    backends = {
        pps: SamProposals(model=model, points_per_side=pps, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                          device=str(device))
        for pps in plan.sam_points
    }
    rec.note(model=plan.sam_model, weights="random", image=f"{plan.sam_image}×{plan.sam_image}",
             repeats=plan.sam_repeats, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    first = backends[plan.sam_points[0]]
    first.propose(image)  # warm-up: kernels, allocator
    encode = []
    for _ in range(plan.sam_repeats):
        start = time.perf_counter()
        first.generator.predictor.set_image(image)
        sync(device)
        encode.append(time.perf_counter() - start)
    rec.put("encoder_s", median(encode))
    for pps, backend in backends.items():
        times, masks = [], 0
        for _ in range(plan.sam_repeats):
            start = time.perf_counter()
            masks = len(backend.propose(image))
            sync(device)
            times.append(time.perf_counter() - start)
        rec.put(f"pps{pps}_s_per_image", median(times))
        rec.put(f"pps{pps}_masks", masks)


def _sam_model(name: str):
    if name == "tiny":  # the tests' 64 px SAM, loaded by path: tests/ is not a package
        import importlib.util

        spec = importlib.util.spec_from_file_location("tiny_sam", ROOT / "tests" / "tiny_sam.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.tiny_sam()
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    return sam_model_registry[name](checkpoint=None)


PARTS = {
    "machine": part_machine,
    "train_step": part_train_step,
    "packing": part_packing,
    "cams": part_cams,
    "sam": part_sam,
}
