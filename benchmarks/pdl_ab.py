"""A/B of programmatic dependent launch on the forward path (mask kernels + Hopper forward), same process.

Times ``sparge_attention`` (mask + kernel, one eager call) and the same replayed from a CUDA graph, with
`sparge.kernels.USE_PDL` on and off, alternating rounds so clock drift hits both alike. Prints and writes JSON:
  python benchmarks/pdl_ab.py --out benchmarks/results/pdl_ab_h100.json [--shape wan2.1-1.3b-480p --sparsity 0.95]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from triton.testing import do_bench

import sparge
import sparge.kernels as kernels
from sparge.bench import Shape, environment


def graph_of(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="wan2.1-1.3b-480p")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    shape = Shape.parse(args.shape)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape.b, shape.h, shape.l, shape.d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    kept = 1 - args.sparsity
    fwd = lambda: sparge.sparge_attention(q, k, v, topk=kept, topp=kept / 2)
    outs, graphs, times = {}, {}, {True: {"eager": [], "graph": []}, False: {"eager": [], "graph": []}}
    for pdl in (True, False):
        kernels.USE_PDL = pdl
        outs[pdl] = fwd()
        graphs[pdl] = graph_of(fwd)
    for _ in range(args.rounds):
        for pdl in (True, False):
            kernels.USE_PDL = pdl
            times[pdl]["eager"].append(do_bench(fwd, warmup=25, rep=200, return_mode="median"))
            times[pdl]["graph"].append(do_bench(graphs[pdl].replay, warmup=25, rep=200, return_mode="median"))
    kernels.USE_PDL = True
    res = {"command": f"python benchmarks/pdl_ab.py --out {args.out} --shape {args.shape} --sparsity {args.sparsity} --rounds {args.rounds}",
           "environment": environment(torch.device("cuda")), "shape": shape.name, "sparsity": args.sparsity,
           "same_output": bool(torch.equal(outs[True], outs[False])),
           "ms": {("pdl" if p else "no_pdl"): {m: {"median": statistics.median(t), "all": t} for m, t in d.items()} for p, d in times.items()}}
    print(json.dumps(res["ms"], indent=1), "same output:", res["same_output"], flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
