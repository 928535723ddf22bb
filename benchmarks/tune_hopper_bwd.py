"""Time the Gluon Hopper backward (`sparge/kernels/hopper_bwd.py`) against the `tl` backward kernels.

For each shape and mask: the whole backward with the `tl` kernels (`impl="triton"`) and as dispatched
(`impl="auto"`), each one's kernels under torch.profiler, and the Gluon dK/dV and dQ kernels alone per
configuration (triton's do_bench, which empties the L2 cache before each call), each Gluon result compared
with the `tl` one. Prints and writes JSON. Usage:
  python benchmarks/tune_hopper_bwd.py --out benchmarks/results/tune_hopper_bwd_h100.json
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

import sparge
from sparge.bench import environment
from sparge.kernels import block_sparse_attn as K
from sparge.kernels import hopper_bwd as G


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    return float((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30))


def _ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _kernel_times(fn, reps: int = 20) -> dict[str, float]:
    """Mean device time per call of each kernel that ``fn`` launches (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.count:
            out[e.key[:60]] = e.device_time_total / 1e3 / reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1,12,32760,128,0.95;1,12,32760,128,0;1,40,75600,128,0.95",
                    help="B,H,L,D,sparsity;... (sparsity 0 = dense mask)")
    ap.add_argument("--configs", default="2:1", help="dK/dV num_buf:kv_buf,...")
    ap.add_argument("--dq-bufs", default="3", help="dQ ring slots, comma-separated (2 or 3: more does not fit in shared memory next to Q, dO and O)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    configs = [dict(zip(("num_buf", "kv_buf"), (int(x) for x in c.split(":")))) for c in args.configs.split(",")]
    rows = []
    for spec in args.shapes.split(";"):
        b, h, l, d, sp = spec.split(",")
        b, h, l, d, sp = int(b), int(h), int(l), int(d), float(sp)
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(b, h, l, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        kept = 1 - sp
        bm = sparge.build_block_mask(q, k, topk=kept, topp=kept / 2) if sp > 0 else \
            sparge.BlockMask.from_dense(torch.ones(b, h, -(-l // 128), -(-l // 64), dtype=torch.bool, device=dev), l, l)
        cc, ci = bm.columns()
        scale = d ** -0.5
        o, lse = K._launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64)
        _, stats = G.launch_dq(do, q, k, v, o, lse, bm.row_count, bm.row_index, scale, 128, 64)
        args_bwd = (do, q, k, v, o, lse, bm.row_count, bm.row_index, cc, ci, scale, 128, 64)
        ref = K._launch_bwd(*args_bwd, impl="triton")
        row = {"shape": [b, h, l, d], "sparsity_target": sp, "measured_sparsity": bm.sparsity(),
               "bwd_tl_ms": _ms(lambda: K._launch_bwd(*args_bwd, impl="triton")),
               "bwd_auto_ms": _ms(lambda: K._launch_bwd(*args_bwd, impl="auto"))}
        row["kernels_ms"] = {impl: _kernel_times(lambda: K._launch_bwd(*args_bwd, impl=impl)) for impl in ("triton", "auto")}
        row["gluon"] = []
        for cfg in configs:
            dk, dv = G.launch_dkdv(do, q, k, v, stats, cc, ci, scale, 128, 64, config=cfg)
            ms = _ms(lambda: G.launch_dkdv(do, q, k, v, stats, cc, ci, scale, 128, 64, config=cfg))
            flop = 4 * 2 * 128 * 64 * d * float(cc.sum())  # four products per kept (query block, key block) pair
            row["gluon"].append({**cfg, "dkdv_ms": ms, "tflops": flop / ms / 1e9,
                                 "rel_diff_dk_vs_tl": _rel(dk, ref[1]), "rel_diff_dv_vs_tl": _rel(dv, ref[2])})
        row["gluon_dq"] = []
        for nb in (int(x) for x in args.dq_bufs.split(",")):
            dq, _ = G.launch_dq(do, q, k, v, o, lse, bm.row_count, bm.row_index, scale, 128, 64, config={"num_buf": nb})
            ms = _ms(lambda: G.launch_dq(do, q, k, v, o, lse, bm.row_count, bm.row_index, scale, 128, 64, config={"num_buf": nb}))
            flop = 3 * 2 * 128 * 64 * d * float(bm.row_count.sum())
            row["gluon_dq"].append({"num_buf": nb, "dq_ms": ms, "tflops": flop / ms / 1e9, "rel_diff_dq_vs_tl": _rel(dq, ref[0])})
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"command": f"python benchmarks/tune_hopper_bwd.py --out {args.out} --shapes '{args.shapes}' --configs {args.configs} --dq-bufs {args.dq_bufs}",
                   "environment": environment(dev), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
