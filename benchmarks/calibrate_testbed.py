"""Calibrate the test-bed model at 0.90 / 0.95 / 0.97 with `sparge calibrate`, then check `sparge generate` uses it.

GPU (after ``benchmarks/testbed_run.py`` saved the model; about a minute on an H100)::

    python benchmarks/calibrate_testbed.py --model $OUT/testbed/model --out $OUT/calibrate

CPU smoke run (builds an untrained micro test-bed model when --model is not given; 320 tokens, blocks 32 x 16,
targets 0.5 / 0.7 / 0.8 because the micro clip has only 20 key blocks)::

    python benchmarks/calibrate_testbed.py --out /tmp/calibrate-tiny --tiny

What it does: writes ``--prompts`` training captions of the test bed (never held-out ones) to ``prompts.txt``,
then runs the calibrate command's own code path (`sparge_cli.calibrate.run_calibrate`) on the model at the
resolution it was trained on (``testbed.json``): every layer and head captured at ``--capture-steps`` of
``--steps`` denoising steps, all targets searched, ``--per-layer`` compared, the levels written into a new
preset ``testbed-preset.yaml``. Then ``sparge generate --sparsity <middle target>`` (`run_generate`) runs on
that preset for a few steps, and the knobs it used are compared with the written level.

Writes, under ``--out``: ``calibrate_results.json`` (after every stage, so a run cut short keeps its numbers;
``complete: true`` at the end), ``testbed-preset.yaml``, ``prompts.txt``, ``generate_<target>.mp4`` + ``.json``.
Exit code 0 when the calibration ran (a failed generate check is recorded as ``generate_check.error`` and
printed, not fatal), 1 when the calibration failed (its error is in the JSON), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[calibrate_testbed {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Calibrate the sparge test-bed model (sparge calibrate) at several targets; record (k, p), error, time.",
        epilog="examples:\n"
               "  python benchmarks/calibrate_testbed.py --model $OUT/testbed/model --out $OUT/calibrate\n"
               "  python benchmarks/calibrate_testbed.py --out /tmp/calibrate-tiny --tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default=None, help="test-bed model directory (benchmarks/testbed_run.py's OUT/model); "
                                                  "with --tiny and no --model an untrained micro model is built in OUT/model")
    ap.add_argument("--out", required=True, help="results directory (created)")
    ap.add_argument("--target", type=float, action="append", default=None,
                    help="target sparsity, repeatable (default 0.90 0.95 0.97; --tiny 0.5 0.7 0.8)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda; --tiny cpu)")
    ap.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--prompts", type=int, default=None, help="training captions used (default 4; --tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps of the calibration run (default 10; --tiny 3)")
    ap.add_argument("--capture-steps", type=int, default=None, help="steps captured, spread over the run (default 4; --tiny 2)")
    ap.add_argument("--generate-steps", type=int, default=None, help="steps of the generate check (default 8; --tiny 2)")
    ap.add_argument("--no-per-layer", action="store_true", help="skip the per-layer comparison")
    ap.add_argument("--backend", default="auto", help="attention backend of the error measurement: auto, triton, torch")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a micro model")
    ap.add_argument("--overwrite", action="store_true", help="replace existing results in --out")
    return ap.parse_args(argv)


def _versions() -> dict[str, Any]:
    import diffusers
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover - triton missing
        tv = None
    return {"torch": torch.__version__, "triton": tv, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cuda": torch.version.cuda,
            "host": platform.node()}


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def run(args: argparse.Namespace) -> int:
    from sparge.testbed import pixel_geometry, read_info
    from sparge.testbed.data import sample_scenes
    from sparge_cli.common import UsageError, check_writable_target, write_json_atomic

    targets = sorted(set(args.target or ([0.5, 0.7, 0.8] if args.tiny else [0.90, 0.95, 0.97])))
    device = args.device or ("cpu" if args.tiny else "cuda")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    steps = args.steps or (3 if args.tiny else 10)
    capture_steps = args.capture_steps or (2 if args.tiny else 4)
    gen_steps = args.generate_steps or (2 if args.tiny else 8)
    n_prompts = args.prompts if args.prompts is not None else (2 if args.tiny else 4)
    if n_prompts < 1:
        raise UsageError(f"--prompts {n_prompts} is out of range: use an integer >= 1")
    if args.tiny:
        import torch

        torch.set_num_threads(1)  # micro tensors: intra-op threads only contend (10x slower on a busy 2-core machine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path, preset_path, prompts_path = out / "calibrate_results.json", out / "testbed-preset.yaml", out / "prompts.txt"
    check_writable_target(results_path, args.overwrite, "results file")
    check_writable_target(preset_path, args.overwrite, "preset")

    result: dict[str, Any] = {
        "benchmark": "calibrate_testbed", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "machine": _versions(),
        "device": device, "dtype": dtype, "targets": targets, "complete": False, "stages": {},
    }

    def save() -> None:
        result["seconds_total"] = round(time.perf_counter() - _T0, 2)
        write_json_atomic(results_path, result)

    def on_term(signum: int, frame: Any) -> None:  # `timeout` sends SIGTERM: keep what was measured
        result["error"] = f"interrupted by signal {signum}"
        save()
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_term)
    save()

    # -- model ---------------------------------------------------------------------------------------------
    if args.model is None:
        if not args.tiny:
            raise UsageError("--model is required (the test-bed model directory); only --tiny builds one")
        from sparge.testbed.train import TestbedConfig, build_pipeline, save_pipeline

        model_dir = out / "model"
        cfg = TestbedConfig.micro()
        _log(f"building an untrained micro test-bed model in {model_dir}")
        save_pipeline(build_pipeline(cfg), model_dir, cfg, overwrite=args.overwrite)
    else:
        model_dir = Path(args.model)
    info = read_info(model_dir)
    if info is None:
        raise UsageError(f"--model {model_dir} has no testbed.json: give a model saved by benchmarks/testbed_run.py")
    height, width, frames = pixel_geometry(info)
    n_heads = int(info["config"]["num_heads"])
    block_q, block_k = (32, 16) if args.tiny else (128, 64)
    result.update(model=str(model_dir), height=height, width=width, frames=frames, tokens=info.get("tokens"),
                  block_q=block_q, block_k=block_k, model_config=info["config"])

    captions = [s.caption for s in sample_scenes(n_prompts, seed=4242, split="train")]
    prompts_path.write_text("".join(c + "\n" for c in captions))
    result["prompts"] = captions
    _log(f"model {model_dir}: {width}x{height}, {frames} frames ({info.get('tokens')} tokens), blocks {block_q}x{block_k}; "
         f"targets {targets}; {len(captions)} prompts, {steps} steps, {capture_steps} captured, device {device} {dtype}")
    save()

    # -- calibrate ---------------------------------------------------------------------------------------------
    from sparge_cli.calibrate import run_calibrate

    stages = result["stages"]

    def on_result(stage: str, data: dict[str, Any]) -> None:
        if stage == "capture":
            stages["capture"] = data
            _log(f"captured {data['samples']} samples in {data['capture_s']:.1f}s (load {data['load_s']:.1f}s, "
                 f"scores + dense outputs {data['prepare_s']:.1f}s)")
        elif stage == "target":
            c = data["chosen"]
            singles = {fam: min((x["error"] for x in data["candidates"] if x["family"] == fam and x["hit"]), default=None)
                       for fam in ("topk", "topp")}
            stages.setdefault("targets", []).append({**data, "best_topk_only_error": singles["topk"],
                                                     "best_topp_only_error": singles["topp"]})
            _log(f"target {data['target']:g}: k={c['topk']:.5g} p={c['topp']:.5g} sparsity {c['sparsity']:.4f} error {c['error']:.4f} "
                 f"(Top-k alone {singles['topk']}, Top-p alone {singles['topp']}); {data['error_evaluations']} error and "
                 f"{data['sparsity_evaluations']} sparsity evaluations, {data['seconds']:.1f}s")
        else:
            stages.setdefault("per_layer", []).append(data)
            _log(f"per-layer at {data['target']:g}: error {data['error']:.4f} at sparsity {data['sparsity']:.4f} vs global "
                 f"{data['global_error']:.4f} at {data['global_sparsity']:.4f} -> lowers error: {data['lowers_error']}")
        save()

    t0 = time.perf_counter()
    summary = run_calibrate(
        targets=targets, preset=None, out=preset_path, model=str(model_dir), prompts_file=prompts_path,
        num_prompts=len(captions), steps=steps, capture_steps=capture_steps, layers="all", heads=n_heads,
        per_layer=not args.no_per_layer, tolerance=0.005, height=height, width=width, frames=frames,
        block_q=block_q, block_k=block_k, guidance_scale=4.0, seed=0, max_memory_gb=8.0, spill_dir=None,
        dtype=dtype, device=device, backend=args.backend, dry_run=False, overwrite=args.overwrite, as_json=False,
        on_result=on_result,
    )
    calib_s = time.perf_counter() - t0
    result["calibrate"] = {
        "seconds": round(calib_s, 2), "timings": summary["timings"], "preset": summary["written"],
        "samples": summary["samples"], "bytes_per_sample": summary["bytes_per_sample"],
        "chosen": {f"{r['target']:g}": {**r["chosen"], "search_s": r["seconds"]} for r in summary["results"]},
    }
    result["preset_yaml"] = preset_path.read_text()
    _log(f"calibrated {len(targets)} targets in {calib_s:.1f}s; preset written to {preset_path}")
    save()

    # -- `sparge generate --sparsity <target>` uses the new level --------------------------------------------------
    from sparge.presets import load_preset
    from sparge_cli.generate import run_generate

    check_target = 0.95 if 0.95 in targets else targets[len(targets) // 2]
    level = load_preset(preset_path).level(check_target)
    cfg = load_preset(preset_path).to_config(check_target)  # what generate builds from --preset/--sparsity
    result["generate_check"] = {"sparsity_level": check_target, "config_from_preset": {
        "topk": cfg.topk, "topp": cfg.topp, "per_layer": {str(k): list(v) for k, v in cfg.per_layer.items()}}}
    save()
    video = out / f"generate_{check_target:g}.mp4"
    try:
        t0 = time.perf_counter()
        g = run_generate(
            prompt=captions[0], negative_prompt="", model=None, preset=str(preset_path), sparsity=check_target,
            topk=None, topp=None, dense=False, checkpoint=None, steps=gen_steps, guidance_scale=4.0, seed=0,
            frames=None, height=None, width=None, dtype=dtype, device=device, cpu_offload=False, out=video,
            overwrite=args.overwrite, as_json=False, backend=args.backend,
        )
        uses = (g["topk"], g["topp"]) == (level.topk, level.topp)
        result["generate_check"] |= {
            "steps": gen_steps, "level": {"topk": level.topk, "topp": level.topp,
                                                                        "per_layer": {str(k): list(v) for k, v in level.per_layer.items()}},
            "generate_topk": g["topk"], "generate_topp": g["topp"], "uses_calibrated_level": uses,
            "measured_sparsity": g["measured_sparsity"], "measured_sparsity_per_layer": g["measured_sparsity_per_layer"],
            "timings": g["timings"], "output": g["output"], "seconds": round(time.perf_counter() - t0, 2),
        }
        _log(f"generate --sparsity {check_target:g}: k={g['topk']} p={g['topp']} (level k={level.topk} p={level.topp}) -> "
             f"uses the calibrated level: {uses}; measured sparsity {g['measured_sparsity']}")
        if not uses:
            _log("WARNING: generate did not use the calibrated level")
    except Exception as e:  # the calibration numbers above stand on their own
        result["generate_check"]["error"] = _first_line(e)
        _log(f"generate check failed (recorded in the JSON; calibration results stand): {_first_line(e)}")
    result["complete"] = True
    save()
    _log(f"done: {results_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from sparge_cli.common import UsageError

    args = _parse(argv)
    try:
        return run(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {_first_line(e) if not isinstance(e, UsageError) else e}", file=sys.stderr, flush=True)
        _record_failure(args, e)
        return 2
    except Exception as e:
        print(f"failed: {_first_line(e)}", file=sys.stderr, flush=True)
        _record_failure(args, e)
        return 1


def _record_failure(args: argparse.Namespace, e: BaseException) -> None:
    """Add the error to an existing results file (the stages that ran are already in it)."""
    path = Path(args.out) / "calibrate_results.json"
    try:
        data = json.loads(path.read_text())
        data["error"] = _first_line(e)
        data["seconds_total"] = round(time.perf_counter() - _T0, 2)
        from sparge_cli.common import write_json_atomic

        write_json_atomic(path, data)
    except Exception:  # nothing written yet, or unreadable: the printed line is all there is
        pass


if __name__ == "__main__":
    sys.exit(main())
