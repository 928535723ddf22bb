"""Host (Python) time per sparge call, apart from device time: what an eager call costs when the GPU waits for it.

The GPU is first given ~0.5 s of work (`torch.cuda._sleep`), so the calls timed after it only enqueue; their
perf_counter time is the host's. cProfile then shows where that time goes. 1.3B shape, bf16. Usage:
  python benchmarks/host_overhead.py [--sparsity 0.95 0.97] [--calls 20]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from sparge.attention import block_sparse_attention
from sparge.bench import host_ms_per_call
from sparge.mask import build_block_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.95, 0.97])
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    for s in args.sparsity:
        knobs = dict(topk=1 - s, topp=(1 - s) / 2)
        bm = build_block_mask(q, k, **knobs)

        def fwd_bwd_total() -> None:
            qg.grad = kg.grad = vg.grad = None
            block_sparse_attention(qg, kg, vg, build_block_mask(qg.detach(), kg.detach(), **knobs)).backward(do)

        calls = {"mask": lambda: build_block_mask(q, k, **knobs),
                 "fwd kernel": lambda: block_sparse_attention(q, k, v, bm),
                 "fwd total": lambda: block_sparse_attention(q, k, v, build_block_mask(q, k, **knobs)),
                 "fwd+bwd total": fwd_bwd_total}
        for name, fn in calls.items():
            print(f"sparsity {s}: {name}: host {host_ms_per_call(fn, args.calls):.3f} ms per call", flush=True)
        prof = cProfile.Profile()
        host_ms_per_call(fwd_bwd_total, args.calls, profiler=prof)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue()[-6000:], flush=True)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(30)
        print(out.getvalue()[-6000:], flush=True)


if __name__ == "__main__":
    main()
