"""Public attention entry points: `block_sparse_attention`, `sparge_attention`, `SpargeConfig`.

Layout is ``[B, H, L, D]`` (SDPA's); strided views such as ``x.transpose(1, 2)`` of diffusers'
``[B, L, H, D]`` are read in place when the head dim is contiguous.

Dispatch: the Triton kernels run on CUDA (compute capability >= 8.0) and on the CPU under the Triton
interpreter (``TRITON_INTERPRET=1``). Anywhere else -- a CPU without the interpreter, float64, a head
dim over 256 -- an exact plain-PyTorch path runs instead (`_gathered_attention`: each query block
against its gathered kept key blocks), with one warning (or a ``RuntimeError`` when ``backend="triton"``
was asked for).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from sparge.kernels import capability, triton_available
from sparge.mask import (
    BlockMask,
    _check_block,
    build_block_mask,
    check_dense_mask,
    check_knobs,
    kept_slots,
)

Backend = Literal["auto", "triton", "torch"]
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set[str] = set()


@dataclass(frozen=True)
class SpargeConfig:
    """What sparse attention to run, and where.

    Attributes:
        topk: fraction of key blocks kept per query block (0 disables Top-k).
        topp: cumulative pooled-probability mass kept (0 disables Top-p).
        block_q, block_k: block sizes (query, key); 128 and 64 by default.
        dense_steps: the first N denoising steps run dense (0 = none).
        per_layer: optional ``{block_index: (topk, topp)}`` overrides (from `sparge calibrate --per-layer`).
        backend: "auto" (Triton where it can run, else the exact torch path), "triton" or "torch".
    """

    topk: float = 0.03
    topp: float = 0.2
    block_q: int = 128
    block_k: int = 64
    dense_steps: int = 0
    per_layer: dict[int, tuple[float, float]] = field(default_factory=dict)
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        check_knobs(self.topk, self.topp)
        _check_block("block_q", self.block_q)
        _check_block("block_k", self.block_k)
        if not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps={self.dense_steps!r} is out of range: use an integer >= 0")
        for layer, knobs in self.per_layer.items():
            if not isinstance(layer, int) or layer < 0:
                raise ValueError(f"per_layer key {layer!r} is not a layer index: use integers >= 0")
            if not isinstance(knobs, (tuple, list)) or len(knobs) != 2:
                raise ValueError(f"per_layer[{layer}]={knobs!r}: use a (topk, topp) pair")
            check_knobs(*knobs)
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend={self.backend!r} is not known: use 'auto', 'triton' or 'torch'")

    def knobs_for(self, layer: int) -> tuple[float, float]:
        """(topk, topp) for transformer block ``layer``."""
        k, p = self.per_layer.get(layer, (self.topk, self.topp))
        return float(k), float(p)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H, L, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point() or t.dtype not in (*_KERNEL_DTYPES, torch.float64):
            raise ValueError(f"{name}.dtype={t.dtype} is not supported: use bfloat16, float16, float32 or float64")
        if t.shape[2] == 0:
            raise ValueError(f"{name} has sequence length 0: at least one token is needed")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"q, k and v must share [B, H], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share the head dim D, got {q.shape[3]} and {k.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must share the sequence length, got {k.shape[2]} and {v.shape[2]}")
    if v.shape[3] != q.shape[3]:
        raise ValueError(f"v must have q's head dim {q.shape[3]}, got {v.shape[3]}")


def _kernel_refusal(q: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take ``q``, or None when it can."""
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if not triton_available(q):
        return f"device {q.device} (Triton runs on CUDA, or on the CPU with TRITON_INTERPRET=1)"
    if q.is_cuda and capability(q.device)[0] < 8:
        return f"GPU {torch.cuda.get_device_name(q.device)} (compute capability < 8.0)"
    return None


def _autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under autocast, run in the autocast dtype as SDPA does."""
    dev = q.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if q.dtype in (torch.float32, torch.float64) and dt in (torch.float16, torch.bfloat16):
            return q.to(dt), k.to(dt), v.to(dt)
    return q, k, v


class _BlockSparseAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, row_count, row_index, col_count, col_index, scale, block_q, block_k):  # type: ignore[override]
        from sparge.kernels.block_sparse_attn import attn_fwd

        o, lse = attn_fwd(q, k, v, row_count, row_index, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, o, lse, row_count, row_index, col_count, col_index)
        ctx.scale, ctx.block_q, ctx.block_k = scale, block_q, block_k
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        from sparge.kernels.block_sparse_attn import attn_bwd

        q, k, v, o, lse, row_count, row_index, col_count, col_index = ctx.saved_tensors
        dq, dk, dv = attn_bwd(do, q, k, v, o, lse, row_count, row_index, col_count, col_index, ctx.scale, ctx.block_q, ctx.block_k)
        return dq, dk, dv, None, None, None, None, None, None, None


def _resolve_backend(q: torch.Tensor, backend: Backend) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is not known: use 'auto', 'triton' or 'torch'")
    if backend == "torch":
        return "torch"
    why = _kernel_refusal(q)
    if why is None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"sparge: the Triton block-sparse kernel cannot run here: {why}")
    _warn_once(
        f"fallback:{why}",
        f"sparge: Triton block-sparse kernel unavailable for {why}; using the exact PyTorch path "
        "(gathers the kept key blocks per query block: exact, much slower than the kernel)",
    )
    return "torch"


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | BlockMask,
    *,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention over the kept blocks of ``mask`` only; differentiable in q, k and v.

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]``; bfloat16, float16 or float32 (float64 takes the torch path).
        mask: ``[B, H, Tq, Tk]`` bool (True = computed), or a `BlockMask` (then its block sizes are used).
        block_q, block_k: block sizes (query, key) of a dense bool mask.
        scale: score scale, default ``1/sqrt(D)``.
        backend: "auto", "triton" or "torch" (see module docstring).

    Returns:
        ``[B, H, Lq, D]`` in the input dtype (the autocast dtype under autocast). Query blocks that keep
        no key block give zero output and zero gradients.

    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> m = torch.ones(1, 2, 2, 4, dtype=torch.bool)
        >>> block_sparse_attention(q, k, v, m).shape
        torch.Size([1, 2, 256, 64])
    """
    _check_qkv(q, k, v)
    q, k, v = _autocast(q, k, v)
    lq, lk = q.shape[2], k.shape[2]
    if isinstance(mask, BlockMask):
        block_q, block_k = mask.block_q, mask.block_k
        if (mask.q_len, mask.k_len) != (lq, lk) or mask.shape[:2] != tuple(q.shape[:2]):
            raise ValueError(f"mask {mask!r} does not match q {tuple(q.shape)} and k {tuple(k.shape)}")
    else:
        _check_block("block_q", block_q)
        _check_block("block_k", block_k)
        check_dense_mask(mask, lq, lk, block_q, block_k, batch_heads=(q.shape[0], q.shape[1]))
    if mask_device(mask) != q.device:
        raise ValueError(f"mask is on {mask_device(mask)} but q is on {q.device}: put them on one device")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale={scale!r} is not accepted: use a positive finite number (default 1/sqrt(head_dim))")
    bm = mask if isinstance(mask, BlockMask) else BlockMask.from_dense(mask, lq, lk, block_q=block_q, block_k=block_k)
    if _resolve_backend(q, backend) == "torch":
        return _gathered_attention(q, k, v, bm.row_count, bm.row_index, block_q, block_k, float(scale))
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        from sparge.kernels.block_sparse_attn import attn_fwd

        return attn_fwd(q, k, v, bm.row_count, bm.row_index, float(scale), block_q, block_k)[0]  # no column lists
    return _BlockSparseAttentionFn.apply(
        q, k, v, bm.row_count, bm.row_index, bm.col_count, bm.col_index, float(scale), block_q, block_k
    )


def _gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_count: torch.Tensor, row_index: torch.Tensor,
                        block_q: int, block_k: int, scale: float) -> torch.Tensor:
    """The torch backend: each query block attends to its kept key blocks only, gathered from k and v.

    Exact (same result as `sparge.reference.block_sparse_attention`), differentiable through autograd,
    computed in q's dtype. Memory and time scale with the kept blocks: ``[B, H, Tq, block_q, C * block_k]``
    scores, C the largest row count, instead of the full ``[B, H, Lq, Lk]`` score matrix.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    tq, tk = row_count.shape[2], -(-lk // block_k)
    c = int(row_count.max()) if row_count.numel() else 0  # one host sync: this path is not for CUDA graphs
    if c == 0:
        return q.new_zeros(b, h, lq, v.shape[-1])
    kept = kept_slots(row_count, c)  # [B, H, Tq, C]
    idx = torch.where(kept, row_index[..., :c].long(), 0).clamp_(0, tk - 1)
    pad_k = tk * block_k - lk
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad_k)).reshape(b, h, tk, block_k * d)
    vb = torch.nn.functional.pad(v, (0, 0, 0, pad_k)).reshape(b, h, tk, block_k * v.shape[-1])
    flat = idx.view(b, h, tq * c, 1)
    kg = torch.gather(kb, 2, flat.expand(-1, -1, -1, kb.shape[-1])).view(b, h, tq, c * block_k, d)
    vg = torch.gather(vb, 2, flat.expand(-1, -1, -1, vb.shape[-1])).view(b, h, tq, c * block_k, v.shape[-1])
    qb = torch.nn.functional.pad(q, (0, 0, 0, tq * block_q - lq)).reshape(b, h, tq, block_q, d)
    key_pos = (idx.unsqueeze(-1) * block_k + torch.arange(block_k, device=q.device)).view(b, h, tq, 1, c * block_k)
    valid = (kept.repeat_interleave(block_k, dim=-1).unsqueeze(-2)) & (key_pos < lk)  # [B, H, Tq, 1, C*bk]
    s = torch.matmul(qb, kg.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid, float("-inf")).masked_fill(~valid.any(-1, keepdim=True), 0.0)  # empty rows stay finite
    p = torch.softmax(s, dim=-1) * valid
    return torch.matmul(p, vg).reshape(b, h, tq * block_q, -1)[:, :, :lq]


def mask_device(mask: torch.Tensor | BlockMask) -> torch.device:
    return mask.row_count.device if isinstance(mask, BlockMask) else mask.device


def sparge_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: float = 0.03,
    topp: float = 0.2,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Hybrid Top-k+Top-p block mask from q and k, then block-sparse attention over it.

    Equivalent to ``block_sparse_attention(q, k, v, hybrid_block_mask(q, k, ...))``; the mask has no
    gradient. Arguments as in `hybrid_block_mask` and `block_sparse_attention`.

    Example:
        >>> q = k = v = torch.randn(1, 2, 1024, 64)
        >>> sparge_attention(q, k, v, topk=0.1, topp=0.5).shape
        torch.Size([1, 2, 1024, 64])
    """
    _check_qkv(q, k, v)
    with torch.no_grad():
        bm = build_block_mask(q, k, topk=topk, topp=topp, block_q=block_q, block_k=block_k, scale=scale, backend=backend)
    return block_sparse_attention(q, k, v, bm, scale=scale, backend=backend)
