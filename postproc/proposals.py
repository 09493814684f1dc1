"""Region-proposal backends: class-agnostic masks that refinement snaps the seed to.

Each backend is a class built once (SAM loads its weights in ``__init__``) whose
``propose(image)`` returns a list of H×W bool masks. Backends are chosen by name
from :data:`PROPOSAL_BACKENDS`; :func:`build_proposals` is the factory.

``superpixel`` (scikit-image) is the CPU default; ``sam`` runs segment-anything's
automatic mask generator and needs a local checkpoint file. torch and
segment-anything are imported only when a SAM backend is built.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from postproc.masks import check_image, check_range
from training.errors import CheckpointError, ConfigError
from training.registry import Registry


class ProposalBackend(Protocol):
    def propose(self, image: np.ndarray) -> list[np.ndarray]:
        """Masks for an H×W×3 uint8 RGB image, each H×W bool."""
        ...


PROPOSAL_BACKENDS: Registry[type] = Registry("region-proposal backend")
SUPERPIXEL_METHODS = ("felzenszwalb", "slic")


@PROPOSAL_BACKENDS.register("superpixel")
class SuperpixelProposals:
    """One proposal per superpixel (Felzenszwalb graph segmentation or SLIC).

    Args:
        method: ``felzenszwalb`` or ``slic``.
        scale: Felzenszwalb: higher means larger segments.
        sigma: Gaussian pre-smoothing width, both methods.
        min_size: Felzenszwalb: smallest segment in pixels.
        n_segments: SLIC: approximate number of segments.
        compactness: SLIC: higher gives squarer segments.
    """

    def __init__(
        self,
        *,
        method: str = "felzenszwalb",
        scale: float = 100.0,
        sigma: float = 0.8,
        min_size: int = 20,
        n_segments: int = 100,
        compactness: float = 10.0,
    ) -> None:
        if method not in SUPERPIXEL_METHODS:
            raise ConfigError(f"method: unknown superpixel method {method!r}; valid: {', '.join(SUPERPIXEL_METHODS)}")
        check_range("scale", scale, low=0.0, low_open=True)
        check_range("sigma", sigma, low=0.0)
        check_range("min_size", min_size, low=1)
        check_range("n_segments", n_segments, low=1)
        check_range("compactness", compactness, low=0.0, low_open=True)
        self.method = method
        self.scale, self.sigma, self.min_size = float(scale), float(sigma), int(min_size)
        self.n_segments, self.compactness = int(n_segments), float(compactness)

    def segments(self, image: np.ndarray) -> np.ndarray:
        """H×W int label map for an H×W×3 uint8 RGB image."""
        from skimage.segmentation import felzenszwalb, slic

        image = check_image(image)
        if self.method == "felzenszwalb":
            return felzenszwalb(image, scale=self.scale, sigma=self.sigma, min_size=self.min_size)
        return slic(
            image,
            n_segments=self.n_segments,
            compactness=self.compactness,
            sigma=self.sigma,
            start_label=0,
            channel_axis=-1,
        )

    def propose(self, image: np.ndarray) -> list[np.ndarray]:
        """One H×W bool mask per superpixel of an H×W×3 uint8 RGB image."""
        labels = self.segments(image)
        return [labels == label for label in np.unique(labels)]


def _auto_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_sam_checkpoint(model: Any, checkpoint: str | os.PathLike, *, model_type: str) -> None:
    """Load a SAM state dict from ``checkpoint`` into ``model`` (on the CPU).

    Raises:
        CheckpointError: the file is missing, unreadable, or not a state dict
            for this SAM architecture; the message names the path.
    """
    import torch

    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise CheckpointError(f"SAM checkpoint {path!r} does not exist (model_type={model_type})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a non-checkpoint file
        raise CheckpointError(f"SAM checkpoint {path!r} could not be read: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"SAM checkpoint {path!r} holds a {type(state).__name__}, expected a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"SAM checkpoint {path!r} is not a {model_type} SAM state dict: {first_line}") from err


@PROPOSAL_BACKENDS.register("sam")
class SamProposals:
    """Segment-anything's automatic mask generator (grid of point prompts, no CAM input).

    The model and generator are built once here; ``propose`` only runs them.

    Args:
        model_type: key of ``segment_anything.sam_model_registry`` (``vit_b``,
            ``vit_l``, ``vit_h``) giving the architecture of ``checkpoint``.
        checkpoint: path of a local SAM state-dict file (e.g. ``sam_vit_b_01ec64.pth``).
        points_per_side: point-prompt grid size; 32 in the thesis (16 lost 0.5 IoU).
        pred_iou_thresh: drop masks whose predicted IoU is below this, in [0, 1].
        stability_score_thresh: drop masks less stable than this, in [0, 1].
        min_mask_region_area: remove holes and islands smaller than this (pixels).
        points_per_batch: prompts run through the decoder at once (memory vs speed).
        device: ``auto`` (cuda when available), ``cpu``, ``cuda`` or ``cuda:N``.
        model: a ready ``segment_anything.modeling.Sam``, used instead of
            ``model_type`` + ``checkpoint`` when given.
        model_builder: a zero-argument callable returning a randomly initialised
            ``Sam`` of a custom architecture, then loaded from ``checkpoint``;
            overrides ``model_type`` (tests use a tiny SAM this way).
    """

    def __init__(
        self,
        *,
        model_type: str = "vit_b",
        checkpoint: str | os.PathLike | None = None,
        points_per_side: int = 32,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        min_mask_region_area: int = 0,
        points_per_batch: int = 64,
        device: str = "auto",
        model: Any = None,
        model_builder: Callable[[], Any] | None = None,
    ) -> None:
        check_range("points_per_side", points_per_side, low=1)
        check_range("pred_iou_thresh", pred_iou_thresh, low=0.0, high=1.0)
        check_range("stability_score_thresh", stability_score_thresh, low=0.0, high=1.0)
        check_range("min_mask_region_area", min_mask_region_area, low=0)
        check_range("points_per_batch", points_per_batch, low=1)
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

        if model is None:
            if model_builder is None:
                if model_type not in sam_model_registry:
                    raise ConfigError(
                        f"model_type: unknown SAM architecture {model_type!r}; "
                        f"valid: {', '.join(sorted(sam_model_registry))}"
                    )
                model_builder = lambda: sam_model_registry[model_type](checkpoint=None)
            if checkpoint is None:
                raise ConfigError(
                    "checkpoint: expected the path of a local SAM checkpoint file, got None "
                    "(no weights can be downloaded)"
                )
            model = model_builder()
            load_sam_checkpoint(model, checkpoint, model_type=model_type)
        self.device = _auto_device(device)
        self.model = model.to(self.device).eval()
        self.generator = SamAutomaticMaskGenerator(
            self.model,
            points_per_side=int(points_per_side),
            points_per_batch=int(points_per_batch),
            pred_iou_thresh=float(pred_iou_thresh),
            stability_score_thresh=float(stability_score_thresh),
            min_mask_region_area=int(min_mask_region_area),
            output_mode="binary_mask",
        )

    def propose(self, image: np.ndarray) -> list[np.ndarray]:
        """SAM masks for an H×W×3 uint8 RGB image, each H×W bool."""
        image = check_image(image)
        return [np.asarray(m["segmentation"], dtype=bool) for m in self.generator.generate(image)]


def backend_params(name: str) -> list[str]:
    """Keyword arguments accepted by the backend ``name``, in signature order."""
    backend = PROPOSAL_BACKENDS.get(name, field="backend")
    return [p for p in inspect.signature(backend.__init__).parameters if p != "self"]


def check_backend_params(name: str, params: dict[str, Any]) -> None:
    """Raise ConfigError for an unknown backend or a parameter it does not take."""
    valid = backend_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"backend {name!r}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


def build_proposals(name: str, **kwargs: Any) -> ProposalBackend:
    """Build the proposal backend registered as ``name`` with ``kwargs``.

    Raises:
        ConfigError: unknown backend name (valid names listed) or parameter.
    """
    check_backend_params(name, kwargs)
    return PROPOSAL_BACKENDS.get(name, field="backend")(**kwargs)
