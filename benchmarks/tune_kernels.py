"""Sweep launch configurations of the block-sparse kernels at one shape; prints and writes JSON.

Each kernel family (fwd, dq, dkdv) is varied while the others keep their defaults; every candidate's
output is checked against the default configuration's. Usage:
  python benchmarks/tune_kernels.py --out benchmarks/results/tune_h100.json [--shape 1,12,32760,128] [--sparsity 0.95]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json

import torch
from triton.testing import do_bench

import sparge
from sparge.bench import environment
from sparge.kernels import block_sparse_attn as K


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="1,12,32760,128")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--kinds", default="fwd,dq,dkdv", help="comma-separated kernel families to sweep")
    args = ap.parse_args()
    b, h, l, d = (int(x) for x in args.shape.split(","))
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, l, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    kept = 1 - args.sparsity
    bm = sparge.build_block_mask(q, k, topk=kept, topp=kept / 2)
    scale = d ** -0.5
    base = copy.deepcopy(K.KERNEL_CONFIGS)
    bd = K._block_d(d)
    o_ref, lse_ref = K._launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64, impl="triton")
    g_ref = K._launch_bwd(do, q, k, v, o_ref, lse_ref, bm.row_count, bm.row_index, bm.col_count, bm.col_index, scale, 128, 64)
    rel = lambda a, r: float((a.float() - r.float()).norm() / r.float().norm())
    results = []
    space = {
        "fwd": [dict(split=1, pair=1, desc=1, num_warps=8, num_stages=st) for st in (2, 3, 4)]
        + [dict(split=1, pair=1, desc=0, num_warps=8, num_stages=st) for st in (3, 4)],
        "dq": [dict(split=s, pair=p, num_warps=w, num_stages=st) for s, p, w, st in itertools.product((1, 2), (1, 2), (4, 8), (2, 3))],
        "dkdv": [dict(sub_m=m, num_warps=w, num_stages=st) for m, w, st in itertools.product((32, 64), (4,), (1, 2))] + [dict(sub_m=64, num_warps=8, num_stages=1)],
    }
    space = {kind: space[kind] for kind in args.kinds.split(",")}
    for kind, cands in space.items():
        for cand in cands:
            K.KERNEL_CONFIGS = copy.deepcopy(base)
            K.KERNEL_CONFIGS[kind][bd] = cand
            try:
                if kind == "fwd":
                    fn = lambda: K._launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64, impl="triton")
                    out = fn()[0]
                    err = rel(out, o_ref)
                else:
                    fn = lambda: K._launch_bwd(do, q, k, v, o_ref, lse_ref, bm.row_count, bm.row_index, bm.col_count, bm.col_index, scale, 128, 64)
                    outs = fn()
                    err = max(rel(a, r) for a, r in zip(outs, g_ref))
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                results.append({"kind": kind, **cand, "ms": ms, "rel_diff_vs_default": err})
                print(f"{kind:5s} {cand} {ms:.3f} ms err {err:.2e}", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is a result too
                results.append({"kind": kind, **cand, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(f"{kind:5s} {cand} FAILED {type(e).__name__}", flush=True)
    K.KERNEL_CONFIGS = base
    best = {}
    for kind in space:
        ok = [r for r in results if r["kind"] == kind and "ms" in r and r["rel_diff_vs_default"] < 1e-2]
        best[kind] = min(ok, key=lambda r: r["ms"]) if ok else None
    print("best:", json.dumps(best, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump({"command": f"python benchmarks/tune_kernels.py --out {args.out} --shape {args.shape} --sparsity {args.sparsity} --kinds {args.kinds}",
                   "environment": environment(dev), "shape": [b, h, l, d], "measured_sparsity": bm.sparsity(),
                   "results": results, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
