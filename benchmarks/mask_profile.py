"""Where mask building spends its time: per-kernel device times (torch.profiler), host launch time per
call, CUDA-graph time, the pooled-product kernel's tiles and precision and the selection kernel's warps per
row swept. One JSON per run.

  python benchmarks/mask_profile.py --out mask_profile.json [--shapes wan2.1-1.3b-480p,wan2.1-14b-720p]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import pstats
import time
from collections import defaultdict

import torch
from triton.testing import do_bench

import sparge
from sparge.bench import Shape, capture_graph, environment, host_ms_per_call
from sparge.kernels.mask_lut import SCORES_CONFIG, pooled_logits, select_blocks, select_warps
from sparge.kernels.pool import block_mean_pair


def profile_one(shape: Shape, sparsity: float) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k = (torch.randn(shape.b, shape.h, shape.l, shape.d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    kept = 1 - sparsity
    build = lambda: sparge.build_block_mask(q, k, topk=kept, topp=kept / 2)
    with_cols = lambda: build().columns()
    res: dict = {"shape": shape.name, "sparsity_target": sparsity, "measured_sparsity": build().sparsity()}
    res["build_ms"] = do_bench(build, warmup=25, rep=200, return_mode="median")
    res["build_with_columns_ms"] = do_bench(with_cols, warmup=25, rep=200, return_mode="median")
    res["host_us_per_build"] = host_ms_per_call(build, 50) * 1e3
    graph = capture_graph(build, dev)
    res["graph_ms"] = do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    # per-kernel device times
    for _ in range(3):
        with_cols()
    torch.cuda.synchronize()
    reps = 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            with_cols()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:80]] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    res["kernels_us_per_build"] = {name: t / reps for name, t in sorted(per.items(), key=lambda kv: -kv[1])}
    # selection kernel: warps per row
    pq, pk = block_mean_pair(q, k, 128, 64)
    logits = torch.matmul(pq, pk.transpose(-1, -2)).contiguous()
    exact = torch.matmul(pq.double(), pk.double().transpose(-1, -2))
    err = lambda x: float(((x.double() - exact).abs() / exact.abs().amax(-1, keepdim=True)).max())
    scores = [{"kernel": "torch.matmul", "ms": do_bench(lambda: torch.matmul(pq, pk.transpose(-1, -2)), warmup=25, rep=100,
                                                        return_mode="median"), "max_rel_err": err(logits)}]
    for bm_, bn_, bd_, prec, w in [(64, 64, 32, "tf32x3", 4), (64, 128, 32, "tf32x3", 4), (128, 64, 32, "tf32x3", 8),
                                  (32, 64, 32, "tf32x3", 4), (64, 64, 32, "ieee", 4), (64, 64, 32, "tf32", 4)]:
        cfg = dict(block_m=bm_, block_n=bn_, block_d=bd_, precision=prec, num_warps=w)
        ms = do_bench(lambda: pooled_logits(pq, pk, **cfg), warmup=25, rep=100, return_mode="median")
        scores.append({"kernel": "pooled_logits", **cfg, "ms": ms, "max_rel_err": err(pooled_logits(pq, pk, **cfg))})
        print(scores[-1], flush=True)
    res["scores_default"] = dict(SCORES_CONFIG)
    res["scores_sweep"] = scores
    tk = pk.shape[2]
    n_k = max(1, math.ceil(kept * tk))
    block_t = max(16, 1 << (tk - 1).bit_length())
    res["select_default_warps"] = select_warps(block_t)
    ref = select_blocks(logits, shape.d ** -0.5, n_k, kept / 2)
    sweep = {}
    for w in (1, 2, 4, 8):
        out = select_blocks(logits, shape.d ** -0.5, n_k, kept / 2, num_warps=w)
        same = all(torch.equal(a, b) for a, b in zip(out, ref))
        sweep[w] = {"ms": do_bench(lambda: select_blocks(logits, shape.d ** -0.5, n_k, kept / 2, num_warps=w), warmup=25, rep=100, return_mode="median"),
                    "same_as_default": same}
    res["select_warps_sweep"] = sweep
    res["pool_ms"] = do_bench(lambda: block_mean_pair(q, k, 128, 64), warmup=25, rep=100, return_mode="median")
    res["pool_gbps"] = 2 * q.numel() * q.element_size() / (res["pool_ms"] * 1e-3) / 1e9
    ref = block_mean_pair(q, k, 128, 64)
    pool_sweep = []
    cands = [dict(tokens=t, num_stages=st, d_chunk=dc, num_warps=w)
             for t, st, dc, w in [(128, 1, 128, 4), (128, 1, 128, 8), (128, 1, 64, 2), (256, 2, 128, 4), (512, 3, 64, 4)]]
    for c in cands:
        out = block_mean_pair(q, k, 128, 64, **c)
        ms = do_bench(lambda: block_mean_pair(q, k, 128, 64, **c), warmup=25, rep=100, return_mode="median")
        pool_sweep.append({**c, "ms": ms, "same": all(torch.equal(a, b) for a, b in zip(out, ref)),
                           "gbps": 2 * q.numel() * q.element_size() / (ms * 1e-3) / 1e9})
    # what torch's own reduction reaches on the same bytes (full blocks only)
    lf = (shape.l // 128) * 128
    tq_ = lambda: (q[:, :, :lf].unflatten(2, (-1, 128)).sum(3, dtype=torch.float32), k[:, :, :lf].unflatten(2, (-1, 64)).sum(3, dtype=torch.float32))
    ms = do_bench(tq_, warmup=25, rep=100, return_mode="median")
    res["torch_sum_reference"] = {"ms": ms, "gbps": 2 * q[:, :, :lf].numel() * q.element_size() / (ms * 1e-3) / 1e9}
    res["pool_sweep"] = pool_sweep
    return res


def host_costs() -> dict:
    """Host microseconds per call of each step, on tiny inputs (the GPU is never the bottleneck)."""
    dev = torch.device("cuda")
    q = torch.randn(1, 2, 256, 128, device=dev, dtype=torch.bfloat16)
    pq, pk = block_mean_pair(q, q, 128, 64)
    logits = torch.matmul(pq, pk.transpose(-1, -2)).contiguous()
    steps = {
        "torch.empty": lambda: torch.empty(16, device=dev),
        "pooled_logits": lambda: pooled_logits(pq, pk),
        "block_mean_pair": lambda: block_mean_pair(q, q, 128, 64),
        "select_blocks": lambda: select_blocks(logits, 0.1, 1, 0.1),
        "build_block_mask": lambda: sparge.build_block_mask(q, q, topk=0.5, topp=0.2),
    }
    bm = sparge.build_block_mask(q, q, topk=0.5, topp=0.2)
    steps["block_sparse_attention(prebuilt mask)"] = lambda: sparge.block_sparse_attention(q, q, q, bm)
    steps["sparge_attention"] = lambda: sparge.sparge_attention(q, q, q, topk=0.5, topp=0.2)
    out = {}
    # the GPU is left idle here: these tiny calls finish faster than they are launched, so 300 of them never fill
    # the launch queue (with the GPU kept busy, as host_ms_per_call does, they would and the host would wait)
    for name, fn in steps.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        n = 300
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
    # where the host time of one call goes (every kernel is compiled by now)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        steps["sparge_attention"]()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    print(buf.getvalue()[-4000:], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="wan2.1-1.3b-480p,wan2.1-14b-720p")
    ap.add_argument("--sparsity", type=float, default=0.95)
    args = ap.parse_args()
    rows = []
    host = host_costs()
    print(json.dumps(host, indent=1), flush=True)
    for name in args.shapes.split(","):
        r = profile_one(Shape.parse(name), args.sparsity)
        print(json.dumps(r, indent=1), flush=True)
        rows.append(r)
    with open(args.out, "w") as f:
        json.dump({"command": f"python benchmarks/mask_profile.py --out {args.out} --shapes {args.shapes} --sparsity {args.sparsity}",
                   "environment": environment(torch.device("cuda")), "host_us_per_call": host, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
