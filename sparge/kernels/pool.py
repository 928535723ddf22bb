"""Fused block mean-pooling: one read of ``[B, H, L, D]`` (any strides), fp32 sums, partial last block."""

from __future__ import annotations

import torch

from sparge.kernels import HAS_TRITON, triton_available

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pool_run(X, Out, sxb, sxh, sxl, sxd, sob, soh, sot, off_b, off_h, t0, d0, T, L, D,
                  BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr, NS: tl.constexpr):
        """Mean of blocks ``t0 .. t0+G-1`` (those below T): one loop, so the next block's load is in
        flight while this one is reduced."""
        offs_d = d0 + tl.arange(0, BLOCK_D)
        base = X + off_b.to(tl.int64) * sxb + off_h.to(tl.int64) * sxh
        out_base = Out + off_b.to(tl.int64) * sob + off_h.to(tl.int64) * soh
        for i in tl.range(0, G, num_stages=NS):
            t = t0 + i
            offs_l = t * BLOCK + tl.arange(0, BLOCK)
            ptrs = base + offs_l[:, None].to(tl.int64) * sxl + offs_d[None, :] * sxd
            x = tl.load(ptrs, mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0)
            n = tl.maximum(tl.minimum(L - t * BLOCK, BLOCK), 1)
            tl.store(out_base + t * sot + offs_d, tl.sum(x.to(tl.float32), axis=0) / n, mask=(offs_d < D) & (tl.full([BLOCK_D], t, tl.int32) < T))

    @triton.jit
    def _block_mean_pair_kernel(
        Q, K, OutQ, OutK,
        sqb, sqh, sql, sqd, skb, skh, skl, skd,
        soqb, soqh, soqt, sokb, sokh, sokt,
        H, Lq, Lk, D, Tq, Tk, NQ,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, GQ: tl.constexpr, GK: tl.constexpr,
        NS: tl.constexpr,
    ):
        """One launch pools both Q (programs ``p < NQ``, GQ blocks each) and K (the rest, GK blocks each);
        the third grid axis splits the head dim into chunks of BLOCK_D."""
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        d0 = tl.program_id(2) * BLOCK_D
        off_b = pid_bh // H
        off_h = pid_bh % H
        if pid < NQ:
            _pool_run(Q, OutQ, sqb, sqh, sql, sqd, soqb, soqh, soqt, off_b, off_h, pid * GQ, d0, Tq, Lq, D, BLOCK_Q, BLOCK_D, GQ, NS)
        else:
            _pool_run(K, OutK, skb, skh, skl, skd, sokb, sokh, sokt, off_b, off_h, (pid - NQ) * GK, d0, Tk, Lk, D, BLOCK_K, BLOCK_D, GK, NS)


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


# Pooling launch: tokens each program reads (in whole blocks), loop pipeline depth, head-dim chunk,
# warps. Tuned on an H100 (benchmarks/mask_profile.py).
POOL_CONFIG = {"tokens": 128, "num_stages": 1, "d_chunk": 128, "num_warps": 4}


def block_mean_pair(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, **config: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block means of ``q`` ``[B, H, Lq, D]`` and ``k`` ``[B, H, Lk, D]`` (any strides) in one launch.

    Returns float32 ``[B, H, ceil(Lq / block_q), D]`` and ``[B, H, ceil(Lk / block_k), D]``; a partial last
    block is averaged over its real tokens. ``config`` overrides `POOL_CONFIG` entries (for tuning).
    """
    if not triton_available(q) or q.dtype == torch.float64:
        return block_mean_torch(q, block_q), (block_mean_torch(k, block_k) if k.shape[2] else k.new_empty(*k.shape[:2], 0, k.shape[3]).float())
    b, h, lq, d = q.shape
    lk = k.shape[2]
    tq, tk = -(-lq // block_q), -(-lk // block_k)
    oq = torch.empty((b, h, tq, d), device=q.device, dtype=torch.float32)
    ok = torch.empty((b, h, tk, d), device=q.device, dtype=torch.float32)
    cfg = {**POOL_CONFIG, **{name: v for name, v in config.items() if v is not None}}
    block_d = min(max(16, triton.next_power_of_2(d)), max(16, cfg["d_chunk"]))
    gq, gk = max(1, cfg["tokens"] // block_q), max(1, cfg["tokens"] // block_k)
    nq, nk = -(-tq // gq), -(-tk // gk)
    _block_mean_pair_kernel[(nq + nk, b * h, -(-d // block_d))](
        q, k, oq, ok, *q.stride(), *k.stride(), *oq.stride()[:3], *ok.stride()[:3],
        h, lq, lk, d, tq, tk, nq,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, GQ=gq, GK=gk, NS=cfg["num_stages"],
        num_warps=min(cfg["num_warps"], max(1, max(block_q, block_k) * block_d // 1024)),
    )
    return oq, ok
