"""Train the sparge test-bed model, save it, and measure everything quality-related on it; write JSON.

One command on one GPU (about 10 minutes on an H100: 8.6 training, the rest evaluation)::

    PYTHONUNBUFFERED=1 python benchmarks/testbed_run.py --out benchmarks/results/testbed --minutes 8.6

CPU smoke run at micro size (under 2 minutes on an idle 2-core machine)::

    python benchmarks/testbed_run.py --out /tmp/testbed-tiny --device cpu --tiny

Writes, under ``--out``:

- ``model/``: the trained `WanPipeline` in diffusers format (``--model-dir`` to put it elsewhere),
  loadable by ``sparge generate --model <out>/model`` and ``WanPipeline.from_pretrained``;
- ``testbed_results.json``: machine, versions, command, training summary (loss curve, steps, clips,
  throughput, model size) and every section of `sparge.testbed.evaluate.evaluate` (validation loss,
  caption following, per-layer attention entropy, hybrid / Top-k / Top-p sparse sampling at 90 / 95 / 97%);
- ``previews/heldout_NN.png``: for the first held-out captions, top row the rendered ground truth,
  bottom row the dense sample (palette previews of the latents, 8 frames; captions in the JSON).

``testbed_results.json`` is rewritten after training and after every evaluation section and sparse run,
so a run killed by a time limit still leaves everything finished so far. ``--budget-minutes`` (default
training minutes + 1.3) bounds the whole script: sparse sampling runs that would end after it are skipped
and marked ``"skipped"`` in the JSON (0.95 runs first).

``--model-dir DIR --skip-train`` evaluates an existing model instead. Exit code 0 when every section
ran, 1 when a section failed (its error is in the JSON), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def _versions() -> dict[str, Any]:
    import diffusers
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton missing
        triton_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "gpu": gpu,
            "cuda": torch.version.cuda, "host": platform.node(), "cpu_threads": torch.get_num_threads()}


_T0 = time.perf_counter()
_ON_FAILURE: list[Any] = []  # records a failure in the results file once it has been started


def _log(msg: str) -> None:
    print(msg, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Train the sparge test-bed model, save it, evaluate it (dense and training-free sparse), write JSON.",
        epilog="examples:\n"
               "  PYTHONUNBUFFERED=1 python benchmarks/testbed_run.py --out benchmarks/results/testbed --minutes 8.6\n"
               "  python benchmarks/testbed_run.py --out /tmp/testbed-tiny --device cpu --tiny\n"
               "  python benchmarks/testbed_run.py --out /tmp/eval --model-dir testbed-wan --skip-train --device cuda",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, help="results directory (created; testbed_results.json, previews/, model/)")
    ap.add_argument("--model-dir", default=None, help="where the trained model goes (default OUT/model)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--minutes", type=float, default=None, help="training wall-time budget (default 8.6; --tiny 0.25)")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="wall-time budget of the whole script; later sparse runs are skipped to meet it "
                         "(default: training minutes + 1.3; --tiny: none)")
    ap.add_argument("--steps", type=int, default=None, help="stop training after this many steps")
    ap.add_argument("--skip-train", action="store_true", help="evaluate the existing --model-dir instead of training")
    ap.add_argument("--captions", type=int, default=None, help="held-out captions sampled per run (default 8; --tiny 4)")
    ap.add_argument("--sample-steps", type=int, default=None, help="denoising steps per sample (default 20; --tiny 4)")
    ap.add_argument("--dtype", default=None, help="evaluation dtype of transformer and text encoder: bf16, fp16, fp32 "
                                                  "(default bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--backend", default="auto", help="sparse attention backend: auto, triton, torch (default auto)")
    ap.add_argument("--previews", type=int, default=4, help="held-out captions drawn as preview PNGs (default 4)")
    ap.add_argument("--tiny", action="store_true", help="micro model and clips (320 tokens): a CPU smoke run")
    ap.add_argument("--overwrite", action="store_true", help="replace existing results and model")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from sparge.integrations.diffusers import load_wan_pipeline
    from sparge.testbed import read_info
    from sparge.testbed.data import Geometry
    from sparge.testbed.evaluate import EvalSettings, evaluate, preview_image
    from sparge.testbed.train import TestbedConfig, dir_size, save_pipeline, train
    from sparge_cli.common import (
        UsageError,
        check_writable_target,
        parse_device,
        parse_dtype,
        write_json_atomic,
    )

    device = parse_device(args.device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # micro ops: more threads only fight over the cores (10x slower when shared)
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    if args.backend not in ("auto", "triton", "torch"):
        raise UsageError(f"--backend {args.backend!r} is not known: use auto, triton or torch")
    for name in ("captions", "sample_steps", "steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} {v} is out of range: use an integer >= 1")
    if args.previews < 0:
        raise UsageError(f"--previews {args.previews} is out of range: use an integer >= 0")
    for name in ("minutes", "budget_minutes"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise UsageError(f"--{name.replace('_', '-')} {v} is out of range: use a number of minutes > 0")
    out = Path(args.out)
    model_dir = Path(args.model_dir) if args.model_dir else out / "model"
    results_path = out / "testbed_results.json"
    out.mkdir(parents=True, exist_ok=True)
    check_writable_target(results_path, args.overwrite, "results file")
    if args.skip_train:
        if not (model_dir / "model_index.json").is_file():
            raise UsageError(f"--skip-train needs a trained model in --model-dir, but {model_dir} has no model_index.json")
    elif model_dir.exists() and (not model_dir.is_dir() or any(model_dir.iterdir())) and not args.overwrite:
        raise UsageError(f"model directory {model_dir} already exists: pass --overwrite to replace it, or --skip-train to evaluate it")

    t_start = _T0
    result: dict[str, Any] = {
        "benchmark": "testbed", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "machine": _versions(),
        "device": str(device), "eval_dtype": str(dtype).replace("torch.", ""), "model_dir": str(model_dir),
        "complete": False,
    }

    def save() -> None:
        result["seconds_total"] = round(time.perf_counter() - t_start, 1)
        write_json_atomic(results_path, result)

    def save_failure(e: BaseException) -> None:
        result["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        save()

    _ON_FAILURE.append(save_failure)

    if args.skip_train:
        info = read_info(model_dir) or {}
        cfg_dict = info.get("config")
        if cfg_dict is None:
            raise UsageError(f"{model_dir} has no testbed.json: it was not written by sparge.testbed.train")
        cfg = TestbedConfig(**cfg_dict)
        result["training"] = info.get("training")
    else:
        over = {k: v for k, v in (("minutes", args.minutes), ("max_steps", args.steps)) if v is not None}
        cfg = TestbedConfig.micro(**{"minutes": 0.25, **over}) if args.tiny else TestbedConfig(**over)
        _log(f"[setup] {result['machine']}")
        _log(f"[train] {cfg.geometry.tokens} tokens per clip, {cfg.num_layers} blocks x {cfg.num_heads} heads x {cfg.head_dim}, "
             f"batch {cfg.batch_size}, budget {cfg.minutes:g} min / {cfg.max_steps} steps")
        trained = train(cfg, device=device, log=_log)
        summary = trained.summary()
        save_pipeline(trained.pipe, model_dir, cfg, overwrite=args.overwrite, extra={"training": summary})
        summary["model_dir_bytes"] = dir_size(model_dir)
        result["training"] = summary
        _log(f"[train] {trained.steps} steps in {trained.seconds:.0f}s, final loss {summary['final_loss']:.4f}; "
             f"saved {model_dir} ({summary['model_dir_bytes'] / 2**20:.1f} MiB)")
        del trained
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()

    budget = args.budget_minutes
    if budget is None and not args.tiny and not args.skip_train:
        budget = cfg.minutes + 1.3
    deadline = t_start + 60.0 * budget if budget is not None else None
    result["budget_minutes"] = budget

    geometry = Geometry(cfg.frames, cfg.height, cfg.width)
    over_e = {k: v for k, v in (("n_captions", args.captions), ("steps", args.sample_steps)) if v is not None}
    settings = (EvalSettings.micro if args.tiny else EvalSettings)(backend=args.backend, **over_e)
    pipe = load_wan_pipeline(str(model_dir), dtype=dtype, device=device)  # the saved files, as users load them
    tensors: dict[str, Any] = {}

    def write_previews() -> None:
        # as soon as the dense samples exist, so a later time-out still leaves them
        import imageio.v3 as iio

        from sparge.testbed.data import render_latents

        prev = out / "previews"
        prev.mkdir(exist_ok=True)
        scenes = tensors["scenes"][: args.previews]
        truth = render_latents(scenes, geometry)
        for i, s in enumerate(scenes):
            img = preview_image([truth[i], tensors["dense_latents"][i]], geometry)
            iio.imwrite(prev / f"heldout_{i:02d}.png", img.numpy())
        result["previews"] = {f"previews/heldout_{i:02d}.png": {"caption": s.caption, "rows": ["ground truth", "dense sample"]}
                              for i, s in enumerate(scenes)}

    def on_update(ev: dict[str, Any]) -> None:
        result["evaluation"] = ev
        if args.previews and "previews" not in result and tensors.get("dense_latents") is not None:
            write_previews()
        save()

    result["evaluation"] = evaluate(pipe, geometry, settings, log=_log, shift=cfg.flow_shift, tensors=tensors,
                                    deadline=deadline, on_update=on_update)

    result["complete"] = True
    save()
    errors = result["evaluation"].get("errors", [])
    _log(f"[done] {result['seconds_total']:.0f}s; wrote {results_path}" + (f"; FAILED sections: {', '.join(errors)}" if errors else ""))
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    from sparge_cli.common import UsageError

    args = _parse(argv)
    try:
        return run(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        for fn in _ON_FAILURE:
            fn(e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Exception, KeyboardInterrupt) as e:  # runtime failure: one line (SPARGE_DEBUG=1 for the traceback)
        for fn in _ON_FAILURE:
            fn(e)
        if os.environ.get("SPARGE_DEBUG") == "1":
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"error: {type(e).__name__}: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
