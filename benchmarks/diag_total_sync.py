"""Diagnostic: does the fwd+bwd "total" path (mask building + forward + backward) synchronise the host or
make the caching allocator call cudaMalloc/cudaFree? Checked at the 14B 720p and 1.3B 480p shapes, 95%,
with torch's sync debug mode and the allocator's counters, then timed with do_bench in this fresh process.

Run on an H100 (session 9): `python benchmarks/diag_total_sync.py`; RESULTS.md records its output.
"""
import torch, warnings
from sparge.attention import block_sparse_attention
from sparge.mask import build_block_mask
for (H, L) in ((40, 75600), (12, 32760)):
    q, k, v = (torch.randn(1, H, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    kw = dict(topk=0.05, topp=0.025, block_q=128, block_k=64)
    def total():
        qg.grad = kg.grad = vg.grad = None
        block_sparse_attention(qg, kg, vg, build_block_mask(qg.detach(), kg.detach(), **kw)).backward(do)
    for _ in range(3): total()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        total(); total()
    torch.cuda.set_sync_debug_mode(0)
    print(H, L, "sync warnings:", len(w), [str(x.message)[:150] for x in w][:4])
    s = torch.cuda.memory_stats()
    print("num_alloc_retries", s["num_alloc_retries"], "segments", s["segment.all.current"], "cudaMalloc count", s.get("num_device_alloc"), "cudaFree", s.get("num_device_free"))
    torch.cuda.synchronize()
    import time
    from triton.testing import do_bench
    a = torch.cuda.memory_stats().get("num_device_alloc"); f = torch.cuda.memory_stats().get("num_device_free")
    print("do_bench total", do_bench(total, warmup=25, rep=100, return_mode="median"))
    s = torch.cuda.memory_stats(); print("during do_bench: cudaMalloc", s.get("num_device_alloc") - a, "cudaFree", s.get("num_device_free") - f)
    del q, k, v, do, qg, kg, vg
    torch.cuda.empty_cache()
