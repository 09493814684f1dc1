"""Peak GPU memory of one teacher-student training step (ViT-B/16 student, ResNet-50 teacher, 512×512).

On a CUDA machine, in one process, for each variant (fp32 / bf16 autocast, teacher run in
the step / read from the feature cache, channels-last teacher) it builds the trial's
models, runs three training steps (AdamW state exists from the first) and prints
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``, with images/s, so users
can pick ``resources.gpu`` (the fraction of a GPU per trial).

Without CUDA it says so, prints the **estimate** (parameters + gradients + AdamW state +
activations), and measures on the CPU what the estimate's largest term rests on: the bytes
autograd saves for the backward pass of one image (a `saved_tensors_hooks` count), scaled
to the batch. That is a CPU count of saved tensors, not a GPU memory measurement.

Usage::

    .venv/bin/python benchmarks/gpu_memory.py                    # batch 8 at 512², every variant (GPU)
    .venv/bin/python benchmarks/gpu_memory.py --batch-size 16
    .venv/bin/python benchmarks/gpu_memory.py --no-cpu-count     # on a CPU: only the estimate
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

# `python benchmarks/x.py` puts benchmarks/ first on sys.path, so the sibling module imports as is.
from _common import machine, random_teacher_checkpoint, timed_steps, trial_config

GiB = 1024**3


def gpu_step_memory(cfg, ckpt: str, *, cached: bool, steps: int = 3) -> dict[str, float]:
    """Peak allocated/reserved GiB over ``steps`` training steps on cuda:0 (the first one, which
    creates AdamW's state, included), and images/s of the steps after the first."""
    run = timed_steps(cfg, ckpt, torch.device("cuda"), cached=cached, warmup=1, steps=steps - 1)
    return {
        "allocated": run.peak_bytes / GiB,
        "reserved": run.reserved_bytes / GiB,
        "images_s": cfg.train.batch_size / run.median_s,
    }


def param_counts(cfg) -> tuple[int, int, int]:
    """(student + projections trainable, teacher frozen, projections) parameter counts."""
    from training.models import build_net

    student = build_net(cfg.model.student, image_size=cfg.data.image_size)
    teacher = build_net(cfg.model.teacher, image_size=cfg.data.image_size)
    k = cfg.model.proj_channels
    proj = (student.num_features + teacher.num_features) * k
    count = lambda m: sum(p.numel() for p in m.parameters())
    return count(student) + proj, count(teacher), proj


def saved_bytes(cfg, bf16: bool) -> tuple[float, float]:
    """Bytes autograd keeps for backward in a teacher-student step of ONE image (CPU count):
    (per image, fixed). Parameters are excluded (counted separately); each storage is
    counted once. Under autocast the bf16 copies of the weights are saved too: they have a
    parameter's shape with a leading size other than 1 (an activation's leading size is the
    batch, 1 here), do not grow with the batch, and are reported as ``fixed``.
    """
    from training.models import build_net
    from training.paradigms import TeacherStudent

    one = cfg.replace(**{"train.batch_size": 1})
    student = build_net(one.model.student, image_size=one.data.image_size)
    teacher = build_net(one.model.teacher, image_size=one.data.image_size)
    model = TeacherStudent(one, student, teacher)
    params = {p.data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    per_image: dict[int, int] = {}
    fixed: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            weight_copy = tuple(t.shape) in shapes and t.shape[0] != 1
            (fixed if weight_copy else per_image)[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, 3, one.data.image_size, one.data.image_size)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss, _ = model.loss(x, torch.ones(1))
    del loss
    return float(sum(per_image.values())), float(sum(fixed.values()))


def estimate(cfg, counted: dict[str, tuple[float, float]] | None) -> None:
    trainable, frozen, _ = param_counts(cfg)
    bs = cfg.train.batch_size
    # fp32 weights + fp32 grads + AdamW's two fp32 moments for what learns; fp32 weights for the teacher
    static = (trainable * 16 + frozen * 4) / GiB
    print(f"parameters: student + projections {trainable / 1e6:.1f} M (trainable), "
          f"teacher {frozen / 1e6:.1f} M (frozen)")
    print(f"ESTIMATE, static: weights + grads + AdamW moments = {static:.2f} GiB "
          "(fp32 master weights, also under bf16)")
    if counted is None:
        return
    for name, (b, fixed) in counted.items():
        act = (b * bs + fixed) / GiB
        print(f"ESTIMATE, {name}: saved for backward {b / 2**20:.0f} MiB/image (counted on the CPU) × batch {bs}"
              f" + {fixed / 2**20:.0f} MiB bf16 weight copies = {act:.2f} GiB; total ≈ {static + act:.2f} GiB, "
              f"+20 % for allocator slack and cuDNN/cuBLAS workspaces ≈ {(static + act) * 1.2:.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-cpu-count", action="store_true", help="CPU: skip counting saved activations")
    args = ap.parse_args()

    cfg = trial_config("thesis", image_size=args.image_size, batch_size=args.batch_size)
    print(f"machine: {machine()}")
    print(f"step: {cfg.model.student.name} student, {cfg.model.teacher.name} teacher (output stride "
          f"{cfg.model.teacher.output_stride}), {args.image_size}×{args.image_size}, batch {args.batch_size}, AdamW")
    if not torch.cuda.is_available():
        print("SKIPPED the GPU measurement: no CUDA device is visible. Printing the estimate instead.")
        counted = None
        if not args.no_cpu_count:
            counted = {"fp32": saved_bytes(cfg, False), "bf16": saved_bytes(cfg, True)}
        estimate(cfg, counted)
        return
    ckpt = random_teacher_checkpoint(cfg, Path(tempfile.mkdtemp()))
    rows = []
    for precision in ("fp32", "bf16"):
        for cached in (False, True):
            for channels_last in (False, True):
                if cached and channels_last:
                    continue  # the teacher does not run in a cached step
                c = cfg.replace(**{"train.precision": precision, "train.channels_last": channels_last})
                rows.append((precision, cached, channels_last, gpu_step_memory(c, str(ckpt), cached=cached)))
    ref = rows[0][3]["allocated"]
    print(f"{'precision':<10}{'teacher':<10}{'chan-last':<10}{'peak alloc GiB':>15}{'peak reserved GiB':>18}"
          f"{'images/s':>10}{'ratio':>7}")
    for precision, cached, cl, m in rows:
        print(f"{precision:<10}{'cached' if cached else 'in step':<10}{cl!s:<10}{m['allocated']:15.2f}"
              f"{m['reserved']:18.2f}{m['images_s']:10.1f}{m['allocated'] / ref:7.2f}")
    estimate(cfg, None)


if __name__ == "__main__":
    main()
