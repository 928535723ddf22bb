"""A/B of the test-bed background on the micro model (CPU): the old fixed waves against the gradient.

The question: does a background that varies monotonically along each axis teach a small Wan transformer
(relative 3D RoPE only, no absolute position embedding) where the frame's regions are, so that it can
place "at the top left" from the caption when the latents are still pure noise?

One variant per process (run the two side by side on two cores; about 16 minutes each at 2,500 steps;
an optional fourth argument changes the training seed)::

    python benchmarks/testbed_background_ab.py waves 2500 ab_waves.json
    python benchmarks/testbed_background_ab.py gradient 2500 ab_gradient.json

``gradient:A`` sets the gradient's amplitude to A (``gradient``: the data's own, 3). ``waves`` patches `sparge.testbed.data._background_field` back to the pattern used up to commit 754f49a
(``0.5 sin(pi (x + y / 2))`` and ``0.5 cos(pi (y - 0.3 x))``); ``gradient`` is the current data. Both train
the micro config (`TestbedConfig.micro`, batch 8, same seed) for the same number of steps, then measure:

- ``x0hat_pure_noise_centroid_err_px``: for 48 single-object held-out captions at noise 0.999 (four noise
  draws averaged), the distance between the centroid of the predicted clean latent's mass along the
  object's colour code (first frame) and the caption's start position; ``centre_guess_err_px`` is the
  same distance for a prediction that always sits at the frame centre (no position sense);
- ``samples``: `read_back` of dense samples (20 UniPC steps, guidance 4) for 32 held-out captions, with the
  rendered ground truth and the samples scored against other captions (chance) beside it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sparge.testbed.data as D  # noqa: E402


def _waves(geometry: D.Geometry, device: torch.device) -> torch.Tensor:
    basis = D._code_basis(device)
    _, bg = D.colour_codes(device)
    u1, u2 = basis[:, len(D.COLOURS) + 1], basis[:, len(D.COLOURS) + 2]
    y = torch.linspace(0, 1, geometry.height, device=device)[:, None]
    x = torch.linspace(0, 1, geometry.width, device=device)[None, :]
    pattern = (0.5 * torch.sin(math.pi * (x + 0.5 * y)) * u1[:, None, None]
               + 0.5 * torch.cos(math.pi * (y - 0.3 * x)) * u2[:, None, None])
    return bg[:, None, None] + pattern


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str]) -> int:
    variant = argv[0] if argv else ""
    amplitude = variant.partition(":")[2]
    if len(argv) not in (3, 4) or not (variant in ("waves", "gradient") or (variant.startswith("gradient:") and _is_number(amplitude))):
        print("usage: python benchmarks/testbed_background_ab.py {waves|gradient|gradient:AMPLITUDE} STEPS OUT.json [SEED]", file=sys.stderr)
        return 2
    steps, out = int(argv[1]), argv[2]
    torch.set_num_threads(1)
    if variant == "waves":
        D._background_field = _waves
    elif amplitude:
        D._GRADIENT = float(amplitude)
    from sparge.testbed.evaluate import sample_latents
    from sparge.testbed.train import TestbedConfig, encode_captions, train

    seed = {"seed": int(argv[3])} if len(argv) == 4 else {}  # weights, scenes and noise of training
    cfg = TestbedConfig.micro(max_steps=steps, minutes=60.0, batch_size=8, log_every=250, **seed)
    t0 = time.time()
    r = train(cfg, device="cpu", log=lambda s: print(variant, s, flush=True))
    pipe, geo = r.pipe, cfg.geometry
    res = {"variant": variant, "steps": steps, "seed": cfg.seed, "train_s": round(time.time() - t0, 1), "final_loss": r.history[-1]["loss"],
           "command": "python " + " ".join(sys.argv), "machine": "CPU, 1 thread per variant"}
    scenes = D.sample_scenes(48, seed=5, split="heldout", max_objects=1)
    codes, _ = D.colour_codes()
    cent, _ = D.trajectories(scenes, geo)
    ys = torch.arange(geo.height).float()[:, None]
    xs = torch.arange(geo.width).float()[None, :]
    with torch.no_grad():
        text = encode_captions(pipe, [s.caption for s in scenes], torch.device("cpu"))
        xh = 0
        for seed in range(4):
            noise = torch.randn((48, 16, geo.frames, geo.height, geo.width), generator=torch.Generator().manual_seed(seed))
            v = pipe.transformer(hidden_states=noise * 0.999 + 0.001 * D.render_latents(scenes, geo), timestep=torch.full((48,), 999.0),
                                 encoder_hidden_states=text, return_dict=False)[0]
            xh = xh + (0.999 * noise - 0.999 * v) / 4  # x_t - s v without x_t's 0.001 x0 term: no truth leaks in
        errs = []
        for i, sc in enumerate(scenes):
            w = torch.einsum("cthw,c->thw", xh[i], codes[D.COLOURS.index(sc.objects[0].colour)])[0].clamp_min(0)
            cy, cx = float((w * ys).sum() / w.sum()), float((w * xs).sum() / w.sum())
            errs.append(math.hypot(cy - float(cent[i, 0, 0, 0]), cx - float(cent[i, 0, 0, 1])))
        res["x0hat_pure_noise_centroid_err_px"] = sum(errs) / len(errs)
        res["centre_guess_err_px"] = sum(math.hypot(float(cent[i, 0, 0, 0]) - (geo.height - 1) / 2,
                                                    float(cent[i, 0, 0, 1]) - (geo.width - 1) / 2) for i in range(48)) / 48
    sc3 = D.sample_scenes(32, seed=0, split="heldout")
    lat = sample_latents(pipe, [s.caption for s in sc3], geo, steps=20, guidance=4.0, batch_size=32)
    res["samples"] = D.read_back(lat, sc3, geo)
    res["ground_truth"] = D.read_back(D.render_latents(sc3, geo), sc3, geo)
    res["chance"] = D.read_back(lat, sc3[1:] + sc3[:1], geo)
    print(json.dumps(res, indent=1))
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
