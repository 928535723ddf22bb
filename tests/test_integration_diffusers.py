"""sparge.integrations.diffusers and sparge.checkpoint on a tiny Wan2.1 model loaded with from_pretrained."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sparge import SpargeConfig, hybrid_block_mask, mask_sparsity, reference
from sparge.checkpoint import load_transformer_weights, read_checkpoint_metadata, save_transformer_weights
from sparge.integrations.diffusers import (
    SpargeWanAttnProcessor,
    WanModelError,
    apply,
    load_wan_pipeline,
    time_transformer_step,
)
from sparge.testbed.tiny import tiny_generation_kwargs, tiny_transformer_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("plain_torch_on_cpu"),  # see conftest; tests marked `interpreted` run the Triton kernels
]

TORCH = dict(backend="torch")  # exact PyTorch attention path


interpreted = pytest.mark.interpreted


@pytest.fixture(scope="module")
def transformer(tiny_pipeline_dir):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_wan_pipeline(str(tiny_pipeline_dir), dtype=torch.float32, device="cpu")


def _inputs(model, batch=2, dtype=torch.float32, seed=0):
    """Latents of the tiny video (3 x 16 x 20 -> 240 tokens), text embeddings, one timestep per sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 3, 16, 20, generator=g).to(dtype)
    e = torch.randn(batch, 24, model.config.text_dim, generator=g).to(dtype)
    return dict(hidden_states=x, timestep=torch.full((batch,), 700.0), encoder_hidden_states=e, return_dict=False)


def _run(model, **kw):
    return model(**kw)[0]


def _frames(pipe, seed=0, **extra):
    """Denoised latents of the tiny pipeline (the VAE decode is skipped: it is not what these tests check)."""
    kw = tiny_generation_kwargs()
    return pipe(prompt="a red cat runs on the beach", negative_prompt="dark", generator=torch.Generator().manual_seed(seed),
                output_type="latent", **kw, **extra).frames


def test_installs_on_self_attention_only_and_remove_restores_the_same_objects(transformer):
    orig1 = [b.attn1.processor for b in transformer.blocks]
    orig2 = [b.attn2.processor for b in transformer.blocks]
    inp = _inputs(transformer)
    with torch.no_grad():
        dense = _run(transformer, **inp)
        handle = apply(transformer, SpargeConfig(topk=0.3, topp=0.3, **TORCH))
        assert all(isinstance(b.attn1.processor, SpargeWanAttnProcessor) for b in transformer.blocks)
        assert [b.attn2.processor for b in transformer.blocks] == orig2
        sparse = _run(transformer, **inp)
        handle.remove()
        handle.remove()  # idempotent
        after = _run(transformer, **inp)
    assert all(b.attn1.processor is o for b, o in zip(transformer.blocks, orig1))
    assert not torch.allclose(sparse, dense, atol=1e-4), "a 50%-sparse mask should change the output"
    assert torch.equal(after, dense)


@pytest.mark.parametrize("backend", [pytest.param("auto", marks=interpreted), "torch"])
def test_dense_level_matches_dense_model(transformer, backend):
    """k = 1 keeps every block: the output is diffusers' dense output (``auto``: Triton kernels, interpreted on a CPU)."""
    inp = _inputs(transformer)
    with torch.no_grad():
        dense = _run(transformer, **inp)
        with apply(transformer, SpargeConfig(topk=1.0, topp=0.0, backend=backend)):
            out = _run(transformer, **inp)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


def test_dense_steps_path_is_bit_identical_and_observer_sees_bhld(transformer):
    inp = _inputs(transformer)
    seen = []
    with torch.no_grad():
        dense = _run(transformer, **inp)
        with apply(transformer, SpargeConfig(topk=0.03, topp=0.1, dense_steps=3, **TORCH),
                   observer=lambda layer, step, q, k, v: seen.append((layer, step, q.shape, k.shape, v.shape))):
            out = _run(transformer, **inp)
    assert torch.equal(out, dense)  # the Q/K/V path of the processor reproduces diffusers' exactly
    heads, d = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    assert [(s[0], s[1]) for s in seen] == [(0, 0), (1, 0)]
    assert all(s[2] == s[3] == s[4] == torch.Size([2, heads, 240, d]) for s in seen)


@interpreted
def test_sparse_output_equals_reference_block_sparse_attention(transformer):
    """The processor's attention equals reference.block_sparse_attention on the hybrid mask of its own Q/K
    (``auto``: the Triton kernels under the interpreter on a CPU, the compiled ones on a GPU)."""
    inp = _inputs(transformer)
    layer0 = transformer.blocks[0].attn1
    captured = {}

    def observer(layer, step, q, k, v):
        if layer == 0:
            captured.update(q=q.clone(), k=k.clone(), v=v.clone())

    hook = layer0.register_forward_hook(lambda mod, args, out: captured.setdefault("out", out.clone()))
    try:
        with torch.no_grad(), apply(transformer, SpargeConfig(topk=0.25, topp=0.4), observer=observer):
            _run(transformer, **inp)
    finally:
        hook.remove()
    q, k, v = captured["q"], captured["k"], captured["v"]
    mask = hybrid_block_mask(q, k, topk=0.25, topp=0.4)
    assert 0 < mask_sparsity(mask, 240, 240) < 1
    with torch.no_grad():
        att = reference.block_sparse_attention(q, k, v, mask).transpose(1, 2).flatten(2, 3)
        expected = layer0.to_out[1](layer0.to_out[0](att))
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=1e-5)


def test_stats_per_layer_and_step_over_a_cfg_pipeline_run(pipe):
    calls = []
    with apply(pipe, SpargeConfig(topk=0.25, topp=0.3, dense_steps=1, **TORCH), collect_stats=True,
               observer=lambda layer, step, q, k, v: calls.append((layer, step, float(mask_sparsity(hybrid_block_mask(q, k, topk=0.25, topp=0.3), q.shape[2], k.shape[2]))))) as sa:
        _frames(pipe)
        stats = sa.stats()
    steps = tiny_generation_kwargs()["num_inference_steps"]
    assert sorted(stats) == [(layer, s) for layer in range(2) for s in range(steps)]
    # CFG: the transformer runs twice per step (cond, uncond), so every (layer, step) sees two calls
    assert len(calls) == 2 * 2 * steps
    for (layer, s), value in stats.items():
        if s == 0:
            assert value == 0.0  # dense warm-up step skips nothing
        else:
            expected = [c[2] for c in calls if c[0] == layer and c[1] == s]
            assert value == pytest.approx(sum(expected) / len(expected), abs=1e-9)
            assert 0.0 < value < 1.0
    assert sa.mean_sparsity() == pytest.approx(sum(stats.values()) / len(stats))
    sa.reset()
    assert sa.stats() == {} and sa.step == 0


def test_manual_step_tracking_through_pipeline_callback(pipe):
    with apply(pipe, SpargeConfig(topk=0.25, topp=0.3, **TORCH), collect_stats=True, step_tracking="manual") as sa:
        _frames(pipe, callback_on_step_end=sa.step_callback)
        assert sa._hooks == []
        assert sorted({s for (_l, s) in sa.stats()}) == [0, 1, 2]


def test_pipeline_dense_level_equals_dense_and_remove_is_exact(pipe):
    dense = _frames(pipe)
    with apply(pipe, SpargeConfig(topk=1.0, topp=0.0, **TORCH)):
        same = _frames(pipe)
    torch.testing.assert_close(same, dense, atol=1e-4, rtol=0)
    with apply(pipe, SpargeConfig(topk=0.03, topp=0.1, **TORCH)):
        sparse = _frames(pipe)
    assert (sparse - dense).abs().max() > 1e-4
    assert torch.equal(_frames(pipe), dense)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dense_level(tiny_pipeline_dir, dtype):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer", torch_dtype=dtype).eval()
    inp = _inputs(model, dtype=dtype)
    with torch.no_grad():
        dense = _run(model, **inp).float()
        with apply(model, SpargeConfig(topk=1.0, topp=0.0, **TORCH)):
            out = _run(model, **inp)
    assert out.dtype == dtype
    tol = 4e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), dense, atol=tol, rtol=tol)


def test_gradients_flow_and_match_dense_at_k1(tiny_pipeline_dir):
    from diffusers import WanTransformer3DModel

    grads = []
    for sparse in (False, True):
        model = WanTransformer3DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer").train()
        inp = _inputs(model, batch=1)
        ctx = apply(model, SpargeConfig(topk=1.0, topp=0.0, **TORCH)) if sparse else None
        _run(model, **inp).square().mean().backward()
        if ctx is not None:
            ctx.remove()
        grads.append(model.blocks[0].attn1.to_q.weight.grad.clone())
    assert torch.isfinite(grads[1]).all() and grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-3)


def test_i2v_variant_self_attention(tmp_path):
    """Wan I2V blocks have an image branch in attn2; only attn1 is swapped and k=1 stays dense."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = tiny_transformer_config()
    model = WanTransformer3DModel(**cfg, image_dim=24, added_kv_proj_dim=32).eval()
    model.save_pretrained(tmp_path / "i2v")
    model = WanTransformer3DModel.from_pretrained(tmp_path / "i2v").eval()
    inp = _inputs(model, batch=1)
    inp["encoder_hidden_states"] = torch.randn(1, 512, 32)
    inp["encoder_hidden_states_image"] = torch.randn(1, 4, 24)
    with torch.no_grad():
        dense = _run(model, **inp)
        with apply(model, SpargeConfig(topk=1.0, topp=0.0, **TORCH)):
            assert model.blocks[0].attn2.add_k_proj is not None
            assert not isinstance(model.blocks[0].attn2.processor, SpargeWanAttnProcessor)
            out = _run(model, **inp)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


def test_apply_errors(transformer):
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        apply(torch.nn.Linear(2, 2), SpargeConfig())
    with pytest.raises(ValueError, match="out of range"):
        apply(transformer, SpargeConfig(), layers=[0, 7])
    with apply(transformer, SpargeConfig(), layers=[1]) as h:
        assert not isinstance(transformer.blocks[0].attn1.processor, SpargeWanAttnProcessor)
        assert isinstance(transformer.blocks[1].attn1.processor, SpargeWanAttnProcessor)
        with pytest.raises(ValueError, match="already has a sparge processor"):
            apply(transformer, SpargeConfig())
        assert "layers=1" in repr(h)
    assert not any(isinstance(b.attn1.processor, SpargeWanAttnProcessor) for b in transformer.blocks)


@pytest.mark.filterwarnings("ignore:.*local_dir_use_symlinks.*:UserWarning")  # raised inside diffusers' hub download
def test_load_wan_pipeline_errors(tmp_path, monkeypatch):
    with pytest.raises(WanModelError, match="does not exist.*huggingface-cli download"):
        load_wan_pipeline(str(tmp_path / "nope"), dtype=torch.float32)
    with pytest.raises(WanModelError, match="no model_index.json"):
        load_wan_pipeline(str(tmp_path), dtype=torch.float32)
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(WanModelError, match="StableDiffusionPipeline.*not a Wan"):
        load_wan_pipeline(str(other), dtype=torch.float32)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    with pytest.raises(WanModelError, match="could not load 'sparge-test/no-such-wan' from the Hugging Face hub") as e:
        load_wan_pipeline("sparge-test/no-such-wan", dtype=torch.float32)
    assert "\n" not in str(e.value)


def test_time_transformer_step_tiny(transformer):
    common = dict(batch=2, frames=9, height=128, width=160, dtype=torch.float32, device="cpu", warmup=0, iters=1, text_len=16)
    dense = time_transformer_step(transformer, None, attention_share=True, **common)
    sparse = time_transformer_step(transformer, SpargeConfig(topk=0.25, topp=0.3, **TORCH), **common)
    assert dense["tokens"] == sparse["tokens"] == 240
    assert dense["measured_sparsity"] is None and 0 < sparse["measured_sparsity"] < 1
    assert dense["ms_per_step"] > 0 and sparse["ms_per_step"] > 0
    assert 0.0 <= dense["self_attention_share"] < 1.0
    assert not any(isinstance(b.attn1.processor, SpargeWanAttnProcessor) for b in transformer.blocks)
    with pytest.raises(ValueError, match="4n\\+1"):
        time_transformer_step(transformer, None, frames=8, height=128, width=160, device="cpu")


# -- checkpoints ----------------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_strictness(tiny_pipeline_dir, tmp_path):
    from diffusers import WanTransformer3DModel

    src = WanTransformer3DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    path = save_transformer_weights(tmp_path / "student.safetensors", src,
                                    metadata={"base_model": str(tiny_pipeline_dir), "topk": 0.03, "topp": 0.2, "steps": 7})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp file may be left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual file mode, not mkstemp's 0600
    dst = WanTransformer3DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
    meta = load_transformer_weights(path, dst)
    assert meta["format"] == "sparge-student" and meta["version"] == "1"
    assert meta["topk"] == 0.03 and meta["steps"] == 7 and meta["base_model"] == str(tiny_pipeline_dir)
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n
    assert read_checkpoint_metadata(path)["topp"] == 0.2

    bigger = WanTransformer3DModel(**tiny_transformer_config(num_layers=3))
    with pytest.raises(ValueError, match=r"missing keys \(blocks\.2\."):
        load_transformer_weights(path, bigger)
    wider = WanTransformer3DModel(**{**tiny_transformer_config(), "ffn_dim": 128})
    with pytest.raises(ValueError, match="shape mismatches"):
        load_transformer_weights(path, wider)

    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a sparge checkpoint"):
        load_transformer_weights(tmp_path / "plain.safetensors", dst)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_transformer_weights(tmp_path / "junk.safetensors", dst)
    with pytest.raises(ValueError, match="reserved"):
        save_transformer_weights(tmp_path / "x.safetensors", dst, metadata={"format": "mine"})



@pytest.mark.parametrize("name", ["WAN_2_1_T2V_1_3B_CONFIG", "WAN_2_1_T2V_14B_CONFIG"])
def test_full_size_architectures_get_a_processor_per_block(name):
    from diffusers import WanTransformer3DModel

    import sparge.integrations.diffusers as integ

    cfg = getattr(integ, name)
    with torch.device("meta"):
        model = WanTransformer3DModel(**cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == pytest.approx(1.42e9 if "1_3B" in name else 14.29e9, rel=0.01)
    with apply(model, SpargeConfig()) as sa:
        assert sa.layers == list(range(cfg["num_layers"]))
        assert sum(isinstance(b.attn1.processor, SpargeWanAttnProcessor) for b in model.blocks) == cfg["num_layers"]
    assert not any(isinstance(b.attn1.processor, SpargeWanAttnProcessor) for b in model.blocks)


def test_e2e_benchmark_script_runs_tiny(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "e2e_step.py"
    spec = importlib.util.spec_from_file_location("e2e_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "e2e.json"
    assert mod.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--backend", "torch", "--warmup", "0", "--iters", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["architecture"] == "tiny" and res["dense"]["tokens"] == 240
    assert res["speedup_per_step"] == pytest.approx(res["dense"]["ms_per_step"] / res["sparse"]["ms_per_step"])
    assert 0 < res["sparse"]["measured_sparsity"] < 1 and 0 <= res["self_attention_share_dense"] < 1
    # Top-k only at 0.95 on key blocks of 64, 64, 64, 48 tokens keeps max(1, ceil(0.05 * 4)) = 1 per query
    # block: every query row keeps 64 or 48 of its 240 keys, so the skipped fraction is in [1 - 64/240, 1 - 48/240]
    assert res["sparse_at_target"]["target"] == 0.95 and res["sparse_at_target"]["topp"] == 0.0
    assert 1 - 64 / 240 - 1e-9 <= res["sparse_at_target"]["measured_sparsity"] <= 1 - 48 / 240 + 1e-9
    assert res["complete"] is True and res["dense"]["batch"] == 2
    with pytest.raises(SystemExit):
        mod.main(["--tiny", "--device", "cpu", "--out", str(out)])  # exists, no --overwrite
