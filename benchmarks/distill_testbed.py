"""Training-free vs velocity-distilled vs diffusion-loss fine-tuned sparse attention on the test bed; JSON + PNG.

On the test-bed model (``benchmarks/testbed_run.py``), at one sparsity (default 0.95):

1. knobs: the hybrid (topk, topp) for the target, from ``--preset`` (a YAML written by ``sparge calibrate``)
   or calibrated here on captured attention of training captions (`sparge.calibrate.search_target`);
2. data: ``--clips`` training clips (training captions, rendered latents, the pipeline's own text
   embeddings) written once as a `sparge.data` latent cache -- both fine-tunes read the same cache, in
   the same order, with the same noise and timesteps;
3. held-out evaluation set: ``--val-clips`` clips of held-out captions at fixed, stratified noise
   levels, and ``--captions`` held-out captions sampled with the pipeline (same initial noise each run);
4. three students at the same sparsity, each compared with the dense model (the teacher):
   ``training_free`` (the dense weights, sparse attention), ``distill`` (`sparge.distill.Finetuner`,
   ``loss="distill"``) and ``diffusion`` (same trainer, ``loss="diffusion"``: the plain flow-matching
   loss), both ``--train all`` for the same steps, batch, learning rate and data;
5. per student: velocity error against the dense teacher on the held-out set (relative L2 and MSE; also
   the flow-matching loss against the true velocity), measured sparsity, relative L2 of the final
   sampled latents against the dense samples, PSNR of the VAE-decoded frames and of the palette previews
   against dense, caption following (`sparge.testbed.data.read_back`);
6. the held-out teacher error is also measured every ``--eval-every`` steps during both fine-tunes.

Writes ``--out/distill_results.json`` (rewritten after every phase, so a timeout leaves what was done)
and ``--out/distill_loss_curves.png`` (training loss of both fine-tunes; held-out teacher error over the
steps with the training-free level). The latent cache and the run folders go to ``--work`` (default: a
temporary folder, deleted at the end), never under ``--out``.

GPU (H100, about 2 minutes; N = 500 steps at batch 16 and lr 1e-4, each fine-tune capped at ``--budget-s 120``
seconds -- if the cap stops the distillation run early, the diffusion run gets the same step count)::

    python benchmarks/distill_testbed.py --model $OUT/testbed/model --out $OUT/distill

CPU smoke run (micro model trained here first when ``--model`` is not given; target 0.8 = 1 of 5 key blocks)::

    python benchmarks/distill_testbed.py --out /tmp/distill-tiny --device cpu --tiny

Exit code 0 on success, 2 on a usage error, 1 on a runtime failure (the JSON keeps the finished phases).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

METHODS = ("training_free", "distill", "diffusion")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Training-free vs distilled vs diffusion-loss fine-tuned sparse attention on the test bed.",
        epilog="examples:\n"
               "  python benchmarks/distill_testbed.py --model $OUT/testbed/model --out $OUT/distill\n"
               "  python benchmarks/distill_testbed.py --model testbed/model --out r --preset r/calibrate/testbed.yaml\n"
               "  python benchmarks/distill_testbed.py --out /tmp/distill-tiny --device cpu --tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="test-bed model directory (testbed_run.py's OUT/model); "
                                                  "with --tiny and no --model a micro model is trained first")
    ap.add_argument("--out", required=True, help="results folder: distill_results.json, distill_loss_curves.png")
    ap.add_argument("--work", default=None, help="scratch folder for the latent cache and run folders (default: temporary)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when visible)")
    ap.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--sparsity", type=float, default=None, help="target sparsity (default 0.95; --tiny 0.8)")
    ap.add_argument("--preset", default=None, help="preset YAML with a level at --sparsity (e.g. from sparge calibrate); "
                                                   "default: calibrate here")
    ap.add_argument("--topk", type=float, default=None, help="use these knobs instead of calibrating (with --topp; "
                                                           "--tiny: Top-k alone at 1 - sparsity)")
    ap.add_argument("--topp", type=float, default=0.0, help="Top-p knob with --topk (default 0)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps, the same for both losses (default 500, the paper's; --tiny 6)")
    ap.add_argument("--batch-size", type=int, default=None, help="clips per step (default 16; --tiny 4)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    ap.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    ap.add_argument("--clips", type=int, default=None, help="training clips in the cache (default 256; --tiny 8)")
    ap.add_argument("--val-clips", type=int, default=None, help="held-out clips for the velocity errors (default 32; --tiny 4)")
    ap.add_argument("--captions", type=int, default=None, help="held-out captions sampled per student (default 8; --tiny 2)")
    ap.add_argument("--sample-steps", type=int, default=None, help="denoising steps per sample (default 25; --tiny 3)")
    ap.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of the samples (default 4)")
    ap.add_argument("--decode", type=int, default=None, help="samples VAE-decoded for the frame PSNR (default 4; --tiny 1)")
    ap.add_argument("--eval-every", type=int, default=None, help="held-out teacher error every N steps (default steps/8)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-time cap of each fine-tune in seconds (default 120 on "
                                                                 "cuda, none on cpu); the second run then gets the first's steps")
    ap.add_argument("--backend", default="auto", help="sparse attention backend: auto, triton, torch (default auto)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data order, noise and timesteps (default 0)")
    ap.add_argument("--tiny", action="store_true", help="micro sizes for a CPU smoke run")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing distill_results.json")
    return ap.parse_args(argv)


def _versions() -> dict[str, Any]:
    import diffusers

    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    return {"torch": torch.__version__, "triton": tv, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "host": platform.node()}


def _autocast(device: torch.device, dtype: torch.dtype):
    import contextlib

    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def _train_micro_model(work: Path, device: torch.device) -> Path:
    """A micro test-bed model (320 tokens), trained briefly so its attention has some structure."""
    from sparge.testbed.train import TestbedConfig, save_pipeline, train

    cfg = TestbedConfig.micro(max_steps=15, minutes=0.3)
    _log(f"[model] training a micro test-bed model ({cfg.max_steps} steps max)")
    trained = train(cfg, device=device, log=None)
    path = work / "micro-model"
    save_pipeline(trained.pipe, path, cfg)
    return path


def _encode(pipe: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    from sparge.testbed.train import encode_captions

    with torch.no_grad():
        return encode_captions(pipe, captions, device).float()


def _build_cache(pipe: Any, geometry: Any, n: int, path: Path, device: torch.device, *, seed: int) -> Path:
    """``n`` training clips (training split) as a `sparge.data` latent cache; embeddings trimmed to real tokens."""
    from sparge.data import write_cache
    from sparge.testbed.data import render_latents, sample_scenes
    from sparge.testbed.train import TEXT_LEN

    scenes = sample_scenes(n, seed=seed + 31337, split="train")

    def items():
        for i in range(0, n, 32):
            part = scenes[i:i + 32]
            lat = render_latents(part, geometry, device).float().cpu()
            emb = _encode(pipe, [s.caption for s in part], device).cpu()
            for j, s in enumerate(part):
                nz = emb[j].abs().amax(-1).nonzero()
                real = int(nz[-1]) + 1 if nz.numel() else 1
                yield {"latents": lat[j], "prompt_embeds": emb[j, :real]}, {"caption": s.caption}

    return write_cache(path, items(), max_sequence_length=TEXT_LEN, metadata={"source": "sparge.testbed", "seed": seed})


class HeldOut:
    """Fixed held-out clips: x0, text, stratified sigmas, noise; the dense teacher's velocities."""

    def __init__(self, pipe: Any, geometry: Any, n: int, device: torch.device, dtype: torch.dtype, *, shift: float,
                 seed: int = 4242, batch: int = 8) -> None:
        from sparge.distill import noisy_latents, shift_sigmas
        from sparge.testbed.data import render_latents, sample_scenes

        scenes = sample_scenes(n, seed=seed, split="heldout")
        self.device, self.dtype, self.batch = device, dtype, batch
        self.x0 = render_latents(scenes, geometry, device).float()
        self.emb = _encode(pipe, [s.caption for s in scenes], device)
        self.sigma = shift_sigmas((torch.arange(n, dtype=torch.float32) + 0.5) / n, shift).to(device)
        self.noise = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        self.x_t = noisy_latents(self.x0, self.noise, self.sigma)
        self.teacher = self.velocity(pipe.transformer)

    @torch.no_grad()
    def velocity(self, model: torch.nn.Module) -> torch.Tensor:
        from sparge.distill import predict_velocity

        was = model.training
        model.eval()
        out = []
        try:
            for i in range(0, self.x0.shape[0], self.batch):
                sl = slice(i, i + self.batch)
                with _autocast(self.device, self.dtype):
                    out.append(predict_velocity(model, self.x_t[sl], self.sigma[sl], self.emb[sl]).float())
        finally:
            model.train(was)
        return torch.cat(out)

    def errors(self, model: torch.nn.Module) -> dict[str, float]:
        v = self.velocity(model)
        return {"teacher_rel_l2": float(torch.linalg.vector_norm(v - self.teacher) / torch.linalg.vector_norm(self.teacher)),
                "teacher_mse": float(torch.mean((v - self.teacher) ** 2)),
                "flow_matching_loss": float(torch.mean((v - (self.noise - self.x0)) ** 2))}


def _choose_knobs(pipe: Any, geometry: Any, args: argparse.Namespace, target: float, device: torch.device) -> dict[str, Any]:
    """(topk, topp) at ``target`` from ``--preset``, else calibrated here; Top-k alone if calibration fails."""
    from sparge.calibrate import (
        CalibrationData,
        CaptureStore,
        capture_attention,
        search_target,
        spread,
    )
    from sparge.testbed.data import sample_scenes

    if args.topk is not None:
        return {"topk": args.topk, "topp": args.topp, "block_q": 128, "block_k": 64, "source": "--topk/--topp"}
    if args.preset:
        from sparge.presets import load_preset

        preset = load_preset(args.preset)
        cfg = preset.to_config(target, backend=args.backend)
        return {"topk": cfg.topk, "topp": cfg.topp, "block_q": cfg.block_q, "block_k": cfg.block_k,
                "source": f"preset {args.preset}"}
    steps = args.sample_steps
    captions = [s.caption for s in sample_scenes(2, seed=args.seed + 104729, split="train")]
    store = CaptureStore()
    t0 = time.perf_counter()
    try:
        capture_attention(pipe, captions, store=store, num_inference_steps=steps, capture_steps=spread(min(4, steps), steps),
                          guidance_scale=args.guidance, negative_prompt="", seed=args.seed, **geometry.pipeline_kwargs())
        data = CalibrationData(store, block_q=128, block_k=64, device=device, backend=args.backend)
        res = search_target(data, target, tolerance=0.01 if not args.tiny else 0.1)
        c = res.chosen
        return {"topk": c.topk, "topp": c.topp, "block_q": 128, "block_k": 64, "calibration_sparsity": c.sparsity,
                "calibration_attention_rel_l2": c.error, "family": c.family,
                "source": f"calibrated here on {len(captions)} training captions ({time.perf_counter() - t0:.1f}s)"}
    except Exception as e:  # an unreachable target or a capture failure: fall back to Top-k alone
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"topk": round(1.0 - target, 6), "topp": 0.0, "block_q": 128, "block_k": 64,
                "source": f"Top-k alone (calibration failed: {first[:160]})"}
    finally:
        store.close()


def _samples(pipe: Any, transformer: torch.nn.Module, sparse: Any, captions: list[str], geometry: Any,
             args: argparse.Namespace) -> tuple[torch.Tensor, float | None]:
    """Sampled latents ``[N, 16, T, H, W]`` with ``transformer`` in the pipeline (sparse when ``sparse`` is given)."""
    from sparge.integrations.diffusers import apply
    from sparge.testbed.evaluate import sample_latents

    base = pipe.transformer
    pipe.transformer = transformer
    try:
        if sparse is None:
            return sample_latents(pipe, captions, geometry, steps=args.sample_steps, guidance=args.guidance,
                                  seed=args.seed, batch_size=8), None
        with apply(pipe, sparse, collect_stats=True) as sa:
            lat = sample_latents(pipe, captions, geometry, steps=args.sample_steps, guidance=args.guidance,
                                 seed=args.seed, batch_size=8)
            return lat, sa.mean_sparsity()
    finally:
        pipe.transformer = base


def _plot(path: Path, result: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"distill": "tab:blue", "diffusion": "tab:orange"}
    for m in ("distill", "diffusion"):
        run = result.get("runs", {}).get(m)
        if not run or not run.get("train_loss"):
            continue
        steps, losses = zip(*run["train_loss"])
        a.plot(steps, losses, color=colours[m], label=f"{m}: " + ("MSE vs dense teacher" if m == "distill" else "flow-matching MSE"))
        if run.get("heldout_curve"):
            s2, e2 = zip(*run["heldout_curve"])
            b.plot(s2, e2, "o-", color=colours[m], label=m)
    tf = result.get("students", {}).get("training_free", {}).get("velocity", {}).get("teacher_rel_l2")
    if tf is not None:
        b.axhline(tf, color="tab:red", ls="--", label="training-free")
        b.axhline(tf / 2, color="tab:red", ls=":", lw=1, label="half of training-free")
    a.set_yscale("log")
    a.set(xlabel="step", ylabel="training loss (per step, global batch)", title="training loss")
    b.set(xlabel="step", ylabel="||v_student - v_dense|| / ||v_dense||", title="held-out velocity error vs dense teacher")
    b.set_ylim(bottom=0)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    target = result.get("target_sparsity")
    fig.suptitle(f"sparge test bed, {target:g} sparsity: velocity distillation vs diffusion-loss fine-tuning" if target else "")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


class _Budget(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    from sparge.attention import SpargeConfig
    from sparge.calibrate import relative_l2
    from sparge.data import LatentCache
    from sparge.distill import FinetuneConfig, Finetuner, scheduler_shift
    from sparge.integrations.diffusers import load_wan_pipeline
    from sparge.testbed import read_info
    from sparge.testbed.data import Geometry, latents_to_rgb, read_back, sample_scenes
    from sparge.testbed.evaluate import decode_frames, psnr
    from sparge_cli.common import (
        UsageError,
        check_writable_target,
        parse_device,
        parse_dtype,
        write_json_atomic,
    )

    tiny = args.tiny
    defaults = dict(sparsity=(0.8, 0.95), steps=(6, 500), batch_size=(4, 16), clips=(8, 256), val_clips=(4, 32),
                    captions=(2, 8), sample_steps=(3, 25), decode=(1, 4))
    for k, (t, g) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, t if tiny else g)
    for k in ("steps", "batch_size", "clips", "val_clips", "captions", "sample_steps", "decode"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} {getattr(args, k)} is out of range: use an integer >= 1")
    if not 0 < args.sparsity < 1:
        raise UsageError(f"--sparsity {args.sparsity} is out of range: use a number in (0, 1), e.g. 0.95")
    if args.backend not in ("auto", "triton", "torch"):
        raise UsageError(f"--backend {args.backend!r} is not known: use auto, triton or torch")
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    if tiny and args.topk is None and args.preset is None:
        args.topk = round(1.0 - args.sparsity, 6)
    budget = args.budget_s if args.budget_s is not None else (120.0 if device.type == "cuda" else None)
    eval_every = args.eval_every or max(1, args.steps // (3 if tiny else 8))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path, png_path = out / "distill_results.json", out / "distill_loss_curves.png"
    check_writable_target(results_path, args.overwrite, "results file")
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="sparge-distill-")) if own_work else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "distill_testbed", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "machine": _versions(),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "target_sparsity": args.sparsity,
        "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "warmup", "clips", "val_clips", "captions",
                                                   "sample_steps", "guidance", "decode", "seed", "backend", "tiny")}
                    | {"budget_s": budget, "eval_every": eval_every, "train": "all"},
        "students": {}, "runs": {}, "errors": [],
    }

    def save() -> None:
        result["seconds_total"] = round(time.perf_counter() - t_start, 1)
        write_json_atomic(results_path, result)

    try:
        model = args.model
        if model is None:
            if not tiny:
                raise UsageError("--model is required (the test-bed model, e.g. $OUT/testbed/model); only --tiny trains its own")
            model = str(_train_micro_model(work, device))
        info = read_info(model)
        if info is None:
            raise UsageError(f"--model {model} has no testbed.json: give a model written by benchmarks/testbed_run.py")
        tb = info["config"]
        geometry = Geometry(tb["frames"], tb["height"], tb["width"])
        result["model"] = {"path": str(model), "tokens": geometry.tokens, "layers": tb["num_layers"], "heads": tb["num_heads"],
                           "head_dim": tb["head_dim"]}
        pipe = load_wan_pipeline(str(model), dtype=dtype, device=device)
        for m in (pipe.transformer, pipe.text_encoder):
            m.requires_grad_(False)
        shift = scheduler_shift(pipe.scheduler.config)
        result["shift"] = shift
        _log(f"[setup] {result['machine']['gpu'] or 'cpu'}; model {model}: {geometry.tokens} tokens, shift {shift:g}")

        knobs = _choose_knobs(pipe, geometry, args, args.sparsity, device)
        sparse = SpargeConfig(topk=knobs["topk"], topp=knobs["topp"], block_q=knobs["block_q"], block_k=knobs["block_k"],
                              backend=args.backend)  # type: ignore[arg-type]
        result["knobs"] = knobs
        _log(f"[knobs] topk {sparse.topk:g} topp {sparse.topp:g} ({knobs['source']})")
        save()

        t0 = time.perf_counter()
        cache = LatentCache(_build_cache(pipe, geometry, args.clips, work / "cache", device, seed=args.seed))
        held = HeldOut(pipe, geometry, args.val_clips, device, dtype, shift=shift)
        scenes = sample_scenes(args.captions, seed=args.seed, split="heldout")
        captions = [s.caption for s in scenes]
        dense_lat, _ = _samples(pipe, pipe.transformer, None, captions, geometry, args)
        dense_frames = decode_frames(pipe, dense_lat[: args.decode])
        dense_rgb = latents_to_rgb(dense_lat, geometry)
        result["dense"] = {"caption_following": read_back(dense_lat, scenes, geometry), "captions": captions,
                           "flow_matching_loss": float(torch.mean((held.teacher - (held.noise - held.x0)) ** 2))}
        result["data"] = {"train_clips": len(cache), "heldout_clips": args.val_clips, "seconds": round(time.perf_counter() - t0, 1)}
        _log(f"[data] {len(cache)} training clips cached, {args.val_clips} held-out clips, dense samples of "
             f"{len(captions)} captions ({time.perf_counter() - t0:.1f}s)")
        save()

        def score(name: str, transformer: torch.nn.Module, velocity: dict[str, float]) -> None:
            t1 = time.perf_counter()
            lat, measured = _samples(pipe, transformer, sparse, captions, geometry, args)
            frames = decode_frames(pipe, lat[: args.decode])
            rec = {"velocity": velocity, "measured_sparsity": measured,
                   "latent_rel_l2": relative_l2(lat, dense_lat),
                   "latent_rel_l2_per_sample": [relative_l2(lat[i], dense_lat[i]) for i in range(lat.shape[0])],
                   "psnr_vae_frames_db": psnr(frames, dense_frames, peak=255.0),
                   "psnr_rgb_preview_db": psnr(latents_to_rgb(lat, geometry), dense_rgb, peak=1.0),
                   "caption_following": read_back(lat, scenes, geometry), "sample_seconds": round(time.perf_counter() - t1, 1)}
            result["students"][name] = rec
            _log(f"[{name}] held-out velocity rel-L2 vs dense {velocity['teacher_rel_l2']:.4f}; samples: latent rel-L2 "
                 f"{rec['latent_rel_l2']:.4f}, PSNR {rec['psnr_vae_frames_db']:.2f} dB, sparsity "
                 f"{measured if measured is None else round(measured, 4)}")
            save()

        from sparge.integrations.diffusers import apply

        with apply(pipe.transformer, sparse):
            free_velocity = held.errors(pipe.transformer)
        score("training_free", pipe.transformer, free_velocity)

        steps = args.steps
        for loss in ("distill", "diffusion"):
            cfg = FinetuneConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, steps),
                                 train="all", loss=loss, seed=args.seed, save_every=steps, keep=1)  # type: ignore[arg-type]
            student = copy.deepcopy(pipe.transformer)
            trainer = Finetuner(student, sparse, cache, cfg, work / f"run-{loss}", shift=shift, dtype=dtype, device=device,
                                metadata={"benchmark": "distill_testbed"})
            run_rec: dict[str, Any] = {"loss": loss, "train_loss": [], "heldout_curve": [[0, free_velocity["teacher_rel_l2"]]],
                                       "grad_norm": []}
            result["runs"][loss] = run_rec
            t1 = time.perf_counter()
            stopped = False

            def on_step(rec: Any, run_rec: dict[str, Any] = run_rec, trainer: Any = trainer, t1: float = t1,
                        loss: str = loss) -> None:
                run_rec["train_loss"].append([rec.step, rec.loss])
                run_rec["grad_norm"].append([rec.step, rec.grad_norm])
                if rec.step % eval_every == 0 or rec.step == trainer.cfg.steps:
                    err = held.errors(trainer.student)["teacher_rel_l2"]
                    trainer.switch.handle.reset()  # keep the evaluation's calls out of the next step's sparsity
                    run_rec["heldout_curve"].append([rec.step, err])
                    _log(f"[{loss}] step {rec.step}/{trainer.cfg.steps} loss {rec.loss:.5f} held-out rel-L2 {err:.4f} "
                         f"({rec.steps_per_s:.2f} steps/s)")
                if budget is not None and time.perf_counter() - t1 > budget and rec.step < trainer.cfg.steps:
                    raise _Budget

            try:
                trainer.run(on_step=on_step)
            except _Budget:
                stopped = True
            seconds = time.perf_counter() - t1
            done = trainer.step
            run_rec.update(steps=done, stopped_by_budget=stopped, seconds=round(seconds, 1),
                           steps_per_s=done / seconds if seconds else None, samples_per_s=done * args.batch_size / seconds,
                           measured_train_sparsity=trainer.last_sparsity)
            if stopped:
                _log(f"[{loss}] --budget-s {budget:g} reached at step {done}: the other run uses {done} steps too")
                steps = done
            trainer.switch.remove()
            student = trainer.student.eval()
            with torch.no_grad():  # back to the dense model's per-parameter dtypes (its fp32-kept modules stay fp32)
                base_dtypes = {n: p.dtype for n, p in pipe.transformer.named_parameters()}
                for n, p in student.named_parameters():
                    p.data = p.data.to(base_dtypes[n])
            with apply(student, sparse):
                velocity = held.errors(student)
            score(loss, student, velocity)
            del trainer, student
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["settings"]["steps_run"] = steps

        s = result["students"]
        tf, di, df = (s[m]["velocity"]["teacher_rel_l2"] for m in METHODS)
        result["verdict"] = {
            "velocity_rel_l2": {m: s[m]["velocity"]["teacher_rel_l2"] for m in METHODS},
            "latent_rel_l2": {m: s[m]["latent_rel_l2"] for m in METHODS},
            "psnr_vae_frames_db": {m: s[m]["psnr_vae_frames_db"] for m in METHODS},
            "distill_over_training_free_velocity": di / tf if tf else None,
            "distill_over_training_free_latent": s["distill"]["latent_rel_l2"] / s["training_free"]["latent_rel_l2"]
            if s["training_free"]["latent_rel_l2"] else None,
            "distill_halves_training_free_velocity_error": di <= 0.5 * tf,
            "distill_halves_training_free_sample_error": s["distill"]["latent_rel_l2"] <= 0.5 * s["training_free"]["latent_rel_l2"],
            "distill_beats_diffusion_velocity": di < df,
            "distill_beats_diffusion_samples": s["distill"]["latent_rel_l2"] < s["diffusion"]["latent_rel_l2"],
        }
        result["plot"] = png_path.name if _plot(png_path, result) else None
        save()
        v = result["verdict"]
        _log(f"[done] velocity rel-L2 vs dense: training-free {tf:.4f}, distill {di:.4f}, diffusion {df:.4f} "
             f"(distill/training-free {v['distill_over_training_free_velocity']:.2f}); wrote {results_path}"
             + (f" and {png_path}" if result["plot"] else "") + f" in {result['seconds_total']:.0f}s")
        return 0
    except (UsageError, ValueError, FileNotFoundError):
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        result["errors"].append(f"{type(e).__name__}: {first}")
        if result.get("runs"):
            _plot(png_path, result)
        save()
        raise
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from sparge_cli.common import UsageError

    args = _parse(argv)
    try:
        return run(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # runtime failure: one line (SPARGE_DEBUG=1 for the traceback)
        if os.environ.get("SPARGE_DEBUG") == "1":
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"error: {type(e).__name__}: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
