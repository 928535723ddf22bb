"""Plain-PyTorch attention that materialises the full score matrix: the golden model for tests.

Differentiable through autograd; works in any float dtype (use float64 for golden values).
"""

from __future__ import annotations

import torch

from sparge.mask import check_dense_mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense attention ``softmax(q k^T * scale) v``; q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]``; returns ``[B, H, Lq, D]``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v)


def token_mask(mask: torch.Tensor, q_len: int, k_len: int, block_q: int = 128, block_k: int = 64) -> torch.Tensor:
    """Expand a block mask ``[B, H, Tq, Tk]`` to a token mask ``[B, H, Lq, Lk]`` (bool)."""
    m = mask.repeat_interleave(block_q, dim=2)[:, :, :q_len]
    return m.repeat_interleave(block_k, dim=3)[:, :, :, :k_len]


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention restricted to the kept blocks of ``mask``.

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]`` (v may have its own head dim).
        mask: ``[B, H, Tq, Tk]`` bool, True = computed.
        block_q, block_k: block sizes (query, key).
        scale: default ``1/sqrt(D)``.

    Returns:
        ``[B, H, Lq, Dv]`` in q's dtype. Rows of a query block that keeps no key block are zero, and
        so are their gradients.
    """
    check_dense_mask(mask, q.shape[2], k.shape[2], block_q, block_k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    tm = token_mask(mask, q.shape[2], k.shape[2], block_q, block_k)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~tm, float("-inf"))
    empty = ~tm.any(dim=-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)  # a finite row keeps softmax (and its gradient) free of NaN
    p = torch.softmax(s, dim=-1) * tm
    return torch.matmul(p, v)


def block_sparse_lse(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, block_q: int = 128, block_k: int = 64, scale: float | None = None) -> torch.Tensor:
    """Natural-log log-sum-exp of the kept scaled scores per query row, ``[B, H, Lq]`` (``-inf`` for empty rows)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    tm = token_mask(mask, q.shape[2], k.shape[2], block_q, block_k)
    s = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~tm, float("-inf"))
    return torch.logsumexp(s, dim=-1)
