"""Block-sparse flash attention in Triton: forward, backward (dQ; dK/dV), and their torch.library ops.

Blocks: a program of the forward and dQ kernels owns one query block of ``BLOCK_M = block_q`` rows
and walks that block's *row list* (the kept key blocks, ``BLOCK_N = block_k`` columns each). A
program of the dK/dV kernel owns one key block and walks its *column list* (the query blocks that
keep it), so the backward pass is deterministic (no atomics) and never scans a dense map.

Online softmax in base 2 with fp32 accumulation (FlashAttention-2). Tails are masked: key columns
past ``Lk`` get ``-inf`` scores, query rows past ``Lq`` are neither stored nor counted. The
log-sum-exp (natural log, float32, ``[B, H, Lq]``; ``-inf`` for a query block with an empty row
list) is returned for the backward pass and for merging partial results (ring attention).
"""

from __future__ import annotations

import torch

from sparge.kernels import HAS_TRITON, capability

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """``acc + a @ b`` in fp32. IEEE: exact fp32 products (fp32 inputs). UPCAST: the Triton
        interpreter multiplies bf16 operands wrongly, so there they are widened first (exact)."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _gather_cols(idx_ptr, t, count, Lk, BLOCK_N: tl.constexpr, PAIR: tl.constexpr):
        """Key positions of the row-list entries t .. t+PAIR-1 as one tile, and which are real."""
        r = tl.arange(0, PAIR * BLOCK_N)
        if PAIR == 1:
            kb = tl.load(idx_ptr + t)
            offs = kb * BLOCK_N + r
            return offs, offs < Lk
        else:
            j = t + r // BLOCK_N
            kb = tl.load(idx_ptr + j, mask=j < count, other=-1)
            offs = kb * BLOCK_N + r % BLOCK_N
            return offs, (kb >= 0) & (offs < Lk)

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, LSE, RowCount, RowIndex,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        H, Lq, Lk, D, TQ, TK, qk_scale,
        BLOCK_M: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, PAIR: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr, TAIL: tl.constexpr, DESC: tl.constexpr,
    ):
        # TAIL: some key block is partial (Lk % BLOCK_N != 0), so scores need the column mask.
        # DESC: Q/K/V/O are host-built 4-D TMA descriptors ([B, H, L, D]) instead of pointers (Hopper+,
        # D == BLOCK_D, 16-byte aligned strides).
        # SPLIT programs share one mask query block of BLOCK_M * SPLIT rows; each step takes PAIR kept
        # key blocks at once (a PAIR * BLOCK_N tile gathered from the row list)
        pid = tl.program_id(0)
        pid_m = pid // SPLIT
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)

        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < Lq
        mask_d = offs_d < D

        lut_row = pid_bh.to(tl.int64) * TQ + pid_m
        count = tl.load(RowCount + lut_row)
        idx_ptr = RowIndex + lut_row * TK

        if DESC:
            b32 = pid_bh // H
            h32 = pid_bh % H
            q = Q.load([b32, h32, pid * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            k_base = K + off_b * stride_kb + off_h * stride_kh
            v_base = V + off_b * stride_vb + off_h * stride_vh
            q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
            q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        for t in range(0, count, PAIR):
            if DESC:
                kb = tl.load(idx_ptr + t)
                k = K.load([b32, h32, kb * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
                qk = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
                if TAIL:
                    qk = tl.where((kb * BLOCK_N + tl.arange(0, BLOCK_N) < Lk)[None, :], qk, float("-inf"))
            else:
                offs_kn, mask_n = _gather_cols(idx_ptr, t, count, Lk, BLOCK_N, PAIR)
                k = tl.load(
                    k_base + offs_kn[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0,
                )
                qk = _mma(q, k, tl.zeros([BLOCK_M, PAIR * BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
                if TAIL or PAIR > 1:
                    qk = tl.where(mask_n[None, :], qk, float("-inf"))
            # raw-score max, then one fused multiply-add per score (qk_scale > 0 keeps the max)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if DESC:
                v = V.load([b32, h32, kb * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
            else:
                v = tl.load(
                    v_base + offs_kn[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0,
                )
            acc = _mma(p.to(v.dtype), v, acc, IEEE, UPCAST)
            m_i = m_new

        nonempty = l_i > 0.0
        l_safe = tl.where(nonempty, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(nonempty, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        if DESC:
            O.store([b32, h32, pid * BLOCK_M, 0], out.to(O.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
        else:
            o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=mask_m)

    @triton.jit
    def _bwd_preprocess(
        O, DO, Delta,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_dob, stride_doh, stride_dom, stride_dod,
        H, Lq, D,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        msk = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
        o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=msk, other=0.0)
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=msk, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, Delta, RowCount, RowIndex,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        H, Lq, Lk, D, TQ, TK, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, PAIR: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_m = pid // SPLIT
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < Lq
        mask_d = offs_d < D
        md = mask_m[:, None] & mask_d[None, :]

        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=md, other=0.0)
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=md, other=0.0)
        lse2 = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta + pid_bh.to(tl.int64) * Lq + offs_m, mask=mask_m, other=0.0)
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        lut_row = pid_bh.to(tl.int64) * TQ + pid_m
        count = tl.load(RowCount + lut_row)
        idx_ptr = RowIndex + lut_row * TK

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for t in range(0, count, PAIR):
            offs_kn, mask_n = _gather_cols(idx_ptr, t, count, Lk, BLOCK_N, PAIR)
            nd_t = mask_n[None, :] & mask_d[:, None]
            kT = tl.load(k_base + offs_kn[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=nd_t, other=0.0)
            vT = tl.load(v_base + offs_kn[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=nd_t, other=0.0)
            qk = _mma(q, kT, tl.zeros([BLOCK_M, PAIR * BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
            dp = _mma(do, vT, tl.zeros([BLOCK_M, PAIR * BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            p = tl.where(mask_n[None, :], p, 0.0)
            ds = p * (dp - delta[:, None])
            dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, IEEE, UPCAST)
        dq = dq * sm_scale
        tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=md)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, Delta, ColCount, ColIndex,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        H, Lq, Lk, D, TQ, TK, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_s = tl.arange(0, SUB_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < Lk
        mask_d = offs_d < D
        nd = mask_n[:, None] & mask_d[None, :]

        k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=nd, other=0.0)
        v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=nd, other=0.0)
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = pid_bh.to(tl.int64) * Lq
        lut_col = pid_bh.to(tl.int64) * TK + pid_n
        count = tl.load(ColCount + lut_col)
        idx_ptr = ColIndex + lut_col * TQ

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for t in range(0, count):
            qb = tl.load(idx_ptr + t)
            for s in range(0, BLOCK_M // SUB_M):
                offs_m = qb * BLOCK_M + s * SUB_M + offs_s
                mask_m = offs_m < Lq
                dm_t = mask_d[:, None] & mask_m[None, :]
                qT = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd, mask=dm_t, other=0.0)
                doT = tl.load(do_base + offs_m[None, :] * stride_dom + offs_d[:, None] * stride_dod, mask=dm_t, other=0.0)
                lse2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
                delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
                qkT = _mma(k, qT, tl.zeros([BLOCK_N, SUB_M], dtype=tl.float32), IEEE, UPCAST)
                pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
                dv = _mma(pT.to(doT.dtype), tl.trans(doT), dv, IEEE, UPCAST)
                dpT = _mma(v, doT, tl.zeros([BLOCK_N, SUB_M], dtype=tl.float32), IEEE, UPCAST)
                dsT = pT * (dpT - delta[None, :])
                dk = _mma(dsT.to(qT.dtype), tl.trans(qT), dk, IEEE, UPCAST)
        dk = dk * sm_scale
        tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=nd)
        tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=nd)


def _upcast(q: torch.Tensor) -> bool:
    return (not q.is_cuda) and q.dtype == torch.bfloat16


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


# Launch configurations per kernel, keyed by the padded head dim; tuned on an H100 (benchmarks/NOTES.md).
# split: programs per 128-row query block; sub_m: query rows per step of the dK/dV loop.
KERNEL_CONFIGS: dict[str, dict[int, dict[str, int]]] = {
    "fwd": {64: {"split": 1, "pair": 1, "desc": 0, "num_warps": 4, "num_stages": 3},
            128: {"split": 1, "pair": 1, "desc": 1, "num_warps": 8, "num_stages": 3},
            256: {"split": 2, "pair": 1, "desc": 0, "num_warps": 8, "num_stages": 2}},
    "dq": {64: {"split": 1, "pair": 1, "num_warps": 4, "num_stages": 2}, 128: {"split": 2, "pair": 1, "num_warps": 4, "num_stages": 2},
           256: {"split": 2, "pair": 1, "num_warps": 8, "num_stages": 1}},
    "dkdv": {64: {"sub_m": 64, "num_warps": 4, "num_stages": 2}, 128: {"sub_m": 64, "num_warps": 4, "num_stages": 1},
             256: {"sub_m": 16, "num_warps": 8, "num_stages": 1}},
}


def _config(kind: str, block_d: int, block_q: int, is_cuda: bool) -> tuple[dict, int]:
    """(triton launch kwargs, split or sub_m) for a kernel; the interpreter takes whole blocks."""
    table = KERNEL_CONFIGS[kind]
    cfg = dict(table[min((d for d in table if d >= block_d), default=max(table))])
    inner = cfg.pop("split" if kind != "dkdv" else "sub_m")
    pair = cfg.pop("pair", 1)
    desc = cfg.pop("desc", None)
    extra = {"PAIR": pair} if kind != "dkdv" else {}
    if desc is not None:
        extra["DESC"] = bool(desc)
    if not is_cuda:
        return extra, (1 if kind != "dkdv" else block_q)
    cfg.update(extra)
    if kind == "dkdv":
        inner = min(inner, block_q)
    else:
        inner = max(1, min(inner, block_q // 16))
    return cfg, inner


def _run(kernel, grid, args: tuple, cfg: dict, **meta) -> None:
    """Launch with ``cfg``; if the compiler runs out of shared memory (fp32 tiles, small GPUs), retry
    with fewer pipeline stages before giving up."""
    stages = cfg.get("num_stages")
    while True:
        try:
            kernel[grid](*args, **meta, **cfg)
            return
        except triton.runtime.errors.OutOfResources:
            if not stages or stages <= 1:
                raise
            stages -= 1
            cfg = {**cfg, "num_stages": stages}


def _tma_ok(*xs: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these ``[B, H, L, D]`` tensors: unit head-dim stride, 16-byte
    aligned base and strides, and (on a GPU) compute capability 9.0 or newer."""
    for x in xs:
        if x.stride(-1) != 1 or x.data_ptr() % 16:
            return False
        if any(st <= 0 or (st * x.element_size()) % 16 for st, n in zip(x.stride()[:3], x.shape[:3]) if n > 1):
            return False  # broadcast (stride-0) and unaligned dims take the pointer path
    return not xs[0].is_cuda or capability(xs[0].device)[0] >= 9


# Which forward kernel runs on the GPU: "auto" takes the Gluon kernel (`hopper_fwd.py`) where it supports the
# call (Hopper, bf16/fp16, D 64/128, TMA-addressable) and this file's `tl` kernel elsewhere; "triton" always
# takes the `tl` kernel (for comparisons).
FWD_IMPL = "auto"


def _launch_fwd(q, k, v, row_count, row_index, scale, block_q, block_k, impl: str | None = None):
    from sparge.kernels import hopper_fwd

    if (impl or FWD_IMPL) == "auto" and hopper_fwd.supported(q, k, v, block_q, block_k):
        return hopper_fwd.launch_fwd(q, k, v, row_count, row_index, scale, block_q, block_k)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    tq, tk = row_index.shape[2], row_index.shape[3]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    block_d = _block_d(d)
    cfg, split = _config("fwd", block_d, block_q, q.is_cuda)
    desc = bool(cfg.get("DESC")) and d == block_d and _tma_ok(q, k, v, o)
    cfg = {**cfg, "DESC": desc}
    tensors = (q, k, v, o)
    if desc:
        from triton.tools.tensor_descriptor import TensorDescriptor

        cfg["PAIR"] = 1
        bm_ = block_q // split
        tensors = tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, block_d])
                        for x, rows in ((q, bm_), (k, block_k), (v, block_k), (o, bm_)))
    _run(_fwd_kernel, (tq * split, b * h), (
        *tensors, lse, row_count, row_index,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        h, lq, lk, d, tq, tk, scale * LOG2E,
    ), cfg, BLOCK_M=block_q // split, SPLIT=split, BLOCK_N=block_k, BLOCK_D=block_d,
        IEEE=q.dtype == torch.float32, UPCAST=_upcast(q), TAIL=lk % block_k != 0)
    return o, lse


# Which backward kernels run on the GPU: "auto" takes the Gluon dQ and dK/dV kernels (`hopper_bwd.py`) where they
# support the call, "triton" always this file's `tl` kernels.
BWD_IMPL = "auto"


def _launch_bwd(do, q, k, v, o, lse, row_count, row_index, col_count, col_index, scale, block_q, block_k,
                impl: str | None = None):
    from sparge.kernels import hopper_bwd

    if (impl or BWD_IMPL) == "auto" and hopper_bwd.supported(do, q, k, v, o, block_q, block_k):
        dq, stats = hopper_bwd.launch_dq(do, q, k, v, o, lse, row_count, row_index, scale, block_q, block_k)
        dk, dv = hopper_bwd.launch_dkdv(do, q, k, v, stats, col_count, col_index, scale, block_q, block_k)
        return dq, dk, dv
    b, h, lq, d = q.shape
    lk = k.shape[2]
    tq, tk = row_index.shape[2], row_index.shape[3]
    block_d = _block_d(d)
    ieee = q.dtype == torch.float32
    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    _bwd_preprocess[(tq, b * h)](
        o, do, delta, *o.stride(), *do.stride(), h, lq, d, BLOCK_M=block_q, BLOCK_D=block_d,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    cfg, split = _config("dq", block_d, block_q, q.is_cuda)
    _run(_bwd_dq_kernel, (tq * split, b * h), (
        q, k, v, do, dq, lse, delta, row_count, row_index,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        h, lq, lk, d, tq, tk, scale * LOG2E, scale,
    ), cfg, BLOCK_M=block_q // split, SPLIT=split, BLOCK_N=block_k, BLOCK_D=block_d, IEEE=ieee, UPCAST=_upcast(q))
    cfg, sub_m = _config("dkdv", block_d, block_q, q.is_cuda)
    _run(_bwd_dkdv_kernel, (tk, b * h), (
        q, k, v, do, dk, dv, lse, delta, col_count, col_index,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        h, lq, lk, d, tq, tk, scale * LOG2E, scale,
    ), cfg, BLOCK_M=block_q, SUB_M=sub_m, BLOCK_N=block_k, BLOCK_D=block_d, IEEE=ieee, UPCAST=_upcast(q))
    return dq, dk, dv


def _head_dim_ok(x: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit stride on the head dim; other strides are read in place."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    row_count: torch.Tensor, row_index: torch.Tensor,
    scale: float, block_q: int, block_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward op: ``(o [B,H,Lq,D] in q.dtype, lse [B,H,Lq] float32 natural log)``."""
    return _launch_fwd(_head_dim_ok(q), _head_dim_ok(k), _head_dim_ok(v), row_count, row_index, scale, block_q, block_k)


block_sparse_attn_fwd = torch.library.custom_op("sparge::block_sparse_attn_fwd", mutates_args=())(_fwd_impl)


@block_sparse_attn_fwd.register_fake
def _(q, k, v, row_count, row_index, scale, block_q, block_k):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_impl(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    row_count: torch.Tensor, row_index: torch.Tensor, col_count: torch.Tensor, col_index: torch.Tensor,
    scale: float, block_q: int, block_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward op: ``(dq, dk, dv)`` shaped and typed like ``(q, k, v)``."""
    return _launch_bwd(
        _head_dim_ok(do), _head_dim_ok(q), _head_dim_ok(k), _head_dim_ok(v), _head_dim_ok(o), lse,
        row_count, row_index, col_count, col_index, scale, block_q, block_k,
    )


block_sparse_attn_bwd = torch.library.custom_op("sparge::block_sparse_attn_bwd", mutates_args=())(_bwd_impl)


@block_sparse_attn_bwd.register_fake
def _(do, q, k, v, o, lse, row_count, row_index, col_count, col_index, scale, block_q, block_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# The torch.library ops are what torch.compile traces; in eager mode their dispatch costs ~10-20 us of
# host time per call, so eager calls go straight to the launchers the ops wrap.


def attn_fwd(q, k, v, row_count, row_index, scale: float, block_q: int, block_k: int):
    if torch.compiler.is_compiling():
        return block_sparse_attn_fwd(q, k, v, row_count, row_index, float(scale), int(block_q), int(block_k))
    return _fwd_impl(q, k, v, row_count, row_index, float(scale), int(block_q), int(block_k))


def attn_bwd(do, q, k, v, o, lse, row_count, row_index, col_count, col_index, scale: float, block_q: int, block_k: int):
    args = (do, q, k, v, o, lse, row_count, row_index, col_count, col_index, float(scale), int(block_q), int(block_k))
    if torch.compiler.is_compiling():
        return block_sparse_attn_bwd(*args)
    return _bwd_impl(*args)


__all__ = ["attn_bwd", "attn_fwd", "block_sparse_attn_bwd", "block_sparse_attn_fwd"]
