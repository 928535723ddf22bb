"""Fused block mean-pooling: one read of ``[B, H, L, D]`` (any strides), fp32 sums, partial last block."""

from __future__ import annotations

import torch

from sparge.kernels import HAS_TRITON, triton_available

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _block_mean_kernel(
        X, Out,
        stride_xb, stride_xh, stride_xl, stride_xd,
        stride_ob, stride_oh, stride_ot,
        H, L, D,
        BLOCK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // H
        off_h = pid_bh % H
        offs_d = tl.arange(0, BLOCK_D)
        offs_c = tl.arange(0, CHUNK)
        start = pid_t * BLOCK
        base = X + off_b.to(tl.int64) * stride_xb + off_h.to(tl.int64) * stride_xh
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c in range(0, BLOCK, CHUNK):
            offs_l = start + c + offs_c
            ptrs = base + offs_l[:, None].to(tl.int64) * stride_xl + offs_d[None, :] * stride_xd
            x = tl.load(ptrs, mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0)
            acc += tl.sum(x.to(tl.float32), axis=0)
        n = tl.minimum(L - start, BLOCK)
        out_ptrs = Out + off_b.to(tl.int64) * stride_ob + off_h * stride_oh + pid_t * stride_ot + offs_d
        tl.store(out_ptrs, acc / n, mask=offs_d < D)


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
    if not triton_available(x) or x.dtype == torch.float64:
        return block_mean_torch(x, block)
    b, h, length, d = x.shape
    t = -(-length // block)
    out = torch.empty((b, h, t, d), device=x.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(d))
    chunk = min(block, 64)
    _block_mean_kernel[(t, b * h)](
        x, out,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        h, length, d,
        BLOCK=block, CHUNK=chunk, BLOCK_D=block_d,
        num_warps=4,
    )
    return out
