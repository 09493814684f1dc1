"""benchmarks/gpu_check.sh: its syntax, its part runner (caps, failures), the GPU plan, and the CPU dry run.

The GPU figures themselves need a GPU; here the same code runs on the CPU at toy sizes and the
report is checked to hold every figure the issue asks for, as a number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "gpu_check.sh"
TRAIN_CASES = [f"{p}_{c}" for p in ("fp32", "bf16") for c in ("uncached", "uncached_channels_last", "cached")]


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    """The driver module (benchmarks/ is a folder of scripts, not a package)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    return gpu_check


def test_script_syntax() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _part(tmp_path: Path, body: str) -> list[str]:
    """A stand-in part: a Python process running ``body`` with ``result`` = its result file."""
    code = "import json, subprocess, sys, time\nresult = sys.argv[1]\n" + textwrap.dedent(body)
    return [sys.executable, "-c", code, str(tmp_path / "result.json")]


def _alive(pid: int) -> bool:
    """Running (a killed process that nobody has reaped yet is a zombie: dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_part_past_its_cap_is_stopped_with_its_children_and_keeps_its_figures(gpu_check, tmp_path) -> None:
    argv = _part(tmp_path, """
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open(result + ".child", "w").write(str(child.pid))
        open(result, "w").write(json.dumps({"figures": {"a_s": 1.5}, "errors": {}, "settings": {}}))
        time.sleep(60)
    """)
    start = time.monotonic()
    out = gpu_check.run_part("slow", argv, 3.0, tmp_path / "result.json", tmp_path / "slow.log")
    assert time.monotonic() - start < 30
    assert out["status"] == "timed_out" and "cap of 3 s" in out["error"]
    assert out["figures"] == {"a_s": 1.5}  # what it measured before the cap
    child = int((tmp_path / "result.json.child").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_crashing_part_reports_its_last_line(gpu_check, tmp_path) -> None:
    argv = _part(tmp_path, "raise ValueError('CUDA out of memory, say')")
    out = gpu_check.run_part("bad", argv, 60.0, tmp_path / "result.json", tmp_path / "bad.log")
    assert out["status"] == "failed"
    assert "exit code 1" in out["error"] and "ValueError: CUDA out of memory, say" in out["error"]
    assert out["figures"] == {}


def test_a_part_with_a_failed_case_is_partial(gpu_check, tmp_path) -> None:
    argv = _part(tmp_path, """
        open(result, "w").write(json.dumps({"figures": {"b_s": 2.0}, "errors": {"bf16": "OOM"}, "settings": {}}))
    """)
    out = gpu_check.run_part("some", argv, 60.0, tmp_path / "result.json", tmp_path / "some.log")
    assert (out["status"], out["error"]) == ("partial", None)
    assert (out["figures"], out["errors"]) == ({"b_s": 2.0}, {"bf16": "OOM"})


def test_bad_options_name_the_valid_ones(gpu_check) -> None:
    with pytest.raises(SystemExit, match="valid: machine, train_step, packing, cams, sam"):
        gpu_check._parts("train_step,sams")
    with pytest.raises(SystemExit, match="PART=SECONDS"):
        gpu_check._caps("gpu", ["sam"])
    with pytest.raises(SystemExit, match="not a number"):
        gpu_check._caps("gpu", ["sam=ten"])
    assert gpu_check._parts("sam,machine") == ["machine", "sam"]  # machine always first
    assert gpu_check._caps("gpu", ["sam=300"])["sam"] == 300.0


def test_gpu_caps_fit_the_eight_minutes(gpu_check) -> None:
    assert sum(gpu_check.CAPS["gpu"].values()) <= gpu_check.BUDGET_S["gpu"] - 60  # a minute for start-up
    assert gpu_check.BUDGET_S["gpu"] == 8 * 60


def test_the_gpu_plan_is_the_issues_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from gpu_parts import PLANS

    plan = PLANS["gpu"]
    cfg = plan.config()
    assert (cfg.data.image_size, cfg.train.batch_size) == (512, 8)
    assert (cfg.model.student.name, cfg.model.teacher.name, cfg.model.teacher.pcm) == (
        "vit_base_patch16_224", "resnet50", True)
    assert cfg.model.student.pretrained == cfg.model.teacher.pretrained == "false"  # nothing downloaded
    assert cfg.cam.scales == (0.5, 1.0, 1.5, 2.0)
    assert plan.device == "cuda" and plan.steps >= 20 and plan.warmup >= 1
    assert (plan.sam_model, plan.sam_image, plan.sam_points) == ("vit_b", 1024, (16, 32))


def test_without_cuda_the_gpu_plan_skips_after_the_machine_part(gpu_check, tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    report = gpu_check.check("gpu", ["machine", "train_step"], gpu_check.CAPS["gpu"], tmp_path, 300.0)
    assert report["parts"]["machine"]["status"] == "ok"
    assert report["parts"]["machine"]["figures"]["cuda_available"] is False
    skipped = report["parts"]["train_step"]
    assert skipped["status"] == "skipped" and "no CUDA device" in skipped["error"]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == report


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


@pytest.mark.slow
def test_dry_run_reports_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from gpu_parts import PLANS

    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["plan"] == "dry-run"
    assert {n: (p["status"], p["error"], p["errors"]) for n, p in parts.items()} == {
        n: ("ok", None, {}) for n in ("machine", "train_step", "packing", "cams", "sam")}

    machine = parts["machine"]["figures"]
    assert all(isinstance(machine[k], str) and machine[k] for k in ("gpu", "driver", "torch", "cuda", "line"))
    expected = {
        "train_step": [f"{c}_{f}" for c in TRAIN_CASES for f in ("step_s", "images_s", "peak_gib")]
        + ["fp32_cached_vs_uncached", "bf16_cached_vs_uncached"],
        "packing": ["alone_images_s", "alone_peak_gib", "packed_images_s", "throughput_ratio"]
        + [f"packed{i}_{f}" for i in (0, 1) for f in ("images_s", "peak_gib")],
        "cams": [f"{n}_{m}_images_s" for n in ("student", "teacher") for m in ("gradcam", "weight")],
        "sam": ["encoder_s"] + [f"pps{p}_{f}" for p in PLANS["dry-run"].sam_points for f in ("s_per_image", "masks")],
    }
    for name, keys in expected.items():
        figures = parts[name]["figures"]
        assert [k for k in keys if not (_is_number(figures.get(k)) and figures[k] > 0)] == [], name

    # the figures agree with each other
    train = parts["train_step"]["figures"]
    assert train["fp32_uncached_images_s"] == pytest.approx(4 / train["fp32_uncached_step_s"])  # batch 4
    ratio = train["bf16_cached_step_s"] / train["bf16_uncached_step_s"]
    assert train["bf16_cached_vs_uncached"] == pytest.approx(ratio)
    pack = parts["packing"]["figures"]
    assert pack["throughput_ratio"] == pytest.approx(pack["packed_images_s"] / pack["alone_images_s"])
    assert parts["train_step"]["settings"]["memory"].startswith("peak RSS")  # a CPU stand-in, and said so

    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and all(f"## {n}: ok" in md for n in parts)
    assert "| fp32_cached_vs_uncached |" in proc.stdout  # the tables are printed too
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"{n}.log" for n in sorted(parts)]
