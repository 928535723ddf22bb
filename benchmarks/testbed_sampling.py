"""How the test-bed model's caption following depends on the sampler: scheduler, steps, guidance, dtype.

Samples the same held-out captions from the same initial noise under every combination and reads the
latents back (`sparge.testbed.data.read_back`); also scores one-step clean-latent predictions
``x0 = x_t - s v`` of rendered clips at fixed noise levels, which separates "the model does not know
where objects go" from "the sampler loses it". One GPU, about a minute::

    python benchmarks/testbed_sampling.py --model testbed-wan --out results/testbed_sampling.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="test-bed model directory (diffusers format)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--captions", type=int, default=16, help="held-out captions per setting (default 16)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0, 6.0])
    ap.add_argument("--schedulers", nargs="+", default=["unipc", "euler"])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    args = ap.parse_args(argv)

    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from sparge.testbed import read_info
    from sparge.testbed.data import Geometry, read_back, render_latents, sample_scenes
    from sparge.testbed.evaluate import sample_latents
    from sparge.testbed.train import encode_captions

    info = read_info(args.model)
    if info is None:
        print(f"error: --model {args.model} has no testbed.json: give a model written by sparge.testbed.train", file=sys.stderr)
        return 2
    cfg = info["config"]
    geometry = Geometry(cfg["frames"], cfg["height"], cfg["width"])
    scenes = sample_scenes(args.captions, seed=0, split="heldout")
    captions = [s.caption for s in scenes]
    results: dict = {"benchmark": "testbed_sampling", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "model": args.model, "captions": captions, "runs": [], "one_step": []}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for dname in args.dtypes:
        pipe = WanPipeline.from_pretrained(args.model, torch_dtype=dtypes[dname]).to(dev)
        pipe.set_progress_bar_config(disable=True)
        unipc = pipe.scheduler
        euler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.get("flow_shift", 3.0))
        # one-step predictions of rendered clips: does the model know where the caption puts objects?
        x0 = render_latents(scenes, geometry, dev)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            text = encode_captions(pipe, captions, dev)
            for s in (0.5, 0.8, 0.9, 0.95, 0.98):
                xt = (1 - s) * x0 + s * noise
                v = pipe.transformer(hidden_states=xt.to(dtypes[dname]), timestep=torch.full((len(scenes),), s * 1000.0, device=dev),
                                     encoder_hidden_states=text.to(dtypes[dname]), return_dict=False)[0].float()
                results["one_step"].append({"dtype": dname, "sigma": s, **read_back(xt - s * v, scenes, geometry)})
                print("one-step", dname, s, {k: round(x, 3) for k, x in results["one_step"][-1].items() if isinstance(x, float)}, flush=True)
        for sname, steps, g in itertools.product(args.schedulers, args.steps, args.guidance):
            pipe.scheduler = unipc if sname == "unipc" else euler
            t0 = time.perf_counter()
            lat = sample_latents(pipe, captions, geometry, steps=steps, guidance=g, batch_size=16)
            r = {"dtype": dname, "scheduler": sname, "steps": steps, "guidance": g, "seconds": round(time.perf_counter() - t0, 2),
                 **read_back(lat, scenes, geometry)}
            results["runs"].append(r)
            print("sample", {k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items()}, flush=True)
        del pipe
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
