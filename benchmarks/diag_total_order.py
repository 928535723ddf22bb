"""Diagnostic: does running cuDNN's fwd+bwd first (as `sparge bench` does) slow sparge's 14B fwd+bwd "total"?

do_bench of the total (mask + fwd + bwd in one call) in a fresh process, again after 10 cuDNN SDPA fwd+bwd
calls at the same shape, and again after `torch.cuda.empty_cache()`. Run on an H100 (session 9):
`python benchmarks/diag_total_order.py`; RESULTS.md records its output.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from sparge.attention import block_sparse_attention
from sparge.mask import build_block_mask

q, k, v = (torch.randn(1, 40, 75600, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
do = torch.randn_like(q)
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
kw = dict(topk=0.05, topp=0.025, block_q=128, block_k=64)


def total():
    qg.grad = kg.grad = vg.grad = None
    block_sparse_attention(qg, kg, vg, build_block_mask(qg.detach(), kg.detach(), **kw)).backward(do)


def cudnn():
    qg.grad = kg.grad = vg.grad = None
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(qg, kg, vg).backward(do)


def stats() -> str:
    s = torch.cuda.memory_stats()
    return f"reserved {s['reserved_bytes.all.current'] / 2**30:.2f} GiB, segments {s['segment.all.current']}, cudaMalloc {s['num_device_alloc']}"


for _ in range(3):
    total()
print("fresh:", do_bench(total, warmup=25, rep=500, return_mode="median"), "ms;", stats(), flush=True)
for _ in range(10):
    cudnn()
torch.cuda.synchronize()
print("after cuDNN:", do_bench(total, warmup=25, rep=500, return_mode="median"), "ms;", stats(), flush=True)
torch.cuda.empty_cache()
print("after empty_cache:", do_bench(total, warmup=25, rep=500, return_mode="median"), "ms;", stats(), flush=True)
