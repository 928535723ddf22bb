"""Quality measurements on the test-bed model: does it follow captions, what does its attention look like,
and how much does training-free sparse attention change its samples (hybrid vs Top-k alone vs Top-p alone).

Sections (`evaluate` runs them all and returns one JSON-able dict):

1. ``validation``: flow-matching loss on held-out captions (and, for the generalisation gap, on training
   captions) at fixed, stratified noise levels and fixed noise: lower is better; an untrained model
   scores about 1-2.
2. ``caption_following``: dense samples for held-out captions, read back from the latents with
   `sparge.testbed.data.read_back` (colour recall, false colours, position accuracy, direction
   accuracy). Two references bracket it: the rendered ground truth of the same captions (the ceiling,
   about 0.99 position accuracy: occlusion) and the same samples scored against *other* captions
   (chance level).
3. ``attention``: per layer, the entropy of the pooled block scores (`sparge.block_scores`, softmax over
   key blocks) of q/k captured from real denoising steps, normalised by ``log(Tk)`` (1 = uniform), and
   the two failure signatures: the pooled mass Top-k alone captures at each target budget (low = flat
   rows where a fixed k misses most of the mass) and the blocks Top-p alone keeps per row at its
   matched p (1 block on many rows = peaked rows where p is reached by a single block).
4. ``sparse``: for each target sparsity and each rule (hybrid, Top-k alone, Top-p alone), knobs chosen
   *at the same sparsity* by `sparge.calibrate.search_target` (bisection on captured q/k of
   calibration captions, which are training captions, not the evaluated ones; the hybrid's k fraction
   is the one with the lowest attention error there), then a full sampling run of the held-out
   captions with `sparge.integrations.diffusers.apply`: measured sparsity, relative L2 of the final
   latents against dense, PSNR of the VAE-decoded frames and of the `latents_to_rgb` previews against
   dense, and the caption-following scores of the sparse samples. The knobs (section ``knobs``) are
   searched before the attention report, which uses them for the failure signatures.

Every sampling run uses the same initial noise per caption (drawn on the CPU from one seed), so dense and
sparse runs differ only by the attention.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sparge.attention import SpargeConfig
from sparge.calibrate import (
    CalibrationData,
    Candidate,
    CaptureStore,
    UnreachableTargetError,
    capture_attention,
    relative_l2,
    search_target,
    spread,
)
from sparge.mask import block_scores, mask_from_scores
from sparge.testbed.data import (
    Geometry,
    Scene,
    latents_to_rgb,
    read_back,
    render_latents,
    sample_scenes,
)
from sparge.testbed.train import TEXT_LEN, encode_captions, flow_matching_loss

__all__ = [
    "EvalSettings",
    "attention_report",
    "caption_following",
    "choose_knobs",
    "decode_frames",
    "evaluate",
    "preview_image",
    "psnr",
    "sample_latents",
    "sparse_sweep",
    "validation_loss",
]

RULES = ("hybrid", "topk", "topp")
Log = Callable[[str], None]


@dataclass(frozen=True)
class EvalSettings:
    """How much to evaluate.

    Attributes:
        n_captions: held-out captions sampled (dense and every sparse run).
        steps, guidance: denoising steps and classifier-free guidance scale of every run.
        seed: seed of the held-out captions and the initial noise.
        batch_size: captions per pipeline call.
        val_clips: clips per split for the validation loss.
        calib_captions, calib_steps: captions and denoising steps whose attention is captured to choose
            the knobs and to measure entropy (``calib_steps`` spread over the run, first and last included).
        targets: target sparsities, in run order (0.95 first: the level the presets and fine-tuning
            use, so a time limit cuts the others); tolerance: how close the knobs must get (absolute).
        block_q, block_k: block sizes; backend: sparse attention backend ("auto", "triton", "torch").
        decode_samples: samples VAE-decoded for the frame PSNR (None: all; the Wan VAE is slow on a CPU).
    """

    n_captions: int = 8
    steps: int = 20
    guidance: float = 4.0
    seed: int = 0
    batch_size: int = 8
    val_clips: int = 64
    calib_captions: int = 2
    calib_steps: int = 5
    targets: tuple[float, ...] = (0.95, 0.90, 0.97)
    tolerance: float = 0.005
    block_q: int = 128
    block_k: int = 64
    backend: str = "auto"
    decode_samples: int | None = 2

    @classmethod
    def micro(cls, **overrides: Any) -> EvalSettings:
        """CPU-sized: 4 captions, 3 steps; target 0.6 only (the micro clip has only 5 key blocks)."""
        base = {"n_captions": 4, "steps": 3, "batch_size": 4, "val_clips": 8, "calib_captions": 1, "calib_steps": 2,
                    "targets": (0.6,), "tolerance": 0.1, "decode_samples": 1}
        base.update(overrides)
        return cls(**base)

    def __post_init__(self) -> None:
        for name in ("n_captions", "steps", "batch_size", "val_clips", "calib_captions", "calib_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is out of range: use an integer >= 1")
        for t in self.targets:
            if not 0.0 < t < 1.0:
                raise ValueError(f"target sparsity {t!r} is out of range: use numbers strictly between 0 and 1")
        if self.decode_samples is not None and (not isinstance(self.decode_samples, int) or self.decode_samples < 1):
            raise ValueError(f"decode_samples={self.decode_samples!r} is out of range: use an integer >= 1, or None for all")
        if self.guidance < 1.0:
            raise ValueError(f"guidance={self.guidance!r} is out of range: use >= 1 (1 = no guidance)")


def _device_of(pipe: Any) -> torch.device:
    return next(pipe.transformer.parameters()).device


@torch.no_grad()
def validation_loss(pipe: Any, geometry: Geometry, *, n: int = 64, seed: int = 0, split: str = "heldout",
                    batch_size: int = 16, shift: float = 3.0) -> dict[str, float]:
    """Flow-matching loss on ``n`` clips of ``split`` at stratified noise levels, with fixed noise.

    Noise level of clip ``i``: ``u = (i + 0.5) / n`` through the shift, so every run sees the same levels;
    noise is drawn on the CPU from ``seed``. Returns ``loss`` (mean) and ``loss_low``/``loss_mid``/``loss_high``
    (clips with sigma below 1/3, between, above 2/3).
    """
    device = _device_of(pipe)
    scenes = sample_scenes(n, seed=seed + 7919, split=split)  # type: ignore[arg-type]
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    sigmas = shift * u / (1 + (shift - 1) * u)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for i in range(0, n, batch_size):
        part = scenes[i:i + batch_size]
        x0 = render_latents(part, geometry, device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        text = encode_captions(pipe, [s.caption for s in part], device)
        losses.append(flow_matching_loss(pipe.transformer, x0, text, sigmas[i:i + batch_size].to(device), noise).cpu())
    loss = torch.cat(losses)
    out = {"loss": float(loss.mean()), "clips": n, "split": split}
    for name, sel in (("loss_low", sigmas < 1 / 3), ("loss_mid", (sigmas >= 1 / 3) & (sigmas <= 2 / 3)), ("loss_high", sigmas > 2 / 3)):
        out[name] = float(loss[sel].mean()) if sel.any() else float("nan")
    return out


@torch.no_grad()
def sample_latents(pipe: Any, captions: list[str], geometry: Geometry, *, steps: int, guidance: float, seed: int = 0,
                   batch_size: int = 8, on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Generate latents for ``captions`` with the pipeline itself (``output_type="latent"``).

    Initial noise is drawn on the CPU from ``seed`` for all captions at once, so every call with the same
    captions and seed starts from the same noise, whatever the attention.

    Returns:
        ``[N, 16, T, H, W]`` float32 on the CPU.
    """
    device = _device_of(pipe)
    shape = (len(captions), 16, geometry.frames, geometry.height, geometry.width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(0, len(captions), batch_size):
        part = captions[i:i + batch_size]
        lat = pipe(prompt=part, negative_prompt=[""] * len(part), num_inference_steps=steps, guidance_scale=guidance,
                   latents=noise[i:i + batch_size].to(device), output_type="latent", return_dict=False,
                   max_sequence_length=TEXT_LEN, **geometry.pipeline_kwargs())[0]
        out.append(lat.float().cpu())
        if on_batch is not None:
            on_batch(i + len(part), len(captions))
    return torch.cat(out)


@torch.no_grad()
def decode_frames(pipe: Any, latents: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
    """VAE-decode latents as `WanPipeline` does before writing a video.

    Args:
        latents: ``[N, 16, T, H, W]`` (the pipeline's normalised latents).

    Returns:
        ``[N, 3, F, 8H, 8W]`` uint8 on the CPU (``F = 4 (T - 1) + 1``), the values a video writer gets.
    """
    vae = pipe.vae
    dev = next(vae.parameters()).device
    mean = torch.tensor(vae.config.latents_mean, device=dev, dtype=vae.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=dev, dtype=vae.dtype).view(1, -1, 1, 1, 1)
    out = []
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i:i + batch_size].to(dev, vae.dtype) * std + mean
        video = vae.decode(z, return_dict=False)[0]
        out.append(((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def psnr(x: torch.Tensor, ref: torch.Tensor, *, peak: float) -> float:
    """Mean over samples (dim 0) of ``10 log10(peak^2 / MSE)``; identical samples count as 100 dB."""
    d = (x.double() - ref.double()).flatten(1)
    mse = (d * d).mean(1)
    vals = torch.where(mse > 0, 10 * torch.log10(peak * peak / mse.clamp_min(1e-300)), torch.full_like(mse, 100.0))
    return float(vals.clamp(max=100.0).mean())


def caption_following(latents: torch.Tensor, scenes: list[Scene], geometry: Geometry) -> dict[str, Any]:
    """Read-back scores of generated latents, with the ceiling (rendered ground truth) and chance (other captions)."""
    rotated = scenes[1:] + scenes[:1]
    return {
        "samples": read_back(latents, scenes, geometry),
        "ground_truth_render": read_back(render_latents(scenes, geometry), scenes, geometry),
        "chance_other_captions": read_back(latents, rotated, geometry),
    }


def preview_image(rows: list[torch.Tensor], geometry: Geometry, *, frames: int = 8, scale: int = 4) -> torch.Tensor:
    """A contact sheet of latent clips: one row per clip, ``frames`` frames spread over time, palette colours.

    Args:
        rows: clips ``[16, T, H, W]`` (e.g. ground truth, dense sample, sparse sample of one caption).
        geometry: their geometry; frames: frames shown per row; scale: nearest-neighbour upscaling.

    Returns:
        ``[rows * (scale H + 2), n (scale W + 2), 3]`` uint8, ready for ``imageio.imwrite``.
    """
    idx = spread(min(frames, geometry.frames), geometry.frames)
    rgb = latents_to_rgb(torch.stack([r.float().cpu() for r in rows]), geometry)[:, idx]  # [R, n, 3, H, W]
    rgb = torch.nn.functional.pad(rgb.repeat_interleave(scale, -1).repeat_interleave(scale, -2), (0, 2, 0, 2), value=1.0)
    r, n, _, h, w = rgb.shape
    return (rgb.permute(0, 3, 1, 4, 2).reshape(r * h, n * w, 3) * 255).round().to(torch.uint8)


def _quantiles(x: torch.Tensor, qs: tuple[float, ...] = (0.1, 0.5, 0.9)) -> list[float]:
    x = x.flatten().float()
    if x.numel() > 1 << 24:  # torch.quantile's input limit
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
    return [float(v) for v in torch.quantile(x, torch.tensor(qs, device=x.device))]


@torch.no_grad()
def attention_report(store: CaptureStore, *, block_q: int, block_k: int, device: torch.device | str,
                     knobs: dict[float, dict[str, tuple[float, float]]] | None = None) -> dict[str, Any]:
    """Per-layer pooled-score entropy and Top-k / Top-p failure signatures from captured q/k.

    Args:
        store: captured samples (`sparge.calibrate.capture_attention`).
        block_q, block_k: block sizes.
        device: where to compute the scores.
        knobs: ``{target: {"topk": (k, 0), "topp": (0, p)}}`` from the sparse sweep, for the signatures.

    Returns:
        ``{"tk": Tk, "tq": Tq, "layers": {layer: {...}}}``; per layer: ``entropy_norm_mean`` and its 10/50/90%
        quantiles over rows (batch x heads x query blocks x steps; 1 = uniform over key blocks),
        ``entropy_nats_mean``, ``entropy_norm_per_head``, ``entropy_norm_per_step``, and per target
        ``topk_mass_mean``/``topk_mass_p10`` (pooled mass inside the Top-k mask) and ``topp_blocks_mean``/
        ``topp_blocks_p90``/``topp_single_block_rows`` (blocks per row of the Top-p mask).
    """
    by_layer: dict[int, list[tuple[int, tuple[int, ...], torch.Tensor]]] = {}
    tk = tq = 0
    for i, e in enumerate(store.entries):
        t = store.load(i, device)
        s = block_scores(t["q"], t["k"], block_q=block_q, block_k=block_k)  # [B, H, Tq, Tk] float32
        tq, tk = s.shape[-2], s.shape[-1]
        by_layer.setdefault(e.layer, []).append((e.step, e.heads, s))
    layers: dict[str, Any] = {}
    for layer in sorted(by_layer):
        items = by_layer[layer]
        ent = [-(s * torch.log(s.clamp_min(1e-30))).sum(-1) for _, _, s in items]  # [B, H, Tq] nats
        allrows = torch.cat([e.flatten() for e in ent])
        norm = allrows / math.log(tk) if tk > 1 else torch.zeros_like(allrows)
        per_head: dict[int, list[torch.Tensor]] = {}
        per_step: dict[int, list[torch.Tensor]] = {}
        for (step, heads, _), e in zip(items, ent):
            for j, h in enumerate(heads):
                per_head.setdefault(h, []).append(e[:, j].flatten())
            per_step.setdefault(step, []).append(e.flatten())
        scale = math.log(tk) if tk > 1 else 1.0
        rec: dict[str, Any] = {
            "entropy_norm_mean": float(norm.mean()),
            "entropy_norm_q10_q50_q90": _quantiles(norm),
            "entropy_nats_mean": float(allrows.mean()),
            "entropy_norm_per_head": {str(h): float(torch.cat(v).mean() / scale) for h, v in sorted(per_head.items())},
            "entropy_norm_per_step": {str(st): float(torch.cat(v).mean() / scale) for st, v in sorted(per_step.items())},
            "rows": int(allrows.numel()),
        }
        for target, rules in (knobs or {}).items():
            sig: dict[str, float] = {}
            if "topk" in rules:
                masses = torch.cat([(s * mask_from_scores(s, topk=rules["topk"][0], topp=0.0)).sum(-1).flatten() for _, _, s in items])
                sig["topk"] = rules["topk"][0]
                sig["topk_mass_mean"] = float(masses.mean())
                sig["topk_mass_p10"] = _quantiles(masses, (0.1,))[0]
            if "topp" in rules:
                counts = torch.cat([mask_from_scores(s, topk=0.0, topp=rules["topp"][1]).sum(-1).flatten() for _, _, s in items]).float()
                sig["topp"] = rules["topp"][1]
                sig["topp_blocks_mean"] = float(counts.mean())
                sig["topp_blocks_p90"] = _quantiles(counts, (0.9,))[0]
                sig["topp_single_block_rows"] = float((counts <= 1).float().mean())
            rec[f"at_{target:g}"] = sig
        layers[str(layer)] = rec
    return {"tq": tq, "tk": tk, "layers": layers}


def _apply(pipe: Any, config: SpargeConfig):
    from sparge.integrations.diffusers import apply

    return apply(pipe, config, collect_stats=True)


Picks = dict[float, dict[str, Candidate]]


def choose_knobs(data: CalibrationData, settings: EvalSettings, *, log: Log | None = None) -> tuple[Picks, list[dict[str, Any]]]:
    """Knobs of each rule at each target sparsity, found *at the same sparsity* by `search_target`.

    Top-k alone and Top-p alone are bisected to the target; the hybrid is the lowest-attention-error hit
    among the hybrid candidates (k a fraction of Top-k's k, p bisected), else the closest one.

    Returns:
        ``(picks, errors)``: ``{target: {rule: Candidate}}`` and one ``{"target", "error"}`` row per
        unreachable target.
    """
    picks: Picks = {}
    errors: list[dict[str, Any]] = []
    for target in settings.targets:
        try:
            res = search_target(data, target, tolerance=settings.tolerance)
        except UnreachableTargetError as e:
            errors.append({"target": target, "error": str(e)})
            if log:
                log(f"[knobs] target {target:g}: {e}")
            continue
        hybrids = [c for c in res.candidates if c.family == "hybrid"]
        picks[target] = {
            "hybrid": res.best_of("hybrid") or min(hybrids, key=lambda c: abs(c.sparsity - target)),
            "topk": next(c for c in res.candidates if c.family == "topk"),
            "topp": next(c for c in res.candidates if c.family == "topp"),
        }
        if log:
            log(f"[knobs] target {target:g}: " + ", ".join(
                f"{r} k={c.topk:.4g} p={c.topp:.4g} ({c.sparsity:.4f}, attn err {c.error if c.error is not None else float('nan'):.4f})"
                for r, c in picks[target].items()))
    return picks, errors


def sparse_sweep(
    pipe: Any,
    picks: Picks,
    scenes: list[Scene],
    geometry: Geometry,
    dense: dict[str, Any],
    settings: EvalSettings,
    *,
    log: Log | None = None,
    deadline: float | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Training-free sparse sampling: one full sampling run per (target, rule) with the picked knobs.

    Args:
        pipe: the pipeline (dense attention installed).
        picks: knobs from `choose_knobs`.
        scenes: held-out scenes to sample.
        geometry: latent size.
        dense: ``{"latents", "frames", "rgb", "seconds"}`` of the dense run (same captions, seed and steps).
        settings: evaluation settings.
        log: progress lines.
        deadline: a ``time.perf_counter()`` value; a run that would likely end after it (its estimate is
            the dense run's time) is skipped and recorded as ``{"skipped": ...}``.
        on_row: called with every finished row (for incremental result files).

    Returns:
        One row per (target, rule), in the order of ``settings.targets`` and `RULES`.
    """
    captions = [s.caption for s in scenes]
    rows: list[dict[str, Any]] = []
    for target, chosen in picks.items():
        for rule in RULES:
            c = chosen[rule]
            base = {"target": target, "rule": rule, "topk": c.topk, "topp": c.topp, "calibration_sparsity": c.sparsity,
                    "hit_target": c.hit, "attention_rel_l2_calibration": c.error}
            if deadline is not None and time.perf_counter() + 1.2 * dense.get("seconds", 0.0) > deadline:
                row = {**base, "skipped": "time budget exhausted before this run"}
                rows.append(row)
                if on_row:
                    on_row(row)
                if log:
                    log(f"[sparse] target {target:g} {rule}: skipped (time budget)")
                continue
            cfg = SpargeConfig(topk=c.topk, topp=c.topp, block_q=settings.block_q, block_k=settings.block_k, backend=settings.backend)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            with _apply(pipe, cfg) as sa:
                lat = sample_latents(pipe, captions, geometry, steps=settings.steps, guidance=settings.guidance,
                                     seed=settings.seed, batch_size=settings.batch_size)
                measured = sa.mean_sparsity()
            seconds = time.perf_counter() - t0
            per_sample = [relative_l2(lat[i], dense["latents"][i]) for i in range(lat.shape[0])]
            frames = decode_frames(pipe, lat[: settings.decode_samples])
            row = {
                **base,
                "measured_sparsity": measured,
                "latent_rel_l2": relative_l2(lat, dense["latents"]),
                "latent_rel_l2_per_sample_mean": sum(per_sample) / len(per_sample),
                "latent_rel_l2_per_sample_max": max(per_sample),
                "psnr_vae_frames_db": psnr(frames, dense["frames"], peak=255.0),
                "psnr_rgb_preview_db": psnr(latents_to_rgb(lat, geometry), dense["rgb"], peak=1.0),
                "caption_following": read_back(lat, scenes, geometry),
                "seconds": round(seconds, 2),
            }
            rows.append(row)
            if on_row:
                on_row(row)
            if log:
                log(f"[sparse] target {target:g} {rule:6s} k={c.topk:.4g} p={c.topp:.4g} sparsity {measured:.4f}  "
                    f"latent rel-L2 {row['latent_rel_l2']:.4f}  PSNR {row['psnr_vae_frames_db']:.2f} dB  "
                    f"pos-acc {row['caption_following']['position_accuracy']:.3f}  ({seconds:.1f}s)")
    return rows


def evaluate(pipe: Any, geometry: Geometry, settings: EvalSettings, *, log: Log | None = print,
             shift: float = 3.0, tensors: dict[str, Any] | None = None, deadline: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every section (see the module docstring) and return the results as a JSON-able dict.

    Order: validation, dense sampling, attention capture, knob search, attention report, sparse runs
    (the long part last, so a time limit cuts the fewest results). A section that fails records
    ``{"error": "..."}`` (and the list ``errors`` names it) so the other sections still report; with
    ``SPARGE_DEBUG=1`` the first failure is raised instead.

    Args:
        pipe: a loaded test-bed `WanPipeline` on its device (the transformer in the dtype to evaluate).
        geometry: latent size the model was trained on (``testbed.json``).
        settings: how much to evaluate.
        log: progress lines (None: silent).
        shift: the flow shift the model was trained with.
        tensors: if given, receives ``scenes`` and ``dense_latents`` (``[N, 16, T, H, W]``) for previews.
        deadline: ``time.perf_counter()`` value after which no new sparse sampling run starts.
        on_update: called with the (partial) result dict after every section and every sparse run.
    """
    pipe.set_progress_bar_config(disable=True)
    device = _device_of(pipe)
    out: dict[str, Any] = {"settings": {**asdict(settings), "targets": list(settings.targets)},
                           "geometry": {**asdict(geometry), "tokens": geometry.tokens, **geometry.pipeline_kwargs()},
                           "errors": []}
    debug = os.environ.get("SPARGE_DEBUG") == "1"

    def update() -> None:
        if on_update is not None:
            on_update(out)

    def section(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # recorded, reported, and the run exits non-zero in the caller
            if debug:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            out[name] = {"error": f"{type(e).__name__}: {first}"}
            out["errors"].append(name)
            if log:
                log(f"[{name}] FAILED: {type(e).__name__}: {first}")
            update()
            return None
        if log:
            log(f"[{name}] done in {time.perf_counter() - t0:.1f}s")
        return value

    out["validation"] = section("validation", lambda: {
        split: validation_loss(pipe, geometry, n=settings.val_clips, seed=settings.seed, split=split,
                               batch_size=settings.batch_size, shift=shift)
        for split in ("heldout", "train")})
    update()
    scenes = sample_scenes(settings.n_captions, seed=settings.seed, split="heldout")
    out["captions"] = [s.caption for s in scenes]

    dense: dict[str, Any] = {}

    def run_dense() -> dict[str, Any]:
        t0 = time.perf_counter()
        lat = sample_latents(pipe, out["captions"], geometry, steps=settings.steps, guidance=settings.guidance,
                             seed=settings.seed, batch_size=settings.batch_size)
        seconds = time.perf_counter() - t0
        dense.update(latents=lat, frames=decode_frames(pipe, lat[: settings.decode_samples]), rgb=latents_to_rgb(lat, geometry),
                     seconds=seconds)
        res = caption_following(lat, scenes, geometry)
        res["seconds"] = round(seconds, 2)
        if log:
            log(f"[dense] position accuracy {res['samples']['position_accuracy']:.3f} "
                f"(ground truth {res['ground_truth_render']['position_accuracy']:.3f}, "
                f"chance {res['chance_other_captions']['position_accuracy']:.3f}); "
                f"colour recall {res['samples']['colour_recall']:.3f}, false colours {res['samples']['colour_false_positive']:.3f}; "
                f"direction {res['samples']['direction_accuracy']:.3f}")
        return res

    out["caption_following"] = section("caption_following", run_dense)
    if tensors is not None:
        tensors.update(scenes=scenes, dense_latents=dense.get("latents"))
    update()

    store = CaptureStore()
    calib = [s.caption for s in sample_scenes(settings.calib_captions, seed=settings.seed + 104729, split="train")]
    out["calibration_captions"] = calib

    def capture() -> CalibrationData:
        capture_attention(pipe, calib, store=store, num_inference_steps=settings.steps,
                          capture_steps=spread(settings.calib_steps, settings.steps), guidance_scale=settings.guidance,
                          negative_prompt="", seed=settings.seed, **geometry.pipeline_kwargs())
        return CalibrationData(store, block_q=settings.block_q, block_k=settings.block_k, device=device,
                               backend=settings.backend)  # type: ignore[arg-type]

    try:
        data = section("capture", capture)
        chosen = section("knobs", lambda: choose_knobs(data, settings, log=log)) if data is not None else None
        picks, unreachable = chosen if chosen is not None else ({}, [])
        if chosen is not None:
            out["knobs"] = {f"{t:g}": {r: c.to_dict() for r, c in rules.items()} for t, rules in picks.items()}
        if data is not None:
            knobs = {t: {r: (c.topk, c.topp) for r, c in rules.items()} for t, rules in picks.items()}
            out["attention"] = section("attention", lambda: attention_report(
                store, block_q=settings.block_q, block_k=settings.block_k, device=device, knobs=knobs))
            update()
    finally:
        store.close()
    data = None  # frees the prepared scores before the long sampling runs

    if chosen is not None and dense:
        done: list[dict[str, Any]] = list(unreachable)
        out["sparse"] = done

        def on_row(row: dict[str, Any]) -> None:
            done.append(row)
            out["sparse_summary"] = _summary(done)
            update()

        if section("sparse", lambda: sparse_sweep(pipe, picks, scenes, geometry, dense, settings, log=log,
                                                  deadline=deadline, on_row=on_row)) is None:
            out["sparse_rows_before_failure"] = done  # section() replaced out["sparse"] by the error
        out["sparse_summary"] = _summary(done)
    else:
        out["sparse"] = {"error": "skipped: the dense run, the capture or the knob search failed"}
        out["errors"].append("sparse")
    update()
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{target: {rule: latent_rel_l2}}`` and the rules with the lowest error at each target (ties: several)."""
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        if "latent_rel_l2" in r:
            table.setdefault(f"{r['target']:g}", {})[r["rule"]] = r["latent_rel_l2"]
    best = {t: min(v.values()) for t, v in table.items() if v}
    # a list: at tiny sizes the rules can pick identical masks, and a tie must not read as a win
    return {"latent_rel_l2": table, "most_robust": {t: [r for r, e in table[t].items() if e <= best[t] * (1 + 1e-6)] for t in best}}
