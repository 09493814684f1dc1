"""A full disk while a trial writes its checkpoint or its CAM shards: named, the previous file intact.

These tests write into a real small filesystem: a tmpfs of a few hundred KiB
mounted for the test. Mounting needs root with CAP_SYS_ADMIN (a CI container
run as root usually has it); where it is refused the tests are skipped, saying
so. `test_driver_kill.py` covers the same path in a sweep under Ray, with a
write hook that raises ENOSPC (`fault_plugin`'s ``storage_full``), on any machine.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from training.errors import StorageFull
from training.loop import STATE_FILE, load_state, save_state
from training.shards import read_all, write_shards


@pytest.fixture
def small_fs(tmp_path) -> Path:
    """A 192 KiB tmpfs, unmounted afterwards; skipped where this machine may not mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)], capture_output=True,
                             text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    net = torch.nn.Linear(128, 256)  # 128·256 + 256 float32 = 132 KiB: one fits in 192 KiB, two do not
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return net, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1)


def test_a_checkpoint_that_does_not_fit_names_the_path_and_the_space_and_keeps_the_previous(small_fs):
    ckpt = small_fs / "checkpoint"
    first, opt, sched = _model(0)
    save_state(ckpt, first, opt, sched, epoch=1)
    second, opt2, sched2 = _model(1)
    with pytest.raises(StorageFull) as full:  # the new file beside the old one needs 264 KiB
        save_state(ckpt, second, opt2, sched2, epoch=2)
    message = str(full.value)
    assert message.startswith(f"{ckpt / STATE_FILE}: cannot write it: no space left on device (")
    free = re.search(r"\((\d+\.\d) KiB free of 192\.0 KiB on its filesystem\)", message)
    assert free and float(free.group(1)) < 64, message  # 192 − 132 KiB for the kept checkpoint, roughly
    assert f"the previous {STATE_FILE} is intact" in message and "rerun the same command" in message
    assert sorted(p.name for p in ckpt.iterdir()) == [STATE_FILE]  # the partial temporary file is gone
    restored, opt3, sched3 = _model(2)
    assert load_state(ckpt, restored, opt3, sched3) == 1
    assert torch.equal(restored.weight, first.weight)


def test_cam_shards_that_do_not_fit_name_the_shard_and_leave_no_index(small_fs):
    rng = np.random.default_rng(0)
    cams = [rng.random((64, 64), dtype=np.float32) for _ in range(24)]  # float16 on disk: 8 KiB each, 192 KiB
    with pytest.raises(StorageFull, match=r"/cams/shard-0000\d\.npz: cannot write it: no space left on device "
                                          r"\(\d+(\.\d)? (B|KiB) free of 192\.0 KiB"):  # fmt: skip
        write_shards(small_fs / "cams", [f"im{i}" for i in range(24)], cams, np.zeros((24, 2)), np.zeros(24),
                     shard_size=4)  # fmt: skip
    assert not (small_fs / "cams" / "index.json").exists()  # an index is only written once every shard is
    assert not [p for p in (small_fs / "cams").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_cam_shards_that_fit_are_written_whole(small_fs):
    """The same write, small enough: the filesystem itself is sound (the failure above is the space)."""
    cams = [np.full((16, 16), 0.5, np.float32) for _ in range(8)]
    write_shards(small_fs / "cams", [f"im{i}" for i in range(8)], cams, np.zeros((8, 2)), np.zeros(8), shard_size=4)
    assert read_all(small_fs / "cams").ids == [f"im{i}" for i in range(8)]
