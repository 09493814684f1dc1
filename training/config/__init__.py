"""The config schema: what a trial, a sweep file and a refinement pipeline may say.

Frozen dataclasses checked against name tables, importing neither torch nor timm
(nor Ray, MLflow or OpenCV), so ``wsss validate`` reads a whole sweep in well under
a second. The modules, leaf first:

- `names`: every name a config may use, and the facts the code needs about it;
- `parse`: plain data → dataclasses, value checks, YAML and ``key=value`` overrides;
- `data`, `net`: the data section and one backbone;
- `pretrain`: a pre-training run on the fractal corpus (`wsss pretrain`, ``pretrained: "pretrain:<name>"``);
- `trial`: the trial config (`TrialConfig` and its sections);
- `refine`: refinement steps (one dataclass each) and pipelines;
- `sweep`: the sweep file (`SearchSpace`, resources, scheduler, tables, its ``refine:`` section).

Building happens elsewhere, once per trial, from these values: ``build_paradigm``,
``build_transfer_loss``, ``build_cam_method``, ``build_net`` in ``training``,
``build_pipeline`` in ``postproc``.
"""

from training.config.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, SynthConfig
from training.config.net import NetConfig
from training.config.parse import (
    apply_overrides,
    config_digest,
    from_dict,
    load_yaml,
    parse_overrides,
)
from training.config.trial import (
    CamConfig,
    ModelConfig,
    TrainConfig,
    TransferConfig,
    TrialConfig,
    load_trial_config,
    save_config,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "CamConfig", "DataConfig", "ModelConfig", "NetConfig", "SynthConfig",
    "TrainConfig", "TransferConfig", "TrialConfig", "apply_overrides", "config_digest", "from_dict",
    "load_trial_config", "load_yaml", "parse_overrides", "save_config",
]  # fmt: skip
