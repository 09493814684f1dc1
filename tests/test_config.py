"""Trial config: YAML round trip, rejection of unknown keys, types and ranges, overrides, digest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict

from training.config import (
    TrialConfig,
    apply_overrides,
    from_dict,
    load_trial_config,
    parse_overrides,
    save_config,
)
from training.errors import ConfigError


def _write(tmp_path: Path, data: object, name: str = "trial.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _with(key: str, value: object) -> dict:
    """The tiny config dict with one dotted key set."""
    return apply_overrides(tiny_config_dict(), {key: value})


def test_defaults_are_valid() -> None:
    cfg = TrialConfig()
    assert cfg.transfer.paradigm == "teacher_student"
    assert cfg.cam.scales == (0.5, 1.0, 1.5, 2.0)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = from_dict(TrialConfig, tiny_config_dict("/data/x")).replace(
        **{"cam.layers": [-2, -1], "model.student.options": {"patch_size": 8, "depth": 2}, "transfer.lam": 0.5}
    )
    save_config(cfg, tmp_path / "config.yaml")
    back = load_trial_config(tmp_path / "config.yaml")
    assert back == cfg
    assert back.digest() == cfg.digest()
    assert back.cam.layers == (-2, -1) and isinstance(back.cam.scales, tuple)


def test_shipped_quick_yaml_loads() -> None:
    path = Path(__file__).parents[1] / "search_spaces" / "trials" / "quick.yaml"
    cfg = load_trial_config(path)
    assert cfg.name == "quick" and cfg.model.teacher.output_stride == 8


def test_unknown_key_suggests_and_lists(tmp_path: Path) -> None:
    path = _write(tmp_path, _with("transfer.lamda", 0.5))
    with pytest.raises(ConfigError) as err:
        load_trial_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "transfer.lamda: unknown key" in msg
    assert 'did you mean "lam"' in msg
    assert "valid keys: paradigm, metric, level, lam, temperature" in msg


def test_unknown_top_level_section() -> None:
    with pytest.raises(ConfigError, match=r'trian: unknown key \(did you mean "train"\?\)'):
        from_dict(TrialConfig, {"trian": {}})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.epochs", True, r"train\.epochs: expected an integer, got True"),
        ("train.epochs", 2.5, r"train\.epochs: expected an integer, got 2\.5"),
        ("train.lr", "fast", r"train\.lr: expected a number, got 'fast'"),
        ("train.lr", "inf", r"train\.lr: expected a number, got 'inf'"),
        ("transfer.lam", False, r"transfer\.lam: expected a number, got False"),
        ("data.augment", "yes", r"data\.augment: expected true or false, got 'yes'"),
        ("cam.scales", ["big"], r"cam\.scales\[0\]: expected a number, got 'big'"),
        ("model.student.options", [1, 2], r"model\.student\.options: expected a mapping"),
        ("data", 3, r"data: expected a mapping, got int"),
    ],
)
def test_wrong_types(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(TrialConfig, _with(key, value))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("transfer.lam", -0.1, r"transfer\.lam: expected λ ≥ 0"),
        ("transfer.temperature", 0, r"transfer\.temperature: expected > 0"),
        ("cam.scales", [], r"cam\.scales: expected at least one scale"),
        ("cam.scales", [1.0, 0.0], r"cam\.scales: expected positive scales"),
        ("cam.threshold", 0.0, r"cam\.threshold: expected a value in \(0, 1\), got 0\.0"),
        ("cam.threshold", 1, r"cam\.threshold: expected a value in \(0, 1\), got 1\.0"),
        ("cam.method", "gradcamm", r'cam\.method: unknown CAM method .*did you mean "gradcam"'),
        ("train.device", "gpu", r"train\.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("train.epochs", 0, r"train\.epochs: expected ≥ 1, got 0"),
        ("train.lr", 0.0, r"train\.lr: expected > 0"),
        ("train.precision", "fp16", r"train\.precision: expected one of fp32, bf16, got 'fp16'"),
        ("model.teacher.output_stride", 4, r"model\.teacher\.output_stride: expected one of 8, 16, 32"),
        ("data.image_size", 8, r"data\.image_size: expected ≥ 16, got 8"),
        ("data.std", [0.2, 0.2], r"data\.std: expected 3 values"),
        ("data.std", [0.2, 0.0, 0.2], r"data\.std: expected positive values"),
        ("data.source", "folder", r"data\.root: expected a dataset folder"),
    ],
)
def test_out_of_range(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(TrialConfig, _with(key, value))


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_valid_devices(device: str) -> None:
    assert from_dict(TrialConfig, _with("train.device", device)).train.device == device


@pytest.mark.parametrize(("metric", "level"), [("cosine", "logits"), ("l1", "spatial")])
def test_invalid_metric_level_pair_names_both(metric: str, level: str) -> None:
    data = apply_overrides(tiny_config_dict(), {"transfer.metric": metric, "transfer.level": level})
    with pytest.raises(ConfigError) as err:
        from_dict(TrialConfig, data)
    msg = str(err.value)
    assert "transfer.metric/transfer.level" in msg
    assert f"metric={metric}" in msg and f"level={level}" in msg


def test_unknown_paradigm_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(TrialConfig, _with("transfer.paradigm", "teacher-student"))
    msg = str(err.value)
    assert "transfer.paradigm: unknown paradigm 'teacher-student'" in msg
    assert 'did you mean "teacher_student"' in msg
    assert "valid: baseline, co_training, scd_with_teacher, self_correspondence, teacher_student" in msg


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["transfer.lam=0.5"], {"transfer.lam": 0.5}),
        (["cam.scales=[1.0, 2]"], {"cam.scales": [1.0, 2]}),
        (["name=run 1", "train.seed=3"], {"name": "run 1", "train.seed": 3}),
        (["model.student.options={depth: 2, patch_size: 8}"], {"model.student.options": {"depth": 2, "patch_size": 8}}),
        (
            ["data.augment=true", "transfer.teacher_checkpoint="],
            {"data.augment": True, "transfer.teacher_checkpoint": ""},
        ),
        (["train.lr=1e-3"], {"train.lr": "1e-3"}),  # YAML 1.1: no dot → a string; from_dict converts it
    ],
)
def test_parse_overrides(items: list[str], expected: dict) -> None:
    assert parse_overrides(items) == expected


@pytest.mark.parametrize("item", ["transfer.lam", "=3", "cam.scales=[1.0"])
def test_bad_override(item: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([item])


def test_overrides_applied_when_loading(tmp_path: Path) -> None:
    path = _write(tmp_path, tiny_config_dict())
    cfg = load_trial_config(
        path,
        [
            "transfer.lam=0.3",
            "cam.scales=[0.5, 1.5]",
            "model.student.options.depth=1",
            "cam.layers=-1",
            "train.lr=0.01",
        ],
    )
    assert cfg.transfer.lam == 0.3
    assert cfg.cam.scales == (0.5, 1.5)
    assert cfg.cam.layers == (-1,)  # a scalar becomes a one-element tuple
    assert cfg.model.student.options == {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    assert cfg.train.lr == 0.01
    # the untouched file still builds to the unmodified values
    assert load_trial_config(path).transfer.lam == 1.0


@pytest.mark.parametrize(("text", "value"), [("1e-4", 1e-4), ("5.0e-4", 5e-4), ("2E+1", 20.0), ("3", 3.0)])
def test_float_in_exponent_notation(tmp_path: Path, text: str, value: float) -> None:
    # PyYAML (YAML 1.1) parses `1e-4` as a string; the thesis's lr must still load as a float
    cfg = load_trial_config(_write(tmp_path, f"train:\n  lr: {text}\n"))
    assert cfg.train.lr == value and isinstance(cfg.train.lr, float)


def test_override_of_unknown_key_fails(tmp_path: Path) -> None:
    path = _write(tmp_path, tiny_config_dict())
    with pytest.raises(ConfigError, match=r'cam\.scale: unknown key \(did you mean "scales"\?\)'):
        load_trial_config(path, ["cam.scale=[1.0]"])


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\ntrain:\n  epochs: 2\n  lr: [0.1\n", name="broken.yaml")
    with pytest.raises(ConfigError) as err:
        load_trial_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:")
    assert "YAML syntax error" in msg
    line = int(msg[len(str(path)) + 1 :].split(":")[0])
    assert line in (4, 5)  # the unclosed list opens on line 4; PyYAML reports where it gave up


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_trial_config(tmp_path / "nope.yaml")


def test_empty_yaml_is_the_defaults(tmp_path: Path) -> None:
    assert load_trial_config(_write(tmp_path, "")) == TrialConfig()


def test_pretrained_false_from_yaml_is_a_string(tmp_path: Path) -> None:
    cfg = load_trial_config(_write(tmp_path, "model:\n  teacher: {pretrained: false}\n"))
    assert cfg.model.teacher.pretrained == "false"


def test_digest_stable_and_sensitive() -> None:
    a = from_dict(TrialConfig, tiny_config_dict())
    b = from_dict(TrialConfig, tiny_config_dict())
    assert a.digest() == b.digest()
    assert len(a.digest()) == 12
    c = a.replace(**{"transfer.lam": 0.5})
    assert c.digest() != a.digest()
    # a section digest ignores changes outside it
    assert c.digest("data", "model") == a.digest("data", "model")
    assert c.digest("transfer") != a.digest("transfer")
    assert a.replace(**{"data.synth.seed": 4}).digest("data.synth") != a.digest("data.synth")


def test_replace_returns_validated_copy() -> None:
    a = from_dict(TrialConfig, tiny_config_dict())
    b = a.replace(**{"transfer.paradigm": "co_training", "train.epochs": 5})
    assert (b.transfer.paradigm, b.train.epochs) == ("co_training", 5)
    assert (a.transfer.paradigm, a.train.epochs) == ("baseline", 2)  # the original is unchanged
    with pytest.raises(ConfigError, match=r"train\.epochs: expected ≥ 1"):
        a.replace(**{"train.epochs": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        a.replace(**{"train.epoch": 3})


def test_config_is_frozen() -> None:
    cfg = TrialConfig()
    with pytest.raises(AttributeError):
        cfg.name = "x"  # type: ignore[misc]


TRIAL_CONFIGS = sorted((Path(__file__).parents[1] / "search_spaces" / "trials").glob("*.yaml"))


@pytest.mark.parametrize("path", TRIAL_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_trial_config_loads(path: Path) -> None:
    cfg = load_trial_config(path)
    assert cfg.name == path.stem
