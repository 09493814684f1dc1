"""The speed paths compute what the plain paths compute: channels-last CNNs, bf16 autocast,
CAMs sharing their forward with the logits, and the indexed loader's order."""

from __future__ import annotations

import math

import pytest
import torch

from training.cams import multiscale_cams, multiscale_cams_and_logits
from training.config import CamConfig
from training.feature_cache import IndexedDataset
from training.loop import default_num_workers, epoch_loader, make_optimizer, train_epoch
from training.models import build_net
from training.paradigms import build_paradigm


def _images(b: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_channels_last_keeps_outputs(make_config, which: str) -> None:
    cfg = make_config()
    torch.manual_seed(0)
    net = build_net(getattr(cfg.model, which), image_size=32).eval()
    x = _images()
    with torch.no_grad():
        plain = net(x)
        net.use_channels_last()
        fast = net(x)
    assert net.channels_last is (not net.is_vit)  # the ViT is left alone
    for a, b in zip(plain, fast, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_paradigm_channels_last_reaches_the_teacher(make_config) -> None:
    model = build_paradigm(make_config(**{"transfer.paradigm": "co_training"})).use_channels_last()
    assert model.teacher.channels_last and not model.cam_net.channels_last
    conv = next(m for m in model.teacher.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_trains(make_config, synth_root) -> None:
    from training.trial import load_splits

    cfg = make_config(**{"train.precision": "bf16"})
    train_ds, _ = load_splits(cfg.data, synth_root)
    torch.manual_seed(0)
    model = build_paradigm(cfg)
    loader = epoch_loader(train_ds, cfg.train, 0)
    opt, sched = make_optimizer(model, cfg.train, len(loader))
    metrics = train_epoch(model, loader, opt, sched, cfg.train, torch.device("cpu"), epoch=0)
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0


@pytest.mark.parametrize("which", ["teacher", "student"])
@pytest.mark.parametrize("scales", [(1.0,), (0.5, 1.0, 1.5)])
def test_cams_share_the_logits_forward(make_config, which: str, scales: tuple[float, ...]) -> None:
    cfg = make_config()
    torch.manual_seed(0)
    net = build_net(getattr(cfg.model, which), image_size=32).eval()
    x = _images()
    cam_cfg = CamConfig(scales=scales)
    calls = {"n": 0}
    real = net.net.forward_features

    def counting(images):
        calls["n"] += 1
        return real(images)

    net.net.forward_features = counting
    with torch.no_grad():
        cams, logits = multiscale_cams_and_logits(net, x, cam_cfg)
        shared_calls = calls["n"]
        assert torch.equal(logits, net(x)[0])  # the very same numbers as a separate forward
        assert torch.equal(cams, multiscale_cams(net, x, cam_cfg))
    assert shared_calls == len(scales)  # one forward per scale, none extra for the logits


def test_indexed_loader_keeps_the_order(make_config, synth_root) -> None:
    from training.trial import load_splits

    cfg = make_config()
    train_ds, _ = load_splits(cfg.data, synth_root)
    plain = [b[1] for b in epoch_loader(train_ds, cfg.train, 3)]
    indexed = list(epoch_loader(IndexedDataset(train_ds), cfg.train, 3))
    assert all(torch.equal(a, b[1]) for a, b in zip(plain, indexed, strict=True))
    labels = torch.tensor([train_ds[int(i)][1] for b in indexed for i in b[2]])
    assert torch.equal(labels, torch.cat(plain))


def test_default_num_workers() -> None:
    assert default_num_workers(torch.device("cpu"), 0) == 0  # a shared CPU box decodes in-process
    assert default_num_workers(torch.device("cpu"), 3) == 3
    assert default_num_workers(torch.device("cuda"), 0) >= 0
