"""Block-sparse attention forward for Hopper (sm_90) in Gluon: FlashAttention-3's structure.

One program owns one 128-row query block of one (batch, head) and walks its row list of kept 64-key
blocks, like the ``tl`` kernel in ``block_sparse_attn.py`` (which stays the reference, the CPU path and
the path for other GPUs). What Gluon adds is explicit control of the Hopper pieces:

- warp specialisation: one *loader* warp issues TMA copies of the kept K and V blocks into a ring of
  ``NUM_BUF`` shared-memory slots (one mbarrier per K, per V and per free slot); two *consumer*
  warpgroups each own 64 of the 128 query rows and both read every slot;
- asynchronous ``wgmma``: each consumer issues the scores of block t and the PV product of block t-1
  back to back, and runs the softmax of block t while PV t-1 is still on the tensor cores
  (FlashAttention-3's intra-warpgroup overlap); P stays in registers as the A operand;
- optional ping-pong (``PINGPONG``): the two consumers take turns to issue their products, so one
  warpgroup's softmax runs under the other's matrix multiplies (FlashAttention-3's inter-warpgroup
  schedule).

Inputs and outputs match ``block_sparse_attn._launch_fwd``: q, k, v ``[B, H, L, D]`` (bf16 or fp16,
D in {64, 128}, unit stride on D, 16-byte aligned strides), row lists ``[B, H, TQ, TK]`` int32 with
counts ``[B, H, TQ]``; returns o ``[B, H, Lq, D]`` and the natural-log LSE ``[B, H, Lq]`` float32.
"""

from __future__ import annotations

import torch

from sparge.kernels import HAS_TRITON, capability

HAS_GLUON = False
if HAS_TRITON:
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import (
            fence_async_shared,
            mbarrier,
            tma,
            warpgroup_mma,
            warpgroup_mma_wait,
        )
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        HAS_GLUON = True
    except ImportError:  # Triton without Gluon, or with a different Gluon API
        HAS_GLUON = False

LOG2E = 1.4426950408889634

if HAS_GLUON:

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, free_bars,
                RowCount, RowIndex, H, TQ, TK,
                HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr):
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        lut_row = pid_bh.to(gl.int64) * TQ + pid_m
        count = gl.load(RowCount + lut_row)
        idx_ptr = RowIndex + lut_row * TK
        for i in gl.static_range(2):
            mbarrier.expect(q_bars.index(i), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, h, (2 * pid_m + i) * HALF_M, 0], q_bars.index(i), q_smem.index(i))
        for t in range(count):
            s = t % NUM_BUF
            kb = gl.load(idx_ptr + t)
            # a fresh barrier counts as having completed the phase before 0, so the first lap passes
            mbarrier.wait(free_bars.index(s), ((t // NUM_BUF) & 1) ^ 1)
            mbarrier.expect(k_bars.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, h, kb * BLOCK_N, 0], k_bars.index(s), k_smem.index(s))
            mbarrier.expect(v_bars.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [b, h, kb * BLOCK_N, 0], v_bars.index(s), v_smem.index(s))

    @gluon.jit
    def _softmax_step(s, m_i, l_i, kb, Lk, qk_scale,
                      s_layout: gl.constexpr, BLOCK_N: gl.constexpr, TAIL: gl.constexpr):
        """One online-softmax step in base 2: (p fp32, new max, new sum, rescale factor)."""
        if TAIL:
            cols = kb * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where((cols < Lk)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _consumer(o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, free_bars, turn_bars,
                  RowCount, RowIndex, H, Lq, Lk, TQ, TK, qk_scale,
                  WG: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
                  NUM_BUF: gl.constexpr, TAIL: gl.constexpr, PINGPONG: gl.constexpr):
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        lut_row = pid_bh.to(gl.int64) * TQ + pid_m
        count = gl.load(RowCount + lut_row)
        idx_ptr = RowIndex + lut_row * TK
        dtype: gl.constexpr = q_smem.dtype

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        q = q_smem.index(WG).reshape([HALF_M, BLOCK_D])
        m_i = gl.full([HALF_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([HALF_M], gl.float32, layout=row_s)
        acc = gl.zeros([HALF_M, BLOCK_D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bars.index(WG), 0)

        if count > 0:
            if PINGPONG:
                mbarrier.wait(turn_bars.index(WG), 0)
            mbarrier.wait(k_bars.index(0), 0)
            kb = gl.load(idx_ptr)
            s_tok = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, BLOCK_D]).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn_bars.index(1 - WG))
            s = warpgroup_mma_wait(0, deps=(s_tok,))
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, kb, Lk, qk_scale, s_layout, BLOCK_N, TAIL)
            p = gl.convert_layout(p.to(dtype), p_layout)
            for t in range(1, count):
                slot = t % NUM_BUF
                prev = (t - 1) % NUM_BUF
                kb = gl.load(idx_ptr + t)
                if PINGPONG:
                    mbarrier.wait(turn_bars.index(WG), t & 1)
                mbarrier.wait(k_bars.index(slot), (t // NUM_BUF) & 1)
                s_tok = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, BLOCK_D]).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)
                mbarrier.wait(v_bars.index(prev), ((t - 1) // NUM_BUF) & 1)
                acc_tok = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_N, BLOCK_D]), acc, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn_bars.index(1 - WG))
                s = warpgroup_mma_wait(1, deps=(s_tok,))
                p_new, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, kb, Lk, qk_scale, s_layout, BLOCK_N, TAIL)
                acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
                mbarrier.arrive(free_bars.index(prev))
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                p = gl.convert_layout(p_new.to(dtype), p_layout)
            last = (count - 1) % NUM_BUF
            mbarrier.wait(v_bars.index(last), ((count - 1) // NUM_BUF) & 1)
            acc_tok = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_N, BLOCK_D]), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc_tok,))
            mbarrier.arrive(free_bars.index(last))

        l_o = gl.convert_layout(l_i, row_o)
        nonempty = l_o > 0.0
        l_safe = gl.where(nonempty, l_o, 1.0)
        out = acc / l_safe[:, None]
        m_o = gl.convert_layout(m_i, row_o)
        lse = gl.where(nonempty, (m_o + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        offs_m = (2 * pid_m + WG) * HALF_M + gl.arange(0, HALF_M, layout=row_o)
        gl.store(LSE + pid_bh.to(gl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)
        # Q's slot is free once the last score product is done: stage O there for the TMA store
        o_smem = q_smem.index(WG)
        o_smem.reshape([HALF_M, BLOCK_D]).store(out.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [b, h, (2 * pid_m + WG) * HALF_M, 0], o_smem)
        tma.store_wait(0)

    @gluon.jit
    def _consumer0(o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, free_bars, turn_bars,
                   RowCount, RowIndex, H, Lq, Lk, TQ, TK, qk_scale,
                   HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
                   NUM_BUF: gl.constexpr, TAIL: gl.constexpr, PINGPONG: gl.constexpr):
        _consumer(o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, free_bars, turn_bars,
                  RowCount, RowIndex, H, Lq, Lk, TQ, TK, qk_scale, 0, HALF_M, BLOCK_N, BLOCK_D, NUM_BUF, TAIL, PINGPONG)

    @gluon.jit
    def _consumer1(o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, free_bars, turn_bars,
                   RowCount, RowIndex, H, Lq, Lk, TQ, TK, qk_scale,
                   HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
                   NUM_BUF: gl.constexpr, TAIL: gl.constexpr, PINGPONG: gl.constexpr):
        _consumer(o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, free_bars, turn_bars,
                  RowCount, RowIndex, H, Lq, Lk, TQ, TK, qk_scale, 1, HALF_M, BLOCK_N, BLOCK_D, NUM_BUF, TAIL, PINGPONG)

    @gluon.jit
    def _fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, RowCount, RowIndex, H, Lq, Lk, TQ, TK, qk_scale,
                    BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, NUM_BUF: gl.constexpr,
                    TAIL: gl.constexpr, PINGPONG: gl.constexpr, LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        HALF_M: gl.constexpr = q_desc.block_type.shape[2]
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_BUF] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_BUF] + v_desc.block_type.shape, v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        free_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bars.index(i), count=1)
            mbarrier.init(turn_bars.index(i), count=1)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
            mbarrier.init(free_bars.index(i), count=2)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index(0))  # consumer 0 issues first
        gl.warp_specialize([
            (_consumer0, (o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, free_bars, turn_bars,
                          RowCount, RowIndex, H, Lq, Lk, TQ, TK, qk_scale,
                          HALF_M, BLOCK_N, BLOCK_D, NUM_BUF, TAIL, PINGPONG)),
            (_consumer1, (o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, free_bars, turn_bars,
                          RowCount, RowIndex, H, Lq, Lk, TQ, TK, qk_scale,
                          HALF_M, BLOCK_N, BLOCK_D, NUM_BUF, TAIL, PINGPONG)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, free_bars,
                       RowCount, RowIndex, H, TQ, TK, HALF_M, BLOCK_N, NUM_BUF)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# Launch configuration, tuned on an H100 (benchmarks/NOTES.md).
HOPPER_FWD_CONFIG: dict[str, int] = {"num_buf": 3, "pingpong": 0, "loader_regs": 24, "consumer_regs": 232}


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> bool:
    """Whether the Gluon kernel can run this call: a Hopper GPU, bf16/fp16, D in {64, 128}, 128x64 blocks,
    TMA-addressable ``[B, H, L, D]`` tensors."""
    if not (HAS_GLUON and q.is_cuda and capability(q.device)[0] == 9):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.shape[-1] not in (64, 128) or block_q != 128 or block_k != 64:
        return False
    from sparge.kernels.block_sparse_attn import _tma_ok

    return _tma_ok(q, k, v)


def _descriptor(x: torch.Tensor, rows: int) -> "TensorDescriptor":
    block = [1, 1, rows, x.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block, layout)


def launch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_count: torch.Tensor, row_index: torch.Tensor,
               scale: float, block_q: int, block_k: int, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Gluon forward; the caller checks :func:`supported` first. Returns ``(o, lse)``."""
    cfg = {**HOPPER_FWD_CONFIG, **(config or {})}
    b, h, lq, d = q.shape
    lk = k.shape[2]
    tq, tk = row_index.shape[2], row_index.shape[3]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    half = block_q // 2
    _fwd_kernel[(tq, b * h)](
        _descriptor(q, half), _descriptor(k, block_k), _descriptor(v, block_k), _descriptor(o, half),
        lse, row_count, row_index, h, lq, lk, tq, tk, scale * LOG2E,
        BLOCK_N=block_k, BLOCK_D=d, NUM_BUF=cfg["num_buf"], TAIL=lk % block_k != 0, PINGPONG=bool(cfg["pingpong"]),
        LOADER_REGS=cfg["loader_regs"], CONSUMER_REGS=cfg["consumer_regs"], num_warps=4,
    )
    return o, lse


__all__ = ["HAS_GLUON", "HOPPER_FWD_CONFIG", "launch_fwd", "supported"]
