"""Where a test-bed training step spends its time, on one GPU: per-phase wall time and a CUDA kernel table.

Phases (synchronised after each, so they add up to a step): scene sampling, latent rendering, text
encoding, transformer forward, backward, optimiser. ``--text full`` encodes captions the way `WanPipeline`
does (the encoder runs on 512 padded tokens); ``--text short`` the way training does now
(`sparge.testbed.train.encode_captions_short`, same embeddings); ``--compile`` compiles the blocks and the
text encoder as `sparge.testbed.train.train` does::

    python benchmarks/testbed_train_profile.py --text full --out results/testbed_train_profile.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", choices=("full", "short"), default="short")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=50, help="timed steps after 10 warm-up steps (default 50)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)

    from sparge.testbed.data import render_latents, sample_scenes
    from sparge.testbed.train import (
        TestbedConfig,
        build_pipeline,
        caption_tokens,
        compiled_for_training,
        encode_captions,
        encode_captions_short,
        flow_matching_loss,
        sample_sigmas,
    )

    cfg = TestbedConfig()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    pipe = build_pipeline(cfg).to(dev)
    params = [p for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    encoder = pipe.text_encoder
    if args.compile:
        pipe.transformer.blocks, encoder = compiled_for_training(pipe)
    rng, gen = random.Random(0), torch.Generator(device=dev).manual_seed(0)

    def now() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    phases = ("scenes", "render", "text", "forward", "backward", "optimiser")
    total = dict.fromkeys(phases, 0.0)

    def one_step(timed: bool) -> None:
        t = [now()]
        scenes = sample_scenes(cfg.batch_size, seed=rng, split="train")
        captions = [s.caption for s in scenes]
        t.append(now())
        x0 = render_latents(scenes, cfg.geometry, dev)
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        sigmas = sample_sigmas(cfg.batch_size, cfg.flow_shift, gen, dev)
        t.append(now())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            text = (encode_captions(pipe, captions, dev) if args.text == "full"
                    else encode_captions_short(encoder, pipe.tokenizer, captions, dev, caption_tokens(cfg.max_objects)))
            t.append(now())
            loss = flow_matching_loss(pipe.transformer, x0, text, sigmas, noise).mean()
        t.append(now())
        loss.backward()
        t.append(now())
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(now())
        if timed:
            for name, a, b in zip(phases, t, t[1:]):
                total[name] += (b - a) * 1000 / args.steps

    for _ in range(10):
        one_step(False)
    for _ in range(args.steps):
        one_step(True)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv),
              "text": args.text, "compile": args.compile, "batch_size": cfg.batch_size,
              "ms_per_step": {k: round(v, 2) for k, v in total.items()}, "step_ms": round(sum(total.values()), 1)}
    print(json.dumps(result, indent=1))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            one_step(False)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
