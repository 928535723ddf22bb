"""Check and time the Gluon Hopper forward (`sparge/kernels/hopper_fwd.py`) against the `tl` kernel and cuDNN.

First a correctness pass against the float32 reference (`sparge.reference`) at small shapes: tails, both head
dims, bf16 and fp16, empty rows, strided views. Then each configuration is timed at the given shapes, each
output compared with the `tl` kernel's; every time uses the bench's steady-clock timer (1 s warm-up, at least
5 calls), and with ``--rounds 2`` the configurations are timed again in reverse order, so clock drift over the
run shows as a difference between the rounds instead of favouring whichever ran first. Prints and writes JSON. Usage:
  python benchmarks/tune_hopper_fwd.py --out benchmarks/results/tune_hopper_fwd_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparge
from sparge import reference
from sparge.bench import _timer, environment
from sparge.kernels import block_sparse_attn as K
from sparge.kernels import hopper_fwd as G


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    return float((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30))


def correctness(configs: list[dict]) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    cases = [(1, 2, 384, 384, 128, torch.bfloat16, 0.4), (2, 3, 300, 200, 128, torch.float16, 0.5),
             (1, 2, 1000, 777, 64, torch.bfloat16, 0.3), (1, 1, 130, 70, 128, torch.bfloat16, 1.0),
             (1, 12, 4096, 4096, 128, torch.bfloat16, 0.1)]  # 384 tiles: several per program, empty ones between
    for b, h, lq, lk, d, dtype, density in cases:
        g = torch.Generator(device=dev).manual_seed(lq + lk + d)
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g) for n in (lq, lk, lk))
        tq, tk = -(-lq // 128), -(-lk // 64)
        mask = torch.rand(b, h, tq, tk, device=dev, generator=g) < density
        mask[..., 0, :] = False  # an empty row
        bm = sparge.BlockMask.from_dense(mask, lq, lk)
        scale = d ** -0.5
        assert G.supported(q, k, v, 128, 64), "Gluon path not supported on this machine"
        o_ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask, scale=scale)
        lse_ref = reference.block_sparse_lse(q.float(), k.float(), mask, scale=scale)
        o_tl, _ = K._launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64, impl="triton")
        fin = torch.isfinite(lse_ref)
        for cfg in configs:
            o, lse = G.launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64, config=cfg)
            row = {"shape": [b, h, lq, lk, d], "dtype": str(dtype), "density": density, **cfg,
                   "rel_err_gluon": _rel(o, o_ref), "rel_err_tl": _rel(o_tl, o_ref),
                   "lse_max_abs_err": float((lse[fin] - lse_ref[fin]).abs().max()),
                   "empty_rows_ok": bool((o[..., :128, :] == 0).all() and torch.isinf(lse[..., :128]).all())}
            row["ok"] = row["rel_err_gluon"] <= 2 * row["rel_err_tl"] + 1e-3 and row["lse_max_abs_err"] < 1e-2 and row["empty_rows_ok"]
            rows.append(row)
            print(row, flush=True)
    # strided [B, L, H, D] -> [B, H, L, D] views, as diffusers passes them
    b, h, l, d = 1, 4, 1000, 128
    x = torch.randn(3, b, l, h, d, device=dev, dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(0))
    mask = torch.rand(b, h, 8, 16, device=dev) < 0.5
    bm = sparge.BlockMask.from_dense(mask, l, l)
    o_ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask)
    o_tl, _ = K._launch_fwd(q, k, v, bm.row_count, bm.row_index, d ** -0.5, 128, 64, impl="triton")
    for cfg in configs:
        o, _ = G.launch_fwd(q, k, v, bm.row_count, bm.row_index, d ** -0.5, 128, 64, config=cfg)
        row = {"shape": "strided [B,L,H,D] view", **cfg, "rel_err_gluon": _rel(o, o_ref), "rel_err_tl": _rel(o_tl, o_ref)}
        row["ok"] = row["rel_err_gluon"] <= 2 * row["rel_err_tl"] + 1e-3
        rows.append(row)
        print(row, flush=True)
    return rows


def timing(shape: tuple[int, int, int, int], sparsity: float, configs: list[dict], skew: bool = False,
           rounds: int = 1) -> list[dict]:
    b, h, l, d = shape
    dev = torch.device("cuda")
    time_ms = _timer(dev, 1000, 300)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, h, l, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    tq, tk = -(-l // 128), -(-l // 64)
    if skew:  # row densities spread evenly over [0, 2 * kept]: a few heavy rows, as on real video attention
        dens = torch.linspace(0, 2 * (1 - sparsity), tq, device=dev)[torch.randperm(tq, device=dev, generator=g)]
        mask = torch.rand(b, h, tq, tk, device=dev, generator=g) < dens[None, None, :, None]
        mask[..., 0] = True
        bm = sparge.BlockMask.from_dense(mask, l, l)
    elif sparsity > 0:
        kept = 1 - sparsity
        bm = sparge.build_block_mask(q, k, topk=kept, topp=kept / 2)
    else:
        bm = sparge.BlockMask.from_dense(torch.ones(b, h, tq, tk, dtype=torch.bool, device=dev), l, l)
    scale = d ** -0.5
    kept_blocks = float(bm.row_count.sum())
    flops = 4 * kept_blocks * 128 * 64 * d  # QK^T and PV over the kept 128x64 blocks
    o_tl, _ = K._launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64, impl="triton")
    ms_tl = time_ms(lambda: K._launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64, impl="triton"))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms_cudnn = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    rows = [{"shape": list(shape), "sparsity": float(bm.sparsity()), "skew": skew, "kernel": "tl", "ms": ms_tl,
             "tflops": flops / ms_tl / 1e9, "cudnn_dense_ms": ms_cudnn}]
    print(rows[0], flush=True)
    for rnd, cfg in ((r, c) for r in range(rounds) for c in (configs if r % 2 == 0 else configs[::-1])):
        try:
            o, _ = G.launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64, config=cfg)
            ms = time_ms(lambda: G.launch_fwd(q, k, v, bm.row_count, bm.row_index, scale, 128, 64, config=cfg))
            row = {"shape": list(shape), "sparsity": float(bm.sparsity()), "skew": skew, "kernel": "gluon", "round": rnd, **cfg, "ms": ms,
                   "tflops": flops / ms / 1e9, "vs_tl": ms_tl / ms, "rel_diff_vs_tl": _rel(o, o_tl)}
        except Exception as e:  # noqa: BLE001 - a config that fails to compile or run is recorded, not fatal
            row = {"shape": list(shape), "kernel": "gluon", **cfg, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1,12,32760,128@0.95;1,12,32760,128@0;1,40,75600,128@0.95;1,12,32760,128@0.95@skew",
                    help="B,H,L,D@sparsity[@skew] items separated by ';' (sparsity 0: a dense mask)")
    ap.add_argument("--configs", default="1:3,1:4,2:2", help="pair:num_buf items (K/V tiles of pair * 64 keys, ring slots)")
    ap.add_argument("--lpt", default="0,1", help="process tiles heaviest row first (0, 1 or both)")
    ap.add_argument("--q-buf", default="1,2", help="tiles whose Q is in shared memory at once (1, 2 or both)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="time the configurations this many times, alternating order")
    args = ap.parse_args()
    configs = [{"pair": int(pn.split(":")[0]), "num_buf": int(pn.split(":")[1]), "lpt": lpt, "q_buf": qb}
               for pn, lpt, qb in itertools.product(args.configs.split(","), *([int(x) for x in a.split(",")]
                                                                                for a in (args.lpt, args.q_buf)))]
    checked = [c for c in configs if c["lpt"] == 0]
    result = {"environment": environment(torch.device("cuda")), "correctness": [] if args.skip_check else correctness(checked), "timing": []}
    for spec in args.shapes.split(";"):
        shape, sp, *mode = spec.split("@")
        result["timing"] += timing(tuple(int(x) for x in shape.split(",")), float(sp), configs, skew=mode == ["skew"], rounds=args.rounds)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
