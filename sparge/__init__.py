"""sparge: trainable sparse attention (hybrid Top-k+Top-p block masks) for video diffusion transformers.

Public API (tensors in SDPA layout ``[B, H, L, D]``)::

    block_scores, hybrid_block_mask, topk_block_mask, topp_block_mask, mask_sparsity
    BlockMask, build_block_mask
    block_sparse_attention, sparge_attention, SpargeConfig
"""

from sparge.attention import SpargeConfig, block_sparse_attention, sparge_attention
from sparge.mask import (
    BlockMask,
    block_scores,
    build_block_mask,
    hybrid_block_mask,
    mask_sparsity,
    topk_block_mask,
    topp_block_mask,
)

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "SpargeConfig",
    "block_scores",
    "block_sparse_attention",
    "build_block_mask",
    "hybrid_block_mask",
    "mask_sparsity",
    "sparge_attention",
    "topk_block_mask",
    "topp_block_mask",
    "__version__",
]
