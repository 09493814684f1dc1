"""Shared fixtures: one tiny synthetic dataset per session, tiny trial configs, an isolated cache.

Everything here is sized for a shared 2-core CPU: 48 px images, 48 training and 24 test
images, a 2-block ViT with 32 channels and a ResNet-10-T with 8–64 channels.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from training.config import TrialConfig, from_dict
from training.synth import SynthConfig, generate

TINY_SYNTH = SynthConfig(size=48, n_train=48, n_test=24, seed=3)
TINY_VIT = {"name": "vit_tiny_patch16_224", "options": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}}
TINY_CNN = {"name": "resnet10t", "output_stride": 8, "options": {"channels": [8, 16, 32, 64], "stem_width": 8}}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding ``slow`` tests first, each kept whole (its module fixtures run once).

    `make test` spreads modules over two workers (pytest-xdist, ``--dist loadfile
    --no-loadscope-reorder``): the slow ones, which mostly wait on Ray and MLflow
    starting, then start at once on both, and the quick ones fill in behind them.
    """
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # stable: order within kept


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Run the whole session as on a machine that never ran anything: its own empty HOME
    (so no `~/.ray/auth_token` or `~/.cache` left by earlier runs counts, either way), its own
    Ray temp folder (Ray's "current cluster" pointer and session logs), its own cache; MLflow
    quiet; one thread."""
    cache = tmp_path_factory.mktemp("wsss-cache")
    home = tmp_path_factory.mktemp("home")
    # Short and outside the pytest tree: Ray's unix socket paths live under it (107-byte limit).
    ray_tmp = Path(tempfile.mkdtemp(prefix="wsss-ray-", dir="/tmp"))
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("RAY_TMPDIR", str(ray_tmp))
        for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
            mp.delenv(name, raising=False)
        mp.setenv("WSSS_CACHE", str(cache))
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        torch.set_num_threads(1)
        yield cache
    torch.set_num_threads(threads)
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def wsss_cache(_isolated_env: Path) -> Path:
    return Path(os.environ["WSSS_CACHE"])


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic dataset (generated once per session)."""
    return generate(TINY_SYNTH, tmp_path_factory.mktemp("synth") / "tiny")


def tiny_config_dict(root: Path | str = "") -> dict[str, Any]:
    """Plain-data form of the tiny trial config (what a YAML file would hold)."""
    return {
        "name": "tiny",
        "data": {
            "source": "synthetic",
            "root": str(root),
            "synth": {"size": TINY_SYNTH.size, "n_train": TINY_SYNTH.n_train, "n_test": TINY_SYNTH.n_test, "seed": 3},
            "image_size": 32,
        },
        "model": {"teacher": dict(TINY_CNN), "student": dict(TINY_VIT), "proj_channels": 2},
        "transfer": {"paradigm": "baseline", "metric": "cosine", "level": "global", "lam": 1.0},
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "lr": 1e-3,
            "seed": 7,
            "device": "cpu",
            "threads": 1,
            "teacher_epochs": 1,
            "teacher_lr": 1e-3,
        },
        "cam": {"scales": [1.0, 0.5], "threshold": 0.3, "shard_size": 10, "batch_size": 12, "gallery": 3},
    }


@pytest.fixture(scope="session")
def make_config(synth_root: Path) -> Callable[..., TrialConfig]:
    """Factory: ``make_config(**{"transfer.paradigm": "co_training"})`` → a validated tiny TrialConfig."""
    base = from_dict(TrialConfig, tiny_config_dict(synth_root))

    def make(**overrides: Any) -> TrialConfig:
        return base.replace(**overrides) if overrides else base

    return make


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sqlite store with MLflow's schema; migrating a fresh DB costs seconds per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def uri(tmp_path: Path, migrated_db: Path) -> str:
    """A fresh MLflow tracking URI per test (a copy of the migrated template)."""
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"
