"""`sparge calibrate`: find the (topk, topp) that reach a target sparsity with the least attention error.

options -> preset (model, resolution, block sizes) -> destination checks (before any model work)
-> load the pipeline -> capture q/k/v of a few real denoising steps (`sparge.calibrate.capture_attention`)
-> search each target (`sparge.calibrate.search_target`, optional `search_per_layer`)
-> rich table -> write the levels into the preset YAML atomically (all targets in one replace) -> --json.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from collections.abc import Callable
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
)


EXAMPLES = """
Examples:

  sparge calibrate --model ./Wan2.1-T2V-1.3B-Diffusers --target 0.95 --overwrite    # re-measure the shipped 0.95 level

  sparge calibrate --model ./Wan2.1-T2V-1.3B-Diffusers --target 0.9 --target 0.97 --dry-run --json

  sparge calibrate --preset my-720p.yaml --target 0.95 --prompts prompts.txt --per-layer

  sparge calibrate --model ./my-wan --height 480 --width 832 --frames 81 --target 0.95 --out presets/my-wan-480p.yaml

Levels are written into the preset file (--preset FILE, or the shipped preset that matches --model), or into a
new file with --out; replacing an existing level needs --overwrite. `sparge generate --sparsity 0.95` uses it.
Memory: one sample is 4 x heads x tokens x head_dim x itemsize bytes (q, k, v, dense output); prompts x layers x
capture steps samples are kept, up to --max-memory-gb in RAM and the rest spilled to safetensors files; during the
search they also stay in GPU memory when they fit in 30% of the free memory (at most 16 GiB).
"""


# -- option parsing -------------------------------------------------------------------------------------


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``"all"``, a count ``"6"`` (spread evenly) or a list ``"0,10,20"`` -> block indices."""
    from sparge.calibrate import spread

    s = spec.strip().lower()
    if s == "all":
        return list(range(n_layers))
    try:
        if "," in s:
            idx = sorted({int(x) for x in s.split(",") if x.strip()})
        else:
            n = int(s)
            if n < 1:
                raise ValueError
            return spread(n, n_layers)
    except ValueError:
        raise UsageError(f"--layers {spec!r} is not understood: use 'all', a count such as 6, or block indices such as 0,10,20") from None
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad or not idx:
        raise UsageError(f"--layers {spec!r}: blocks {bad} do not exist, the model has blocks 0..{n_layers - 1}")
    return idx


def read_prompts(path: Optional[Path], count: int) -> list[str]:
    """Prompts from a text file (one a line, blank and '#' lines skipped) or the built-in set; the first ``count``."""
    from sparge.calibrate import DEFAULT_PROMPTS

    if count < 1:
        raise UsageError(f"--num-prompts {count} is out of range: use an integer >= 1")
    if path is None:
        prompts = list(DEFAULT_PROMPTS)
    else:
        if not path.is_file():
            raise UsageError(f"--prompts {path} does not exist: give a text file with one prompt per line")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise UsageError(f"--prompts {path} holds no prompt: write one prompt per line")
    return prompts[:count]


def _check_targets(targets: list[float]) -> list[float]:
    from sparge.calibrate import check_target

    if not targets:
        raise UsageError("--target is required: give the sparsity to reach, e.g. --target 0.95 (repeat for several)")
    out: list[float] = []
    for t in targets:
        try:
            t = check_target(t)
        except ValueError:
            raise UsageError(f"--target {t} is out of range: use a number strictly between 0 and 1 (e.g. 0.95 = 95% skipped)") from None
        if not any(math.isclose(t, o, abs_tol=1e-9) for o in out):
            out.append(t)
    return sorted(out)


def _check_geometry(height: int, width: int, frames: int) -> None:
    for name, v in (("--height", height), ("--width", width)):
        if v <= 0 or v % 16:
            raise UsageError(f"{name} {v} is not allowed: use a positive multiple of 16 (e.g. 480 x 832)")
    if frames < 1 or (frames - 1) % 4:
        raise UsageError(f"--frames {frames} is not allowed: use 4n+1 (e.g. 81)")


def _check_block(name: str, v: int) -> None:
    if v < 16 or v & (v - 1):
        raise UsageError(f"{name} {v} is not allowed: use a power of two >= 16 (default 128 for --block-q, 64 for --block-k)")


# -- preset destination ------------------------------------------------------------------------------------


def _new_preset_text(model: str, height: int, width: int, frames: int, block_q: int, block_k: int) -> str:
    import yaml

    data = {"model": model, "height": height, "width": width, "frames": frames, "block_q": block_q, "block_k": block_k,
            "sparse_layers": "all", "dense_steps": 0, "levels": {}}
    head = f"# {model} at {width}x{height}, {frames} frames: levels written by `sparge calibrate`.\n"
    return head + yaml.safe_dump(data, sort_keys=False)


def _check_in_place(path: Path) -> None:
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
        raise UsageError(f"cannot write preset {path}: it (or its directory) is not writable; pass --out FILE to write a new preset")


# -- the command ------------------------------------------------------------------------------------------------


def run_calibrate(
    *,
    targets: list[float],
    preset: Optional[str],
    out: Optional[Path],
    model: Optional[str],
    prompts_file: Optional[Path],
    num_prompts: int,
    steps: int,
    capture_steps: int,
    layers: Optional[str],
    heads: int,
    per_layer: bool,
    tolerance: float,
    height: Optional[int],
    width: Optional[int],
    frames: Optional[int],
    block_q: Optional[int],
    block_k: Optional[int],
    guidance_scale: float,
    seed: int,
    max_memory_gb: float,
    spill_dir: Optional[Path],
    dtype: str,
    device: Optional[str],
    backend: str,
    dry_run: bool,
    overwrite: bool,
    as_json: bool,
    on_result: Optional[Callable[[str, dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Validate cheap options and the destination, then capture, search, report and write; return the summary.

    ``on_result(stage, data)``, if given, sees partial results as they come: ``("capture", {...})`` after the
    capture and preparation, ``("target", TargetResult.to_dict())`` after each target's search and
    ``("per_layer", PerLayerResult.to_dict())`` after each per-layer search (benchmark scripts save them, so a
    run cut short still leaves numbers).
    """
    from sparge.presets import resolve_preset

    # -- options that need no model ---------------------------------------------------------------------
    targets = _check_targets(targets)
    if not 0.0 < tolerance < 0.5 or math.isnan(tolerance):
        raise UsageError(f"--tolerance {tolerance} is out of range: use a number in (0, 0.5), e.g. 0.005 (= +-0.5%)")
    if steps < 1:
        raise UsageError(f"--steps {steps} is out of range: use an integer >= 1")
    if not 1 <= capture_steps <= steps:
        raise UsageError(f"--capture-steps {capture_steps} is out of range: use 1..{steps} (--steps)")
    if heads < 1:
        raise UsageError(f"--heads {heads} is out of range: use an integer >= 1")
    if not max_memory_gb >= 0 or math.isinf(max_memory_gb):
        raise UsageError(f"--max-memory-gb {max_memory_gb} is out of range: use a number >= 0 (0 spills every sample to disk)")
    if guidance_scale < 0 or math.isnan(guidance_scale):
        raise UsageError(f"--guidance-scale {guidance_scale} is out of range: use a number >= 0")
    if backend not in ("auto", "triton", "torch"):
        raise UsageError(f"--backend {backend!r} is not known: use auto, triton or torch")
    for name, v in (("--block-q", block_q), ("--block-k", block_k)):
        if v is not None:
            _check_block(name, v)
    prompts = read_prompts(prompts_file, num_prompts)
    torch_dtype = parse_dtype(dtype)
    if out is not None and out.suffix.lower() not in (".yaml", ".yml"):
        raise UsageError(f"--out {out} must end in .yaml or .yml")
    if spill_dir is not None and spill_dir.exists() and not spill_dir.is_dir():
        raise UsageError(f"--spill-dir {spill_dir} is a file: give a directory")

    # -- preset, geometry, destination --------------------------------------------------------------------
    pr, model_id = resolve_preset(preset, model, height, width, default=DEFAULT_PRESET)
    height, width, frames = default_geometry(pr, model_id, height, width, frames)
    _check_geometry(height, width, frames)
    if pr is not None:
        for name, v, have in (("--block-q", block_q, pr.block_q), ("--block-k", block_k, pr.block_k)):
            if v is not None and v != have:
                raise UsageError(f"{name} {v} differs from preset {pr.name}'s {have}: block sizes belong to the preset; use --out with no --preset for new ones")
        bq, bk = pr.block_q, pr.block_k
    else:
        bq, bk = block_q or 128, block_k or 64

    dest: Path | None = None
    if out is not None:
        dest = out
        if not dry_run:
            check_writable_target(out, overwrite, "preset")
    elif pr is None:
        if dry_run:
            dest = None
        else:
            raise UsageError(
                f"no preset for model {model_id} at {width}x{height}: pass --out FILE.yaml to create one (or --preset FILE)"
            )
    else:
        if (pr.height, pr.width, pr.frames) != (height, width, frames):
            raise UsageError(
                f"preset {pr.name} is for {pr.width}x{pr.height}, {pr.frames} frames, not {width}x{height}, {frames} frames: "
                "pass --out FILE.yaml to write a preset for this resolution"
            )
        dest = pr.path
        if not dry_run:
            _check_in_place(dest)
    if pr is not None and dest == pr.path and not overwrite and not dry_run:
        clash = [t for t in targets if any(math.isclose(t, s, abs_tol=1e-9) for s in pr.levels)]
        if clash:
            raise UsageError(
                f"preset {pr.path} already has level(s) {', '.join(f'{t:g}' for t in clash)}: pass --overwrite to replace them"
            )
    dev = _resolve_device(device)

    # -- load, capture, search ---------------------------------------------------------------------------------
    import torch

    from sparge import calibrate as cal
    from sparge.integrations.diffusers import load_wan_pipeline, wan_transformers

    quiet_hf()
    ui = err_console if as_json else console
    t_start = time.perf_counter()
    with ui.status(f"loading {model_id} ({dtype}) ..."):
        pipe = load_wan_pipeline(model_id, dtype=torch_dtype, device=dev)
    load_s = time.perf_counter() - t_start
    tr = wan_transformers(pipe)[0]
    n_layers, n_heads = len(tr.blocks), int(tr.config.num_attention_heads)
    head_dim = int(tr.config.attention_head_dim)
    sparse_layers = pr.layers() if pr is not None else None
    layer_spec = layers if layers is not None else ("all" if per_layer else "6")
    chosen_layers = parse_layers(layer_spec, n_layers)
    if sparse_layers is not None:
        chosen_layers = [i for i in chosen_layers if i in set(sparse_layers)] or sorted(sparse_layers)[:1]
    heads = min(heads, n_heads)
    cap_steps = cal.spread(capture_steps, steps)
    pt, ph, pw = tr.config.patch_size
    tokens = ((frames - 1) // 4 + 1) // pt * (height // 8 // ph) * (width // 8 // pw)
    n_samples = len(prompts) * len(chosen_layers) * len(cap_steps)
    per_sample = cal.sample_bytes(heads=heads, tokens=tokens, head_dim=head_dim, itemsize=torch.empty((), dtype=torch_dtype).element_size())
    max_bytes = int(max_memory_gb * (1 << 30))
    ui.print(
        f"capturing {n_samples} samples ({len(prompts)} prompts x {len(chosen_layers)} layers x {len(cap_steps)} steps "
        f"{cap_steps} of {steps}; {heads}/{n_heads} heads, {tokens} tokens): {_gib(n_samples * per_sample)} in all, "
        f"at most {_gib(max_bytes)} in RAM, the rest spilled to disk"
    )

    progress = _progress(ui)
    tasks: dict[str, Any] = {}

    def on_progress(task: str, done: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = progress.add_task(task, total=total)
        progress.update(tasks[task], completed=done, total=total)

    store = cal.CaptureStore(max_bytes=max_bytes, spill_dir=spill_dir)
    try:
        with progress:
            t0 = time.perf_counter()
            cal.capture_attention(
                pipe, prompts, store=store, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                capture_steps=cap_steps, layers=chosen_layers, heads=heads, guidance_scale=guidance_scale, seed=seed,
                on_progress=on_progress,
            )
            capture_s = time.perf_counter() - t0
            del pipe, tr  # the captured tensors are all the search needs: free the accelerator for them
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            data = cal.CalibrationData(store, block_q=bq, block_k=bk, device=dev, backend=backend, on_progress=on_progress)  # type: ignore[arg-type]
            prepare_s = time.perf_counter() - t0
            emit = on_result or (lambda stage, d: None)
            emit("capture", {"samples": len(store), "layers": chosen_layers, "capture_steps": cap_steps, "heads": heads,
                             "tokens": tokens, "bytes_per_sample": per_sample, "load_s": load_s, "capture_s": capture_s,
                             "prepare_s": prepare_s})
            results = []
            for t in targets:
                results.append(cal.search_target(data, t, tolerance=tolerance, on_progress=on_progress))
                emit("target", results[-1].to_dict())
            pl_results = []
            for r in results if per_layer else []:
                pl_results.append(cal.search_per_layer(data, r, on_progress=on_progress))
                emit("per_layer", pl_results[-1].to_dict())
    finally:
        store.close()

    # -- report and write ----------------------------------------------------------------------------------------
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    calibrated_on = {
        "model": model_id,
        "height": height, "width": width, "frames": frames,
        "prompts": prompts, **({"prompts_file": str(prompts_file)} if prompts_file is not None else {}),
        "steps": steps, "capture_steps": cap_steps, "layers": chosen_layers, "heads_per_layer": heads,
        "guidance_scale": guidance_scale, "seed": seed, "dtype": str(torch_dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        "date": date, "sparge": _version(),
    }
    levels = {r.target: level_entry(r, pl, calibrated_on) for r, pl in zip(results, pl_results or [None] * len(results))}

    written = None
    if not dry_run:
        assert dest is not None
        written = str(_write_levels(dest, pr, levels, model_id, height, width, frames, bq, bk))

    summary: dict[str, Any] = {
        "preset": pr.name if pr is not None else None,
        "destination": str(dest) if dest is not None else None,
        "written": written,
        "dry_run": dry_run,
        "model": model_id,
        "height": height, "width": width, "frames": frames, "block_q": bq, "block_k": bk,
        "samples": len(store), "bytes_per_sample": per_sample, "bytes_in_memory": store.bytes_in_memory, "bytes_spilled": store.bytes_spilled,
        "calibrated_on": calibrated_on,
        "results": [r.to_dict() for r in results],
        "per_layer": [p.to_dict() for p in pl_results] if per_layer else None,
        "timings": {"load_s": load_s, "capture_s": capture_s, "prepare_s": prepare_s,
                    "search_s": sum(r.seconds for r in results), "per_layer_s": sum(p.seconds for p in pl_results),
                    "total_s": time.perf_counter() - t_start},
    }
    _print_tables(ui, results, pl_results, summary)
    return summary


def level_entry(result: Any, per_layer: Any, calibrated_on: dict[str, Any]) -> dict[str, Any]:
    """The preset level (a `sparge.presets.write_level` mapping) for one `TargetResult`.

    The per-layer table of a `PerLayerResult` is stored only when it lowers the attention error at equal overall
    sparsity (`PerLayerResult.lowers_error`); its error is recorded either way.
    """
    c = result.chosen
    on = {**calibrated_on, "attention_error": round(float(c.error), 6), "tolerance": result.tolerance}
    lv: dict[str, Any] = {"topk": c.topk, "topp": c.topp, "measured_sparsity": round(c.sparsity, 6), "calibrated_on": on}
    if per_layer is not None:
        on["per_layer_attention_error"] = round(per_layer.error, 6)
        on["per_layer_stored"] = per_layer.lowers_error
        if per_layer.lowers_error:
            lv["per_layer"] = {int(layer): [cc.topk, cc.topp] for layer, cc in sorted(per_layer.levels.items())}
    return lv


def _write_levels(
    dest: Path, pr: Any, levels: dict[float, dict[str, Any]], model: str, height: int, width: int, frames: int, bq: int, bk: int
) -> Path:
    """All levels in one atomic replace of ``dest``: copy the base, apply `write_level` per target, rename."""
    from sparge.presets import write_level

    base = pr.path.read_text() if pr is not None else _new_preset_text(model, height, width, frames, bq, bk)
    if pr is not None and dest != pr.path:
        import yaml

        data = yaml.safe_load(base)
        data.update(model=pr.model if _same_model(model, pr.model) else model, height=height, width=width, frames=frames)
        lines = base.splitlines(keepends=True)
        n = 0
        while n < len(lines) and (lines[n].startswith("#") or not lines[n].strip()):
            n += 1
        base = "".join(lines[:n]) + yaml.safe_dump(data, sort_keys=False)
    with atomic_path(dest) as tmp:
        tmp.write_text(base)
        for target, lv in levels.items():
            # clashes with existing levels of an in-place preset were refused (without --overwrite) before any work
            write_level(tmp, target, lv, overwrite_level=True)
    return dest


def _same_model(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower() or Path(a.rstrip("/")).name.lower() == Path(b.rstrip("/")).name.lower()


def _resolve_device(device: Optional[str]):
    import torch

    if device is None:
        if not torch.cuda.is_available():
            raise UsageError("no CUDA GPU is visible: pass --device cpu to calibrate on the CPU (slow), or run on a GPU machine")
        device = "cuda"
    return parse_device(device)


def _version() -> str:
    import sparge

    return sparge.__version__


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


def _progress(ui: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("[bold]{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=ui)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_tables(ui: Any, results: list[Any], pl_results: list[Any], summary: dict[str, Any]) -> None:
    from rich.table import Table

    for r in results:
        t = Table(title=f"target sparsity {r.target:g} (+-{r.tolerance:g}): {r.sparsity_evaluations} sparsity and {r.error_evaluations} attention evaluations, {r.seconds:.1f} s")
        for col in ("family", "topk", "topp", "sparsity", "rel. L2 error", "chosen"):
            t.add_column(col, justify="left" if col == "family" else "right")
        for c in r.candidates:
            style = "bold green" if c.chosen else ("dim" if not c.hit else None)
            t.add_row(c.family, f"{c.topk:.5g}", f"{c.topp:.5g}", f"{c.sparsity:.4f}" + ("" if c.hit else " (miss)"),
                      _fmt(c.error, ".4f"), "yes" if c.chosen else "", style=style)
        ui.print(t)
    for p in pl_results:
        verdict = "lowers" if p.lowers_error else "does not lower"
        stored = "stored" if p.lowers_error else "not stored"
        ui.print(
            f"per-layer at {p.target:g}: error {p.error:.4f} at sparsity {p.sparsity:.4f} vs global {p.global_error:.4f} at "
            f"{p.global_sparsity:.4f}: {verdict} the error ({stored})"
            + (f"; layers {list(p.fallback_layers)} keep the global level" if p.fallback_layers else "")
        )
    where = summary["written"] or (f"{summary['destination']} (dry run: nothing written)" if summary["dry_run"] else "")
    ui.print(f"[bold green]done[/] levels {', '.join(f'{r.target:g}' for r in results)} -> {where}; total {summary['timings']['total_s']:.1f} s")


def register(app: typer.Typer) -> None:
    """Add the ``calibrate`` command to the sparge Typer app."""

    @app.command("calibrate", help="Search Top-k/Top-p for a target sparsity on your model's real Q/K; writes a preset level." + EXAMPLES)
    def calibrate(
        target: list[float] = typer.Option([], "--target", help="Target sparsity in (0, 1), e.g. 0.95; repeat for several."),
        preset: Optional[str] = typer.Option(None, "--preset", help=f"Preset name or YAML file to calibrate and write into (default: the shipped preset for --model; {DEFAULT_PRESET} without --model)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write a new preset file instead (the base preset's other levels are kept)."),
        model: Optional[str] = typer.Option(None, "--model", help="Local diffusers Wan2.1 directory or hub id (default: the preset's model)."),
        prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line (default: a built-in set of varied prompts)."),
        num_prompts: int = typer.Option(2, "--num-prompts", help="Prompts used (the first N)."),
        steps: int = typer.Option(10, "--steps", help="Denoising steps of the calibration run (the scheduler's schedule)."),
        capture_steps: int = typer.Option(3, "--capture-steps", help="Steps captured, spread over the run from first to last."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Layers captured: a count spread evenly (default 6), 'all' (default with --per-layer), or indices 0,10,20."),
        heads: int = typer.Option(2, "--heads", help="Heads captured per layer (seeded random choice)."),
        per_layer: bool = typer.Option(False, "--per-layer", help="Also search a (k, p) per layer; stored when it lowers the error at equal sparsity."),
        tolerance: float = typer.Option(0.005, "--tolerance", help="Allowed |reached - target| sparsity (0.005 = +-0.5%)."),
        height: Optional[int] = typer.Option(None, "--height", help="Height in pixels (default: the preset's, else a test-bed model's own, else 480)."),
        width: Optional[int] = typer.Option(None, "--width", help="Width in pixels (default: the preset's, else a test-bed model's own, else 832)."),
        frames: Optional[int] = typer.Option(None, "--frames", help="Frames, 4n+1 (default: the preset's, else a test-bed model's own, else 81)."),
        block_q: Optional[int] = typer.Option(None, "--block-q", help="Query block size of a new preset (default 128)."),
        block_k: Optional[int] = typer.Option(None, "--block-k", help="Key block size of a new preset (default 64)."),
        guidance_scale: float = typer.Option(5.0, "--guidance-scale", help="CFG scale of the calibration run."),
        seed: int = typer.Option(0, "--seed", help="Seed of the initial noise and the head choice."),
        max_memory_gb: float = typer.Option(4.0, "--max-memory-gb", help="RAM for captured tensors; beyond it samples spill to safetensors files."),
        spill_dir: Optional[Path] = typer.Option(None, "--spill-dir", help="Where spilled samples go (default: a temporary directory, removed at the end)."),
        dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
        device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda; the CPU must be asked for)."),
        backend: str = typer.Option("auto", "--backend", help="Attention backend for the error measurement: auto, triton or torch (exact, slow)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Search and print; write nothing."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing levels of the preset, or an existing --out file."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout (tables go to stderr)."),
    ) -> None:
        with cli_errors():
            result = run_calibrate(
                targets=list(target), preset=preset, out=out, model=model, prompts_file=prompts_file, num_prompts=num_prompts,
                steps=steps, capture_steps=capture_steps, layers=layers, heads=heads, per_layer=per_layer, tolerance=tolerance,
                height=height, width=width, frames=frames, block_q=block_q, block_k=block_k, guidance_scale=guidance_scale,
                seed=seed, max_memory_gb=max_memory_gb, spill_dir=spill_dir, dtype=dtype, device=device, backend=backend,
                dry_run=dry_run, overwrite=overwrite, as_json=as_json,
            )
            if as_json:
                print_json(result)
