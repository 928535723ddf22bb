"""`sparge generate`: text-to-video with a Wan2.1 diffusers pipeline and sparse self-attention, mp4 out.

prompt -> preset (model, resolution, level k/p) -> WanPipeline.from_pretrained -> apply(pipe, config)
-> denoising loop (progress bar) -> VAE decode -> mp4 + JSON sidecar (same stem, ``.json``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import typer

from sparge_cli.common import (
    DEFAULT_PRESET,
    UsageError,
    atomic_path,
    check_writable_target,
    cli_errors,
    console,
    default_geometry,
    err_console,
    parse_device,
    parse_dtype,
    print_json,
    quiet_hf,
    write_json_atomic,
)

WAN_FPS = 16

EXAMPLES = """
Examples:

  sparge generate --prompt "a corgi surfing a wave at sunset" --model ./Wan2.1-T2V-1.3B-Diffusers --out corgi.mp4

  sparge generate --prompt "..." --model ./Wan2.1-T2V-1.3B-Diffusers --dense --out corgi-dense.mp4   # baseline

  sparge generate --prompt "..." --model ./Wan2.1-T2V-14B-Diffusers --height 720 --width 1280 --cpu-offload

  sparge generate --prompt "..." --model ./my-wan --topk 0.05 --topp 0.3 --checkpoint student.safetensors

Get a model with `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir Wan2.1-T2V-1.3B-Diffusers`.
"""


def _check_fraction(name: str, value: Optional[float], *, open_interval: bool = False) -> None:
    if value is None:
        return
    ok = (0.0 < value < 1.0) if open_interval else (0.0 <= value <= 1.0)
    if not ok or math.isnan(value):
        raise UsageError(f"{name} {value} is out of range: use a number in {'(0, 1)' if open_interval else '[0, 1]'}")


def _check_geometry(height: int, width: int, frames: int) -> None:
    for name, v in (("--height", height), ("--width", width)):
        if v <= 0 or v % 16:
            raise UsageError(f"{name} {v} is not allowed: use a positive multiple of 16 (e.g. 480 x 832 or 720 x 1280)")
    if frames < 1 or (frames - 1) % 4:
        lo = max(1, (frames - 1) // 4 * 4 + 1)
        raise UsageError(f"--frames {frames} is not allowed: use 4n+1 (e.g. 81, or {lo} / {lo + 4})")


def _resolve_device(device: Optional[str], cpu_offload: bool):
    import torch

    if device is None:
        if not torch.cuda.is_available():
            raise UsageError("no CUDA GPU is visible: pass --device cpu to generate on the CPU (slow), or run on a GPU machine")
        device = "cuda"
    dev = parse_device(device, need_cuda=cpu_offload)
    return dev


def _versions() -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    import sparge

    v: dict[str, Any] = {
        "sparge": sparge.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "cuda": torch.version.cuda,
    }
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = None
    v["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return v


def decode_latents(pipe: Any, latents: Any) -> Any:
    """Latents ``[B, 16, F', H/8, W/8]`` -> video ``[B, F, H, W, 3]`` float32 numpy in [0, 1], as WanPipeline decodes."""
    import torch

    vae = pipe.vae
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        dev = get_module_execution_device(vae)
    except ImportError:  # pragma: no cover - older diffusers
        dev = pipe._execution_device
    latents = latents.to(dev, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")


def write_mp4(path: Path, frames: Any, fps: int = WAN_FPS) -> None:
    """Write ``frames`` ``[F, H, W, 3]`` (float in [0, 1] or uint8) to an H.264 mp4, atomically."""
    import imageio.v3 as iio
    import numpy as np

    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, arr, plugin="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=16)


def run_generate(
    *,
    prompt: str,
    negative_prompt: str,
    model: Optional[str],
    preset: Optional[str],
    sparsity: Optional[float],
    topk: Optional[float],
    topp: Optional[float],
    dense: bool,
    checkpoint: Optional[Path],
    steps: int,
    guidance_scale: float,
    seed: int,
    frames: Optional[int],
    height: Optional[int],
    width: Optional[int],
    dtype: str,
    device: Optional[str],
    cpu_offload: bool,
    out: Path,
    overwrite: bool,
    as_json: bool,
    backend: str = "auto",
) -> dict[str, Any]:
    """Validate everything cheap first, then load, generate, write the mp4 and the sidecar; return the summary."""
    from sparge.presets import resolve_preset

    # -- options that need no model --------------------------------------------------------------
    if not prompt.strip():
        raise UsageError("--prompt is empty: describe the video to generate")
    if steps < 1:
        raise UsageError(f"--steps {steps} is out of range: use an integer >= 1 (Wan2.1 uses 50)")
    if guidance_scale < 0 or math.isnan(guidance_scale):
        raise UsageError(f"--guidance-scale {guidance_scale} is out of range: use a number >= 0 (Wan2.1 uses 5.0; <= 1 disables CFG)")
    _check_fraction("--sparsity", sparsity, open_interval=True)
    _check_fraction("--topk", topk)
    _check_fraction("--topp", topp)
    if (topk is None) != (topp is None):
        raise UsageError("--topk and --topp go together: give both (0 disables a rule), or neither to use the preset")
    if topk == 0 and topp == 0:
        raise UsageError("--topk 0 --topp 0 would keep no block: make at least one > 0")
    if dense and (sparsity is not None or topk is not None):
        raise UsageError("--dense runs the dense baseline: drop --sparsity/--topk/--topp, or drop --dense")
    if topk is not None and sparsity is not None:
        raise UsageError("--sparsity picks a preset level and --topk/--topp set the knobs directly: give one of them")
    try:
        torch_dtype = None if dtype == "auto" else parse_dtype(dtype)
    except UsageError:
        raise UsageError(f"--dtype {dtype!r} is not known: use auto, bf16, fp16 or fp32") from None
    if backend not in ("auto", "triton", "torch"):
        raise UsageError(f"--backend {backend!r} is not known: use auto, triton or torch")
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"--out {out} must end in .mp4")
    sidecar = out.with_suffix(".json")
    check_writable_target(out, overwrite, "output video")
    check_writable_target(sidecar, overwrite, "output sidecar")
    if checkpoint is not None and not checkpoint.is_file():
        raise UsageError(f"--checkpoint {checkpoint} does not exist: pass a .safetensors file written by `sparge finetune`")

    # -- preset and geometry ------------------------------------------------------------------------
    pr, model_id = resolve_preset(preset, model, height, width, default=DEFAULT_PRESET)
    if pr is None and not dense and topk is None:
        raise UsageError(
            f"no shipped preset for model {model_id}"
            + (f" at {width}x{height}" if height or width else "")
            + ": pass --preset FILE, or --topk/--topp, or --dense (shipped presets: "
            + ", ".join(_shipped())
            + ")"
        )
    height, width, frames = default_geometry(pr, model_id, height, width, frames)
    _check_geometry(height, width, frames)

    from sparge import SpargeConfig

    level_target: float | None = None
    config: SpargeConfig | None = None
    if not dense:
        if topk is not None:
            config = SpargeConfig(
                topk=topk, topp=topp,  # type: ignore[arg-type]
                block_q=pr.block_q if pr else 128, block_k=pr.block_k if pr else 64, dense_steps=pr.dense_steps if pr else 0,
                backend=backend,  # type: ignore[arg-type]
            )
        else:
            assert pr is not None
            level_target = sparsity if sparsity is not None else pr.default_sparsity()
            config = pr.to_config(level_target, backend=backend)
    dev = _resolve_device(device, cpu_offload)
    if torch_dtype is None:  # bf16 matrix products on a CPU run ~4x slower than fp32 (2-core CI machine)
        import torch

        torch_dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16

    # -- load -------------------------------------------------------------------------------------------
    from sparge.integrations.diffusers import apply, load_wan_pipeline

    quiet_hf()
    out_console = err_console if as_json else console
    t_load = time.perf_counter()
    with out_console.status(f"loading {model_id} ({dtype}) ..."):
        pipe = load_wan_pipeline(model_id, dtype=torch_dtype, device=dev, cpu_offload=cpu_offload)
        ckpt_meta = None
        if checkpoint is not None:
            from sparge.checkpoint import load_transformer_weights

            ckpt_meta = load_transformer_weights(checkpoint, pipe.transformer)
    load_s = time.perf_counter() - t_load

    handle = None
    if config is not None:
        handle = apply(pipe, config, collect_stats=True, layers=pr.layers() if pr else None, step_tracking="manual")
    try:
        summary = _generate(
            pipe, handle, out_console, prompt=prompt, negative_prompt=negative_prompt, steps=steps,
            guidance_scale=guidance_scale, seed=seed, frames=frames, height=height, width=width, device=dev,
        )
    finally:
        if handle is not None:
            handle.remove()
    video, timings = summary
    timings["load_s"] = load_s

    stats = handle.stats() if handle is not None else {}
    measured = (sum(stats.values()) / len(stats)) if stats else (0.0 if config is None else None)
    per_layer: dict[str, float] = {}
    for (layer, _step), v in stats.items():
        per_layer.setdefault(str(layer), 0.0)
        per_layer[str(layer)] += v
    n_steps_seen = len({s for (_l, s) in stats}) or 1
    per_layer = {k: v / n_steps_seen for k, v in per_layer.items()}

    write_mp4(out, video[0])
    result: dict[str, Any] = {
        "output": str(out),
        "sidecar": str(sidecar),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "model": model_id,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "checkpoint_metadata": ckpt_meta,
        "preset": (pr.name if pr is not None else None),
        "preset_path": (str(pr.path) if pr is not None else None),
        "dense": config is None,
        "sparsity_level": level_target,
        "topk": config.topk if config else None,
        "topp": config.topp if config else None,
        "block_q": config.block_q if config else None,
        "block_k": config.block_k if config else None,
        "dense_steps": config.dense_steps if config else None,
        "backend": config.backend if config else None,
        "measured_sparsity": measured,
        "measured_sparsity_per_layer": per_layer,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "frames": frames,
        "height": height,
        "width": width,
        "fps": WAN_FPS,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": str(dev),
        "cpu_offload": cpu_offload,
        "timings": timings,
        "versions": _versions(),
    }
    write_json_atomic(sidecar, result)
    return result


def _shipped() -> list[str]:
    from sparge.presets import list_presets

    return list_presets()


def _generate(pipe, handle, out_console, *, prompt, negative_prompt, steps, guidance_scale, seed, frames, height, width, device):
    """Encode the prompt, denoise (progress bar, per-step times), decode; returns (video, timings)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    generator = torch.Generator(device="cpu").manual_seed(seed)  # same noise for a seed on every device
    t0 = time.perf_counter()
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=guidance_scale > 1.0,
            max_sequence_length=512, device=pipe._execution_device,
        )
    sync()
    t_text = time.perf_counter()

    step_ends: list[float] = []
    progress = Progress(
        TextColumn("[bold]denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=out_console, transient=False,
    )

    def on_step_end(p, i, t, kwargs):
        sync()  # one sync per step (seconds each on a GPU) so that the per-step times are real
        step_ends.append(time.perf_counter())
        if handle is not None:
            handle.step_callback(p, i, t, kwargs)
        progress.update(task, advance=1)
        return {}

    with progress:
        task = progress.add_task("denoise", total=steps)
        t_den = time.perf_counter()
        latents = pipe(
            prompt_embeds=pe, negative_prompt_embeds=npe, height=height, width=width, num_frames=frames,
            num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator, output_type="latent",
            callback_on_step_end=on_step_end,
        ).frames
    sync()
    t_dec0 = time.perf_counter()
    with torch.no_grad():
        video = decode_latents(pipe, latents)
    sync()
    t_end = time.perf_counter()
    pipe.maybe_free_model_hooks()
    per_step = [(b - a) * 1e3 for a, b in zip([t_den, *step_ends[:-1]], step_ends)]
    timings = {
        "text_encoder_s": t_text - t0,
        "denoise_s": (step_ends[-1] if step_ends else t_dec0) - t_den,
        "s_per_step": ((step_ends[-1] - t_den) / len(step_ends)) if step_ends else None,
        "ms_per_step_all": per_step,
        "vae_decode_s": t_end - t_dec0,
        "total_s": t_end - t0,
    }
    return video, timings


def _print_summary(r: dict[str, Any]) -> None:
    t = r["timings"]
    if r["dense"]:
        mode = "dense baseline"
    else:
        ms = r["measured_sparsity"]
        mode = f"sparse topk={r['topk']:g} topp={r['topp']:g}" + (f" (preset {r['preset']} level {r['sparsity_level']:g})" if r["sparsity_level"] else "")
        mode += f", measured sparsity {ms:.3f}" if ms is not None else ""
    console.print(f"[bold green]done[/] {mode}")
    console.print(
        f"  wall {t['total_s']:.2f} s (text encoder {t['text_encoder_s']:.2f} s, denoise {t['denoise_s']:.2f} s = "
        f"{t['s_per_step']:.3f} s/step x {r['steps']}, VAE decode {t['vae_decode_s']:.2f} s; load {t['load_s']:.1f} s)"
    )
    console.print(f"  video {r['output']} ({r['frames']} frames {r['width']}x{r['height']} @ {r['fps']} fps), sidecar {r['sidecar']}")


def register(app: typer.Typer) -> None:
    """Add the ``generate`` command to the sparge Typer app."""

    @app.command("generate", help="Text-to-video with Wan2.1 and sparse self-attention; writes an mp4 and a JSON sidecar." + EXAMPLES)
    def generate(
        prompt: str = typer.Option(..., "--prompt", help="What the video shows."),
        negative_prompt: str = typer.Option("", "--negative-prompt", help="What to steer away from (CFG)."),
        model: Optional[str] = typer.Option(None, "--model", help="Local diffusers-format Wan2.1 directory or hub id (default: the preset's model)."),
        preset: Optional[str] = typer.Option(None, "--preset", help=f"Preset name or YAML file (default: chosen from --model and --height/--width; {DEFAULT_PRESET} without --model)."),
        sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Target sparsity level of the preset, e.g. 0.95 (default: the preset's highest)."),
        topk: Optional[float] = typer.Option(None, "--topk", help="Explicit Top-k fraction (with --topp), overriding the preset level; for models without a preset."),
        topp: Optional[float] = typer.Option(None, "--topp", help="Explicit Top-p mass (with --topk)."),
        dense: bool = typer.Option(False, "--dense", help="Dense baseline: no sparse attention installed."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Fine-tuned transformer weights from `sparge finetune` (.safetensors)."),
        steps: int = typer.Option(50, "--steps", help="Denoising steps."),
        guidance_scale: float = typer.Option(5.0, "--guidance-scale", help="Classifier-free guidance scale (<= 1 disables CFG)."),
        seed: int = typer.Option(0, "--seed", help="Random seed of the initial noise."),
        frames: Optional[int] = typer.Option(None, "--frames", help="Frames, 4n+1 (default: the preset's, else a test-bed model's own, else 81)."),
        height: Optional[int] = typer.Option(None, "--height", help="Height in pixels, multiple of 16 (default: the preset's, else a test-bed model's own, else 480)."),
        width: Optional[int] = typer.Option(None, "--width", help="Width in pixels, multiple of 16 (default: the preset's, else a test-bed model's own, else 832)."),
        dtype: str = typer.Option("auto", "--dtype", help="auto, bf16, fp16 or fp32 for the transformer and text encoder (auto: bf16 on a GPU, fp32 on the CPU; the VAE runs in fp32)."),
        device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda; the CPU must be asked for)."),
        cpu_offload: bool = typer.Option(False, "--cpu-offload", help="Keep models on the CPU and move each to the GPU when used (less GPU memory)."),
        out: Path = typer.Option(Path("video.mp4"), "--out", help="Output .mp4; the sidecar is the same path with .json."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output video and sidecar."),
        backend: str = typer.Option("auto", "--backend", help="Sparse attention: auto (Triton kernel where it runs, else exact PyTorch with a warning), triton (error if it cannot run), torch."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary (the sidecar's content) as JSON on stdout."),
    ) -> None:
        with cli_errors():
            result = run_generate(
                prompt=prompt, negative_prompt=negative_prompt, model=model, preset=preset, sparsity=sparsity,
                topk=topk, topp=topp, dense=dense, checkpoint=checkpoint, steps=steps, guidance_scale=guidance_scale,
                seed=seed, frames=frames, height=height, width=width, dtype=dtype, device=device,
                cpu_offload=cpu_offload, out=out, overwrite=overwrite, as_json=as_json, backend=backend,
            )
            if as_json:
                print_json(result)
            else:
                _print_summary(result)
