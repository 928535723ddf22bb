"""Mask semantics: pooling, scores, Top-k / Top-p / hybrid selection, sparsity, BlockMask lists."""

import math

import pytest
import torch

import sparge
from sparge.mask import BlockMask, block_pool, mask_from_scores
from sparge.kernels.pool import block_mean_torch


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_block_pool_partial_last_block_uses_real_tokens():
    x = _rand(2, 3, 300, 16)
    pooled = block_pool(x, 128)
    assert pooled.shape == (2, 3, 3, 16) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[:, :, 0], x[:, :, :128].mean(2))
    torch.testing.assert_close(pooled[:, :, 2], x[:, :, 256:].mean(2))  # 44 real tokens, not 128


def test_block_pool_triton_matches_torch_on_strided_bf16():
    x = _rand(1, 50, 2, 32).to(torch.bfloat16).transpose(1, 2)  # [B,H,L,D] view of [B,L,H,D]
    torch.testing.assert_close(block_pool(x, 16), block_mean_torch(x, 16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens,d_chunk", [(None, None), (256, 128), (512, 16)])
def test_block_mean_pair_groups_of_blocks_with_partial_tails(tokens, d_chunk):
    """Several blocks per pooling program, a last group with fewer blocks, partial last blocks."""
    from sparge.kernels import triton_available
    from sparge.kernels.pool import block_mean_pair

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = _rand(2, 2, 1000, 32, seed=1).to(dev), _rand(2, 2, 700, 32, seed=2).to(dev)  # Tq = 8, Tk = 11
    if not triton_available(q):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    pq, pk = block_mean_pair(q, k, 128, 64, tokens=tokens, d_chunk=d_chunk)
    torch.testing.assert_close(pq, block_mean_torch(q, 128), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pk, block_mean_torch(k, 64), rtol=1e-5, atol=1e-6)


def test_block_scores_formula_and_rows_sum_to_one():
    q, k = _rand(1, 2, 200, 32, seed=1), _rand(1, 2, 130, 32, seed=2)
    s = sparge.block_scores(q, k, block_q=64, block_k=64)
    pq = torch.stack([q[:, :, i * 64:(i + 1) * 64].mean(2) for i in range(4)], 2)
    pk = torch.stack([k[:, :, j * 64:(j + 1) * 64].mean(2) for j in range(3)], 2)
    expected = torch.softmax(pq @ pk.transpose(-1, -2) / math.sqrt(32), -1)
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(s.sum(-1), torch.ones(1, 2, 4))
    s2 = sparge.block_scores(q, k, block_q=64, block_k=64, scale=0.5)
    torch.testing.assert_close(s2, torch.softmax(pq @ pk.transpose(-1, -2) * 0.5, -1))


def test_topk_count_and_ties_go_to_lower_index():
    scores = torch.full((1, 1, 1, 10), 0.1)  # all tied
    m = mask_from_scores(scores, topk=0.25, topp=0.0)  # ceil(2.5) = 3 blocks
    assert m[0, 0, 0].tolist() == [True] * 3 + [False] * 7
    m = mask_from_scores(scores, topk=0.01, topp=0.0)  # at least one
    assert m.sum() == 1 and m[0, 0, 0, 0]


def test_topp_keeps_fewest_blocks_reaching_p():
    scores = torch.tensor([[[[0.05, 0.5, 0.3, 0.15]]]])
    assert mask_from_scores(scores, topk=0, topp=0.5)[0, 0, 0].tolist() == [False, True, False, False]
    assert mask_from_scores(scores, topk=0, topp=0.51)[0, 0, 0].tolist() == [False, True, True, False]
    assert mask_from_scores(scores, topk=0, topp=0.9)[0, 0, 0].tolist() == [False, True, True, True]
    assert mask_from_scores(scores, topk=0, topp=0.97)[0, 0, 0].tolist() == [True, True, True, True]
    assert mask_from_scores(scores, topk=0, topp=1e-6).sum() == 1


def test_sink_case_topp_alone_keeps_only_the_sink_and_topk_rescues():
    # skewed row: one attention-sink block holds most of the mass
    tk = 20
    row = torch.full((tk,), 0.2 / (tk - 1))
    row[0] = 0.8
    scores = row.view(1, 1, 1, tk)
    topp_only = mask_from_scores(scores, topk=0, topp=0.5)
    topk_only = mask_from_scores(scores, topk=0.25, topp=0)
    hybrid = mask_from_scores(scores, topk=0.25, topp=0.5)
    assert topp_only.sum() == 1 and topp_only[0, 0, 0, 0]  # Top-p collapses onto the sink
    assert topk_only.sum() == 5
    assert torch.equal(hybrid, topp_only | topk_only) and hybrid.sum() == 5


def test_flat_case_topk_alone_keeps_too_little_and_topp_rescues():
    tk = 20
    scores = torch.full((1, 1, 1, tk), 1.0 / tk) + torch.linspace(0, 1e-4, tk).flip(0)
    scores = scores / scores.sum(-1, keepdim=True)
    topk_only = mask_from_scores(scores, topk=0.05, topp=0)
    topp_only = mask_from_scores(scores, topk=0, topp=0.5)
    hybrid = mask_from_scores(scores, topk=0.05, topp=0.5)
    kept_mass = lambda m: float((scores * m).sum())
    assert topk_only.sum() == 1 and kept_mass(topk_only) < 0.06  # Top-k alone: too little mass
    assert topp_only.sum() == 10 and kept_mass(topp_only) >= 0.5
    assert torch.equal(hybrid, topk_only | topp_only)


@pytest.mark.parametrize("k,p", [(0.1, 0.3), (0.3, 0.1), (0.05, 0.9), (0.5, 0.0), (0.0, 0.4)])
def test_hybrid_is_union_on_random_data(k, p):
    q, k_ = _rand(2, 2, 1000, 16, seed=3), _rand(2, 2, 700, 16, seed=4)
    hyb = sparge.hybrid_block_mask(q, k_, topk=k, topp=p)
    parts = []
    if k > 0:
        parts.append(sparge.topk_block_mask(q, k_, topk=k))
    if p > 0:
        parts.append(sparge.topp_block_mask(q, k_, topp=p))
    union = parts[0] if len(parts) == 1 else parts[0] | parts[1]
    assert torch.equal(hyb, union)
    assert hyb.shape == (2, 2, 8, 11) and bool(hyb.any(-1).all())


def test_dense_settings():
    q, k = _rand(1, 1, 500, 16), _rand(1, 1, 500, 16, seed=9)
    assert sparge.hybrid_block_mask(q, k, topk=1.0, topp=0).all()
    assert sparge.hybrid_block_mask(q, k, topk=0, topp=1.0).all()


def test_mask_sparsity_weights_partial_blocks():
    lq, lk = 300, 100  # q blocks 128,128,44 ; k blocks 64,36
    m = torch.zeros(1, 1, 3, 2, dtype=torch.bool)
    m[0, 0, 2, 1] = True  # the 44 x 36 corner
    assert sparge.mask_sparsity(m, lq, lk) == pytest.approx(1 - 44 * 36 / (300 * 100))
    m2 = torch.ones(2, 2, 3, 2, dtype=torch.bool)
    m2[1] = False
    m2[1, :, :, 0] = True  # second batch keeps the first key block only
    expected = (0.0 + (1 - 64 / 100)) / 2
    assert sparge.mask_sparsity(m2, lq, lk) == pytest.approx(expected)


def test_blockmask_lists_roundtrip():
    m = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    m[0, 0, 1] = False
    bm = BlockMask.from_dense(m, 600, 400, block_q=128, block_k=64)
    assert torch.equal(bm.to_dense(), m)
    assert torch.equal(bm.row_count, m.sum(-1).int())
    assert not bm._columns  # column lists are built on first use only
    assert torch.equal(bm.col_count, m.sum(-2).int())
    for j in range(7):  # column lists ascending and exact
        cnt = int(bm.col_count[1, 2, j])
        assert bm.col_index[1, 2, j, :cnt].tolist() == torch.nonzero(m[1, 2, :, j]).flatten().tolist()
    assert bm.sparsity() == pytest.approx(sparge.mask_sparsity(m, 600, 400))
    assert "BlockMask(B=2, H=3, Tq=5, Tk=7" in repr(bm)


def test_build_block_mask_equals_hybrid_mask():
    q, k = _rand(1, 2, 900, 32, seed=5), _rand(1, 2, 900, 32, seed=6)
    bm = sparge.build_block_mask(q, k, topk=0.2, topp=0.3)
    assert torch.equal(bm.to_dense(), sparge.hybrid_block_mask(q, k, topk=0.2, topp=0.3))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, k: sparge.hybrid_block_mask(q[0], k), "q must have 4 dimensions"),
        (lambda q, k: sparge.hybrid_block_mask(q, k[:, :1]), "same batch and heads"),
        (lambda q, k: sparge.hybrid_block_mask(q, k[..., :8]), "same head dim"),
        (lambda q, k: sparge.hybrid_block_mask(q.int(), k), "q.dtype=torch.int32 is not supported"),
        (lambda q, k: sparge.hybrid_block_mask(q, k, topk=1.5), "topk=1.5 is out of range"),
        (lambda q, k: sparge.hybrid_block_mask(q, k, topp=-0.1), "topp=-0.1 is out of range"),
        (lambda q, k: sparge.hybrid_block_mask(q, k, topk=0, topp=0), "topk=0 and topp=0"),
        (lambda q, k: sparge.hybrid_block_mask(q, k, block_q=100), "block_q=100 is not supported"),
        (lambda q, k: sparge.topk_block_mask(q, k, topk=0), "topk=0 would keep no block"),
        (lambda q, k: sparge.mask_sparsity(torch.ones(1, 1, 2, 2, dtype=torch.bool), 300, 100), r"expected \[B, H, 3, 2\]"),
        (lambda q, k: sparge.mask_sparsity(torch.ones(1, 1, 3, 2), 300, 100), "mask must be a bool tensor"),
    ],
)
def test_bad_inputs_raise_value_error_naming_argument(call, match):
    q, k = _rand(1, 2, 64, 16), _rand(1, 2, 64, 16)
    with pytest.raises(ValueError, match=match):
        call(q, k)


@pytest.mark.parametrize("k,p", [(0.1, 0.3), (0.03, 0.2), (0.2, 0.0), (0.0, 0.6), (1.0, 0.0), (0.0, 1.0)])
def test_triton_selection_equals_torch_selection(k, p):
    """The fused radix-select kernel and the plain-torch sort pick the same blocks (ties included)."""
    from sparge.kernels import triton_available

    q, k_ = _rand(1, 2, 1100, 16, seed=21), _rand(1, 2, 1500, 16, seed=22)
    q[:, :, 128:256] = 0.0  # a query block whose scores are all tied
    if not triton_available(q):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    fast = sparge.build_block_mask(q, k_, topk=k, topp=p)
    slow = sparge.build_block_mask(q, k_, topk=k, topp=p, backend="torch")
    assert torch.equal(fast.to_dense(), slow.to_dense())
    assert torch.equal(fast.row_count, slow.row_count)
    assert torch.equal(fast.row_index, slow.row_index)  # kept blocks ascending, then zeros
    assert torch.equal(fast.col_count, slow.col_count)


@pytest.mark.parametrize("tq,tk,d", [(3, 5, 16), (70, 130, 48), (2, 17, 128)])
def test_pooled_logits_kernel_matches_float64_product(tq, tk, d):
    """The pooled-product kernel (tiles past Tq, Tk and D masked) equals pq @ pk^T to fp32 accuracy."""
    from sparge.kernels import triton_available
    from sparge.kernels.mask_lut import pooled_logits

    pq, pk = _rand(2, 3, tq, d, seed=31), _rand(2, 3, tk, d, seed=32)
    if not triton_available(pq):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = pooled_logits(pq.to(dev), pk.to(dev)).cpu()
    want = pq.double() @ pk.double().transpose(-1, -2)
    assert got.dtype == torch.float32 and got.shape == (2, 3, tq, tk)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_mask_backend_names_are_checked():
    q = _rand(1, 1, 64, 16)
    with pytest.raises(ValueError, match="backend='cuda'"):
        sparge.build_block_mask(q, q, backend="cuda")
