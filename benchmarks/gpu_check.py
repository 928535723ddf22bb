"""GPU correctness at the Wan2.1-1.3B shape and mask-building time; writes JSON.

bf16 block-sparse attention (5% random block mask) against a float32 plain-torch reference on the
same mask (per head, TF32 off): relative L2 error of the output and of dq, dk, dv. Then the time to
build the hybrid mask (pooling, scores, Top-k/Top-p, row and column lists) at that shape.

Usage: python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import sparge
from sparge import reference
from sparge.bench import environment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="1,12,32760,128")
    ap.add_argument("--density", type=float, default=0.05)
    args = ap.parse_args()
    b, h, l, d = (int(x) for x in args.shape.split(","))
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, h, l, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    do = torch.randn(b, h, l, d, device=dev, dtype=torch.bfloat16, generator=g)
    tq, tk = -(-l // 128), -(-l // 64)
    mask = torch.rand(b, h, tq, tk, device=dev, generator=g) < args.density
    mask[..., 0] = True
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o = sparge.block_sparse_attention(qg, kg, vg, mask)
    o.backward(do)
    errs = {"o": [], "dq": [], "dk": [], "dv": []}
    num = {n: 0.0 for n in errs}
    den = {n: 0.0 for n in errs}
    for hh in range(h):
        qr, kr, vr = (t[:, hh:hh + 1].float().requires_grad_() for t in (q, k, v))
        r = reference.block_sparse_attention(qr, kr, vr, mask[:, hh:hh + 1])
        r.backward(do[:, hh:hh + 1].float())
        for n, got, ref in (("o", o, r), ("dq", qg.grad, qr.grad), ("dk", kg.grad, kr.grad), ("dv", vg.grad, vr.grad)):
            diff = got[:, hh:hh + 1].float() - ref.detach()
            num[n] += float(diff.pow(2).sum())
            den[n] += float(ref.detach().pow(2).sum())
        del qr, kr, vr, r
        torch.cuda.empty_cache()
    rel = {n: (num[n] / den[n]) ** 0.5 for n in errs}
    nan = {n: bool(torch.isnan(t).any()) for n, t in (("o", o), ("dq", qg.grad), ("dk", kg.grad), ("dv", vg.grad))}
    print("relative L2 error vs fp32 reference:", rel, "nan:", nan, flush=True)

    from triton.testing import do_bench

    timings = {}
    for k_, p_ in ((0.03, 0.2), (0.05, 0.025)):
        fn = lambda: sparge.build_block_mask(q, k, topk=k_, topp=p_)
        timings[f"k={k_},p={p_}"] = do_bench(fn, warmup=50, rep=300, return_mode="median")
    pool_ms = do_bench(lambda: sparge.mask.block_pool(q, 128), warmup=50, rep=300, return_mode="median")
    print("mask build ms:", timings, "pool q ms:", pool_ms, flush=True)
    res = {
        "command": "python benchmarks/gpu_check.py --out " + args.out,
        "environment": environment(dev),
        "shape": {"B": b, "H": h, "L": l, "D": d},
        "mask_density": args.density,
        "measured_sparsity": sparge.mask_sparsity(mask, l, l),
        "rel_l2_error_bf16_vs_fp32": rel,
        "nan": nan,
        "mask_build_ms": timings,
        "pool_q_ms": pool_ms,
        "date": time.strftime("%Y-%m-%d"),
    }
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
