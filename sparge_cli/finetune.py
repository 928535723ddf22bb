"""`sparge finetune`: velocity distillation of a Wan2.1 transformer to its sparse attention; `sparge finetune prepare`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import typer

from sparge_cli.common import (
    UsageError,
    cli_errors,
    console,
    err_console,
    parse_device,
    parse_dtype,
    print_json,
)

CACHE_SUBDIR = "latent-cache"

EXAMPLES = """
Examples:

  # encode the videos once (VAE + text encoder), then train 500 steps at 95% sparsity
  sparge finetune prepare --preset wan2.1-t2v-1.3b-480p --data clips/ --cache latents/
  sparge finetune --preset wan2.1-t2v-1.3b-480p --sparsity 0.95 --data latents/ --out runs/s95

  # both in one go (the cache goes to OUT/latent-cache), LoRA, continue after an interruption
  sparge finetune --preset wan2.1-t2v-1.3b-480p --data clips.jsonl --prepare --out runs/lora --train lora
  sparge finetune --preset wan2.1-t2v-1.3b-480p --data latents/ --out runs/lora --train lora --resume

  # 8 GPUs (FSDP2), 14B at 720p with the paper's batch of 16
  torchrun --standalone --nproc_per_node 8 -m sparge_cli.app finetune --preset wan2.1-t2v-14b-720p \\
      --data latents-720p/ --out runs/14b --batch-size 16 --grad-accum 2 --gradient-checkpointing
"""

PREPARE_EXAMPLES = """
Examples:

  sparge finetune prepare --preset wan2.1-t2v-1.3b-480p --data clips/ --cache latents/
  sparge finetune prepare --model ./Wan2.1-T2V-1.3B-Diffusers --data clips.jsonl --cache latents/ --frames 33 --height 480 --width 832

A data folder holds videos (.mp4 .mov .mkv .webm .avi .gif) with a same-stem .txt caption each; a JSONL
manifest has one {"video": "path", "caption": "..."} per line (paths relative to the manifest).
"""


def _resolve_model(preset_name: str, model: str | None) -> tuple[Any, str]:
    from sparge.presets import load_preset

    preset = load_preset(preset_name)
    return preset, model or preset.model


def _load_transformer(model: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """The pipeline's transformer and its scheduler config, without the VAE and text encoder."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    from sparge.integrations.diffusers import check_wan_checkpoint

    local = Path(model).expanduser()
    src = str(check_wan_checkpoint(local)) if local.exists() or model.startswith((".", "/", "~")) else model
    try:
        transformer = WanTransformer3DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dtype)
        scheduler_config = dict(UniPCMultistepScheduler.load_config(src, subfolder="scheduler"))
    except Exception as e:  # hub errors and damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"could not load the Wan transformer from {model!r} ({type(e).__name__}: {first[:200]})") from None
    return transformer, scheduler_config


def _prepare(preset_name: str, model: str | None, data: Path, cache: Path, *, frames: int | None, height: int | None,
             width: int | None, max_sequence_length: int, dtype: str, device: str, overwrite: bool, quiet: bool) -> dict[str, Any]:
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from sparge.data import prepare_cache, scan_dataset
    from sparge.integrations.diffusers import load_wan_pipeline

    preset, model_id = _resolve_model(preset_name, model)
    frames, height, width = frames or preset.frames, height or preset.height, width or preset.width
    if max_sequence_length < 1:
        raise UsageError(f"--max-sequence-length {max_sequence_length} is out of range: use an integer >= 1 (Wan uses 512)")
    if cache.exists() and not overwrite:
        raise UsageError(f"--cache {cache} already exists: pass --overwrite to rebuild it, or choose another folder")
    samples = scan_dataset(data)
    dev, dt = parse_device(device), parse_dtype(dtype)
    pipe = load_wan_pipeline(model_id, dtype=dt, device=None)
    pipe.transformer = None  # not needed for encoding; freed before training
    pipe.text_encoder.to(dev)
    pipe.vae.to(dev)
    with Progress(TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err_console, disable=quiet, transient=True) as bar:
        task = bar.add_task("encode", total=len(samples))
        out = prepare_cache(pipe, samples, cache, num_frames=frames, height=height, width=width,
                            max_sequence_length=max_sequence_length, overwrite=overwrite,
                            metadata={"model": model_id, "preset": preset.name},
                            on_sample=lambda i: bar.update(task, completed=i + 1))
    del pipe
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"cache": str(out), "samples": len(samples), "frames": frames, "height": height, "width": width,
            "model": model_id}


def register(app: typer.Typer) -> None:
    ft = typer.Typer(invoke_without_command=True, no_args_is_help=False, add_completion=False,
                     help="Fine-tune the sparse model by velocity distillation (dense teacher -> sparse student).\n" + EXAMPLES)

    @ft.callback(invoke_without_command=True)
    def finetune(
        ctx: typer.Context,
        preset: str = typer.Option("wan2.1-t2v-1.3b-480p", "--preset", help="Preset name or YAML file: model, resolution, block sizes, sparsity levels."),
        model: str = typer.Option(None, "--model", help="Local diffusers Wan2.1 directory or hub id (default: the preset's)."),
        sparsity: float = typer.Option(None, "--sparsity", help="Preset sparsity level to train for (default: the preset's highest)."),
        data: Path = typer.Option(None, "--data", help="Latent cache from `sparge finetune prepare`; or, with --prepare, a video folder / JSONL manifest."),
        out: Path = typer.Option(None, "--out", help="Run folder: checkpoints, log.jsonl, student.safetensors."),
        prepare: bool = typer.Option(False, "--prepare", help=f"Encode --data (videos) into OUT/{CACHE_SUBDIR} first."),
        steps: int = typer.Option(500, "--steps", help="Optimizer steps (the paper: 500)."),
        batch_size: int = typer.Option(64, "--batch-size", help="Global batch: all GPUs x accumulation (paper: 64 for 1.3B 480p, 16 for 14B 720p)."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-steps per optimizer step (micro-batch = batch / (GPUs x accum))."),
        lr: float = typer.Option(1e-5, "--lr", help="AdamW learning rate (constant after warm-up)."),
        warmup: int = typer.Option(0, "--warmup", help="Linear learning-rate warm-up steps."),
        weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
        max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping norm (0 = off)."),
        train: str = typer.Option("all", "--train", help="What to train: all, attention (self-attention weights) or lora (peft adapters)."),
        lora_rank: int = typer.Option(64, "--lora-rank", help="LoRA rank (alpha = rank) with --train lora."),
        loss: str = typer.Option("distill", "--loss", help="distill (student vs dense teacher velocity), diffusion (flow-matching target) or mix."),
        shift: float = typer.Option(None, "--shift", help="Flow shift for timestep sampling (default: the pipeline scheduler's)."),
        seed: int = typer.Option(0, "--seed", help="Seed of data order, noise and timesteps."),
        save_every: int = typer.Option(100, "--save-every", help="Checkpoint every N steps (and at the end)."),
        keep: int = typer.Option(2, "--keep", help="Checkpoints kept (the newest)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a non-empty --out (deletes its checkpoints, log and student)."),
        gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute block activations in the backward pass (less memory)."),
        dtype: str = typer.Option("bf16", "--dtype", help="Compute dtype: bf16, fp16 or fp32 (trained weights stay fp32)."),
        device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda when visible; under torchrun cuda:LOCAL_RANK)."),
        frames: int = typer.Option(None, "--frames", help="With --prepare: frames per clip (4k+1; default: the preset's)."),
        height: int = typer.Option(None, "--height", help="With --prepare: height (default: the preset's)."),
        width: int = typer.Option(None, "--width", help="With --prepare: width (default: the preset's)."),
        max_sequence_length: int = typer.Option(512, "--max-sequence-length", help="With --prepare: text tokens (Wan: 512)."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary (final loss, steps, paths, timings)."),
    ) -> None:
        if ctx.invoked_subcommand is not None:
            return
        with cli_errors():
            import torch

            from sparge.data import LatentCache, is_cache
            from sparge.distill import (
                FinetuneConfig,
                Finetuner,
                launched_by_torchrun,
                prepare_out_dir,
                scheduler_shift,
            )

            if data is None or out is None:
                raise UsageError("--data and --out are required: e.g. sparge finetune --data latents/ --out runs/s95 (see --help)")
            cfg = FinetuneConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
                                 weight_decay=weight_decay, max_grad_norm=max_grad_norm, train=train, lora_rank=lora_rank,  # type: ignore[arg-type]
                                 loss=loss, seed=seed, save_every=save_every, keep=keep,  # type: ignore[arg-type]
                                 gradient_checkpointing=gradient_checkpointing, shift=shift)
            world = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
            cfg.micro_batch(world)
            dt = parse_dtype(dtype)
            dev = parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            preset_obj, model_id = _resolve_model(preset, model)
            level = sparsity if sparsity is not None else preset_obj.default_sparsity()
            sparse = preset_obj.to_config(level)
            prepare_out_dir(out, resume=resume, overwrite=overwrite, keep_names=(CACHE_SUBDIR,))
            quiet = json_out or (launched_by_torchrun() and int(os.environ["RANK"]) != 0)

            cache_dir = data
            if prepare:
                if is_cache(data):
                    raise UsageError(f"--data {data} is already a latent cache: drop --prepare")
                cache_dir = out / CACHE_SUBDIR
                if is_cache(cache_dir) and not overwrite:
                    if not quiet:
                        err_console.print(f"[dim]reusing the latent cache {cache_dir} (--overwrite rebuilds it)[/]")
                else:
                    if launched_by_torchrun():
                        raise UsageError("--prepare runs in one process: run `sparge finetune prepare` first, then torchrun the training")
                    _prepare(preset, model, data, cache_dir, frames=frames, height=height, width=width,
                             max_sequence_length=max_sequence_length, dtype=dtype, device=str(dev), overwrite=overwrite, quiet=quiet)
            elif not is_cache(data):
                if not data.exists():
                    raise UsageError(f"--data {data} does not exist")
                raise UsageError(f"--data {data} is not a latent cache: encode it first with `sparge finetune prepare --data {data} "
                                 f"--cache CACHE` (then --data CACHE), or add --prepare")
            cache = LatentCache(cache_dir)

            transformer, sched_cfg = _load_transformer(model_id, dt)
            default_shift = shift if shift is not None else scheduler_shift(sched_cfg)
            meta = {"base_model": model_id, "preset": preset_obj.name, "sparsity": level, "topk": sparse.topk,
                    "topp": sparse.topp, "block_q": sparse.block_q, "block_k": sparse.block_k}
            trainer = Finetuner(transformer, sparse, cache, cfg, out, shift=default_shift, dtype=dt, device=dev,
                                sparse_layers=preset_obj.layers(), metadata=meta)
            records: list[Any] = []
            final = _train_with_progress(trainer, resume=resume, quiet=quiet, records=records)
            if trainer.dist.is_main:
                summary = {"student": str(final), "out": str(out), "steps": trainer.step, "world_size": trainer.dist.world_size,
                           "micro_batch": trainer.micro, "final_loss": records[-1].loss if records else None,
                           "sparsity": records[-1].extra.get("sparsity") if records else None,
                           "gpu_peak_gib": records[-1].extra.get("gpu_peak_gib") if records else None,
                           "elapsed_s": records[-1].elapsed_s if records else 0.0, "log": str(out / "log.jsonl"),
                           "config": {k: getattr(cfg, k) for k in ("steps", "batch_size", "grad_accum", "lr", "train", "loss", "seed")}}
                if json_out:
                    print_json(summary)
                else:
                    console.print(f"[green]done[/]: {trainer.step} steps, last loss {summary['final_loss']}, student weights in {final}")

    @ft.command("prepare", help="Encode a video folder or JSONL manifest into a latent cache (VAE + text encoder, once).\n" + PREPARE_EXAMPLES)
    def prepare_cmd(
        data: Path = typer.Option(..., "--data", help="Folder of videos with same-stem .txt captions, or a .jsonl manifest."),
        cache: Path = typer.Option(..., "--cache", help="Output folder of the latent cache (written atomically)."),
        preset: str = typer.Option("wan2.1-t2v-1.3b-480p", "--preset", help="Preset: model and default resolution."),
        model: str = typer.Option(None, "--model", help="Local diffusers Wan2.1 directory or hub id (default: the preset's)."),
        frames: int = typer.Option(None, "--frames", help="Frames per clip, 4k+1 (default: the preset's)."),
        height: int = typer.Option(None, "--height", help="Height in pixels, multiple of 16 (default: the preset's)."),
        width: int = typer.Option(None, "--width", help="Width in pixels, multiple of 16 (default: the preset's)."),
        max_sequence_length: int = typer.Option(512, "--max-sequence-length", help="Text tokens (Wan: 512)."),
        dtype: str = typer.Option("bf16", "--dtype", help="Text-encoder dtype: bf16, fp16 or fp32 (the VAE runs in fp32)."),
        device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda when visible)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild an existing --cache."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
    ) -> None:
        with cli_errors():
            import torch

            result = _prepare(preset, model, data, cache, frames=frames, height=height, width=width,
                              max_sequence_length=max_sequence_length, dtype=dtype,
                              device=device or ("cuda" if torch.cuda.is_available() else "cpu"), overwrite=overwrite, quiet=json_out)
            if json_out:
                print_json(result)
            else:
                console.print(f"[green]cached[/] {result['samples']} clips ({result['frames']} x {result['height']} x {result['width']}) in {result['cache']}")

    app.add_typer(ft, name="finetune")


def _train_with_progress(trainer: Any, *, resume: bool, quiet: bool, records: list[Any]) -> Path | None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} steps/s"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console, disable=quiet,
                  transient=True) as bar:
        task = bar.add_task("train", total=trainer.cfg.steps, loss="-", lr="-", speed="-")

        def on_step(rec: Any) -> None:
            records.append(rec)
            loss = f"{rec.loss:.4g}" if math.isfinite(rec.loss) else str(rec.loss)
            bar.update(task, completed=rec.step, loss=loss, lr=f"{rec.lr:.2e}", speed=f"{rec.steps_per_s:.2f}")

        return trainer.run(resume=resume, on_step=on_step)
