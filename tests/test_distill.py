"""sparge.data + sparge.distill on a tiny random-weight Wan2.1 pipeline (real diffusers classes, CPU).

The block-sparse attention runs through its exact torch path here (TRITON_INTERPRET off for these
tests: the Triton kernels have their own tests, and the interpreter would make training minutes long),
except in one test that runs a training step through the Triton kernels (interpreted) and compares.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

# Triton fixes a kernel's interpreter mode when its module is imported: import them now, while conftest's
# TRITON_INTERPRET=1 holds, so the one test below that runs them gets the interpreter.
import sparge.kernels.block_sparse_attn
import sparge.kernels.mask_lut
import sparge.kernels.pool  # noqa: F401
from sparge import SpargeConfig
from sparge.data import LatentCache, prepare_cache, sample_order, scan_dataset
from sparge.distill import (
    FinetuneConfig,
    Finetuner,
    add_lora,
    draw_noise,
    list_checkpoints,
    merged_state_dict,
    prepare_out_dir,
    scheduler_shift,
    shift_sigmas,
)

# 64 x 80 pixels, 9 frames -> latent 3 x 8 x 10 -> 60 tokens: 2 query blocks of 32, 4 key blocks of 16
H, W, F, SEQ = 64, 80, 9, 16
SPARSE = SpargeConfig(topk=0.25, topp=0.0, block_q=32, block_k=16)


@pytest.fixture(autouse=True)
def _torch_attention_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Triton block-sparse kernel unavailable.*")
        yield


def write_clips(folder: Path, n: int, *, seed: int = 0, frames: int = F, captions: bool = True) -> Path:
    """``n`` random mp4 clips (smooth moving noise, 48 x 96) with same-stem captions."""
    import imageio
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["red cat runs", "blue bird flies", "green tree sky", "white boat sea", "dark night city", "small dog jumps"]
    for i in range(n):
        base = rng.random((48, 96, 3))
        w = imageio.get_writer(folder / f"clip{i}.mp4", fps=8, codec="libx264", macro_block_size=1)
        for f in range(frames):
            w.append_data((np.roll(base, 3 * f, axis=1) * 255).astype("uint8"))
        w.close()
        if captions:
            (folder / f"clip{i}.txt").write_text(f"a {words[i % len(words)]}\n")
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return write_clips(tmp_path_factory.mktemp("clips"), 4)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir):
    from sparge.integrations.diffusers import load_wan_pipeline

    return load_wan_pipeline(str(tiny_pipeline_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def cache_dir(tiny_pipe, clips, tmp_path_factory) -> Path:
    return prepare_cache(tiny_pipe, scan_dataset(clips), tmp_path_factory.mktemp("c") / "cache",
                         num_frames=F, height=H, width=W, max_sequence_length=SEQ)


def transformer(tiny_pipeline_dir):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer", torch_dtype=torch.float32)


def finetuner(tiny_pipeline_dir, cache_dir, out, **cfg) -> Finetuner:
    cfg = {"steps": 4, "batch_size": 2, "lr": 3e-4, "save_every": 2, "lora_rank": 4, **cfg}
    return Finetuner(transformer(tiny_pipeline_dir), SPARSE, LatentCache(cache_dir), FinetuneConfig(**cfg), out,
                     shift=3.0, dtype=torch.float32)


# ----------------------------------------------------------------------------- data


def test_scan_folder_and_manifest(tmp_path, clips):
    samples = scan_dataset(clips)
    assert [s.video.name for s in samples] == [f"clip{i}.mp4" for i in range(4)]
    assert samples[0].caption == "a red cat runs"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"video": str(s.video), "prompt": s.caption}) for s in samples[::-1]) + "\n\n")
    assert [s.caption for s in scan_dataset(manifest)] == [s.caption for s in samples[::-1]]


@pytest.mark.parametrize("case, message", [
    ("empty", "has no videos"),
    ("no_caption", "have no caption file: clip0.mp4"),
    ("empty_caption", "is empty"),
    ("bad_json", "line 1 is not JSON"),
    ("no_video_key", 'has no "video" path'),
    ("missing_video", "does not exist"),
    ("manifest_no_caption", "has no caption"),
])
def test_scan_errors(tmp_path, case, message):
    d = tmp_path / "d"
    d.mkdir()
    src: Path = d
    if case == "no_caption":
        write_clips(d, 1, frames=1, captions=False)
    elif case == "empty_caption":
        write_clips(d, 1, frames=1)
        (d / "clip0.txt").write_text("  \n")
    elif case != "empty":
        src = d / "m.jsonl"
        write_clips(d, 1, frames=1)
        src.write_text({"bad_json": "{oops", "no_video_key": '{"caption": "x"}',
                        "missing_video": '{"video": "nope.mp4", "caption": "x"}',
                        "manifest_no_caption": '{"video": "clip0.mp4"}'}[case])
    with pytest.raises(ValueError, match=message):
        scan_dataset(src)


def test_cache_holds_the_pipeline_encodings(tiny_pipe, cache_dir, clips):
    cache = LatentCache(cache_dir)
    assert len(cache) == 4 and cache.index["latent_shape"] == [16, 3, 8, 10]
    lat, emb = cache[1]
    caption = scan_dataset(clips)[1].caption
    want, _ = tiny_pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=SEQ)
    torch.testing.assert_close(emb, want[0].float(), rtol=1e-5, atol=1e-6)
    n_real = len(caption.split()) + 1  # word-level tokenizer + </s>
    assert emb[n_real:].abs().max() == 0 and emb[:n_real].abs().amax(dim=-1).min() > 0  # trimmed on disk, padded on load
    # latents are the posterior mode, normalised the way the pipeline un-normalises before decoding
    from sparge.data import read_video

    vae = tiny_pipe.vae
    video = read_video(scan_dataset(clips)[1].video, num_frames=F, height=H, width=W)[None]
    raw = vae.encode(video).latent_dist.mode()[0]
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    torch.testing.assert_close(lat * std + mean, raw, rtol=1e-5, atol=1e-5)


def test_prepare_refuses_existing_and_bad_geometry(tiny_pipe, clips, cache_dir):
    with pytest.raises(ValueError, match="already exists"):
        prepare_cache(tiny_pipe, scan_dataset(clips), cache_dir, num_frames=F, height=H, width=W)
    with pytest.raises(ValueError, match="not 4k\\+1"):
        prepare_cache(tiny_pipe, scan_dataset(clips), cache_dir.parent / "x", num_frames=8, height=H, width=W)
    with pytest.raises(ValueError, match="fewer than --frames 13"):
        prepare_cache(tiny_pipe, scan_dataset(clips), cache_dir.parent / "y", num_frames=13, height=H, width=W)
    assert not (cache_dir.parent / "y").exists() and not list(cache_dir.parent.glob(".y.*"))  # no half cache


def test_sample_order_is_a_permutation_per_epoch():
    first, second = sample_order(5, 0, 5, seed=1), sample_order(5, 5, 5, seed=1)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert sample_order(5, 3, 4, seed=1) == (first + second)[3:7]  # the position alone decides


# ----------------------------------------------------------------------------- flow matching


def test_timestep_shift_matches_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    u = torch.arange(1000, 0, -1) / 1000  # the scheduler's unshifted training sigmas
    assert sched.sigmas.shape == u.shape
    torch.testing.assert_close(shift_sigmas(u, 5.0), sched.sigmas.float(), rtol=1e-5, atol=1e-6)
    assert scheduler_shift(sched.config) == 5.0
    assert scheduler_shift({"flow_shift": 3.0, "shift": 1.0}) == 3.0
    with pytest.raises(ValueError, match="--shift"):
        scheduler_shift({})


def test_noise_depends_only_on_seed_and_position():
    a, sa = draw_noise([7, 8, 9], (2, 3), seed=4, shift=3.0)
    b, sb = draw_noise([9], (2, 3), seed=4, shift=3.0)
    assert torch.equal(a[2], b[0]) and torch.equal(sa[2], sb[0])
    c, _ = draw_noise([9], (2, 3), seed=5, shift=3.0)
    assert not torch.equal(b, c)


def test_batch_must_split_over_gpus_and_accumulation():
    with pytest.raises(ValueError, match="--batch-size 6 is not divisible by GPUs x --grad-accum = 2 x 2 = 4"):
        FinetuneConfig(batch_size=6, grad_accum=2).micro_batch(2)
    assert FinetuneConfig(batch_size=8, grad_accum=2).micro_batch(2) == 2


# ----------------------------------------------------------------------------- LoRA merge


def test_merged_lora_state_dict_is_the_adapted_model(tiny_pipeline_dir):
    torch.manual_seed(0)
    lora = transformer(tiny_pipeline_dir)
    add_lora(lora, 4)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft initialises B to zero: make the adapters do something
    plain = transformer(tiny_pipeline_dir)
    plain.load_state_dict(merged_state_dict(lora.state_dict()), strict=True)
    x = torch.randn(1, 16, 3, 8, 10)
    kw = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, SEQ, 32), return_dict=False)
    with torch.no_grad():
        out_lora, out_plain = lora(x, **kw)[0], plain(x, **kw)[0]
        lora.disable_adapters()
        out_base = lora(x, **kw)[0]
    torch.testing.assert_close(out_plain, out_lora, rtol=1e-4, atol=1e-5)
    assert (out_base - out_lora).abs().max() > 1e-3


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("train, lr, gain", [("attention", 1e-3, 0.8), ("lora", 3e-3, 0.95)])
def test_a_few_steps_lower_the_distillation_loss(tiny_pipeline_dir, cache_dir, tmp_path, train, lr, gain):
    ft = finetuner(tiny_pipeline_dir, cache_dir, tmp_path / "o", steps=30, batch_size=4, train=train, lr=lr, save_every=100)
    first = range(ft.cfg.batch_size)  # the first step's samples, noise and timesteps
    held_out = range(16)  # noise and timesteps training never sees (evaluate's own seed)
    before, before_ho = ft.evaluate(positions=first, seed=ft.cfg.seed), ft.evaluate(positions=held_out)
    assert before_ho["teacher_rel_l2"] > 0.01  # the sparse student starts off the dense teacher
    records = []
    ft.run(on_step=records.append)
    assert records[0].loss == pytest.approx(before["distill"], rel=1e-5)  # evaluate() sees what training sees
    after_ho = ft.evaluate(positions=held_out)
    assert after_ho["distill"] < gain * before_ho["distill"], (before_ho, after_ho)
    assert 0.5 < records[-1].extra["sparsity"] < 0.9  # the student really ran sparse (1 of 4 key blocks kept)


def test_teacher_shares_frozen_weights_with_the_student(tiny_pipeline_dir, cache_dir, tmp_path):
    ft = finetuner(tiny_pipeline_dir, cache_dir, tmp_path / "o", train="attention")
    student = dict(ft.student.named_parameters())
    teacher = dict(ft.teacher.named_parameters())
    shared = [n for n in student if student[n] is teacher[n]]
    assert shared and all(".attn1." not in n for n in shared)
    assert all(student[n] is not teacher[n] for n in ft.trained) and not any(p.requires_grad for p in teacher.values())
    lora = finetuner(tiny_pipeline_dir, cache_dir, tmp_path / "l", train="lora")
    assert lora.teacher is None  # the base model with adapters off is the teacher: no copy


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("train, accum", [("all", 2), ("lora", 1)])
def test_resume_after_interruption_is_bit_exact(tiny_pipeline_dir, cache_dir, tmp_path, train, accum):
    straight = finetuner(tiny_pipeline_dir, cache_dir, tmp_path / "a", train=train, grad_accum=accum).run()

    class Interrupt(Exception):
        pass

    def stop_at_3(rec):
        if rec.step == 3:
            raise Interrupt  # like a crash after step 3, whose checkpoint was never written (save_every=2)

    out = tmp_path / "b"
    with pytest.raises(Interrupt):
        finetuner(tiny_pipeline_dir, cache_dir, out, train=train, grad_accum=accum).run(on_step=stop_at_3)
    assert [s for s, _ in list_checkpoints(out)] == [2] and not (out / "student.safetensors").exists()
    prepare_out_dir(out, resume=True, overwrite=False)
    resumed = finetuner(tiny_pipeline_dir, cache_dir, out, train=train, grad_accum=accum).run(resume=True)

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()] for d in (tmp_path / "a", out)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]  # the lost step 3 was dropped and redone
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    ref = transformer(tiny_pipeline_dir).state_dict()
    assert any(not torch.equal(a[k], ref[k]) for k in a)  # training changed the weights


def test_checkpoints_rotate_and_the_student_loads_strictly(tiny_pipeline_dir, cache_dir, tmp_path):
    from sparge.checkpoint import load_transformer_weights

    out = tmp_path / "o"
    ft = finetuner(tiny_pipeline_dir, cache_dir, out, steps=5, save_every=1, keep=2, train="attention")
    final = ft.run()
    assert [s for s, _ in list_checkpoints(out)] == [4, 5]
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-000004", "ckpt-000005", "log.jsonl", "run.json", "student.safetensors"]
    assert sorted(p.name for p in (out / "ckpt-000005").iterdir()) == ["optimizer.pt", "state.json", "trainable.safetensors", "trainer.pt"]
    fresh = transformer(tiny_pipeline_dir)
    meta = load_transformer_weights(final, fresh)
    assert meta["steps"] == 5 and meta["train"] == "attention"
    trained = dict(ft.student.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name].detach().to(p.dtype)), name


def test_resume_refuses_a_different_run(tiny_pipeline_dir, cache_dir, tmp_path):
    out = tmp_path / "o"
    finetuner(tiny_pipeline_dir, cache_dir, out, steps=2).run()
    with pytest.raises(ValueError, match="trained with --batch-size 2, this run has 4"):
        finetuner(tiny_pipeline_dir, cache_dir, out, steps=4, batch_size=4).run(resume=True)
    with pytest.raises(ValueError, match="not empty: pass --resume"):
        prepare_out_dir(out, resume=False, overwrite=False)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        prepare_out_dir(tmp_path / "empty", resume=True, overwrite=False)
    (out / "notes.txt").write_text("mine")
    prepare_out_dir(out, resume=False, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # --overwrite removes only what a run wrote


def test_a_step_through_the_triton_kernels_matches_the_torch_path(tiny_pipeline_dir, cache_dir, tmp_path, monkeypatch):
    """The default backend: the Triton kernels (interpreted here) in the student's forward and backward."""
    runs = {}
    for interp in ("0", "1"):  # "0": the exact torch path; "1": Triton under the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        ft = finetuner(tiny_pipeline_dir, cache_dir, tmp_path / interp, steps=1, train="attention", lr=1e-3)
        records = []
        ft.run(on_step=records.append)
        runs[interp] = (records[0], {n: p.detach().clone() for n, p in ft.student.named_parameters() if p.requires_grad})
    (rec_t, w_t), (rec_k, w_k) = runs["0"], runs["1"]
    assert rec_k.loss == pytest.approx(rec_t.loss, rel=1e-4) and rec_k.grad_norm == pytest.approx(rec_t.grad_norm, rel=1e-3)
    assert 0.5 < rec_k.extra["sparsity"] < 0.9
    ref = transformer(tiny_pipeline_dir).state_dict()
    for n in w_t:
        torch.testing.assert_close(w_k[n], w_t[n], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(w_k[n], ref[n]) for n in w_k)  # the kernels' gradients moved the weights
