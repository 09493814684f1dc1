"""Region-proposal backends: class-agnostic masks that refinement snaps the seed to.

Each backend is a class built once (SAM loads its weights in ``__init__``) whose
``propose(image)`` returns a list of H×W bool masks. Backends are chosen by name
from :data:`PROPOSAL_BACKENDS`; :func:`build_proposals` is the factory.

``superpixel`` (scikit-image) is the CPU default; ``sam`` runs segment-anything's
automatic mask generator and needs a local checkpoint file. torch and
segment-anything are imported only when a SAM backend is built. The parameters'
defaults and ranges are those of `training.config.refine.SuperpixelParams` and
`SamParams`, which check them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from postproc.masks import check_image
from training.config import refine
from training.config.refine import SamParams, SuperpixelParams
from training.errors import CheckpointError
from training.registry import Registry


class ProposalBackend(Protocol):
    def propose(self, image: np.ndarray) -> list[np.ndarray]:
        """Masks for an H×W×3 uint8 RGB image, each H×W bool."""
        ...


PROPOSAL_BACKENDS: Registry[type] = Registry("region-proposal backend", names=refine.BACKENDS)


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
        method: str = SuperpixelParams.method,
        scale: float = SuperpixelParams.scale,
        sigma: float = SuperpixelParams.sigma,
        min_size: int = SuperpixelParams.min_size,
        n_segments: int = SuperpixelParams.n_segments,
        compactness: float = SuperpixelParams.compactness,
    ) -> None:
        SuperpixelParams(  # raises ConfigError naming a bad value
            method=method, scale=scale, sigma=sigma, min_size=min_size, n_segments=n_segments, compactness=compactness
        )
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
        model_type: str = SamParams.model_type,
        checkpoint: str | os.PathLike | None = SamParams.checkpoint,
        points_per_side: int = SamParams.points_per_side,
        pred_iou_thresh: float = SamParams.pred_iou_thresh,
        stability_score_thresh: float = SamParams.stability_score_thresh,
        min_mask_region_area: int = SamParams.min_mask_region_area,
        points_per_batch: int = SamParams.points_per_batch,
        device: str = SamParams.device,
        model: Any = None,
        model_builder: Callable[[], Any] | None = None,
    ) -> None:
        SamParams(  # raises ConfigError: a range, an unknown model_type, no checkpoint
            model_type=model_type, checkpoint=checkpoint, points_per_side=points_per_side,
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
            min_mask_region_area=min_mask_region_area, points_per_batch=points_per_batch, device=device,
            model=model, model_builder=model_builder,
        )  # fmt: skip
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

        if model is None:
            if model_builder is None:
                model_builder = lambda: sam_model_registry[model_type](checkpoint=None)
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


def build_proposals(name: str, **kwargs: Any) -> ProposalBackend:
    """Build the proposal backend registered as ``name`` with ``kwargs``.

    Raises:
        ConfigError: unknown backend name (valid names listed) or parameter, or a bad value.
    """
    refine.parse_fields(refine.BACKENDS.get(name, field="backend"), kwargs, f"backend {name!r}")
    return PROPOSAL_BACKENDS.get(name, field="backend")(**kwargs)
