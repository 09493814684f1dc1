"""A tiny randomly initialised SAM (64×64 input) that runs the real segment-anything code.

Builds in milliseconds on a CPU. With random weights the automatic mask
generator only returns masks when ``pred_iou_thresh`` and
``stability_score_thresh`` are opened up (e.g. 0.0).
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

TINY_IMG_SIZE = 64
TINY_PATCH = 16


def tiny_sam(seed: int = 0, *, embed_dim: int = 32) -> Sam:
    """A random SAM with a 2-block ViT encoder; ``embed_dim`` must divide by 8."""
    torch.manual_seed(seed)
    grid = TINY_IMG_SIZE // TINY_PATCH
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=TINY_IMG_SIZE,
            patch_size=TINY_PATCH,
            embed_dim=embed_dim,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=embed_dim,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=2,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(TINY_IMG_SIZE, TINY_IMG_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=embed_dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=2 * embed_dim, num_heads=2),
            num_multimask_outputs=3,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
    )
    return model.eval()
