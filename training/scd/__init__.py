"""Self Correspondence Distillation (Xu et al., AAAI 2023, arXiv 2302.13765): the training-side pieces.

One SCD step on an image x and its copy x' resized by ``scale`` (0.3):

- the backbone's class logits (image-level loss) and CAMs A, A';
- a light segmentation head (:class:`SegmentationHead`) gives logits S, S';
- :func:`correspondence_loss`: the CAMs' pairwise correspondence, a detached
  target, distilled into the head's (points sampled in both views);
- :func:`scale_equivariance_loss`: ``mean |down(A) − A'|``;
- :func:`pseudo_labels`: VARM-refined CAMs at a high and a low background
  score, with an ignore band, supervise S through :func:`balanced_seg_loss`
  and the dense :func:`energy_loss`;
- :class:`SCDConfig` (`training.config.scd`, the trial's ``scd`` section): the
  weights, the warm-up and every setting above;
- :mod:`training.scd.paradigm`: the paradigms ``self_correspondence`` and
  ``scd_with_teacher`` built from these pieces.

Pure functions and small modules; no Ray, no MLflow.
"""

from training.config.scd import SCDConfig
from training.scd.correspondence import correspondence_features, correspondence_loss, correspondence_loss_at
from training.scd.head import SegmentationHead
from training.scd.labels import pseudo_labels
from training.scd.losses import balanced_seg_loss, energy_loss, scale_equivariance_loss

__all__ = [
    "SCDConfig",
    "SegmentationHead",
    "balanced_seg_loss",
    "correspondence_features",
    "correspondence_loss",
    "correspondence_loss_at",
    "energy_loss",
    "pseudo_labels",
    "scale_equivariance_loss",
]
