"""Train the test-bed model: a small Wan2.1-structured text-to-video pipeline on `sparge.testbed.data` clips.

Every component is the class a real Wan2.1 checkpoint uses, so every sparge command runs on the result:

- ``transformer``: `WanTransformer3DModel` (patch (1, 2, 2), 16 latent channels, RMS QK-norm, 3D RoPE,
  cross-attention to text), default 4 blocks x 4 heads of dim 64 (the kernel's head dim), FFN 2x, 3.8 M parameters (about
  7.7 MB in bf16, small enough to keep in the repository), trained;
- ``text_encoder``: `UMT5EncoderModel`, 2 layers, ``d_model`` 64, trained jointly from scratch (a frozen
  random encoder mixes word order too weakly to bind "red" to "circle" to "top left" in captions with
  several objects; training it is cheap and keeps the shape of the real stack);
- ``tokenizer``: a word-level `PreTrainedTokenizerFast` over the caption vocabulary, built offline;
- ``vae``: a small `AutoencoderKLWan` with **random** weights (Wan's 4 x 8 x 8 compression). Clips are
  made directly in latent space (see `sparge.testbed.data`), so decoded frames are not pictures of the
  scene; they are a fixed, deterministic function of the latents, so PSNR between dense and sparse
  decodes is still a like-for-like comparison. `sparge.testbed.data.latents_to_rgb` is the meaningful
  preview;
- ``scheduler``: `UniPCMultistepScheduler` in flow-prediction mode with ``flow_shift=3``, as Wan2.1.

Objective (Wan's rectified flow): ``x_t = (1 - s) x0 + s * noise``, target ``noise - x0``, timestep
``1000 s``, with ``s = shift * u / (1 + (shift - 1) u)``, ``u ~ U(0, 1)``, the shift the sampler uses.
Captions are dropped (replaced by "") with probability 0.1 so classifier-free guidance works; text
embeddings are the ones the pipeline's `encode_prompt` makes (zero-padded to 512 tokens, as at sampling
time), with the encoder run on only as many tokens as the longest caption can have
(`encode_captions_short`). AdamW, linear warm-up then cosine decay to 10% over the time (or step) budget,
bf16 autocast on CUDA, float32 on the CPU, one fixed seed for weights, scenes, noise and timesteps. On
CUDA the transformer blocks and the text encoder are compiled (``torch.compile``) for training only;
the compile time counts in the budget and a compile failure falls back to eager.

Run (about 9 minutes on one H100; 4 minutes gives a model that follows colour but hardly position)::

    python -m sparge.testbed.train --out testbed-wan --device cuda --minutes 8.6

The number of steps in a time budget depends on the GPU, so two runs on different hardware can differ;
``--steps N`` (with a generous ``--minutes``) makes a run reproducible step for step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparge._atomic import atomic_dir
from sparge.testbed import INFO_FILE
from sparge.testbed.data import (
    MICRO_GEOMETRY,
    Geometry,
    caption_words,
    render_latents,
    sample_scenes,
)

__all__ = [
    "TEXT_LEN",
    "TestbedConfig",
    "TrainResult",
    "build_pipeline",
    "build_tokenizer",
    "compiled_for_training",
    "encode_captions",
    "encode_captions_short",
    "flow_matching_loss",
    "main",
    "sample_sigmas",
    "save_pipeline",
    "train",
]

TEXT_LEN = 512
"""Text tokens the transformer sees: WanPipeline's default ``max_sequence_length`` (zero-padded)."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_COMPILE_DEVICES = ("cuda",)  # where `TestbedConfig.compile` applies (compiling for the CPU costs more than it saves here)


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that defines a test-bed model and its training run (saved as ``testbed.json``).

    Geometry: latent ``frames x height x width`` (default 16 x 40 x 40 = 6400 tokens = 61 frames of
    320 x 320 pixels). Model: ``num_layers`` blocks of ``num_heads`` x ``head_dim``. Training: AdamW
    at ``lr`` with ``batch_size`` clips per step, for ``minutes`` of wall time or ``max_steps``;
    ``compile`` compiles the transformer blocks and the text encoder for training on CUDA (the compile
    time counts in ``minutes``; a compile failure falls back to eager with a logged line).
    """

    seed: int = 20250611
    frames: int = 16
    height: int = 40
    width: int = 40
    max_objects: int = 3
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 64
    ffn_mult: int = 2
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    flow_shift: float = 3.0
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 100_000
    minutes: float = 8.6
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    save_dtype: str = "bf16"
    log_every: int = 50
    compile: bool = True

    def __post_init__(self) -> None:
        Geometry(self.frames, self.height, self.width)  # validates
        positive = ("max_objects", "num_layers", "num_heads", "head_dim", "ffn_mult", "text_dim", "text_layers",
                    "text_heads", "batch_size", "max_steps", "log_every")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is out of range: use an integer >= 1")
        if self.head_dim % 2 or self.head_dim > 256:
            raise ValueError(f"head_dim={self.head_dim} is not supported: use an even number <= 256 (64 matches the kernels)")
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim={self.text_dim} must be divisible by text_heads={self.text_heads}")
        if not self.minutes > 0:
            raise ValueError(f"minutes={self.minutes!r} is out of range: use a number > 0")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout={self.caption_dropout!r} is out of range: use [0, 1)")
        if self.save_dtype not in _DTYPES:
            raise ValueError(f"save_dtype={self.save_dtype!r} is not known: use {', '.join(_DTYPES)}")
        if not self.lr > 0 or self.flow_shift <= 0:
            raise ValueError(f"lr={self.lr!r} and flow_shift={self.flow_shift!r} must be > 0")

    @classmethod
    def micro(cls, **overrides: Any) -> TestbedConfig:
        """A CPU-sized config (320 tokens, 2 blocks of 2 heads x 64) for tests and ``--tiny`` runs."""
        base = {"frames": MICRO_GEOMETRY.frames, "height": MICRO_GEOMETRY.height, "width": MICRO_GEOMETRY.width,
                    "num_layers": 2, "num_heads": 2, "head_dim": 64, "ffn_mult": 2, "text_dim": 32, "text_layers": 1, "text_heads": 2,
                    "batch_size": 4, "lr": 1e-3, "warmup_steps": 5, "minutes": 1.0, "max_steps": 40, "save_dtype": "fp32", "log_every": 10}
        base.update(overrides)
        return cls(**base)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.frames, self.height, self.width)

    def transformer_config(self) -> dict[str, Any]:
        """Keyword arguments of `WanTransformer3DModel` (Wan2.1 layout, small)."""
        dim = self.num_heads * self.head_dim
        return {
            "patch_size": (1, 2, 2), "num_attention_heads": self.num_heads, "attention_head_dim": self.head_dim,
            "in_channels": 16, "out_channels": 16, "text_dim": self.text_dim, "freq_dim": 256, "ffn_dim": self.ffn_mult * dim,
            "num_layers": self.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
            "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_tokenizer(words: list[str] | None = None):
    """Word-level fast tokenizer over ``words`` (default: the caption vocabulary), built offline.

    Ids: ``<pad>`` 0, ``</s>`` 1 (appended to every text, as T5 does), ``<unk>`` 2, then the words.
    Returns a `transformers.PreTrainedTokenizerFast` (saved by ``save_pretrained`` like a real one).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words if words is not None else caption_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_LEN)


def build_pipeline(cfg: TestbedConfig):
    """A freshly initialised test-bed `WanPipeline` (float32, CPU), deterministic in ``cfg.seed``."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        tokenizer = build_tokenizer()
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=cfg.text_dim // cfg.text_heads, d_ff=2 * cfg.text_dim,
            num_layers=cfg.text_layers, num_heads=cfg.text_heads, relative_attention_num_buckets=16,
            relative_attention_max_distance=64, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        ))
        transformer = WanTransformer3DModel(**cfg.transformer_config())
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    finally:
        torch.random.set_rng_state(state)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=cfg.flow_shift)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_captions(pipe: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    """Text embeddings exactly as `WanPipeline` makes them: ``[B, 512, text_dim]`` (zero-padded), with grad."""
    embeds, _ = pipe.encode_prompt(prompt=captions, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN, device=device)
    return embeds


def caption_tokens(max_objects: int) -> int:
    """Tokens of the longest caption with ``max_objects`` objects (11 words each, "and" between, ``</s>``), rounded up to 8."""
    return -(-(12 * max_objects) // 8) * 8


def encode_captions_short(text_encoder: torch.nn.Module, tokenizer: Any, captions: list[str], device: torch.device,
                          length: int) -> torch.Tensor:
    """The embeddings of `encode_captions`, with the encoder run on ``length`` tokens instead of 512.

    `WanPipeline` runs its encoder on 512 padded tokens and then zeroes every position past a caption's
    end; padded keys are masked out, so the caption positions do not depend on how much padding there is.
    Training runs the encoder on ``length`` tokens (a fixed shape, so it compiles once) and zero-pads to
    512 the same way: the transformer sees the same ``[B, 512, text_dim]`` tensor at a fraction of the cost.

    Raises:
        ValueError: a caption does not fit in ``length`` tokens (it would be truncated).
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    toks = tokenizer([prompt_clean(c) for c in captions], padding="max_length", max_length=length, truncation=True,
                     add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = toks.attention_mask
    if bool((mask.sum(1) >= length).any()):
        raise ValueError(f"a caption does not fit in {length} text tokens: raise the length (captions: {captions!r})")
    ids, mask = toks.input_ids.to(device), mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    hidden = hidden * mask[..., None].to(hidden.dtype)
    return torch.nn.functional.pad(hidden, (0, 0, 0, TEXT_LEN - length))


def compiled_for_training(pipe: Any) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """``(blocks, text_encoder)``: ``torch.compile`` wrappers of the transformer's blocks (one per block; one
    graph serves them all) and of the text encoder.

    For training only: put the blocks in ``pipe.transformer.blocks`` while training and the originals back
    afterwards, so what is saved and sampled is plain eager diffusers code.
    """
    return torch.nn.ModuleList([torch.compile(b) for b in pipe.transformer.blocks]), torch.compile(pipe.text_encoder)


def sample_sigmas(n: int, shift: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Noise levels ``[n]`` float32: uniform ``u`` through Wan's shift ``s = shift u / (1 + (shift - 1) u)``."""
    u = torch.rand(n, generator=generator, device=generator.device).to(device)
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(
    transformer: torch.nn.Module, x0: torch.Tensor, text: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Per-sample rectified-flow loss ``mean((v(x_t, 1000 s) - (noise - x0))^2)``.

    Args:
        transformer: a `WanTransformer3DModel`.
        x0: clean latents ``[B, 16, T, H, W]``; noise: same shape; sigmas: ``[B]`` in [0, 1].
        text: ``[B, S, text_dim]`` text embeddings.

    Returns:
        ``[B]`` float32 losses (differentiable).
    """
    s = sigmas.view(-1, 1, 1, 1, 1).to(x0.dtype)
    x_t = (1 - s) * x0 + s * noise
    # ModelMixin.dtype skips the modules kept in float32 (the first parameter is one of them)
    dtype = getattr(transformer, "dtype", None) or next(transformer.parameters()).dtype
    pred = transformer(hidden_states=x_t.to(dtype), timestep=sigmas * 1000, encoder_hidden_states=text.to(dtype), return_dict=False)[0]
    return ((pred.float() - (noise - x0).float()) ** 2).mean(dim=(1, 2, 3, 4))


@dataclass
class TrainResult:
    """What `train` returns: the trained pipeline (float32, on the training device) and its history."""

    pipe: Any
    steps: int
    seconds: float
    history: list[dict[str, float]]
    config: TestbedConfig

    def summary(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.pipe.transformer.parameters())
        return {
            "steps": self.steps, "seconds": round(self.seconds, 2), "clips_seen": self.steps * self.config.batch_size,
            "steps_per_second": self.steps / self.seconds if self.seconds else None,
            "transformer_parameters": params,
            "text_encoder_parameters": sum(p.numel() for p in self.pipe.text_encoder.parameters()),
            "first_loss": self.history[0]["loss"] if self.history else None,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "history": self.history, "config": self.config.to_dict(),
        }


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(
    cfg: TestbedConfig,
    *,
    device: str | torch.device = "cuda",
    log: Callable[[str], None] | None = print,
    pipe: Any = None,
) -> TrainResult:
    """Train the test-bed pipeline until ``cfg.minutes`` of wall time or ``cfg.max_steps`` steps.

    Args:
        cfg: model, data and optimiser settings (fixed seed).
        device: "cuda" (bf16 autocast) or "cpu" (float32).
        log: called with one progress line every ``cfg.log_every`` steps (None: silent).
        pipe: continue training this pipeline instead of a fresh `build_pipeline(cfg)`.

    Returns:
        A `TrainResult`; ``history`` holds the mean training loss of every ``log_every`` steps.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipe = build_pipeline(cfg) if pipe is None else pipe
    pipe.to(device)
    modules = [pipe.transformer, pipe.text_encoder]
    for m in modules:
        m.float().train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    geometry = cfg.geometry
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    budget = cfg.minutes * 60.0
    text_len = caption_tokens(cfg.max_objects)
    compiled = cfg.compile and device.type in _COMPILE_DEVICES
    eager_blocks = pipe.transformer.blocks
    text_encoder: torch.nn.Module = pipe.text_encoder
    if compiled:
        pipe.transformer.blocks, text_encoder = compiled_for_training(pipe)
    history: list[dict[str, float]] = []
    acc = torch.zeros((), device=device)
    acc_n = 0
    step = 0

    def step_loss(encoder: torch.nn.Module, captions: list[str], x0: torch.Tensor, sigmas: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        with autocast:
            text = encode_captions_short(encoder, pipe.tokenizer, captions, device, text_len)
            loss = flow_matching_loss(pipe.transformer, x0, text, sigmas, noise).mean()
        loss.backward()
        return loss.detach()

    t0 = time.perf_counter()
    try:
        while step < cfg.max_steps:
            elapsed = time.perf_counter() - t0
            if elapsed >= budget:
                break
            progress = max(step / cfg.max_steps, elapsed / budget)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, progress, cfg.warmup_steps)
            scenes = sample_scenes(cfg.batch_size, seed=rng, split="train", max_objects=cfg.max_objects)
            captions = ["" if rng.random() < cfg.caption_dropout else s.caption for s in scenes]
            x0 = render_latents(scenes, geometry, device)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            sigmas = sample_sigmas(cfg.batch_size, cfg.flow_shift, gen, device)
            try:
                loss = step_loss(text_encoder, captions, x0, sigmas, noise)
            except Exception as e:  # a compiler failure of any kind: train eagerly instead
                if not compiled or step > 0:
                    raise
                compiled = False
                pipe.transformer.blocks, text_encoder = eager_blocks, pipe.text_encoder
                opt.zero_grad(set_to_none=True)
                if log is not None:
                    first = str(e).splitlines()[0] if str(e) else ""
                    log(f"[train] torch.compile failed ({type(e).__name__}: {first}); training eagerly")
                loss = step_loss(text_encoder, captions, x0, sigmas, noise)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            acc += loss
            acc_n += 1
            step += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                mean = float(acc) / acc_n  # the only host sync of the loop
                acc.zero_()
                acc_n = 0
                el = time.perf_counter() - t0
                history.append({"step": step, "loss": mean, "seconds": round(el, 2), "lr": opt.param_groups[0]["lr"]})
                if not math.isfinite(mean):
                    raise RuntimeError(f"training diverged at step {step} (loss {mean}): lower lr (now {cfg.lr})")
                if log is not None:
                    log(f"[train] step {step:6d}  loss {mean:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                        f"{el:6.1f}s  {step / el:.2f} steps/s")
    finally:
        pipe.transformer.blocks = eager_blocks
    if acc_n:
        history.append({"step": step, "loss": float(acc) / acc_n, "seconds": round(time.perf_counter() - t0, 2),
                        "lr": opt.param_groups[0]["lr"]})
    for m in modules:
        m.eval().requires_grad_(False)
    return TrainResult(pipe=pipe, steps=step, seconds=time.perf_counter() - t0, history=history, config=cfg)


def dir_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_pipeline(pipe: Any, path: str | os.PathLike, cfg: TestbedConfig, *, overwrite: bool = False,
                  extra: dict[str, Any] | None = None) -> Path:
    """Save the pipeline in diffusers format (safetensors), atomically, with ``testbed.json`` beside it.

    The transformer and text encoder are written in ``cfg.save_dtype`` (bf16 by default, halving the
    size; ``WanPipeline.from_pretrained`` loads them in any ``torch_dtype``), the VAE in float32. The
    in-memory pipeline is left unchanged.

    Args:
        pipe: a test-bed `WanPipeline`.
        path: target directory; must not exist (or be empty) unless ``overwrite``.
        cfg: the config it was trained with (recorded in ``testbed.json``).
        overwrite: replace an existing directory.
        extra: more JSON-able facts for ``testbed.json`` (training summary, ...).

    Returns:
        ``path``, loadable with ``WanPipeline.from_pretrained(path)``.
    """
    from diffusers import WanPipeline

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ValueError(f"model directory {path} already exists: pass --overwrite to replace it, or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write model directory {path}: directory {parent} does not exist")
    dtype = _DTYPES[cfg.save_dtype]
    # copies in the save dtype, on the CPU: the caller's pipeline keeps its dtype and device
    state = {n: getattr(pipe, n) for n in ("transformer", "text_encoder")}
    out = WanPipeline(
        tokenizer=pipe.tokenizer, vae=pipe.vae, scheduler=pipe.scheduler,
        transformer=_cpu_copy(state["transformer"], dtype), text_encoder=_cpu_copy(state["text_encoder"], dtype),
    )
    with atomic_dir(path) as tmp:
        out.save_pretrained(tmp, safe_serialization=True)
        info = {"format": "sparge-testbed", "version": 1, "config": cfg.to_dict(), "geometry": dataclasses.asdict(cfg.geometry),
                "pipeline_kwargs": cfg.geometry.pipeline_kwargs(), "tokens": cfg.geometry.tokens, **(extra or {})}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return path


def _cpu_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A CPU copy in ``dtype``, leaving the modules the class keeps in float32 (``_keep_in_fp32_modules``) alone."""
    import copy

    out = copy.deepcopy(module).to("cpu")
    keep = tuple(getattr(type(module), "_keep_in_fp32_modules", None) or ())
    for name, t in [*out.named_parameters(), *out.named_buffers()]:
        if t.is_floating_point() and not any(k in name.split(".") for k in keep):
            t.data = t.data.to(dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m sparge.testbed.train --out DIR [--device cuda] [--minutes 5] [--steps N] [--tiny] [--overwrite]``."""
    ap = argparse.ArgumentParser(
        prog="python -m sparge.testbed.train",
        description="Train the sparge test-bed model (a small Wan2.1-structured text-to-video pipeline) and save it.",
        epilog="examples:\n  python -m sparge.testbed.train --out testbed-wan --device cuda --minutes 8.6\n"
               "  python -m sparge.testbed.train --out /tmp/tb --device cpu --tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, help="model directory to write (diffusers format)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-time budget for training (default 8.6; --tiny: 1)")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (reproducible step for step)")
    ap.add_argument("--batch-size", type=int, default=None, help="clips per step (default 16; --tiny: 4)")
    ap.add_argument("--seed", type=int, default=None, help="seed of weights, scenes and noise (default fixed)")
    ap.add_argument("--no-compile", action="store_true", help="train eagerly on CUDA too (default: compile the blocks)")
    ap.add_argument("--tiny", action="store_true", help="micro model and clips (320 tokens): a CPU smoke run")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = ap.parse_args(argv)
    from sparge_cli.common import (  # the CLI's one-line errors for a script entry point
        UsageError,
        parse_device,
    )

    try:
        over = {k: v for k, v in (("minutes", args.minutes), ("max_steps", args.steps), ("batch_size", args.batch_size),
                                  ("seed", args.seed)) if v is not None}
        if args.no_compile:
            over["compile"] = False
        cfg = TestbedConfig.micro(**over) if args.tiny else TestbedConfig(**over)
        device = parse_device(args.device)
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise ValueError(f"--out {out} already exists: pass --overwrite to replace it, or choose another path")
        result = train(cfg, device=device, log=lambda s: print(s, flush=True))
        save_pipeline(result.pipe, out, cfg, overwrite=args.overwrite, extra={"training": result.summary()})
        print(f"[train] {result.steps} steps in {result.seconds:.0f}s; saved {out} ({dir_size(out) / 2**20:.1f} MiB)", flush=True)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
