"""End-to-end denoising-step benchmark: Wan2.1 transformer time per step, dense vs sparse, one run.

Builds the full-size Wan2.1-T2V architecture (1.3B or 14B, the published transformer config) with random
weights on the device -- no download -- and times one denoising step (one transformer forward over the
CFG batch of 2) dense and with sparse self-attention at a preset level; also the share of the dense step
spent in self-attention (dense step minus the same step with the attention product replaced by V), and
the step with Top-k only at the level's target sparsity (random weights make Top-p keep more blocks
than a trained model does; see "notes" in the JSON). Progress lines on stdout; the JSON is rewritten
after every measurement ("complete": true at the end), so a run cut short still leaves its results.

GPU (the figure the issue asks for; the defaults are Wan2.1-T2V-1.3B, preset wan2.1-t2v-1.3b-480p level
0.95 = k 0.03 / p 0.2, 832x480, 81 frames, bf16, CFG batch 2, cuda, warmup 2, iters 5; about a minute):

    python benchmarks/e2e_step.py --out benchmarks/results/e2e_step_1.3b_480p_h100.json

CPU smoke run at a tiny size (seconds):

    python benchmarks/e2e_step.py --tiny --device cpu --out /tmp/e2e_tiny.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def _versions() -> dict:
    import diffusers

    import sparge

    v = {"sparge": sparge.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda,
         "python": platform.python_version()}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = None
    return v


def main(argv: list[str] | None = None) -> int:
    from sparge import SpargeConfig
    from sparge.integrations.diffusers import (
        WAN_2_1_T2V_1_3B_CONFIG,
        WAN_2_1_T2V_14B_CONFIG,
        build_random_wan_transformer,
        time_transformer_step,
    )
    from sparge.presets import load_preset
    from sparge.testbed.tiny import tiny_generation_kwargs, tiny_transformer_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["1.3b", "14b"], default="1.3b", help="Wan2.1-T2V architecture (random weights)")
    ap.add_argument("--preset", default=None, help="preset name/file for k, p, block sizes and resolution (default by --model)")
    ap.add_argument("--sparsity", type=float, default=None, help="preset level (default: the preset's highest)")
    ap.add_argument("--topk", type=float, default=None, help="override: Top-k (with --topp)")
    ap.add_argument("--topp", type=float, default=None, help="override: Top-p (with --topk)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2, help="CFG batch (2 = cond + uncond)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    ap.add_argument("--sdpa", choices=["cudnn", "flash", "default"], default="cudnn",
                    help="torch SDPA kernel for every dense attention (the dense baseline and the cross-attention): "
                         "cudnn (default: the fastest dense one on H100; falls back to flash, efficient, math), "
                         "flash (FlashAttention-2 first), default (torch's own choice)")
    ap.add_argument("--tiny", action="store_true", help="tiny transformer and video (CPU smoke test)")
    ap.add_argument("--no-attention-share", action="store_true", help="skip the attention-share measurement")
    ap.add_argument("--target", type=float, default=0.0,
                    help="also time Top-k only at this sparsity (topk = 1 - target, topp = 0); 0 (default) = the preset "
                         "level's target (0.95 with --tiny or --topk); a negative value skips it")
    ap.add_argument("--time-budget", type=float, default=75.0,
                    help="seconds after which the optional Top-k-only measurement at the target is skipped; 0 = none")
    ap.add_argument("--out", required=True, help="JSON output path (refused if it exists, unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        ap.error(f"--out {out} exists: pass --overwrite or choose another path")
    if not out.parent.exists():
        ap.error(f"--out {out}: directory {out.parent} does not exist")
    if a.target >= 1:
        ap.error(f"--target {a.target} is out of range: use a sparsity in (0, 1), 0 for the preset level, < 0 to skip")
    if (a.topk is None) != (a.topp is None):
        ap.error("--topk and --topp go together")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is visible: use --device cpu with --tiny for a smoke run")

    if a.tiny:
        arch = tiny_transformer_config(num_layers=2)
        g = tiny_generation_kwargs()
        height, width, frames = g["height"], g["width"], g["num_frames"]
        preset = None
        knobs = (a.topk, a.topp) if a.topk is not None else (0.3, 0.3)
        cfg = SpargeConfig(topk=knobs[0], topp=knobs[1], backend=a.backend)
        level = None
        text_len = 512
    else:
        arch = WAN_2_1_T2V_1_3B_CONFIG if a.model == "1.3b" else WAN_2_1_T2V_14B_CONFIG
        preset = load_preset(a.preset or ("wan2.1-t2v-1.3b-480p" if a.model == "1.3b" else "wan2.1-t2v-14b-720p"))
        height, width, frames = a.height or preset.height, a.width or preset.width, a.frames or preset.frames
        if a.topk is not None:
            cfg = SpargeConfig(topk=a.topk, topp=a.topp, block_q=preset.block_q, block_k=preset.block_k, backend=a.backend)
            level = None
        else:
            level = a.sparsity if a.sparsity is not None else preset.default_sparsity()
            cfg = preset.to_config(level, backend=a.backend)
        text_len = 512

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[e2e_step {time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    result: dict = {
        "benchmark": "e2e_step",
        "what": "Wan2.1 transformer forward per denoising step over the CFG batch (random weights, random inputs)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "cpu": platform.processor() or platform.machine(), "host": platform.node()},
        "versions": _versions(),
        "sdpa_backends_enabled": _sdpa_flags(),
        "sdpa_priority": a.sdpa,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "architecture": "tiny" if a.tiny else f"Wan2.1-T2V-{a.model.upper()}",
        "transformer_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()},
        "preset": preset.name if preset else None,
        "sparsity_level": level,
        "complete": False,
        "notes": [
            "dense = diffusers' own WanAttnProcessor (torch SDPA, kernel priority in sdpa_priority); sparse = sparge processor with the preset level's "
            "topk/topp; mask building is included in the sparse time.",
            "Random weights give near-uniform pooled attention scores, so Top-p keeps many more blocks than on the "
            "trained model: 'sparse' measures less sparsity than the level's target. 'sparse_at_target' uses Top-k "
            "only (topk = 1 - target, topp = 0), which skips the target fraction on any weights: it is the step time "
            "at the target sparsity.",
            "self_attention_share_dense = 1 - t(step with the self-attention product replaced by V) / t(dense step); "
            "projections, QK-norm and RoPE stay in both.",
        ],
    }

    def save() -> None:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)

    def over_budget(what: str) -> bool:
        spent = time.perf_counter() - t_start
        if a.time_budget and spent > a.time_budget:
            log(f"time budget {a.time_budget:.0f} s spent ({spent:.0f} s): skipping {what}")
            result.setdefault("skipped", []).append(what)
            save()
            return True
        return False

    save()
    log(f"building {result['architecture']} with random weights ({a.dtype}, {device})")
    transformer = build_random_wan_transformer(arch, dtype=dtype, device=device)
    common = dict(batch=a.batch, frames=frames, height=height, width=width, dtype=dtype, device=device,
                  warmup=a.warmup, iters=a.iters, text_len=text_len)
    sdpa = a.sdpa

    def timed(config, **kw):
        nonlocal sdpa
        try:
            with _sdpa_priority(sdpa):
                return time_transformer_step(transformer, config, **{**common, **kw})
        except RuntimeError as e:  # a preferred SDPA kernel that fails outright: fall back to torch's choice once
            if sdpa == "default":
                raise
            log(f"SDPA with {sdpa} first failed ({str(e).splitlines()[0][:160]}); using torch's default SDPA choice")
            sdpa = result["sdpa_priority"] = "default"
            return time_transformer_step(transformer, config, **{**common, **kw})

    share = not a.no_attention_share
    log(f"dense step: {width}x{height}x{frames}, batch {a.batch}, warmup {a.warmup}, iters {a.iters}, SDPA {sdpa} first"
        + (", then the same step with the self-attention product replaced by V (attention share)" if share else ""))
    dense = timed(None, attention_share=share)
    result["dense"] = dense
    result["self_attention_share_dense"] = dense.get("self_attention_share")
    save()
    log(f"dense {dense['ms_per_step']:.1f} ms/step ({dense['tokens']} tokens)"
        + (f"; self-attention share {dense['self_attention_share']:.1%} ({dense['ms_per_step_without_self_attention']:.1f} "
           "ms/step without it)" if share else ""))

    log(f"sparse step: topk={cfg.topk:g} topp={cfg.topp:g} backend={cfg.backend}")
    sparse = timed(cfg)
    result["sparse"] = sparse
    result["speedup_per_step"] = dense["ms_per_step"] / sparse["ms_per_step"]
    save()
    log(f"sparse {sparse['ms_per_step']:.1f} ms/step, measured sparsity {sparse['measured_sparsity']:.4f}, "
        f"speedup {result['speedup_per_step']:.2f}x")

    if a.target >= 0 and not over_budget("sparse_at_target"):
        target = a.target if a.target > 0 else (level if level is not None else 0.95)
        tcfg = SpargeConfig(topk=round(1.0 - target, 6), topp=0.0, block_q=cfg.block_q, block_k=cfg.block_k, backend=a.backend)
        log(f"sparse step at target {target:g}: topk={tcfg.topk:g} topp=0")
        at = timed(tcfg)
        result["sparse_at_target"] = {**at, "target": target}
        result["speedup_per_step_at_target"] = dense["ms_per_step"] / at["ms_per_step"]
        save()
        log(f"sparse at target {at['ms_per_step']:.1f} ms/step, measured sparsity {at['measured_sparsity']:.4f}, "
            f"speedup {result['speedup_per_step_at_target']:.2f}x")

    result["complete"] = not result.get("skipped")
    result["wall_s"] = time.perf_counter() - t_start
    save()
    log(f"wrote {out}")
    return 0


def _sdpa_priority(name: str):
    """Context that makes torch SDPA try ``name``'s kernel first (and the others after it)."""
    import contextlib

    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    order = [first] + [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                   SDPBackend.MATH) if b != first]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6 has no priorities: allow all, torch's order
        return contextlib.nullcontext()


def _sdpa_flags() -> dict:
    try:
        b = torch.backends.cuda
        return {"flash": b.flash_sdp_enabled(), "cudnn": b.cudnn_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
                "math": b.math_sdp_enabled()}
    except Exception:  # pragma: no cover - depends on the torch build
        return {}


if __name__ == "__main__":
    raise SystemExit(main())
