"""The quality test bed: procedural data, training, saving/loading, and the evaluation sections (CPU, micro size)."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
import torch

from sparge.testbed.data import (
    MICRO_GEOMETRY,
    Geometry,
    ObjectSpec,
    Scene,
    caption_words,
    is_held_out,
    latents_to_rgb,
    parse_caption,
    read_back,
    render_latents,
    sample_scenes,
)
from sparge.testbed.train import TestbedConfig as _Config
from sparge.testbed.train import (
    build_pipeline,
    caption_tokens,
    encode_captions,
    encode_captions_short,
    flow_matching_loss,
    save_pipeline,
    train,
)

# the evaluation tests use an even smaller clip than training: 3 x 16 x 16 latents = 192 tokens
EVAL_GEOMETRY = Geometry(frames=3, height=16, width=16)


# -- data -----------------------------------------------------------------------------------------------


def test_scenes_are_deterministic_and_splits_disjoint():
    a = sample_scenes(20, seed=3)
    assert a == sample_scenes(20, seed=3)
    assert a != sample_scenes(20, seed=4)
    assert torch.equal(render_latents(a, MICRO_GEOMETRY), render_latents(sample_scenes(20, seed=3), MICRO_GEOMETRY))
    assert not any(is_held_out(s.caption) for s in a)
    held = sample_scenes(20, seed=3, split="heldout")
    assert all(is_held_out(s.caption) for s in held)
    assert not {s.caption for s in held} & {s.caption for s in sample_scenes(200, seed=5)}
    for s in a + held:
        assert 1 <= len(s.objects) <= 3
        assert len({o.colour for o in s.objects}) == len(s.objects)  # distinct colours: read-back is unambiguous
        assert parse_caption(s.caption).objects == s.objects
        assert set(s.caption.split()) <= set(caption_words())


def test_parse_caption_rejects_other_text():
    with pytest.raises(ValueError, match="does not follow the test-bed grammar"):
        parse_caption("a cat on a mat")
    with pytest.raises(ValueError, match="split="):
        sample_scenes(1, seed=0, split="test")  # type: ignore[arg-type]


def test_geometry_gives_enough_tokens_for_95_percent_sparsity():
    g = Geometry()
    assert g.tokens == 16 * 20 * 20 >= 2000
    assert g.pipeline_kwargs() == {"num_frames": 61, "height": 320, "width": 320}
    tk = math.ceil(g.tokens / 64)
    assert round(0.05 * tk) > 1 and round(0.03 * tk) > 1  # 95% and 97% keep more than one key block
    with pytest.raises(ValueError, match="height=7"):
        Geometry(4, 7, 16)


def test_clip_follows_its_caption():
    g = Geometry(frames=9, height=32, width=32)
    scene = Scene((ObjectSpec("red", "square", "large", "top left", "right", "quickly"),), ((0.0, 0.0),))
    x = render_latents([scene], g)
    assert x.shape == (1, 16, 9, 32, 32)
    rgb = latents_to_rgb(x, g)  # [1, T, 3, H, W]
    red = (rgb[0, :, 0] > 0.6) & (rgb[0, :, 1] < 0.4)  # red pixels per frame
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cx = [(xs * red[t]).sum() / red[t].sum() for t in range(9)]
    cy = [(ys * red[t]).sum() / red[t].sum() for t in range(9)]
    assert abs(cy[0] - 0.25 * 31) < 1.0 and abs(cx[0] - 0.25 * 31) < 1.0  # starts in the top-left cell
    assert all(b > a for a, b in itertools.pairwise(cx[:5]))  # moves right (no bounce yet)
    assert max(abs(c - cy[0]) for c in cy) < 0.5  # and not up or down
    # the other colours are absent
    assert read_back(x, [scene], g)["colour_false_positive"] == 0.0


def test_read_back_separates_matching_from_mismatched_captions():
    scenes = sample_scenes(24, seed=11, split="any")
    x = render_latents(scenes, MICRO_GEOMETRY)
    good = read_back(x, scenes, MICRO_GEOMETRY)
    bad = read_back(x, scenes[1:] + scenes[:1], MICRO_GEOMETRY)
    noise = read_back(torch.randn_like(x), scenes, MICRO_GEOMETRY)
    assert good["colour_recall"] == 1.0 and good["colour_false_positive"] == 0.0
    assert good["position_accuracy"] > 0.9 and good["direction_accuracy"] > 0.9
    assert bad["position_accuracy"] < 0.3 and noise["position_accuracy"] < 0.3
    assert noise["colour_false_positive"] > 0.5


# -- training, saving, loading --------------------------------------------------------------------------


def _fixed_batch(cfg: _Config, pipe):
    scenes = sample_scenes(4, seed=99, split="train")
    x0 = render_latents(scenes, cfg.geometry)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])
    return x0, noise, sigmas, [s.caption for s in scenes]


def _loss(pipe, batch) -> float:
    x0, noise, sigmas, captions = batch
    with torch.no_grad():
        return float(flow_matching_loss(pipe.transformer, x0, encode_captions(pipe, captions, torch.device("cpu")), sigmas, noise).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro test-bed model after 30 steps, and its saved directory."""
    torch.manual_seed(0)
    cfg = _Config.micro(max_steps=30, minutes=10.0, log_every=10)
    pipe = build_pipeline(cfg)
    batch = _fixed_batch(cfg, pipe)
    before = _loss(pipe, batch)
    result = train(cfg, device="cpu", log=None, pipe=pipe)
    after = _loss(result.pipe, batch)
    path = save_pipeline(result.pipe, tmp_path_factory.mktemp("tb") / "model", cfg, extra={"training": result.summary()})
    return {"cfg": cfg, "result": result, "before": before, "after": after, "path": path, "batch": batch}


def test_training_reduces_the_flow_matching_loss(trained):
    res = trained["result"]
    assert res.steps == 30
    assert [h["step"] for h in res.history] == [10, 20, 30]
    assert trained["after"] < 0.75 * trained["before"], (trained["before"], trained["after"])


def test_short_text_encoding_matches_the_pipeline():
    """Training runs the text encoder on a few tokens; the transformer must see what sampling gives it."""
    pipe = build_pipeline(_Config.micro())
    captions = [s.caption for s in sample_scenes(5, seed=3, max_objects=3)] + [""]
    with torch.no_grad():
        full = encode_captions(pipe, captions, torch.device("cpu"))
        short = encode_captions_short(pipe.text_encoder, pipe.tokenizer, captions, torch.device("cpu"), caption_tokens(3))
    assert short.shape == full.shape == (6, 512, 32)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
    assert full[:, 40:].abs().max() == 0 and full[0, :10].abs().min() > 0  # zero past each caption, not before
    longest = max((s.caption for s in sample_scenes(200, seed=1, max_objects=6)), key=lambda c: len(c.split()))
    assert len(pipe.tokenizer(longest).input_ids) <= caption_tokens(6)
    with pytest.raises(ValueError, match="does not fit in 8 text tokens"):
        encode_captions_short(pipe.text_encoder, pipe.tokenizer, captions, torch.device("cpu"), 8)


def test_training_falls_back_to_eager_when_compile_fails(monkeypatch):
    import sparge.testbed.train as train_mod

    class Broken(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.inner = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("simulated compiler failure\nsecond line")

    monkeypatch.setattr(train_mod, "_COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken(module))
    lines: list[str] = []
    cfg = _Config.micro(max_steps=3, log_every=1)
    pipe = build_pipeline(cfg)
    blocks = list(pipe.transformer.blocks)
    result = train(cfg, device="cpu", log=lines.append, pipe=pipe)
    assert result.steps == 3 and all(math.isfinite(h["loss"]) for h in result.history)
    assert any("torch.compile failed (RuntimeError: simulated compiler failure); training eagerly" in x for x in lines)
    assert list(result.pipe.transformer.blocks) == blocks  # the pipeline keeps its own modules
    # the same 3 steps without compiling give the same losses: the failed first try left no trace
    plain = train(_Config.micro(max_steps=3, log_every=1, compile=False), device="cpu", log=None)
    assert [h["loss"] for h in plain.history] == pytest.approx([h["loss"] for h in result.history], rel=1e-5)


def test_build_pipeline_is_seeded():
    cfg = _Config.micro()
    a, b = build_pipeline(cfg), build_pipeline(cfg)
    c = build_pipeline(_Config.micro(seed=1))
    wa, wb, wc = (p.transformer.proj_out.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_saved_model_loads_with_from_pretrained_and_generates(trained):
    from diffusers import WanPipeline

    from sparge.integrations.diffusers import load_wan_pipeline

    path = trained["path"]
    info = json.loads((path / "testbed.json").read_text())
    assert info["config"] == trained["cfg"].to_dict() and info["training"]["steps"] == 30
    pipe = WanPipeline.from_pretrained(path)
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert pipe.transformer.config.attention_head_dim == 64
    # the saved weights are the trained ones: same loss on the fixed batch
    assert _loss(pipe, trained["batch"]) == pytest.approx(trained["after"], rel=1e-5)
    pipe = load_wan_pipeline(str(path), dtype=torch.float32, device="cpu")
    out = pipe("a small red circle at the center moving up slowly", num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0), **EVAL_GEOMETRY.pipeline_kwargs()).frames
    assert out.shape == (1, 16, 3, 16, 16) and torch.isfinite(out).all()


def test_save_refuses_to_overwrite(trained, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("keep")
    with pytest.raises(ValueError, match="already exists"):
        save_pipeline(trained["result"].pipe, tmp_path / "m", trained["cfg"])
    assert (tmp_path / "m" / "x").read_text() == "keep"
    save_pipeline(trained["result"].pipe, tmp_path / "m", trained["cfg"], overwrite=True)
    assert (tmp_path / "m" / "model_index.json").is_file() and not (tmp_path / "m" / "x").exists()


def test_train_entry_point_usage_errors(tmp_path, capsys):
    from sparge.testbed.train import main

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert main(["--out", str(tmp_path / "busy"), "--device", "cpu", "--tiny"]) == 2
    assert main(["--out", str(tmp_path / "new"), "--device", "tpu9", "--tiny"]) == 2
    assert main(["--out", str(tmp_path / "new"), "--device", "cpu", "--tiny", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "--overwrite" in err[0] and "tpu9" in err[1] and "batch_size=0" in err[2]
    assert not (tmp_path / "new").exists()


# -- evaluation -----------------------------------------------------------------------------------------


def test_psnr_and_preview():
    from sparge.testbed.evaluate import preview_image, psnr

    ref = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    assert psnr(ref, ref, peak=255.0) == 100.0
    assert psnr(ref + 1, ref, peak=255.0) == pytest.approx(20 * math.log10(255.0))
    x = render_latents(sample_scenes(2, seed=0), MICRO_GEOMETRY)
    img = preview_image([x[0], x[1]], MICRO_GEOMETRY, frames=4, scale=2)
    assert img.dtype == torch.uint8 and img.shape == (2 * (32 + 2), 4 * (32 + 2), 3)


def test_attention_report_tells_flat_from_peaked_layers():
    from sparge.calibrate import CaptureStore
    from sparge.testbed.evaluate import attention_report

    q = torch.zeros(1, 2, 512, 64)
    peaked_k = torch.zeros(1, 2, 512, 64)
    for i in range(4):  # query block i (128 tokens) matches key blocks 2i and 2i+1 (64 tokens each) only
        q[:, :, 128 * i:128 * (i + 1), i] = 10.0
        peaked_k[:, :, 128 * i:128 * (i + 1), i] = 10.0
    flat_k = torch.zeros(1, 2, 512, 64)  # every key block scores the same: uniform pooled scores
    with CaptureStore.from_tensors([(0, 0, q, flat_k, flat_k), (1, 0, q, peaked_k, peaked_k)]) as store:
        rep = attention_report(store, block_q=128, block_k=64, device="cpu",
                               knobs={0.75: {"topk": (0.25, 0.0), "topp": (0.0, 0.4)}})
    assert rep["tq"] == 4 and rep["tk"] == 8
    flat, peaked = rep["layers"]["0"], rep["layers"]["1"]
    assert flat["entropy_norm_mean"] == pytest.approx(1.0, abs=1e-5)
    assert peaked["entropy_norm_mean"] == pytest.approx(math.log(2) / math.log(8), abs=1e-3)  # two equal blocks
    # Top-k at 25% of the blocks holds 25% of a uniform row's mass; Top-p 0.4 needs 4 of its 8 blocks
    assert flat["at_0.75"]["topk_mass_mean"] == pytest.approx(0.25, abs=1e-5)
    assert flat["at_0.75"]["topp_blocks_mean"] == 4.0 and flat["at_0.75"]["topp_single_block_rows"] == 0.0
    assert peaked["at_0.75"]["topk_mass_mean"] > 0.999  # Top-k's 2 blocks are the 2 that matter
    assert peaked["at_0.75"]["topp_single_block_rows"] == 1.0  # Top-p reaches 0.4 with one of them
    assert set(flat["entropy_norm_per_head"]) == {"0", "1"}


def test_evaluate_runs_every_section_at_micro_size(trained):
    from sparge.integrations.diffusers import load_wan_pipeline
    from sparge.testbed.evaluate import EvalSettings, evaluate

    # float64 takes the exact torch path for masks and attention (interpreted Triton is slow; the Triton
    # path is tested below), and checks that inputs follow the model's dtype, not the fp32-kept modules'
    pipe = load_wan_pipeline(str(trained["path"]), dtype=torch.float64, device="cpu")
    settings = EvalSettings.micro(n_captions=2, steps=2, guidance=1.0, batch_size=2, val_clips=4, targets=(0.5,),
                                  tolerance=0.2)
    tensors: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = evaluate(pipe, EVAL_GEOMETRY, settings, log=None, tensors=tensors)
    assert res["errors"] == [], {k: res[k] for k in res["errors"]}
    json.dumps(res)  # JSON-able
    assert res["validation"]["heldout"]["loss"] > 0 and res["validation"]["train"]["split"] == "train"
    assert len(res["captions"]) == 2 and all(is_held_out(c) for c in res["captions"])
    assert res["caption_following"]["ground_truth_render"]["position_accuracy"] > 0.9
    assert tensors["dense_latents"].shape == (2, 16, 3, 16, 16)
    rows = res["sparse"]
    assert [r["rule"] for r in rows] == ["hybrid", "topk", "topp"]
    for r in rows:
        assert r["topk"] > 0 if r["rule"] != "topp" else r["topk"] == 0.0
        assert r["topp"] > 0 if r["rule"] != "topk" else r["topp"] == 0.0
        assert 0.0 < r["measured_sparsity"] < 1.0
        assert abs(r["calibration_sparsity"] - 0.5) <= 0.2
        assert math.isfinite(r["latent_rel_l2"]) and r["latent_rel_l2"] > 0  # sparse attention changed the sample
        assert r["psnr_vae_frames_db"] > 0
    assert set(res["attention"]["layers"]) == {"0", "1"}
    for layer in res["attention"]["layers"].values():
        assert 0.0 <= layer["entropy_norm_mean"] <= 1.0 + 1e-6
        assert "at_0.5" in layer
    best = res["sparse_summary"]["most_robust"]["0.5"]
    errs = {r["rule"]: r["latent_rel_l2"] for r in rows}
    assert best and all(errs[b] == min(errs.values()) for b in best)


def test_sparse_sampling_with_the_default_backend_matches_the_torch_path(trained):
    """The sparse sampling path of the evaluation, through the default backend (the Triton kernels)."""
    from sparge import SpargeConfig
    from sparge.integrations.diffusers import apply, load_wan_pipeline
    from sparge.testbed.evaluate import sample_latents

    pipe = load_wan_pipeline(str(trained["path"]), dtype=torch.float32, device="cpu")
    captions = [s.caption for s in sample_scenes(1, seed=5, split="heldout")]
    kw = {"steps": 1, "guidance": 1.0, "seed": 3}
    dense = sample_latents(pipe, captions, EVAL_GEOMETRY, **kw)
    out = {}
    for backend in ("auto", "torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with apply(pipe, SpargeConfig(topk=0.3, topp=0.0, backend=backend), collect_stats=True) as sa:
                out[backend] = sample_latents(pipe, captions, EVAL_GEOMETRY, **kw)
                assert sa.mean_sparsity() == pytest.approx(2 / 3, abs=0.01)  # 1 of 3 key blocks kept
    torch.testing.assert_close(out["auto"], out["torch"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["torch"], dense, atol=1e-4)  # the sparse attention did change the sample


def test_validation_loss_in_bf16_matches_fp32(trained):
    from sparge.integrations.diffusers import load_wan_pipeline
    from sparge.testbed.evaluate import validation_loss

    losses = [validation_loss(load_wan_pipeline(str(trained["path"]), dtype=dt, device="cpu"), EVAL_GEOMETRY, n=4,
                              batch_size=4)["loss"] for dt in (torch.bfloat16, torch.float32)]
    assert losses[0] == pytest.approx(losses[1], rel=0.05)


def test_sparse_sweep_skips_runs_past_the_deadline():
    from sparge.calibrate import Candidate
    from sparge.testbed.evaluate import EvalSettings, sparse_sweep

    picks = {0.95: {"hybrid": Candidate("hybrid", 0.02, 0.3, 0.95, True, 0.1, True),
                    "topk": Candidate("topk", 0.05, 0.0, 0.95, True, 0.2, False),
                    "topp": Candidate("topp", 0.0, 0.5, 0.951, True, 0.3, False)}}
    seen: list[dict] = []
    # a deadline in the past: no sampling run starts (pipe is never touched), every row says why
    rows = sparse_sweep(None, picks, [], EVAL_GEOMETRY, {"seconds": 1.0}, EvalSettings(), deadline=0.0, on_row=seen.append)
    assert rows == seen and [r["rule"] for r in rows] == ["hybrid", "topk", "topp"]
    assert all("skipped" in r and "latent_rel_l2" not in r for r in rows)
    assert rows[2]["topp"] == 0.5 and rows[2]["calibration_sparsity"] == 0.951


def test_testbed_run_usage_errors(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("testbed_run", Path(__file__).parent.parent / "benchmarks" / "testbed_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path / "a"), "--device", "cpu", "--tiny", "--budget-minutes", "0"]) == 2
    assert mod.main(["--out", str(tmp_path / "b"), "--device", "cpu", "--tiny", "--backend", "cudnn"]) == 2
    assert mod.main(["--out", str(tmp_path / "c"), "--device", "cpu", "--skip-train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "--budget-minutes 0" in err[0] and "cudnn" in err[1] and "--skip-train" in err[2]


def test_sparge_generate_runs_on_the_trained_test_bed(trained, tmp_path, plain_torch_on_cpu):
    from typer.testing import CliRunner

    from sparge_cli.app import app

    out = tmp_path / "clip.mp4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(app, [
            "generate", "--prompt", "a small red circle at the center moving up slowly", "--model", str(trained["path"]),
            "--topk", "0.3", "--topp", "0.2", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["prompt"].startswith("a small red circle")
    # with no preset and no geometry options, the model's own training geometry (not Wan's 480 x 832 x 81)
    from sparge.testbed import pixel_geometry, read_info

    assert (side["height"], side["width"], side["frames"]) == pixel_geometry(read_info(trained["path"]))
    assert side["dtype"] == "float32"  # --dtype auto: fp32 on the CPU
