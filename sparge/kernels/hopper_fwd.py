"""Block-sparse attention forward for Hopper (sm_90) in Gluon, built the way FlashAttention-3 is.

Work unit: one 128-row query block of one (batch, head), a *tile*, walking that block's ascending row list of
kept 64-key blocks, like the ``tl`` kernel in ``block_sparse_attn.py`` (which stays the reference, the CPU
path and the path for other GPUs and dtypes). What Gluon adds is explicit control of the Hopper pieces:

- persistent programs (one per SM) that walk tiles ``pid, pid + grid, ...`` (heaviest row first with ``lpt``);
- warp specialisation: one *loader* warp issues TMA copies of Q and of the kept K and V blocks into a ring of
  ``num_buf`` shared-memory slots, with one mbarrier per K, per V and per free slot, reading each step's block
  indices a step ahead; two *consumer* warpgroups each own 64 of the 128 query rows and both read every slot;
- asynchronous ``wgmma``: a consumer issues the scores of step t and the PV product of step t-1 back to back,
  and runs the softmax of step t while PV t-1 is still on the tensor cores (FlashAttention-3's
  intra-warpgroup overlap); P stays in registers as the A operand; O leaves through shared memory and TMA;
- options, measured in ``benchmarks/NOTES.md``: ``pair`` = 2 takes two kept blocks per step (a 128-key
  tile). FlashAttention-3's inter-warpgroup ping-pong (the consumers taking turns to issue their products) was
  measured with mbarriers and with named barriers and bought nothing here, so it is not in the kernel.

Only the last entry of an ascending row list can be the partial key block, and only the last step can hold a
repeated block (odd lists with ``pair`` = 2), so masking is confined to the last step of a tile.

Inputs and outputs match ``block_sparse_attn._launch_fwd``: q, k, v ``[B, H, L, D]`` (bf16 or fp16,
D in {64, 128}, unit stride on D, 16-byte aligned strides), row lists ``[B, H, TQ, TK]`` int32 with
counts ``[B, H, TQ]``; returns o ``[B, H, Lq, D]`` and the natural-log LSE ``[B, H, Lq]`` float32.
"""

from __future__ import annotations

import functools

import torch

from sparge.kernels import HAS_TRITON, capability
from sparge.kernels.block_sparse_attn import LOG2E, _tma_ok

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

if HAS_GLUON:

    @gluon.jit
    def _tile_coords(tile, TQ, Order, ORDERED: gl.constexpr):
        """(query block, batch*head) of the i-th tile this program takes; ``Order`` lists tiles heaviest first."""
        if ORDERED:
            tile = gl.load(Order + tile)
        return tile % TQ, tile // TQ

    @gluon.jit
    def _copy_step(desc, bar, slot, b, h, kb0, kb1, BLOCK_N: gl.constexpr, PAIR: gl.constexpr):
        """TMA copies of key blocks kb0 (and kb1) of head (b, h) into one ring slot, completing on ``bar``."""
        mbarrier.expect(bar, PAIR * desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [b, h, kb0 * BLOCK_N, 0], bar, slot.slice(0, BLOCK_N, dim=2))
        if PAIR == 2:
            tma.async_copy_global_to_shared(desc, [b, h, kb1 * BLOCK_N, 0], bar, slot.slice(BLOCK_N, BLOCK_N, dim=2))

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, q_free, k_bars, v_bars, free_bars,
                RowCount, RowIndex, Order, H, TQ, TK, num_tiles,
                HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr, PAIR: gl.constexpr,
                ORDERED: gl.constexpr, Q_BUF: gl.constexpr, do_desc=None, do_smem=None, o_desc=None, o_smem=None):
        # with do_desc and o_desc (the dQ kernel of hopper_bwd.py) each tile's dO and O rows load next to its Q rows
        WITH_DO: gl.constexpr = do_desc is not None
        it = 0
        n = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            pid_m, pid_bh = _tile_coords(tile, TQ, Order, ORDERED)
            b = pid_bh // H
            h = pid_bh % H
            lut_row = pid_bh.to(gl.int64) * TQ + pid_m
            count = gl.load(RowCount + lut_row)
            idx_ptr = RowIndex + lut_row * TK
            for i in gl.static_range(2):
                # Q_BUF tiles' Q in flight, so the next tile's Q and first K/V blocks load under this tile's end;
                # a fresh barrier counts as having completed the phase before 0, so the first lap passes
                qs = (n % Q_BUF) * 2 + i
                mbarrier.wait(q_free.index(qs), ((n // Q_BUF) & 1) ^ 1)
                if WITH_DO:
                    mbarrier.expect(q_bars.index(qs), 3 * q_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(do_desc, [b, h, (2 * pid_m + i) * HALF_M, 0], q_bars.index(qs), do_smem.index(qs))
                    tma.async_copy_global_to_shared(o_desc, [b, h, (2 * pid_m + i) * HALF_M, 0], q_bars.index(qs), o_smem.index(qs))
                else:
                    mbarrier.expect(q_bars.index(qs), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [b, h, (2 * pid_m + i) * HALF_M, 0], q_bars.index(qs), q_smem.index(qs))
            steps = (count + PAIR - 1) // PAIR
            # the block indices of step t + 1 are read during step t, so no global-load latency sits between
            # a free slot and its copies; an odd row list repeats its last block (the consumers mask it)
            kb0 = gl.load(idx_ptr, mask=count > 0, other=0)
            kb1 = gl.load(idx_ptr + gl.minimum(1, count - 1), mask=count > 1, other=0)
            for t in range(steps):
                j = it + t
                s = j % NUM_BUF
                mbarrier.wait(free_bars.index(s), ((j // NUM_BUF) & 1) ^ 1)
                _copy_step(k_desc, k_bars.index(s), k_smem.index(s), b, h, kb0, kb1, BLOCK_N, PAIR)
                _copy_step(v_desc, v_bars.index(s), v_smem.index(s), b, h, kb0, kb1, BLOCK_N, PAIR)
                nxt = (t + 1) * PAIR
                kb0 = gl.load(idx_ptr + gl.minimum(nxt, count - 1))
                if PAIR == 2:
                    kb1 = gl.load(idx_ptr + gl.minimum(nxt + 1, count - 1))
            it += steps
            n += 1

    @gluon.jit
    def _mask_last_step(s, t, count, kb_last, Lk,
                        s_layout: gl.constexpr, BLOCK_N: gl.constexpr, PAIR: gl.constexpr, TAIL: gl.constexpr):
        """-inf for the score columns of the last step that lie past Lk (the partial key block can only be the
        last entry of an ascending row list) or past the end of the row list (an odd list with PAIR = 2)."""
        c = gl.arange(0, PAIR * BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        e = t * PAIR + c // BLOCK_N  # row-list entry of each column
        valid = e < count
        if TAIL:
            valid = valid & ((e != count - 1) | (kb_last * BLOCK_N + c % BLOCK_N < Lk))
        return gl.where(valid[None, :], s, float("-inf"))

    @gluon.jit
    def _softmax_step(s, m_i, l_i, t, steps, count, kb_last, Lk, qk_scale,
                      s_layout: gl.constexpr, BLOCK_N: gl.constexpr, PAIR: gl.constexpr, TAIL: gl.constexpr):
        """One online-softmax step in base 2: (p fp32, new max, new sum, rescale factor)."""
        if TAIL or PAIR > 1:
            if t == steps - 1:
                s = _mask_last_step(s, t, count, kb_last, Lk, s_layout, BLOCK_N, PAIR, TAIL)
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _store_rows(desc, staging, val, b, h, row0):
        """Store a consumer's [rows, D] result tile at rows row0.. of head (b, h) by TMA through its staging
        buffer, once the previous tile's store has left that buffer (the store itself runs on)."""
        tma.store_wait(0)
        staging.reshape(val.shape).store(val)
        fence_async_shared()
        tma.async_copy_shared_to_global(desc, [b, h, row0, 0], staging)

    @gluon.jit
    def _consumer(o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bars, q_free, k_bars, v_bars, free_bars,
                  RowCount, RowIndex, Order, H, Lq, Lk, TQ, TK, num_tiles, qk_scale,
                  WG: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
                  NUM_BUF: gl.constexpr, PAIR: gl.constexpr, TAIL: gl.constexpr,
                  ORDERED: gl.constexpr, Q_BUF: gl.constexpr):
        dtype: gl.constexpr = q_smem.dtype
        KN: gl.constexpr = PAIR * BLOCK_N  # keys per step
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, KN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        s_zero = gl.zeros([HALF_M, KN], gl.float32, layout=s_layout)

        it = 0
        n = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            pid_m, pid_bh = _tile_coords(tile, TQ, Order, ORDERED)
            lut_row = pid_bh.to(gl.int64) * TQ + pid_m
            count = gl.load(RowCount + lut_row)
            idx_ptr = RowIndex + lut_row * TK
            steps = (count + PAIR - 1) // PAIR
            kb_last = gl.load(idx_ptr + count - 1, mask=count > 0, other=0)
            m_i = gl.full([HALF_M], float("-inf"), gl.float32, layout=row_s)
            l_i = gl.zeros([HALF_M], gl.float32, layout=row_s)
            acc = gl.zeros([HALF_M, BLOCK_D], gl.float32, layout=o_layout)
            qs = (n % Q_BUF) * 2 + WG
            q = q_smem.index(qs).reshape([HALF_M, BLOCK_D])
            mbarrier.wait(q_bars.index(qs), (n // Q_BUF) & 1)
            if steps > 0:
                s0 = it % NUM_BUF
                mbarrier.wait(k_bars.index(s0), (it // NUM_BUF) & 1)
                s_tok = warpgroup_mma(q, k_smem.index(s0).reshape([KN, BLOCK_D]).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)
                s = warpgroup_mma_wait(0, deps=(s_tok,))
                p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, 0, steps, count, kb_last, Lk, qk_scale,
                                                   s_layout, BLOCK_N, PAIR, TAIL)
                p = gl.convert_layout(p.to(dtype), p_layout)
                for t in range(1, steps):
                    j = it + t
                    slot = j % NUM_BUF
                    prev = (j - 1) % NUM_BUF
                    mbarrier.wait(k_bars.index(slot), (j // NUM_BUF) & 1)
                    s_tok = warpgroup_mma(q, k_smem.index(slot).reshape([KN, BLOCK_D]).permute((1, 0)), s_zero,
                                          use_acc=False, is_async=True)
                    mbarrier.wait(v_bars.index(prev), ((j - 1) // NUM_BUF) & 1)
                    acc_tok = warpgroup_mma(p, v_smem.index(prev).reshape([KN, BLOCK_D]), acc, is_async=True)
                    s = warpgroup_mma_wait(1, deps=(s_tok,))
                    p_new, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, t, steps, count, kb_last, Lk, qk_scale,
                                                           s_layout, BLOCK_N, PAIR, TAIL)
                    acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
                    mbarrier.arrive(free_bars.index(prev))
                    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                    p = gl.convert_layout(p_new.to(dtype), p_layout)
                j = it + steps - 1
                last = j % NUM_BUF
                mbarrier.wait(v_bars.index(last), (j // NUM_BUF) & 1)
                acc_tok = warpgroup_mma(p, v_smem.index(last).reshape([KN, BLOCK_D]), acc, is_async=True)
                # the last score product is done: Q's slot goes back to the loader under the last PV
                mbarrier.arrive(q_free.index(qs))
                acc = warpgroup_mma_wait(0, deps=(acc_tok,))
                mbarrier.arrive(free_bars.index(last))
            else:
                mbarrier.arrive(q_free.index(qs))

            l_o = gl.convert_layout(l_i, row_o)
            nonempty = l_o > 0.0
            l_safe = gl.where(nonempty, l_o, 1.0)
            out = acc / l_safe[:, None]
            m_o = gl.convert_layout(m_i, row_o)
            lse = gl.where(nonempty, (m_o + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            row0 = (2 * pid_m + WG) * HALF_M
            offs_m = row0 + gl.arange(0, HALF_M, layout=row_o)
            gl.store(LSE + pid_bh.to(gl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)
            _store_rows(o_desc, o_smem.index(WG), out.to(dtype), pid_bh // H, pid_bh % H, row0)
            it += steps
            n += 1
        tma.store_wait(0)

    @gluon.jit
    def _fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, RowCount, RowIndex, Order, H, Lq, Lk, TQ, TK, num_tiles, qk_scale,
                    BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, NUM_BUF: gl.constexpr, PAIR: gl.constexpr,
                    TAIL: gl.constexpr, ORDERED: gl.constexpr, Q_BUF: gl.constexpr,
                    LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        # persistent: each program walks tiles pid, pid + grid, ... (in Order when ORDERED)
        HALF_M: gl.constexpr = q_desc.block_type.shape[2]
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2 * Q_BUF] + q_desc.block_type.shape, q_desc.layout)
        o_smem = gl.allocate_shared_memory(dtype, [2] + o_desc.block_type.shape, o_desc.layout)
        # K/V rings: NUM_BUF slots of PAIR TMA tiles each; the consumers view a slot as one [PAIR * BLOCK_N, D] tile
        k_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, PAIR * BLOCK_N, BLOCK_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, PAIR * BLOCK_N, BLOCK_D], v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [2 * Q_BUF, 1], mbarrier.MBarrierLayout())
        q_free = gl.allocate_shared_memory(gl.int64, [2 * Q_BUF, 1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        free_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2 * Q_BUF):
            mbarrier.init(q_bars.index(i), count=1)
            mbarrier.init(q_free.index(i), count=1)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
            mbarrier.init(free_bars.index(i), count=2)
        gl.warp_specialize([
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bars, q_free, k_bars, v_bars, free_bars,
                         RowCount, RowIndex, Order, H, Lq, Lk, TQ, TK, num_tiles, qk_scale,
                         0, HALF_M, BLOCK_N, BLOCK_D, NUM_BUF, PAIR, TAIL, ORDERED, Q_BUF)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bars, q_free, k_bars, v_bars, free_bars,
                         RowCount, RowIndex, Order, H, Lq, Lk, TQ, TK, num_tiles, qk_scale,
                         1, HALF_M, BLOCK_N, BLOCK_D, NUM_BUF, PAIR, TAIL, ORDERED, Q_BUF)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, q_free, k_bars, v_bars, free_bars,
                       RowCount, RowIndex, Order, H, TQ, TK, num_tiles, HALF_M, BLOCK_N, NUM_BUF, PAIR, ORDERED, Q_BUF)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# Launch configuration, tuned on an H100 (`benchmarks/tune_hopper_fwd.py`, benchmarks/NOTES.md): ring slots,
# kept blocks per step, heaviest-row-first order, tiles' Q in flight, setmaxnreg budgets.
HOPPER_FWD_CONFIG: dict[str, int] = {"num_buf": 3, "pair": 1, "lpt": 0, "q_buf": 1,
                                      "loader_regs": 24, "consumer_regs": 232}


def available(device: torch.device) -> bool:
    """Whether the Gluon kernel can run on ``device`` at all: Gluon importable and a Hopper (sm_90) GPU."""
    return HAS_GLUON and device.type == "cuda" and capability(device)[0] == 9


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> bool:
    """Whether the Gluon kernel can run this call: a Hopper GPU, bf16/fp16, D in {64, 128}, 128x64 blocks,
    TMA-addressable ``[B, H, L, D]`` tensors."""
    if not available(q.device):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.shape[-1] not in (64, 128) or v.shape[-1] != q.shape[-1] or block_q != 128 or block_k != 64:
        return False
    return _tma_ok(q, k, v)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _smem_layout(block: tuple[int, ...], dtype: torch.dtype) -> "gl.NVMMASharedLayout":
    """The TMA tile's shared-memory layout, built once per (block, dtype): building it on every launch cost
    host time that a host-bound eager call (the 97% forward+backward) pays directly."""
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


def _descriptor(x: torch.Tensor, rows: int, block: tuple[int, ...] | None = None) -> "TensorDescriptor":
    """TMA descriptor of ``x`` ([B, H, L, D] by default, tiles of ``rows`` x D; or any ``block``)."""
    block = block or (1, 1, rows, x.shape[-1])
    return TensorDescriptor(x, list(x.shape), list(x.stride()), list(block), _smem_layout(block, x.dtype))


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
    num_tiles = tq * b * h
    grid = min(num_tiles, _sm_count(q.device))  # one program per SM (shared memory allows no more)
    order = torch.argsort(row_count.reshape(-1), descending=True).to(torch.int32) if cfg["lpt"] else row_count
    _fwd_kernel[(grid,)](
        _descriptor(q, half), _descriptor(k, block_k), _descriptor(v, block_k), _descriptor(o, half),
        lse, row_count, row_index, order, h, lq, lk, tq, tk, num_tiles, scale * LOG2E,
        BLOCK_N=block_k, BLOCK_D=d, NUM_BUF=cfg["num_buf"], PAIR=cfg["pair"], TAIL=lk % block_k != 0,
        ORDERED=bool(cfg["lpt"]), Q_BUF=cfg["q_buf"], LOADER_REGS=cfg["loader_regs"], CONSUMER_REGS=cfg["consumer_regs"], num_warps=4,
    )
    return o, lse


__all__ = ["HAS_GLUON", "HOPPER_FWD_CONFIG", "available", "launch_fwd", "supported"]
