"""Diagnostic: fwd+bwd at the 14B 720p shape, 95%, timed as "total" (mask + kernels in one call, as
`sparge bench` times it) and as "kernel" (a prebuilt mask), with back-to-back perf_counter loops, with
triton's do_bench (the bench's timer) and under torch.profiler (device time per kernel).

Run on an H100 (session 9, in two calls: the profiler part first, then the do_bench part):
`python benchmarks/diag_total_gap_14b.py`; RESULTS.md records its output.
"""
import dataclasses, time, sys
import torch
from torch.profiler import ProfilerActivity, profile
from sparge.attention import block_sparse_attention
from sparge.mask import build_block_mask

B, H, L, D = 1, 40, 75600, 128
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
do = torch.randn_like(q)
qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
kw = dict(topk=0.05, topp=0.025, block_q=128, block_k=64)
bm0 = build_block_mask(q, k, **kw)

def total():
    qg.grad = kg.grad = vg.grad = None
    block_sparse_attention(qg, kg, vg, build_block_mask(qg.detach(), kg.detach(), **kw)).backward(do)

def kernel():
    qg.grad = kg.grad = vg.grad = None
    block_sparse_attention(qg, kg, vg, dataclasses.replace(bm0)).backward(do)

def mask_then_kernel():
    qg.grad = kg.grad = vg.grad = None
    bm = build_block_mask(q, k, **kw)
    block_sparse_attention(qg, kg, vg, bm).backward(do)

for name, f in (("total", total), ("kernel", kernel), ("mask_then_kernel(q not qg)", mask_then_kernel), ("total", total)):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    print(name, (time.perf_counter() - t) / 5 * 1e3, "ms", flush=True)
from triton.testing import do_bench
for name, f in (("total", total), ("kernel", kernel), ("total", total), ("kernel", kernel)):
    print("do_bench", name, do_bench(f, warmup=25, rep=100, return_mode="median"), flush=True)
for name, f in (("total", total), ("kernel", kernel)):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(2):
            f()
        torch.cuda.synchronize()
    print("=====", name)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=8, max_name_column_width=60))
