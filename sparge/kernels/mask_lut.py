"""Fused mask building in Triton: pooled product, block selection (softmax + Top-k/Top-p + row lists) and
list building.

`pooled_logits` computes ``mean(Q_i) . mean(K_j)`` for all block pairs (tf32x3 on the tensor cores).
`select_blocks` turns those logits ``[B, H, Tq, Tk]`` into the hybrid mask in one launch: each program
owns one query block, takes the softmax of its row and, without sorting, finds by radix-select
(bisection over the float bits) the Top-k threshold and the value where the descending cumulative
mass reaches p; the hybrid mask keeps the top ``max(n_k, n_p)`` blocks, ties to the lower index. It
writes the row list (ascending block index, then zeros), the kept count and the dense mask row.
`mask_lists` builds ascending index lists from any dense mask (rows, or columns through a transposed
view). No host synchronisation anywhere.
"""

from __future__ import annotations

import torch

from sparge.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _scores_kernel(PQ, PK, Logits, Tq, Tk, D,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        """Pooled logits ``mean(Q_i) . mean(K_j)`` of one (batch, head) tile: fp32 in, fp32 out."""
        bh = tl.program_id(2).to(tl.int64)
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dmask = (d0 + rd < D)[None, :]
            a = tl.load(PQ + (bh * Tq + rm)[:, None] * D + d0 + rd[None, :], mask=(rm < Tq)[:, None] & dmask, other=0.0)
            b = tl.load(PK + (bh * Tk + rn)[:, None] * D + d0 + rd[None, :], mask=(rn < Tk)[:, None] & dmask, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        tl.store(Logits + (bh * Tq + rm)[:, None] * Tk + rn[None, :], acc, mask=(rm < Tq)[:, None] & (rn < Tk)[None, :])

    @triton.jit
    def _thresholds(bits, prob, n_k, topp, lo, hi, USE_K: tl.constexpr, USE_P: tl.constexpr):
        """Largest bit patterns T_k with count(bits >= T_k) >= n_k and T_p with sum(prob[bits >= T_p]) >= topp.

        Non-negative float32 values order like their int32 bit patterns, so bisection over the bits finds an
        element's exact value: the n_k-th largest, or where the descending mass reaches p. Both searches start
        from the row's [min, max] bits (both answers lie there) and run side by side, so a row takes
        log2(max - min) rounds of two independent reductions instead of 2 x 31 dependent ones.
        """
        lo_k = lo
        hi_k = lo
        lo_p = lo
        hi_p = lo
        if USE_K:
            hi_k = hi
        if USE_P:
            hi_p = hi
        while (hi_k > lo_k) | (hi_p > lo_p):
            mid_k = lo_k + (hi_k - lo_k + 1) // 2
            mid_p = lo_p + (hi_p - lo_p + 1) // 2
            if USE_K:
                ok_k = tl.sum((bits >= mid_k).to(tl.int32), 0) >= n_k
                lo_k = tl.where(ok_k, mid_k, lo_k)
                hi_k = tl.where(ok_k, hi_k, mid_k - 1)
            if USE_P:
                ok_p = tl.sum(tl.where(bits >= mid_p, prob, 0.0), 0) >= topp
                lo_p = tl.where(ok_p, mid_p, lo_p)
                hi_p = tl.where(ok_p, hi_p, mid_p - 1)
        return lo_k, lo_p

    @triton.jit
    def _select_kernel(
        Logits, RowCount, RowIndex, Dense,
        Tk, scale, n_k, topp,
        BLOCK_T: tl.constexpr, USE_K: tl.constexpr, USE_P: tl.constexpr, ALL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_T)
        valid = offs < Tk
        x = tl.load(Logits + row * Tk + offs, mask=valid, other=float("-inf")).to(tl.float32) * scale
        x = tl.where(valid, x, float("-inf"))
        e = tl.exp(x - tl.max(x, 0))
        prob = tl.where(valid, e / tl.sum(e, 0), 0.0)
        bits = tl.where(valid, prob.to(tl.int32, bitcast=True), -1)
        # the hybrid mask is the top-`count` blocks (descending probability, ties to the lower index)
        count = tl.zeros([], dtype=tl.int32)
        thr = tl.full([], 0x7F800000, dtype=tl.int32)
        n_k = tl.minimum(n_k, Tk)
        v_k, v_p = _thresholds(bits, prob, n_k, topp, tl.min(tl.where(valid, bits, 0x7F800000), 0), tl.max(bits, 0),
                               USE_K, USE_P)
        if USE_K:
            count = n_k
            thr = v_k
        if USE_P:
            above = bits > v_p
            n_above = tl.sum(above.to(tl.int32), 0)
            mass_above = tl.sum(tl.where(above, prob, 0.0), 0)
            n_tie = tl.sum((bits == v_p).to(tl.int32), 0)
            v_val = tl.maximum(v_p.to(tl.float32, bitcast=True), 1e-38)
            need = tl.maximum(tl.ceil((topp - mass_above) / v_val).to(tl.int32), 1)
            n_p = tl.maximum(n_above + tl.minimum(need, n_tie), 1)
            thr = tl.where(n_p > count, v_p, thr)
            count = tl.maximum(count, n_p)
        if ALL:
            count = Tk
            thr = tl.zeros([], dtype=tl.int32)
        above = bits > thr
        tie = bits == thr
        tie_rank = tl.cumsum(tie.to(tl.int32), 0) - 1
        kept = valid & (above | (tie & (tie_rank < count - tl.sum(above.to(tl.int32), 0))))
        pos = tl.cumsum(kept.to(tl.int32), 0) - 1
        n_kept = tl.sum(kept.to(tl.int32), 0)
        tl.store(RowIndex + row * Tk + pos, offs.to(tl.int32), mask=kept)
        tl.store(RowIndex + row * Tk + offs, tl.zeros([BLOCK_T], dtype=tl.int32), mask=valid & (offs >= n_kept))
        tl.store(Dense + row * Tk + offs, kept.to(tl.int8), mask=valid)
        tl.store(RowCount + row, n_kept)

    @triton.jit
    def _lists_kernel(
        Mask, Count, Index,
        R, C, stride_mb, stride_mr, stride_mc,
        BLOCK_C: tl.constexpr,
    ):
        r = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = tl.arange(0, BLOCK_C)
        valid = offs < C
        m = tl.load(Mask + b * stride_mb + r * stride_mr + offs * stride_mc, mask=valid, other=0).to(tl.int32)
        pos = tl.cumsum(m, 0) - 1
        out = (b * R + r) * C
        tl.store(Index + out + pos, offs.to(tl.int32), mask=valid & (m != 0))
        tl.store(Count + b * R + r, tl.sum(m, 0))


# Pooled-product launch: tile sizes over (query blocks, key blocks, head dim) and the tensor-core precision
# ("tf32x3" splits each fp32 operand in two tf32 parts: fp32-level accuracy at tensor-core speed).
SCORES_CONFIG: dict = {"block_m": 64, "block_n": 64, "block_d": 32, "precision": "tf32x3", "num_warps": 4}


def pooled_logits(pq: torch.Tensor, pk: torch.Tensor, **config) -> torch.Tensor:
    """``pq @ pk^T`` for pooled blocks: ``[B, H, Tq, D]`` and ``[B, H, Tk, D]`` float32 in, ``[B, H, Tq, Tk]`` float32 out.

    ``config`` overrides `SCORES_CONFIG` entries (for tuning).
    """
    cfg = {**SCORES_CONFIG, **{name: v for name, v in config.items() if v is not None}}
    b, h, tq, d = pq.shape
    tk = pk.shape[2]
    pq, pk = pq.contiguous(), pk.contiguous()
    logits = torch.empty((b, h, tq, tk), dtype=torch.float32, device=pq.device)
    bm, bn = cfg["block_m"], cfg["block_n"]
    _scores_kernel[(-(-tq // bm), -(-tk // bn), b * h)](
        pq, pk, logits, tq, tk, d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["block_d"], PRECISION=cfg["precision"],
        num_warps=cfg["num_warps"],
    )
    return logits


def select_warps(block_t: int) -> int:
    """Warps per selection program: few, so the bisection's row reductions stay (mostly) inside a warp."""
    return max(1, min(8, block_t // 512))


def select_blocks(
    logits: torch.Tensor, scale: float, n_k: int, topp: float, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hybrid selection on the GPU (or the Triton interpreter).

    Args:
        logits: ``[B, H, Tq, Tk]`` float32 pooled ``mean(Q_i) . mean(K_j)`` (unscaled), contiguous.
        scale: score scale; n_k: Top-k block count (0 = off); topp: Top-p mass (0 = off, >= 1 = dense).
        num_warps: warps per row program (default `select_warps`).

    Returns:
        ``(row_count [B,H,Tq] int32, row_index [B,H,Tq,Tk] int32 ascending then zeros, dense [B,H,Tq,Tk] bool)``.
    """
    b, h, tq, tk = logits.shape
    logits = logits.contiguous()
    row_count = torch.empty((b, h, tq), dtype=torch.int32, device=logits.device)
    row_index = torch.empty((b, h, tq, tk), dtype=torch.int32, device=logits.device)
    dense = torch.empty((b, h, tq, tk), dtype=torch.int8, device=logits.device)
    block_t = max(16, triton.next_power_of_2(tk))
    dense_rows = topp >= 1.0 or n_k >= tk
    _select_kernel[(b * h * tq,)](
        logits, row_count, row_index, dense, tk, float(scale), int(n_k), float(topp),
        BLOCK_T=block_t, USE_K=n_k > 0 and not dense_rows, USE_P=topp > 0 and not dense_rows, ALL=dense_rows,
        num_warps=num_warps or select_warps(block_t),
    )
    return row_count, row_index, dense.view(torch.bool)


def mask_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending index lists of the True entries along the last dim of ``mask`` ``[B, H, R, C]`` (any strides).

    Returns ``(count [B,H,R] int32, index [B,H,R,C] int32)``; entries past ``count`` are 0.
    """
    b, h, r, c = mask.shape
    m = mask.view(torch.int8) if mask.dtype == torch.bool else mask
    if m.stride(0) != h * m.stride(1):  # heads must be flattenable with the batch
        m = m.contiguous()
    count = torch.empty((b, h, r), dtype=torch.int32, device=mask.device)
    index = torch.zeros((b, h, r, c), dtype=torch.int32, device=mask.device)
    _lists_kernel[(r, b * h)](
        m, count, index, r, c, m.stride(1), m.stride(2), m.stride(3),
        BLOCK_C=max(16, triton.next_power_of_2(c)), num_warps=4,
    )
    return count, index
