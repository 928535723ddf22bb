"""Fused block mean-pooling: one read of ``[B, H, L, D]`` (any strides), fp32 sums, partial last block."""

from __future__ import annotations

import torch

from sparge.kernels import HAS_TRITON, triton_available

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pool_one(X, Out, sxb, sxh, sxl, sxd, sob, soh, sot, off_b, off_h, t, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        offs_d = tl.arange(0, BLOCK_D)
        offs_l = t * BLOCK + tl.arange(0, BLOCK)
        base = X + off_b.to(tl.int64) * sxb + off_h.to(tl.int64) * sxh
        ptrs = base + offs_l[:, None].to(tl.int64) * sxl + offs_d[None, :] * sxd
        x = tl.load(ptrs, mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0)
        n = tl.minimum(L - t * BLOCK, BLOCK)
        out_ptrs = Out + off_b.to(tl.int64) * sob + off_h * soh + t * sot + offs_d
        tl.store(out_ptrs, tl.sum(x.to(tl.float32), axis=0) / n, mask=offs_d < D)

    @triton.jit
    def _block_mean_pair_kernel(
        Q, K, OutQ, OutK,
        sqb, sqh, sql, sqd, skb, skh, skl, skd,
        soqb, soqh, soqt, sokb, sokh, sokt,
        H, Lq, Lk, D, Tq,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One launch pools both Q (programs ``t < Tq``) and K (the rest): each program reads its whole block at once."""
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // H
        off_h = pid_bh % H
        if pid_t < Tq:
            _pool_one(Q, OutQ, sqb, sqh, sql, sqd, soqb, soqh, soqt, off_b, off_h, pid_t, Lq, D, BLOCK_Q, BLOCK_D)
        else:
            _pool_one(K, OutK, skb, skh, skl, skd, sokb, sokh, sokt, off_b, off_h, pid_t - Tq, Lk, D, BLOCK_K, BLOCK_D)


def block_mean_torch(x: torch.Tensor, block: int) -> torch.Tensor:
    """Plain-torch block mean (the CPU path without the Triton interpreter)."""
    b, h, length, d = x.shape
    t = -(-length // block)
    pad = t * block - length
    xf = x.to(torch.float32)
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    sums = xf.reshape(b, h, t, block, d).sum(dim=3)
    counts = torch.full((t,), float(block), device=x.device)
    counts[-1] = length - (t - 1) * block
    return sums / counts[:, None]


def block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over blocks of ``block`` tokens of ``x`` ``[B, H, L, D]``; returns ``[B, H, T, D]`` float32."""
    return block_mean_pair(x, x[:, :, :0], block, block)[0]


def block_mean_pair(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block means of ``q`` ``[B, H, Lq, D]`` and ``k`` ``[B, H, Lk, D]`` (any strides) in one launch.

    Returns float32 ``[B, H, ceil(Lq / block_q), D]`` and ``[B, H, ceil(Lk / block_k), D]``; a partial last
    block is averaged over its real tokens.
    """
    if not triton_available(q) or q.dtype == torch.float64:
        return block_mean_torch(q, block_q), (block_mean_torch(k, block_k) if k.shape[2] else k.new_empty(*k.shape[:2], 0, k.shape[3]).float())
    b, h, lq, d = q.shape
    lk = k.shape[2]
    tq, tk = -(-lq // block_q), -(-lk // block_k)
    oq = torch.empty((b, h, tq, d), device=q.device, dtype=torch.float32)
    ok = torch.empty((b, h, tk, d), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(d))
    _block_mean_pair_kernel[(tq + tk, b * h)](
        q, k, oq, ok, *q.stride(), *k.stride(), *oq.stride()[:3], *ok.stride()[:3],
        h, lq, lk, d, tq,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=8 if max(block_q, block_k) * block_d >= 128 * 128 else 4,
    )
    return oq, ok
