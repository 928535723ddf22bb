"""Block-sparse attention backward for Hopper (sm_90) in Gluon: dQ from row lists, then dK and dV from column lists.

Both kernels stand beside the ``tl`` kernels of ``block_sparse_attn.py`` (the reference, the CPU path and the
path for other GPUs and dtypes) and, like them, are deterministic: no atomics.

**dQ** (``_dq_kernel``) is the forward's schedule (``hopper_fwd.py``: persistent programs, a loader warp, two
consumer warpgroups of 64 query rows, a K/V ring): the loader brings each tile's Q, dO and O rows, and each
step of the row list takes S = Q K^T and dP = dO V^T back to back, P = exp2(S * scale * log2e - lse * log2e)
while dP is on the tensor cores, and dQ += P (dP - delta) K. The consumers also compute delta = rowsum(O * dO)
of their rows and write the row statistics (-lse / scale, -delta, padded to whole query blocks with -inf and
0) that the dK/dV kernel reads by TMA, so the backward has no separate pass over O and dO.

**dK/dV** (``_dkdv_kernel``): one tile = one 64-key block of one (batch, head), walking the block's ascending
*column list* (the 128-row query blocks that keep it):

- persistent programs (one per SM) walking tiles ``pid, pid + grid, ...``; K and V of a tile stay in shared
  memory for the whole column list (``kv_buf`` = 2 would let the next tile's K and V load under this tile's
  end; measured no faster, so off);
- one *loader* warp issues TMA copies of each step's Q and dO query block and of its row statistics into a
  ring of ``num_buf`` slots, reading each tile's count and first column entry a tile ahead;
- two *consumer* warpgroups each take 64 of the 128 query rows of every step and keep their own fp32 dK and
  dV for the tile's 64 keys; at the end of the tile they swap halves through one shared buffer, the second
  storing dV and the first dK.

Per step and consumer (keys as rows, so P^T and dS^T are the A operands of the accumulating products and
stay in registers): S^T - lse / scale = K Q^T + (-lse / scale), with the row statistic as the accumulator's
initial value, and dP^T = V dO^T issued back to back; P^T = exp2((S^T - lse / scale) * scale * log2e) while
dP^T is on the tensor cores; dV += P^T dO issued; dS^T = P^T (dP^T - delta) while dV's product runs;
dK += dS^T Q. The statistics come from shared memory at the point of use, so no [64]-column vector stays
live next to the five register tiles.

No masking is needed in either kernel: TMA fills query rows past Lq and key rows past Lk with zeros, a zero
key row adds nothing to dQ whatever its P, query rows past Lq have -lse / scale = -inf (so P = 0), and dK/dV
rows past Lk are not stored.

Inputs: q, k, v, do, o ``[B, H, L, D]`` (bf16 or fp16, D in {64, 128}, unit stride on D, 16-byte aligned
strides), the statistics ``[B*H, 2, TQ*128]`` float32 that the dQ kernel writes (above), row and column lists
with their counts as ``BlockMask`` holds them, and lse ``[B, H, Lq]`` float32 from the forward; dq, dk, dv come
back shaped and typed like q, k, v.
"""

from __future__ import annotations

import torch

from sparge.kernels.block_sparse_attn import LOG2E
from sparge.kernels.hopper_fwd import HAS_GLUON, _descriptor, _sm_count
from sparge.kernels.hopper_fwd import supported as _fwd_supported

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from sparge.kernels.hopper_fwd import _loader, _store_rows

    @gluon.jit
    def _column_head(ColCount, ColIndex, tile, num_tiles, TQ):
        """(count, first query block) of a tile's column list; (0, 0) past the last tile."""
        live = tile < num_tiles
        # tile = pid_bh * TK + key block: the tile number is the column list's index
        count = gl.load(ColCount + tile, mask=live, other=0)
        qb = gl.load(ColIndex + tile.to(gl.int64) * TQ, mask=live & (count > 0), other=0)
        return count, qb

    @gluon.jit
    def _dkdv_loader(q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, st_smem,
                     kv_bars, kv_free, ld_bars, free_bars, ColCount, ColIndex, H, TQ, TK, num_tiles,
                     HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr, KV_BUF: gl.constexpr):
        it = 0
        n = 0
        # each tile's count and first column entry are read one tile ahead, so no global-load latency sits
        # between the last copies of a tile and the first of the next
        count, qb = _column_head(ColCount, ColIndex, gl.program_id(0), num_tiles, TQ)
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            pid_n = tile % TK
            pid_bh = tile // TK
            b = pid_bh // H
            h = pid_bh % H
            idx_ptr = ColIndex + tile.to(gl.int64) * TQ
            count_nxt, qb_nxt = _column_head(ColCount, ColIndex, tile + gl.num_programs(0), num_tiles, TQ)
            ks = n % KV_BUF
            # a fresh barrier counts as having completed the phase before 0, so the first lap passes
            mbarrier.wait(kv_free.index(ks), ((n // KV_BUF) & 1) ^ 1)
            mbarrier.expect(kv_bars.index(ks), 2 * k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, h, pid_n * BLOCK_N, 0], kv_bars.index(ks), k_smem.index(ks))
            tma.async_copy_global_to_shared(v_desc, [b, h, pid_n * BLOCK_N, 0], kv_bars.index(ks), v_smem.index(ks))
            for t in range(count):
                j = it + t
                s = j % NUM_BUF
                mbarrier.wait(free_bars.index(s), ((j // NUM_BUF) & 1) ^ 1)
                for i in gl.static_range(2):  # consumer i's 64 rows and their statistics, on its own barrier
                    bar = ld_bars.index(2 * s + i)
                    mbarrier.expect(bar, 2 * q_desc.block_type.nbytes + 2 * st_desc.block_type.nbytes)
                    row = (2 * qb + i) * HALF_M
                    tma.async_copy_global_to_shared(q_desc, [b, h, row, 0], bar, q_smem.index(2 * s + i))
                    tma.async_copy_global_to_shared(do_desc, [b, h, row, 0], bar, do_smem.index(2 * s + i))
                    for r in gl.static_range(2):
                        tma.async_copy_global_to_shared(st_desc, [pid_bh, r, row], bar, st_smem.index(4 * s + 2 * i + r))
                qb = gl.load(idx_ptr + gl.minimum(t + 1, count - 1))
            it += count
            n += 1
            count = count_nxt
            qb = qb_nxt

    @gluon.jit
    def _dkdv_consumer(DK, DV, q_smem, do_smem, k_smem, v_smem, st_smem, red_smem,
                       kv_bars, kv_free, ld_bars, free_bars, red_bars,
                       ColCount, H, Lk, TK, num_tiles, qk_scale, sm_scale, stride_b, stride_h, stride_n,
                       WG: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
                       NUM_BUF: gl.constexpr, KV_BUF: gl.constexpr):
        dtype: gl.constexpr = q_smem.dtype
        # S^T and dP^T: [BLOCK_N keys, HALF_M queries]; dK and dV: [BLOCK_N, BLOCK_D]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF_M, 16])
        a_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout, k_width=2)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        s_zero = gl.zeros([BLOCK_N, HALF_M], gl.float32, layout=s_layout)
        red_k = red_bars.index(0)   # consumer 1's dK is in red_smem
        red_v = red_bars.index(1)   # consumer 0's dV is in red_smem
        red_free = red_bars.index(2)

        it = 0
        n = 0
        count = gl.load(ColCount + gl.program_id(0))
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            pid_n = tile % TK
            pid_bh = tile // TK
            nxt = tile + gl.num_programs(0)
            count_nxt = gl.load(ColCount + nxt, mask=nxt < num_tiles, other=0)
            dk = gl.zeros([BLOCK_N, BLOCK_D], gl.float32, layout=a_layout)
            dv = gl.zeros([BLOCK_N, BLOCK_D], gl.float32, layout=a_layout)
            ks = n % KV_BUF
            mbarrier.wait(kv_bars.index(ks), (n // KV_BUF) & 1)
            k = k_smem.index(ks).reshape([BLOCK_N, BLOCK_D])
            v = v_smem.index(ks).reshape([BLOCK_N, BLOCK_D])
            for t in range(count):
                j = it + t
                s = j % NUM_BUF
                mbarrier.wait(ld_bars.index(2 * s + WG), (j // NUM_BUF) & 1)
                qs = q_smem.index(2 * s + WG).reshape([HALF_M, BLOCK_D])
                dos = do_smem.index(2 * s + WG).reshape([HALF_M, BLOCK_D])
                neg_lse = st_smem.index(4 * s + 2 * WG).reshape([HALF_M]).load(col_s)
                st_tok = warpgroup_mma(k, qs.permute((1, 0)), s_zero + neg_lse[None, :], is_async=True)
                dp_tok = warpgroup_mma(v, dos.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                st = warpgroup_mma_wait(1, deps=(st_tok,))
                pt = gl.exp2(st * qk_scale)
                pt_op = gl.convert_layout(pt.to(dtype), op_layout)
                dv_tok = warpgroup_mma(pt_op, dos, dv, is_async=True)
                dpt = warpgroup_mma_wait(1, deps=(dp_tok,))
                neg_delta = st_smem.index(4 * s + 2 * WG + 1).reshape([HALF_M]).load(col_s)
                dst_op = gl.convert_layout((pt * (dpt + neg_delta[None, :])).to(dtype), op_layout)
                dk_tok = warpgroup_mma(dst_op, qs, dk, is_async=True)
                dv, dk, pt_op, dst_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, pt_op, dst_op))
                mbarrier.arrive(free_bars.index(s))
            mbarrier.arrive(kv_free.index(ks))

            # the two consumers' partial sums meet in one shared buffer: consumer 1 hands over its dK and
            # stores dV, consumer 0 hands over its dV and stores dK (each barrier completes once per tile)
            rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_layout))
            cols = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, a_layout))
            offs = (pid_bh // H).to(gl.int64) * stride_b + (pid_bh % H).to(gl.int64) * stride_h \
                + rows.to(gl.int64)[:, None] * stride_n + cols[None, :]
            ok = (rows < Lk)[:, None]
            if WG == 1:
                mbarrier.wait(red_free, (n & 1) ^ 1)
                red_smem.store(dk)
                mbarrier.arrive(red_k)
                mbarrier.wait(red_v, n & 1)
                dv = dv + red_smem.load(a_layout)
                mbarrier.arrive(red_free)
                gl.store(DV + offs, dv.to(dtype), mask=ok)
            else:
                mbarrier.wait(red_k, n & 1)
                dk = (dk + red_smem.load(a_layout)) * sm_scale
                gl.thread_barrier()  # every thread has read consumer 1's dK before any overwrites it
                red_smem.store(dv)
                mbarrier.arrive(red_v)
                gl.store(DK + offs, dk.to(dtype), mask=ok)
            it += count
            n += 1
            count = count_nxt

    @gluon.jit
    def _dkdv_kernel(q_desc, do_desc, k_desc, v_desc, st_desc, DK, DV, ColCount, ColIndex,
                     H, Lk, TQ, TK, num_tiles, qk_scale, sm_scale, stride_b, stride_h, stride_n,
                     BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, NUM_BUF: gl.constexpr, KV_BUF: gl.constexpr,
                     LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        HALF_M: gl.constexpr = q_desc.block_type.shape[2]
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2 * NUM_BUF] + q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [2 * NUM_BUF] + do_desc.block_type.shape, do_desc.layout)
        # per slot and consumer: -lse / scale and -delta of its 64 rows
        st_smem = gl.allocate_shared_memory(gl.float32, [4 * NUM_BUF] + st_desc.block_type.shape, st_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [KV_BUF] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [KV_BUF] + v_desc.block_type.shape, v_desc.layout)
        red_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_N, BLOCK_D],
                                             gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_D], gl.float32))
        kv_bars = gl.allocate_shared_memory(gl.int64, [KV_BUF, 1], mbarrier.MBarrierLayout())
        kv_free = gl.allocate_shared_memory(gl.int64, [KV_BUF, 1], mbarrier.MBarrierLayout())
        ld_bars = gl.allocate_shared_memory(gl.int64, [2 * NUM_BUF, 1], mbarrier.MBarrierLayout())
        free_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        red_bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(KV_BUF):
            mbarrier.init(kv_bars.index(i), count=1)
            mbarrier.init(kv_free.index(i), count=2)
        for i in gl.static_range(2 * NUM_BUF):
            mbarrier.init(ld_bars.index(i), count=1)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(free_bars.index(i), count=2)
        for i in gl.static_range(3):
            mbarrier.init(red_bars.index(i), count=1)
        gl.warp_specialize([
            (_dkdv_consumer, (DK, DV, q_smem, do_smem, k_smem, v_smem, st_smem, red_smem,
                              kv_bars, kv_free, ld_bars, free_bars, red_bars,
                              ColCount, H, Lk, TK, num_tiles, qk_scale, sm_scale, stride_b, stride_h, stride_n,
                              0, HALF_M, BLOCK_N, BLOCK_D, NUM_BUF, KV_BUF)),
            (_dkdv_consumer, (DK, DV, q_smem, do_smem, k_smem, v_smem, st_smem, red_smem,
                              kv_bars, kv_free, ld_bars, free_bars, red_bars,
                              ColCount, H, Lk, TK, num_tiles, qk_scale, sm_scale, stride_b, stride_h, stride_n,
                              1, HALF_M, BLOCK_N, BLOCK_D, NUM_BUF, KV_BUF)),
            (_dkdv_loader, (q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, st_smem,
                            kv_bars, kv_free, ld_bars, free_bars, ColCount, ColIndex, H, TQ, TK, num_tiles,
                            HALF_M, BLOCK_N, NUM_BUF, KV_BUF)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


    @gluon.jit
    def _dq_consumer(dq_desc, LSE, Stats, q_smem, do_smem, o_smem, dq_smem, k_smem, v_smem, q_bars, q_free, k_bars,
                     v_bars, free_bars, RowCount, H, Lq, TQ, Lpad, num_tiles, qk_scale, sm_scale, inv_scale,
                     WG: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
                     NUM_BUF: gl.constexpr):
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # O * dO, 16-byte vectors
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout)
        offs = gl.arange(0, HALF_M, layout=row_s)

        it = 0
        n = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            pid_m = tile % TQ
            pid_bh = tile // TQ
            count = gl.load(RowCount + tile)  # tile = pid_bh * TQ + pid_m
            row0 = (2 * pid_m + WG) * HALF_M
            lse = gl.load(LSE + pid_bh.to(gl.int64) * Lq + row0 + offs, mask=row0 + offs < Lq, other=float("inf"))
            mbarrier.wait(q_bars.index(WG), n & 1)
            q = q_smem.index(WG).reshape([HALF_M, BLOCK_D])
            do = do_smem.index(WG).reshape([HALF_M, BLOCK_D])
            # delta = rowsum(O * dO) of this consumer's rows (zero past Lq: TMA zero-fills), and the rows the
            # dK/dV kernel reads by TMA after this kernel: (-lse / scale, -delta), padded to Lpad
            prod = o_smem.index(WG).reshape([HALF_M, BLOCK_D]).load(rows_layout).to(gl.float32) \
                * do.load(rows_layout).to(gl.float32)
            neg_delta = -gl.convert_layout(gl.sum(prod, 1), row_s)
            st = Stats + pid_bh.to(gl.int64) * 2 * Lpad + row0 + offs
            gl.store(st, -lse * inv_scale)
            gl.store(st + Lpad, neg_delta)
            neg_lse2 = -lse * 1.4426950408889634
            dq = gl.zeros([HALF_M, BLOCK_D], gl.float32, layout=o_layout)
            for t in range(count):
                j = it + t
                slot = j % NUM_BUF
                k = k_smem.index(slot).reshape([BLOCK_N, BLOCK_D])
                v = v_smem.index(slot).reshape([BLOCK_N, BLOCK_D])
                mbarrier.wait(k_bars.index(slot), (j // NUM_BUF) & 1)
                s_tok = warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_bars.index(slot), (j // NUM_BUF) & 1)
                dp_tok = warpgroup_mma(do, v.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s_tok,))
                p = gl.exp2(s * qk_scale + neg_lse2[:, None])
                dp = warpgroup_mma_wait(0, deps=(dp_tok,))
                ds_op = gl.convert_layout((p * (dp + neg_delta[:, None])).to(dtype), op_layout)
                dq_tok = warpgroup_mma(ds_op, k, dq, is_async=True)
                dq, ds_op = warpgroup_mma_wait(0, deps=(dq_tok, ds_op))
                mbarrier.arrive(free_bars.index(slot))
            mbarrier.arrive(q_free.index(WG))
            _store_rows(dq_desc, dq_smem.index(WG), (dq * sm_scale).to(dtype), pid_bh // H, pid_bh % H, row0)
            it += count
            n += 1
        tma.store_wait(0)

    @gluon.jit
    def _dq_kernel(q_desc, do_desc, o_desc, k_desc, v_desc, dq_desc, LSE, Stats, RowCount, RowIndex, H, Lq, TQ, TK, Lpad,
                   num_tiles, qk_scale, sm_scale, inv_scale, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
                   NUM_BUF: gl.constexpr, LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        # the forward's schedule (hopper_fwd.py) with dO and O next to Q and three products per step:
        # S = Q K^T, dP = dO V^T, dQ += P (dP - delta) K; one tile = one query block, walked over its row list
        HALF_M: gl.constexpr = q_desc.block_type.shape[2]
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [2] + do_desc.block_type.shape, do_desc.layout)
        o_smem = gl.allocate_shared_memory(dtype, [2] + o_desc.block_type.shape, o_desc.layout)
        dq_smem = gl.allocate_shared_memory(dtype, [2] + dq_desc.block_type.shape, dq_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, BLOCK_N, BLOCK_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, BLOCK_N, BLOCK_D], v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        free_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bars.index(i), count=1)
            mbarrier.init(q_free.index(i), count=1)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
            mbarrier.init(free_bars.index(i), count=2)
        gl.warp_specialize([
            (_dq_consumer, (dq_desc, LSE, Stats, q_smem, do_smem, o_smem, dq_smem, k_smem, v_smem, q_bars, q_free,
                            k_bars, v_bars, free_bars, RowCount, H, Lq, TQ, Lpad, num_tiles, qk_scale, sm_scale,
                            inv_scale, 0, HALF_M, BLOCK_N, BLOCK_D, NUM_BUF)),
            (_dq_consumer, (dq_desc, LSE, Stats, q_smem, do_smem, o_smem, dq_smem, k_smem, v_smem, q_bars, q_free,
                            k_bars, v_bars, free_bars, RowCount, H, Lq, TQ, Lpad, num_tiles, qk_scale, sm_scale,
                            inv_scale, 1, HALF_M, BLOCK_N, BLOCK_D, NUM_BUF)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, q_free, k_bars, v_bars, free_bars,
                       RowCount, RowIndex, RowCount, H, TQ, TK, num_tiles, HALF_M, BLOCK_N, NUM_BUF, 1, False, 1,
                       do_desc, do_smem, o_desc, o_smem)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# Launch configuration, tuned on an H100 (benchmarks/NOTES.md): Q/dO ring slots, K/V buffers, setmaxnreg budgets.
HOPPER_DKDV_CONFIG: dict[str, int] = {"num_buf": 2, "kv_buf": 1, "loader_regs": 24, "consumer_regs": 240}
HOPPER_DQ_CONFIG: dict[str, int] = {"num_buf": 3, "loader_regs": 24, "consumer_regs": 232}


def supported(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              block_q: int, block_k: int) -> bool:
    """Whether the Gluon backward can run this call: the forward's conditions, and dO and O TMA-addressable too."""
    return (_fwd_supported(q, k, v, block_q, block_k) and do.dtype == o.dtype == q.dtype
            and _fwd_supported(do, o, v, block_q, block_k))


def launch_dkdv(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stats: torch.Tensor,
                col_count: torch.Tensor, col_index: torch.Tensor, scale: float, block_q: int, block_k: int,
                config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Gluon dK/dV kernel; the caller checks :func:`supported` first. ``stats`` is the row statistics
    that :func:`launch_dq` returns. Returns ``(dk, dv)``."""
    cfg = {**HOPPER_DKDV_CONFIG, **(config or {})}
    b, h, _, d = q.shape
    lk = k.shape[2]
    tk, tq = col_index.shape[2], col_index.shape[3]
    dk = torch.empty((b, h, lk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, h, lk, d), dtype=v.dtype, device=v.device)
    half = block_q // 2
    num_tiles = tk * b * h
    grid = min(num_tiles, _sm_count(q.device))
    _dkdv_kernel[(grid,)](
        _descriptor(q, half), _descriptor(do, half), _descriptor(k, block_k), _descriptor(v, block_k),
        _descriptor(stats, half, (1, 1, half)), dk, dv, col_count, col_index, h, lk, tq, tk, num_tiles, scale * LOG2E, scale,
        dk.stride(0), dk.stride(1), dk.stride(2),
        BLOCK_N=block_k, BLOCK_D=d, NUM_BUF=cfg["num_buf"], KV_BUF=cfg["kv_buf"],
        LOADER_REGS=cfg["loader_regs"], CONSUMER_REGS=cfg["consumer_regs"], num_warps=4,
    )
    return dk, dv


def launch_dq(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
              row_count: torch.Tensor, row_index: torch.Tensor, scale: float, block_q: int, block_k: int,
              config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Gluon dQ kernel (row lists). Returns ``dq`` like q and the row statistics ``[B*H, 2, TQ*block_q]``
    float32 (-lse / scale, -delta with delta = rowsum(o * do); padded with -inf and 0) that :func:`launch_dkdv`
    reads, so the backward needs no separate pass over O and dO."""
    cfg = {**HOPPER_DQ_CONFIG, **(config or {})}
    b, h, lq, d = q.shape
    tq, tk = row_index.shape[2], row_index.shape[3]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    stats = torch.empty((b * h, 2, tq * block_q), dtype=torch.float32, device=q.device)
    half = block_q // 2
    num_tiles = tq * b * h
    grid = min(num_tiles, _sm_count(q.device))
    _dq_kernel[(grid,)](
        _descriptor(q, half), _descriptor(do, half), _descriptor(o, half), _descriptor(k, block_k),
        _descriptor(v, block_k), _descriptor(dq, half), lse, stats, row_count, row_index, h, lq, tq, tk, tq * block_q,
        num_tiles, scale * LOG2E, scale, 1.0 / scale,
        BLOCK_N=block_k, BLOCK_D=d, NUM_BUF=cfg["num_buf"],
        LOADER_REGS=cfg["loader_regs"], CONSUMER_REGS=cfg["consumer_regs"], num_warps=4,
    )
    return dq, stats


__all__ = ["HOPPER_DKDV_CONFIG", "HOPPER_DQ_CONFIG", "launch_dkdv", "launch_dq", "supported"]
