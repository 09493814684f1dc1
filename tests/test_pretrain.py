"""`wsss pretrain`: the cache key, a tiny pre-training run whose backbone a trial loads
(strict for the backbone, the K-class head dropped), reuse of the cache, a trial that
pre-trains on first use, and the errors for bad references and fields."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CNN, TINY_VIT

from orchestrator.cli import main
from training.config import TrialConfig
from training.config.pretrain import load_pretrain_config, shipped_names
from training.errors import CheckpointError, ConfigError
from training.models import build_net, classifier_keys, read_state_dict
from training.pretrain import ensure_pretrained, pretrain_key, resolve_pretrained
from training.trial import run_trial, teacher_key

TINY_PRETRAIN = {
    "name": "tiny_vit",
    "corpus": {"classes": 3, "instances": 4, "val_instances": 2, "size": 32, "points_per_pixel": 1.0, "seed": 2},
    "net": TINY_VIT,
    "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0.5, "seed": 1},
    "device": "cpu",
    "threads": 1,
}


def _write(tmp_path: Path, data: dict, name: str = "tiny_vit.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


_SHIPPED_VIT = "fractal_vit"


def _key(**overrides) -> str:
    return pretrain_key(load_pretrain_config(_SHIPPED_VIT, overrides))


def test_every_shipped_pretrain_config_loads_and_fits_its_cpu_network() -> None:
    assert {"fractal_vit", "fractal_cnn"} <= set(shipped_names())
    cpu = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "trials" / "cpu.yaml").read_text())["model"]
    for name, which in (("fractal_vit", "student"), ("fractal_cnn", "teacher")):
        net = load_pretrain_config(name).net
        assert (net.name, net.options) == (cpu[which]["name"], cpu[which]["options"])


@pytest.mark.parametrize(
    "override",
    [
        "corpus.classes=101", "corpus.instances=41", "corpus.seed=1", "corpus.jitter=0.2", "corpus.size=48",
        "net.options={patch_size: 8, depth: 4, embed_dim: 96, num_heads: 3}", "mean=[0.5,0.5,0.5]",
        "train.epochs=11", "train.lr=5e-4", "train.batch_size=32", "train.label_smoothing=0.0", "train.seed=3",
        "train.warmup_epochs=2", "train.weight_decay=0.1",
    ],
)  # fmt: skip
def test_cache_key_changes_with_every_setting_that_matters(override: str) -> None:
    assert _key() != _key(**{override.split("=", 1)[0]: yaml.safe_load(override.split("=", 1)[1])})


@pytest.mark.parametrize("override", [{"device": "cuda"}, {"threads": 4}, {"name": "other"}, {"net.pcm": True}])
def test_cache_key_ignores_where_and_how_fast_it_runs(override: dict) -> None:
    assert _key() == _key(**override)


@pytest.fixture(scope="module")
def tiny_pretrain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pretrain YAML, its checkpoint) of one tiny pre-training run (~2 s on one thread)."""
    root = tmp_path_factory.mktemp("pretrain")
    path = _write(root, TINY_PRETRAIN)
    return path, ensure_pretrained(load_pretrain_config(path), root / "cache")


def test_backbone_saved_without_its_head_loads_strictly(tiny_pretrain: tuple[Path, Path]) -> None:
    yaml_path, ckpt = tiny_pretrain
    state = read_state_dict(ckpt)
    assert state["format"] == "wsss-backbone" and state["meta"]["classes"] == 3
    assert 0.0 <= state["meta"]["val_accuracy"] <= 1.0
    assert not {k for k in state["state_dict"] if k.startswith("head.")}  # the 3-class head is gone
    cfg = load_pretrain_config(yaml_path)
    torch.manual_seed(0)
    fresh = build_net(cfg.net, image_size=32)
    torch.manual_seed(0)
    loaded = build_net(cfg.net.__class__(**{**cfg.net.__dict__, "pretrained": str(ckpt)}), image_size=32)
    own = loaded.net.state_dict()
    head = classifier_keys(loaded.net)
    assert head == {"head.weight", "head.bias"}
    for k, v in state["state_dict"].items():
        torch.testing.assert_close(own[k], v)  # every backbone weight is the pre-trained one
    for k in head:
        torch.testing.assert_close(own[k], fresh.net.state_dict()[k])  # the 1-logit head is fresh


def test_a_backbone_of_another_network_fails_naming_the_first_mismatch(tiny_pretrain: tuple[Path, Path]) -> None:
    _, ckpt = tiny_pretrain
    other = load_pretrain_config(_SHIPPED_VIT).net  # 96 wide, the checkpoint is 32 wide
    net = other.__class__(**{**other.__dict__, "pretrained": str(ckpt)})
    with pytest.raises(
        CheckpointError,
        match=r"does not fit this network \(30 problems, first: cls_token: \(1, 1, 32\) in the file, \(1, 1, 96\) here",
    ):
        build_net(net, image_size=32)


def test_second_call_reuses_the_cache(tiny_pretrain: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    yaml_path, ckpt = tiny_pretrain
    monkeypatch.setattr("training.pretrain.run_pretraining", lambda *a, **k: pytest.fail("pre-trained again"))
    again = load_pretrain_config(yaml_path, ["device=auto", "threads=2", "name=renamed"])
    assert ensure_pretrained(again, ckpt.parents[1]) == ckpt


def test_a_trial_pretrains_on_first_use_and_loads_the_backbone(
    tmp_path: Path, make_config: Callable[..., TrialConfig], wsss_cache: Path
) -> None:
    spec = _write(tmp_path, {**TINY_PRETRAIN, "train": {**TINY_PRETRAIN["train"], "seed": 4}})
    cfg = make_config(**{"model.student.pretrained": f"pretrain:{spec}", "train.epochs": 1})
    ckpt = wsss_cache / "pretrain" / f"pretrain-{pretrain_key(load_pretrain_config(spec))}.pt"
    assert not ckpt.exists()
    metrics = run_trial(cfg, tmp_path / "trial")
    assert ckpt.is_file() and 0.0 <= metrics["accuracy"] <= 1.0
    saved = yaml.safe_load((tmp_path / "trial" / "config.yaml").read_text())
    assert saved["model"]["student"]["pretrained"] == f"pretrain:{spec}"  # portable: the reference, not the path
    assert resolve_pretrained(cfg, wsss_cache).model.student.pretrained == str(ckpt)


def test_only_networks_the_paradigm_builds_are_resolved(
    tiny_pretrain: tuple[Path, Path], make_config: Callable[..., TrialConfig], tmp_path: Path
) -> None:
    cnn = _write(tmp_path, {**TINY_PRETRAIN, "net": TINY_CNN}, "tiny_cnn.yaml")
    cfg = make_config(**{"model.teacher.pretrained": f"pretrain:{cnn}"})  # a ViT baseline: no CNN built
    assert resolve_pretrained(cfg, tmp_path / "cache") == cfg
    assert not (tmp_path / "cache").exists()


def test_teacher_key_follows_the_pretrain_files_content(
    tmp_path: Path, make_config: Callable[..., TrialConfig]
) -> None:
    spec = _write(tmp_path, {**TINY_PRETRAIN, "net": TINY_CNN}, "cnn.yaml")
    cfg = make_config(**{"model.teacher.pretrained": f"pretrain:{spec}", "transfer.paradigm": "teacher_student"})
    before = teacher_key(cfg)
    _write(tmp_path, {**TINY_PRETRAIN, "net": TINY_CNN, "train": {**TINY_PRETRAIN["train"], "lr": 3e-3}}, "cnn.yaml")
    assert teacher_key(cfg) != before


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pretrain:fractal_vt", r'model\.student\.pretrained: unknown pretrain config .fractal_vt. '
                                r'\(did you mean "fractal_vit"\?\); valid: .*fractal_cnn.*fractal_vit'),
        ("pretrain:no/such.yaml", r"model\.student\.pretrained: pretrain config file 'no/such\.yaml' does not exist"),
        ("pretrain:fractal_cnn", r"model\.student\.pretrained: 'pretrain:fractal_cnn' pre-trains resnet18 .*"
                                 r"but this network is vit_tiny_patch16_224 .*differ in name, output_stride, options"),
    ],
)  # fmt: skip
def test_bad_pretrain_reference_names_the_field(
    value: str, message: str, make_config: Callable[..., TrialConfig]
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(**{"model.student.pretrained": value})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"corpus": {**TINY_PRETRAIN["corpus"], "clases": 3}}, r'corpus\.clases: unknown key \(did you mean "classes"'),
        ({"corpus": {**TINY_PRETRAIN["corpus"], "classes": 1}}, r"corpus\.classes: expected an integer in \[2, "),
        ({"train": {"label_smoothing": 1.0}}, r"train\.label_smoothing: expected a value in \[0, 1\)"),
        ({"net": {**TINY_VIT, "pretrained": "true"}}, r"net\.pretrained: expected false"),
        ({"mean": [0.5, 0.5]}, r"mean/std: expected 3 values each"),
    ],
)  # fmt: skip
def test_bad_pretrain_field_names_file_and_field(tmp_path: Path, change: dict, message: str) -> None:
    path = _write(tmp_path, {**TINY_PRETRAIN, **change})
    with pytest.raises(ConfigError, match=rf"{path}: {message}"):
        load_pretrain_config(path)


def test_normalisation_mismatch_fails_before_training(tmp_path: Path, make_config: Callable[..., TrialConfig]) -> None:
    spec = _write(tmp_path, {**TINY_PRETRAIN, "mean": [0.5, 0.5, 0.5]})
    cfg = make_config(**{"model.student.pretrained": f"pretrain:{spec}"})
    with pytest.raises(ConfigError, match=r"model\.student\.pretrained: .* normalises inputs with mean \[0\.5"):
        resolve_pretrained(cfg, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_cli_prints_the_checkpoint_and_reports_the_cache(
    tiny_pretrain: tuple[Path, Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    yaml_path, ckpt = tiny_pretrain
    monkeypatch.setenv("WSSS_CACHE", str(ckpt.parents[1]))
    assert main(["pretrain", str(yaml_path)]) == 0
    out = capsys.readouterr().out
    assert f"pre-trained backbone (cached): {ckpt}" in out
    assert json.loads(out[: out.index("}") + 1])["epoch"] == 2
    assert main(["pretrain", "fractal_vt"]) == 2
    assert "unknown pretrain config 'fractal_vt' (did you mean \"fractal_vit\"?)" in capsys.readouterr().err


def test_validate_accepts_a_pretrain_reference_and_refuses_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "trials" / "cpu.yaml").read_text())
    space = tmp_path / "space.yaml"
    grid = {"model.student.pretrained": ["false", "pretrain:fractal_vit"]}
    space.write_text(yaml.safe_dump({"name": "pt", "base": base, "grid": grid}))
    assert main(["validate", str(space)]) == 0  # not mistaken for a missing checkpoint file; nothing trains
    assert "expands to 2 trials" in capsys.readouterr().out
    space.write_text(yaml.safe_dump({"name": "pt", "base": base, "grid": {"model.student.pretrained": ["pretrain:x"]}}))
    assert main(["validate", str(space)]) == 2
    assert "model.student.pretrained: unknown pretrain config 'x'" in capsys.readouterr().err
