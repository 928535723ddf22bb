"""Block-sparse attention kernels (Triton; the interpreter on CPU) against the float64 torch reference."""

import pytest
import torch
import torch.nn.functional as F

import sparge
from sparge import reference
from sparge.kernels import triton_available

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(torch.empty(0, device=DEV)), reason="needs CUDA or TRITON_INTERPRET=1")


def _qkv(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda l: torch.randn(b, h, l, d, generator=g).to(dtype).to(DEV).requires_grad_()
    return mk(lq), mk(lk), mk(lk)


def _nblocks(length, block):
    return -(-length // block)


def _rand_mask(b, h, lq, lk, density, seed=0, bq=128, bk=64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, h, _nblocks(lq, bq), _nblocks(lk, bk), generator=g) < density).to(DEV)


def _run(q, k, v, mask, do, **kw):
    for t in (q, k, v):
        t.grad = None
    o = sparge.block_sparse_attention(q, k, v, mask, **kw)
    o.backward(do)
    return o.detach(), q.grad.detach(), k.grad.detach(), v.grad.detach()


def _golden(q, k, v, mask, do, bq=128, bk=64, scale=None):
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o = reference.block_sparse_attention(q64, k64, v64, mask, bq, bk, scale)
    o.backward(do.double())
    return o.detach(), q64.grad, k64.grad, v64.grad


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@needs_triton
@pytest.mark.parametrize(
    "b,h,lq,lk,d,density",
    [
        (1, 2, 300, 200, 64, 0.5),   # Lq != Lk, neither a multiple of the blocks
        (2, 2, 256, 256, 64, 0.3),   # B, H > 1
        (1, 1, 130, 70, 128, 0.6),   # D = 128, one-token tails
        (1, 1, 100, 90, 48, 1.0),    # D not a power of two, full mask, single partial q block
    ],
)
def test_forward_backward_match_float64_reference(b, h, lq, lk, d, density):
    q, k, v = _qkv(b, h, lq, lk, d)
    mask = _rand_mask(b, h, lq, lk, density)
    mask[..., 0, 0] = True
    do = torch.randn(b, h, lq, d, generator=torch.Generator().manual_seed(7)).to(DEV)
    got = _run(q, k, v, mask, do)
    ref = _golden(q, k, v, mask, do)
    for name, g_, r_ in zip(("o", "dq", "dk", "dv"), got, ref):
        assert not torch.isnan(g_).any(), name
        assert _rel(g_, r_) < 1e-5, (name, _rel(g_, r_))


@needs_triton
def test_empty_rows_give_zero_output_and_zero_grads():
    q, k, v = _qkv(1, 2, 300, 200, 64, seed=1)
    mask = _rand_mask(1, 2, 300, 200, 0.5, seed=1)
    mask[0, 0, 1] = False  # query block 1 of head 0 keeps nothing
    mask[0, 1] = False  # head 1 keeps nothing at all
    mask[0, 0, 0, 0] = True
    do = torch.randn(1, 2, 300, 64).to(DEV)
    o, dq, dk, dv = _run(q, k, v, mask, do)
    for t in (o, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (o[0, 0, 128:256] == 0).all() and (dq[0, 0, 128:256] == 0).all()
    assert (o[0, 1] == 0).all() and (dq[0, 1] == 0).all() and (dk[0, 1] == 0).all() and (dv[0, 1] == 0).all()
    ref = _golden(q, k, v, mask, do)
    for g_, r_ in zip((o, dq, dk, dv), ref):
        assert _rel(g_, r_) < 1e-5


@needs_triton
def test_dense_mask_equals_sdpa_with_strided_views_and_custom_scale():
    g = torch.Generator().manual_seed(3)
    # diffusers layout [B, L, H, D] viewed as [B, H, L, D] without a copy
    x = [torch.randn(1, 200, 2, 64, generator=g).to(DEV).requires_grad_() for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in x)
    assert not q.is_contiguous()
    mask = torch.ones(1, 2, 2, 4, dtype=torch.bool, device=DEV)
    o = sparge.block_sparse_attention(q, k, v, mask, scale=0.2)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.2)
    assert _rel(o, ref) < 1e-5
    o.sum().backward()
    gq = x[0].grad.clone()
    for t in x:
        t.grad = None
    F.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in x), scale=0.2).sum().backward()
    assert _rel(gq, x[0].grad) < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_is_within_dense_reference_error(dtype):
    # FlexAttention's yardstick: the kernel's error against a float64 golden is within a small factor
    # of a same-dtype plain-torch computation's error on the same mask.
    q, k, v = _qkv(1, 2, 256, 192, 64, dtype=dtype, seed=4)
    mask = _rand_mask(1, 2, 256, 192, 0.6, seed=4)
    mask[..., 0] = True
    do = torch.randn(1, 2, 256, 64, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEV)
    got = _run(q, k, v, mask, do)
    gold = _golden(q, k, v, mask, do)
    qs, ks, vs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    same = reference.block_sparse_attention(qs, ks, vs, mask)
    same.backward(do)
    same_dtype = (same.detach(), qs.grad, ks.grad, vs.grad)
    for name, g_, s_, r_ in zip(("o", "dq", "dk", "dv"), got, same_dtype, gold):
        assert g_.dtype == dtype
        assert _rel(g_, r_) <= 1.5 * _rel(s_, r_) + 1e-3, (name, _rel(g_, r_), _rel(s_, r_))


@needs_triton
def test_sparge_attention_equals_mask_then_kernel_and_reports_lse():
    from sparge.kernels.block_sparse_attn import attn_fwd

    q, k, v = _qkv(1, 2, 384, 384, 64, seed=6)
    out = sparge.sparge_attention(q, k, v, topk=0.2, topp=0.3)
    mask = sparge.hybrid_block_mask(q, k, topk=0.2, topp=0.3)
    ref = reference.block_sparse_attention(q.double(), k.double(), v.double(), mask)
    assert _rel(out, ref) < 1e-5
    bm = sparge.BlockMask.from_dense(mask, 384, 384)
    _, lse = attn_fwd(q.detach(), k.detach(), v.detach(), bm.row_count, bm.row_index, 64 ** -0.5, 128, 64)
    lse_ref = reference.block_sparse_lse(q.double(), k.double(), mask)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_autocast_and_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    q, k, v = _qkv(1, 1, 256, 256, 64, seed=8)
    mask = _rand_mask(1, 1, 256, 256, 0.5, seed=8)
    mask[..., 0] = True
    with torch.autocast(DEV, dtype=torch.bfloat16):
        o = sparge.block_sparse_attention(q, k, v, mask)
    assert o.dtype == torch.bfloat16
    o.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32
    g_plain = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    with torch.autocast(DEV, dtype=torch.bfloat16):
        o2 = checkpoint(sparge.block_sparse_attention, q, k, v, mask, use_reentrant=False)
    o2.float().sum().backward()
    for a, b in zip(g_plain, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("b,lq,lk,d,density", [(1, 200, 150, 32, 0.5), (2, 300, 330, 64, 0.3), (1, 256, 256, 128, 1.0)])
def test_torch_backend_matches_reference_without_triton(b, lq, lk, d, density):
    """The torch backend (kept key blocks gathered per query block) against the dense-matrix reference in
    float64: output and gradients, partial blocks, an empty row, a strided [B, L, H, D] view."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(b, length, 2, d, generator=g, dtype=torch.float64).to(DEV).transpose(1, 2).requires_grad_()
               for length in (lq, lk, lk))
    mask = _rand_mask(b, 2, lq, lk, density, seed=9)
    mask[0, 0, -1] = False  # an empty row
    mask[0, 1, 0, -1] = True  # the partial last key block
    do = torch.randn(b, 2, lq, d, generator=g, dtype=torch.float64).to(DEV)
    got = _run(q, k, v, mask, do, backend="torch")
    for g_, want in zip(got, _golden(q, k, v, mask, do)):
        assert _rel(g_, want) < 1e-12
    last = (_nblocks(lq, 128) - 1) * 128
    assert torch.equal(got[0][0, 0, last:], torch.zeros_like(q[0, 0, last:]))


def test_float64_takes_torch_path_with_one_warning():
    import sparge.attention as att

    att._warned.clear()
    q, k, v = (t.detach().double() for t in _qkv(1, 1, 100, 100, 16))
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool, device=DEV)
    with pytest.warns(RuntimeWarning, match="using the exact PyTorch path"):
        sparge.block_sparse_attention(q, k, v, mask)
    with pytest.raises(RuntimeError, match="cannot run here: dtype torch.float64"):
        sparge.block_sparse_attention(q, k, v, mask, backend="triton")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), "q must have 4 dimensions"),
        (lambda q, k, v, m: (q, k[:, :1], v, m), "share \\[B, H\\]"),
        (lambda q, k, v, m: (q, k[..., :8], v, m), "share the head dim"),
        (lambda q, k, v, m: (q.half(), k, v, m), "share one dtype"),
        (lambda q, k, v, m: (q.int(), k.int(), v.int(), m), "q.dtype=torch.int32 is not supported"),
        (lambda q, k, v, m: (q, k, v[:, :, :10], m), "share the sequence length"),
        (lambda q, k, v, m: (q, k, v, m[..., :1]), "mask has shape"),
        (lambda q, k, v, m: (q, k, v, m.float()), "mask must be a bool tensor"),
        (lambda q, k, v, m: (q, k, v, m.expand(2, -1, -1, -1)), "batch/heads"),
    ],
)
def test_bad_inputs(mutate, match):
    q, k, v = (t.detach() for t in _qkv(1, 2, 200, 150, 32))
    m = torch.ones(1, 2, 2, 3, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match=match):
        sparge.block_sparse_attention(*mutate(q, k, v, m))


def test_unsupported_head_dim_and_backend_name():
    q = torch.randn(1, 1, 64, 272, device=DEV)
    m = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEV)
    with pytest.raises(RuntimeError, match="head dim 272 > 256"):
        sparge.block_sparse_attention(q, q, q, m, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' is not known"):
        sparge.block_sparse_attention(q, q, q, m, backend="cuda")
    with pytest.raises(ValueError, match="topk=2 is out of range"):
        sparge.SpargeConfig(topk=2)


@needs_triton
def test_paired_key_tiles_match_reference(monkeypatch):
    """Two kept key blocks per step (odd row counts leave a half-empty last tile)."""
    from sparge.kernels import block_sparse_attn as K

    cfgs = {kind: {d: dict(c) for d, c in table.items()} for kind, table in K.KERNEL_CONFIGS.items()}
    for kind in ("fwd", "dq"):
        for c in cfgs[kind].values():
            c["pair"] = 2
    monkeypatch.setattr(K, "KERNEL_CONFIGS", cfgs)
    # fp32 on the interpreter (exact); fp16 on a GPU, where an fp32 "ieee" 128x128 tile compiles for minutes
    dtype, tol = (torch.float16, 5e-3) if DEV == "cuda" else (torch.float32, 1e-5)
    q, k, v = _qkv(1, 2, 300, 330, 64, dtype=dtype, seed=11)
    mask = _rand_mask(1, 2, 300, 330, 0.5, seed=11)
    mask[..., 0, :3] = True  # an odd count on the first row
    do = torch.randn(1, 2, 300, 64, generator=torch.Generator().manual_seed(12)).to(dtype).to(DEV)
    for g_, r_ in zip(_run(q, k, v, mask, do), _golden(q, k, v, mask, do)):
        assert _rel(g_, r_) < tol


@needs_triton
@pytest.mark.parametrize("desc", [0, 1])
@pytest.mark.parametrize("d,lk", [(64, 330), (128, 256)])
def test_forward_descriptor_and_pointer_paths_match_reference(monkeypatch, desc, d, lk):
    """The forward kernel's TMA-descriptor path and its pointer path, with and without a partial key block."""
    from sparge.kernels import block_sparse_attn as K

    cfgs = {kind: {dd: dict(c) for dd, c in table.items()} for kind, table in K.KERNEL_CONFIGS.items()}
    for c in cfgs["fwd"].values():
        c["desc"] = desc
    monkeypatch.setattr(K, "KERNEL_CONFIGS", cfgs)
    dtype, tol = (torch.float16, 5e-3) if DEV == "cuda" else (torch.float32, 1e-5)
    q, k, v = _qkv(1, 2, 300, lk, d, dtype=dtype, seed=5)
    mask = _rand_mask(1, 2, 300, lk, 0.5, seed=5)
    mask[..., 1, :] = False  # an empty row
    mask[..., 0, -1] = True  # the partial last key block
    with torch.no_grad():
        o = sparge.block_sparse_attention(q, k, v, mask)
    ref = reference.block_sparse_attention(q.detach().double(), k.detach().double(), v.detach().double(), mask, 128, 64, None)
    assert torch.equal(o[:, :, 128:256], torch.zeros_like(o[:, :, 128:256]))
    assert _rel(o, ref) < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: a Wan-like head dim and length in bf16")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_dense_mask_path_matches_sdpa_bf16(d):
    """The dense-mask path at a realistic size is SDPA to within bf16 rounding (forward and gradients)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(2, 4, 3000, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 4, _nblocks(3000, 128), _nblocks(3000, 64), dtype=torch.bool, device="cuda")
    do = torch.randn_like(q)
    got = _run(q, k, v, mask, do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32)
    ref.backward(do.float())
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, (ref, q32.grad, k32.grad, v32.grad)):
        assert _rel(a, b) < 1e-2, (name, _rel(a, b))


def _hopper_gluon() -> bool:
    from sparge.kernels import hopper_fwd

    return torch.cuda.is_available() and hopper_fwd.available(torch.device("cuda"))


@pytest.mark.skipif(not _hopper_gluon(), reason="the Gluon forward kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("config", [{}, {"q_buf": 2}, {"pair": 2, "num_buf": 2}, {"lpt": 1}])
@pytest.mark.parametrize(
    "b,h,lq,lk,d,dtype,density",
    [
        (1, 2, 300, 200, 128, torch.bfloat16, 0.5),   # partial blocks on both sides, odd row lists
        (2, 3, 1000, 777, 64, torch.float16, 0.3),    # D = 64, fp16
        (1, 1, 130, 70, 128, torch.bfloat16, 1.0),    # one-token tails, dense
        (1, 12, 2048, 4096, 128, torch.bfloat16, 0.1),  # 192 tiles: more than one per program on 132 SMs
    ],
)
def test_gpu_hopper_forward_matches_reference(config, b, h, lq, lk, d, dtype, density):
    """Every Gluon configuration equals the float64 reference to within low-precision rounding, the `tl`
    kernel's own error included; an empty row gives zeros and an LSE of -inf."""
    from sparge.kernels import block_sparse_attn as K
    from sparge.kernels import hopper_fwd

    g = torch.Generator(device="cuda").manual_seed(lq + lk + d)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for n in (lq, lk, lk))
    mask = torch.rand(b, h, _nblocks(lq, 128), _nblocks(lk, 64), device="cuda", generator=g) < density
    mask[:, :, 0] = False
    bm = sparge.BlockMask.from_dense(mask, lq, lk)
    assert hopper_fwd.supported(q, k, v, 128, 64)
    o, lse = hopper_fwd.launch_fwd(q, k, v, bm.row_count, bm.row_index, d ** -0.5, 128, 64, config=config)
    o_tl, _ = K._launch_fwd(q, k, v, bm.row_count, bm.row_index, d ** -0.5, 128, 64, impl="triton")
    ref = reference.block_sparse_attention(q.double(), k.double(), v.double(), mask)
    ref_lse = reference.block_sparse_lse(q.double(), k.double(), mask)
    assert _rel(o, ref) <= 1.5 * _rel(o_tl, ref) + 1e-4
    fin = torch.isfinite(ref_lse)
    assert float((lse.double()[fin] - ref_lse[fin]).abs().max()) < 1e-3
    assert torch.equal(o[:, :, :128], torch.zeros_like(o[:, :, :128])) and torch.isinf(lse[:, :, :128]).all()


@pytest.mark.skipif(not _hopper_gluon(), reason="the Gluon backward kernels run on Hopper GPUs only")
@pytest.mark.parametrize("dkdv_cfg,dq_cfg", [({}, {}), ({"kv_buf": 2}, {"num_buf": 2})])
@pytest.mark.parametrize(
    "b,h,lq,lk,d,dtype,density",
    [
        (1, 2, 300, 200, 128, torch.bfloat16, 0.5),   # partial blocks on both sides
        (2, 3, 1000, 777, 64, torch.float16, 0.3),    # D = 64, fp16, strided [B, L, H, D] views as diffusers passes
        (1, 1, 130, 70, 128, torch.bfloat16, 1.0),    # one-token tails, dense
        (1, 12, 4096, 2048, 128, torch.bfloat16, 0.1),  # 384 dQ tiles, 384 dK/dV tiles: several per program
    ],
)
def test_gpu_hopper_backward_matches_reference(dkdv_cfg, dq_cfg, b, h, lq, lk, d, dtype, density):
    """The Gluon dQ and dK/dV equal the float64 reference gradients to within low-precision rounding (the `tl`
    kernels' own error included); an empty row gets a zero dQ, an empty column zero dK and dV; the row
    statistics the dQ kernel writes for the dK/dV kernel are -lse / scale and -rowsum(O * dO), padded."""
    from sparge.kernels import block_sparse_attn as K
    from sparge.kernels import hopper_bwd

    g = torch.Generator(device="cuda").manual_seed(lq + lk + d + 1)
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
                   for n in (lq, lk, lk, lq))
    if d == 128:
        q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    mask = torch.rand(b, h, _nblocks(lq, 128), _nblocks(lk, 64), device="cuda", generator=g) < density
    mask[:, :, 0] = False      # an empty row: its query rows contribute nothing
    mask[:, :, :, 1] = False   # an empty column: zero dK and dV
    mask[:, :, 1:, 0] = True   # key block 0 kept by every other row: the longest column list
    bm = sparge.BlockMask.from_dense(mask, lq, lk)
    col_count, col_index = bm.columns()
    scale = d ** -0.5
    o, lse = K._launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64)
    assert hopper_bwd.supported(do, q, k, v, o, 128, 64)
    dq, stats = hopper_bwd.launch_dq(do, q, k, v, o, lse, bm.row_count, bm.row_index, scale, 128, 64, config=dq_cfg)
    dk, dv = hopper_bwd.launch_dkdv(do, q, k, v, stats, col_count, col_index, scale, 128, 64, config=dkdv_cfg)
    dq_tl, dk_tl, dv_tl = K._launch_bwd(do, q, k, v, o, lse, bm.row_count, bm.row_index, col_count, col_index,
                                    scale, 128, 64, impl="triton")
    tq = _nblocks(lq, 128)
    st = stats.view(b, h, 2, tq * 128)[..., :lq]
    fin = torch.isfinite(lse)
    assert torch.allclose(st[:, :, 0][fin], -lse[fin] / scale) and (st[:, :, 0][~fin] == float("inf")).all()
    assert torch.allclose(st[:, :, 1], -(o.float() * do.float()).sum(-1), atol=1e-3, rtol=1e-3)
    assert (stats.view(b, h, 2, tq * 128)[:, :, 0, lq:] == float("-inf")).all()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.block_sparse_attention(q64, k64, v64, mask).backward(do.double())
    for got, tl_got, ref in ((dq, dq_tl, q64.grad), (dk, dk_tl, k64.grad), (dv, dv_tl, v64.grad)):
        assert torch.isfinite(got).all()
        assert _rel(got, ref) <= 1.5 * _rel(tl_got, ref) + 1e-4, (_rel(got, ref), _rel(tl_got, ref))
    assert torch.equal(dk[:, :, 64:128], torch.zeros_like(dk[:, :, 64:128]))
    assert torch.equal(dv[:, :, 64:128], torch.zeros_like(dv[:, :, 64:128]))
    assert torch.equal(dq[:, :, :128], torch.zeros_like(dq[:, :, :128]))
