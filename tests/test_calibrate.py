"""sparge.calibrate: capture store, bisection search, hybrid vs single rules on structured Q/K, real capture."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from sparge import reference
from sparge.calibrate import (
    CalibrationData,
    CaptureStore,
    UnreachableTargetError,
    capture_attention,
    check_target,
    relative_l2,
    search_per_layer,
    search_target,
    spread,
)

BQ, BK = 64, 16  # Tq = 32, Tk = 128 at L = 2048: Top-k moves sparsity in steps of 1/128 < the 0.5% tolerance


def _waves(length: int, dim: int, window: float, g: torch.Generator) -> torch.Tensor:
    """Unit-norm random Fourier features: rows i, j have a high dot product when |i - j| << window."""
    pos = torch.arange(length, dtype=torch.float64)
    freqs = torch.randn(dim // 2, generator=g, dtype=torch.float64) / window
    phase = torch.rand(dim // 2, generator=g, dtype=torch.float64) * 2 * math.pi
    ang = pos[:, None] * freqs + phase
    return torch.cat([ang.cos(), ang.sin()], -1) / math.sqrt(dim // 2)


def sink_and_windows(seed: int = 0, length: int = 2048, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q/K/V ``[1, 2, L, D]`` float32 with known structure.

    Head 0: a local window of ~32 tokens (finer than a query block, so pooling blurs it) plus an
    attention sink -- the first key block, which every query attends to with a fixed logit. Pooled
    scores give the sink most of the mass, so Top-p alone keeps little more than the sink and drops the
    local window that carries about half of the real attention.
    Head 1: a wide smooth window (hundreds of tokens): the mass spreads over many key blocks, so a
    fixed Top-k budget misses much of it. V is smooth in position plus noise, so outputs have weight.
    """
    g = torch.Generator().manual_seed(seed)
    half = dim // 2
    s = dim**0.25  # q . k / sqrt(D) = logit when both carry sqrt(logit) * D^(1/4)
    local = _waves(length, half, 32.0, g) * math.sqrt(8.0) * s
    sink = torch.randn(half, generator=g, dtype=torch.float64)
    sink = sink / sink.norm() * math.sqrt(8.0) * s
    q0 = torch.cat([local, sink.expand(length, -1)], -1)
    k0 = torch.cat([local, torch.zeros(length, half, dtype=torch.float64)], -1)
    k0[:BK, half:] = sink
    wide = _waves(length, dim, 300.0, g) * math.sqrt(6.0) * s
    q = torch.stack([q0, wide])[None].float()
    k = torch.stack([k0, wide.clone()])[None].float()
    v = torch.stack([_waves(length, dim, 64.0, g) * math.sqrt(dim) for _ in range(2)])[None].float()
    v = v + 0.5 * torch.randn(1, 2, length, dim, generator=g)
    return q, k, v


@pytest.fixture(scope="module")
def sink_data() -> CalibrationData:
    q, k, v = sink_and_windows()
    return CalibrationData(CaptureStore.from_tensors([(0, 0, q, k, v)]), block_q=BQ, block_k=BK, backend="torch")


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_hybrid_beats_topk_only_and_topp_only_at_equal_sparsity(sink_data: CalibrationData, target: float) -> None:
    res = search_target(sink_data, target)
    c = res.chosen
    assert abs(c.sparsity - target) <= 0.005
    best_k, best_p, best_h = res.best_of("topk"), res.best_of("topp"), res.best_of("hybrid")
    assert best_k is not None and best_p is not None and best_h is not None, "every family must reach the target here"
    for single in (best_k, best_p):
        assert abs(single.sparsity - target) <= 0.005
        assert best_h.error < single.error, (target, best_h, single)
    assert c == best_h and c.topk > 0 and c.topp > 0
    # few evaluations: bisection, not a grid; errors only for the handful of hits
    assert res.error_evaluations <= 8
    assert res.sparsity_evaluations <= 200


def test_reported_sparsity_and_error_match_an_independent_computation(sink_data: CalibrationData) -> None:
    """Pooled scores, kept fraction and error recomputed in plain float64 torch (no shared code but mask_from_scores)."""
    from sparge.mask import mask_from_scores

    q, k, v = (t.double() for t in sink_and_windows())
    L, D = q.shape[2], q.shape[3]
    pq = q.reshape(1, 2, L // BQ, BQ, D).mean(3)
    pk = k.reshape(1, 2, L // BK, BK, D).mean(3)
    scores = torch.softmax(pq @ pk.transpose(-1, -2) / math.sqrt(D), dim=-1)
    dense = reference.attention(q, k, v)
    res = search_target(sink_data, 0.9)
    for cand in [c for c in res.candidates if c.hit][:3]:
        mask = mask_from_scores(scores, topk=cand.topk, topp=cand.topp)
        tokens = reference.token_mask(mask, L, L, BQ, BK)
        assert 1.0 - tokens.double().mean().item() == pytest.approx(cand.sparsity, abs=1e-9)
        # float32 and float64 scores may order near-equal blocks differently: the error uses the search's own mask
        mask32 = mask_from_scores(sink_data.items[0].scores, topk=cand.topk, topp=cand.topp)
        out = reference.block_sparse_attention(q, k, v, mask32, BQ, BK)
        assert cand.error == pytest.approx(((out - dense).norm() / dense.norm()).item(), rel=2e-3)  # float32 vs float64


def test_sparsity_is_monotone_in_each_knob(sink_data: CalibrationData) -> None:
    ks = [sink_data.sparsity(x, 0.3) for x in (0.01, 0.05, 0.1, 0.3)]
    ps = [sink_data.sparsity(0.02, x) for x in (0.1, 0.4, 0.7, 0.95)]
    assert ks == sorted(ks, reverse=True) and ps == sorted(ps, reverse=True)
    assert ks[0] > ks[-1] and ps[0] > ps[-1]


def test_unreachable_target_names_the_closest_sparsity() -> None:
    q, k, v = sink_and_windows(length=256)  # Tk = 16 key blocks: one block per row is 15/16 = 0.9375 sparse
    data = CalibrationData(CaptureStore.from_tensors([(0, 0, q, k, v)]), block_q=BQ, block_k=BK, backend="torch")
    with pytest.raises(UnreachableTargetError, match=r"0\.9375") as ei:
        search_target(data, 0.99)
    assert ei.value.closest == pytest.approx(0.9375)
    assert isinstance(ei.value, ValueError)
    # a target between two reachable steps and a tight tolerance: the message names the closest hit
    with pytest.raises(UnreachableTargetError, match="closest reachable"):
        search_target(data, 0.90, tolerance=1e-4, hybrid_fractions=())


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), True])
def test_check_target_rejects_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        check_target(bad)


def test_search_rejects_bad_knobs(sink_data: CalibrationData) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        search_target(sink_data, 0.9, tolerance=0.0)
    with pytest.raises(ValueError, match="hybrid fraction"):
        search_target(sink_data, 0.9, hybrid_fractions=(1.5,))


def test_per_layer_hits_target_per_layer_and_compares_at_equal_sparsity() -> None:
    q, k, v = sink_and_windows(length=1024)
    # layer 0: the sink head only; layer 1: the wide head only -- they want different (k, p)
    samples = [(0, 0, q[:, :1], k[:, :1], v[:, :1]), (1, 0, q[:, 1:], k[:, 1:], v[:, 1:])]
    data = CalibrationData(CaptureStore.from_tensors(samples), block_q=BQ, block_k=BK, backend="torch")
    glob = search_target(data, 0.9)
    pl = search_per_layer(data, glob)
    assert set(pl.levels) == {0, 1} and not pl.fallback_layers
    g = glob.chosen
    for layer, c in pl.levels.items():
        idx = data.indices_for_layer(layer)
        # each layer keeps its share of the budget: its sparsity under the global level, within tolerance
        assert abs(data.sparsity(c.topk, c.topp, idx) - data.sparsity(g.topk, g.topp, idx)) <= 0.005
        assert data.error(c.topk, c.topp, idx) <= data.error(g.topk, g.topp, idx)  # never worse than the global knobs
    # the layers' budgets differ (the sink layer is sparser at the same knobs): equal-per-layer would be the wrong comparison
    s0, s1 = (data.sparsity(g.topk, g.topp, data.indices_for_layer(i)) for i in (0, 1))
    assert abs(s0 - s1) > 0.01
    assert abs(pl.sparsity - 0.9) <= 0.005 and abs(pl.global_sparsity - 0.9) <= 0.005
    mean_err = sum(data.error(c.topk, c.topp, data.indices_for_layer(layer)) for layer, c in pl.levels.items()) / 2
    assert pl.error == pytest.approx(mean_err) and pl.error <= pl.global_error
    assert pl.global_error == pytest.approx(glob.chosen.error)
    assert pl.lowers_error == (pl.error < 0.99 * pl.global_error)
    assert pl.to_dict()["levels"].keys() == {"0", "1"}


def test_store_spills_to_safetensors_within_the_bound(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [tuple(torch.randn(1, 2, 100, 16, generator=g) for _ in range(3)) for _ in range(3)]
    one = 3 * 2 * 100 * 16 * 4
    store = CaptureStore(max_bytes=one + 10, spill_dir=tmp_path / "spill")
    for i, (q, k, v) in enumerate(tensors):
        store.add(layer=i, step=0, prompt=0, heads=[0, 1], q=q, k=k, v=v)
    assert store.bytes_in_memory == one and store.bytes_spilled == 2 * one
    files = sorted((tmp_path / "spill").glob("*.safetensors"))
    assert len(files) == 2
    for i, (q, k, v) in enumerate(tensors):
        t = store.load(i)
        assert torch.equal(t["q"], q) and torch.equal(t["k"], k) and torch.equal(t["v"], v)
    # adding the dense output pushes the in-memory entry over the bound: it moves to disk
    store.update(0, o=torch.zeros(1, 2, 100, 16))
    assert store.bytes_in_memory == 0 and store.bytes_spilled == 2 * one + one + one // 3
    assert torch.equal(store.load(0)["o"], torch.zeros(1, 2, 100, 16))
    store.close()
    assert not list((tmp_path / "spill").glob("*.safetensors"))


def test_resident_samples_give_the_same_numbers_as_spilled_ones(tmp_path) -> None:
    q, k, v = sink_and_windows(length=256)
    samples = [(0, 0, q, k, v), (1, 0, k, q, v)]
    spilled = CalibrationData(CaptureStore.from_tensors(samples, max_bytes=0, spill_dir=tmp_path), block_q=BQ, block_k=BK, backend="torch")
    resident = CalibrationData(CaptureStore.from_tensors(samples, max_bytes=0), block_q=BQ, block_k=BK, backend="torch",
                               device_cache_bytes=1 << 30)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and len(resident._resident) == 2 and not spilled._resident
    for kp in ((0.1, 0.0), (0.05, 0.3)):
        assert resident.error(*kp) == spilled.error(*kp) > 0
        assert resident.sparsity(*kp) == spilled.sparsity(*kp)


def test_temporary_spill_dir_is_removed() -> None:
    store = CaptureStore(max_bytes=0)
    x = torch.randn(1, 1, 32, 16)
    store.add(layer=0, step=0, prompt=0, heads=[0], q=x, k=x, v=x)
    d = store.spill_dir
    assert d is not None and d.exists()
    store.close()
    assert not d.exists()


def test_relative_l2_and_spread() -> None:
    a = torch.tensor([3.0, 4.0])
    assert relative_l2(a, a) == 0.0
    assert relative_l2(torch.zeros(2), a) == pytest.approx(1.0)
    assert spread(3, 10) == [0, 4, 9] or spread(3, 10) == [0, 5, 9]
    assert spread(5, 3) == [0, 1, 2] and spread(1, 9) == [4]
    with pytest.raises(ValueError):
        spread(0, 4)


# -- real capture from a tiny Wan pipeline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir):
    from sparge.integrations.diffusers import load_wan_pipeline

    return load_wan_pipeline(str(tiny_pipeline_dir), dtype=torch.float32, device="cpu")


def _latents(pipe, steps: int, **kw):
    from sparge.testbed.tiny import tiny_generation_kwargs

    g = tiny_generation_kwargs()
    return pipe(prompt="a red cat runs on the beach", height=g["height"], width=g["width"], num_frames=g["num_frames"],
                num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).frames


def test_capture_from_tiny_pipeline_keeps_outputs_and_bounds(tiny_pipe) -> None:
    from sparge.testbed.tiny import tiny_generation_kwargs

    g = tiny_generation_kwargs()
    with torch.no_grad():
        plain = _latents(tiny_pipe, 3)
    # capture on layer 1 only, 1 of 2 heads, steps 0 and 2; 1 sample in RAM, the rest spilled
    store = CaptureStore(max_bytes=3 * 240 * 16 * 4)
    capture_attention(
        tiny_pipe, ["a red cat runs on the beach", "a boat on the sea at night"], store=store, height=g["height"],
        width=g["width"], num_frames=g["num_frames"], num_inference_steps=3, capture_steps=[0, 2], layers=[1], heads=1,
    )
    assert [(e.prompt, e.layer, e.step) for e in store.entries] == [(0, 1, 0), (0, 1, 2), (1, 1, 0), (1, 1, 2)]
    assert store.bytes_spilled > 0 and store.bytes_in_memory <= store.max_bytes
    t = store.load(0)
    assert t["q"].shape == (1, 1, 240, 16) and t["k"].shape == t["v"].shape == t["q"].shape
    assert not torch.equal(store.load(0)["q"], store.load(1)["q"])  # different steps, different activations
    # the observer changed nothing: the processors are restored and the model output is the same
    with torch.no_grad():
        again = _latents(tiny_pipe, 3)
    assert torch.equal(plain, again)
    assert all(type(b.attn1.processor).__name__ != "SpargeWanAttnProcessor" for b in tiny_pipe.transformer.blocks)

    data = CalibrationData(store, block_q=32, block_k=16, backend="torch")
    res = search_target(data, 0.6)
    c = res.chosen
    assert abs(c.sparsity - 0.6) <= 0.005 and c.error is not None and c.error > 0
    # the default backend (the Triton kernel; interpreted on a CPU) measures the same error as the exact torch path
    kernel = CalibrationData(store, block_q=32, block_k=16)
    assert kernel.error(c.topk, c.topp, [1, 2]) == pytest.approx(data.error(c.topk, c.topp, [1, 2]), rel=1e-3)
    store.close()


def test_capture_sees_q_k_after_norm_and_rope(tiny_pipe) -> None:
    """The captured q/k are the tensors dense attention runs on: SDPA of them reproduces the block's attention."""
    from sparge.testbed.tiny import tiny_generation_kwargs

    g = tiny_generation_kwargs()
    attn = tiny_pipe.transformer.blocks[0].attn1
    seen = {}
    orig = attn.processor

    def spy(mod, args, kwargs, output):  # the attention output after to_out, for the first call only
        seen.setdefault("out", output)

    hook = attn.register_forward_hook(spy, with_kwargs=True)
    try:
        store = CaptureStore()
        capture_attention(tiny_pipe, ["a dog"], store=store, height=g["height"], width=g["width"],
                          num_frames=g["num_frames"], num_inference_steps=1, capture_steps=[0], layers=[0])
    finally:
        hook.remove()
    assert attn.processor is orig
    t = store.load(0)
    with torch.no_grad():
        o = torch.nn.functional.scaled_dot_product_attention(t["q"], t["k"], t["v"])
        out = attn.to_out[0](o.transpose(1, 2).flatten(2, 3))
    torch.testing.assert_close(out, seen["out"], rtol=1e-4, atol=1e-5)
    warnings.simplefilter("default")


def test_per_layer_levels_are_stored_and_reach_the_config(tmp_path) -> None:
    """Two layers that want different (k, p): the per-layer table lowers the error, is written, and `to_config` honours it."""
    from sparge.presets import load_preset, write_level
    from sparge_cli.calibrate import level_entry

    q, k, v = sink_and_windows(length=1024)
    samples = [(0, 0, q[:, :1], k[:, :1], v[:, :1]), (1, 0, q[:, 1:], k[:, 1:], v[:, 1:])]
    data = CalibrationData(CaptureStore.from_tensors(samples), block_q=BQ, block_k=BK, backend="torch")
    glob = search_target(data, 0.9)
    pl = search_per_layer(data, glob)
    assert pl.lowers_error, pl.to_dict()  # the sink layer and the wide layer are best served by different knobs
    lv = level_entry(glob, pl, {"model": "synthetic"})
    assert lv["calibrated_on"]["per_layer_stored"] is True
    preset = tmp_path / "p.yaml"
    preset.write_text("model: synthetic\nheight: 64\nwidth: 64\nframes: 1\nblock_q: 64\nblock_k: 16\nlevels: {}\n")
    write_level(preset, 0.9, lv)
    cfg = load_preset(preset).to_config(0.9)
    for layer, c in pl.levels.items():
        assert cfg.knobs_for(layer) == (c.topk, c.topp)
        # the stored knobs reproduce the per-layer sparsity the search measured
        assert data.sparsity(*cfg.knobs_for(layer), data.indices_for_layer(layer)) == pytest.approx(c.sparsity)
    assert cfg.knobs_for(7) == (glob.chosen.topk, glob.chosen.topp)  # layers without an entry use the level
    # without a gain the table is not stored
    lv_no = level_entry(glob, dataclasses.replace(pl, error=pl.global_error), {})
    assert "per_layer" not in lv_no and lv_no["calibrated_on"]["per_layer_stored"] is False
