"""Diagnostics: why `sparge bench`'s 14B forward+backward "total" (mask + fwd + bwd in one call) reads above its parts.

Five parts, each run on an H100 in its own process (gap, sync, order in session 9; bench, bisect in session 10;
RESULTS.md records their output):

    python benchmarks/diag_total_gap.py gap     # 14B 720p, 95%: "total" vs "kernel" (prebuilt mask) with
                                                #   perf_counter loops, do_bench and torch.profiler
    python benchmarks/diag_total_gap.py sync    # 14B and 1.3B: host syncs on the path (sync debug mode), the
                                                #   allocator's cudaMalloc/cudaFree counts, do_bench of "total"
    python benchmarks/diag_total_gap.py order   # 14B: do_bench of "total" fresh, after 10 cuDNN fwd+bwd calls,
                                                #   and after empty_cache()
    python benchmarks/diag_total_gap.py bench   # 14B: the bench's own sparge sequence (bench_attention, sparge
                                                #   only), then every do_bench sample of "total" and "kernel"
                                                #   at the bench's rep (100 ms) and at 1000 ms in the same process
    python benchmarks/diag_total_gap.py bisect  # 14B: prefixes of the bench's sparge sequence, each in a fresh
                                                #   process, then every do_bench sample of "total" with the SM
                                                #   clock and board power sampled from NVML alongside
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from sparge.attention import block_sparse_attention
from sparge.mask import build_block_mask

KNOBS = dict(topk=0.05, topp=0.025, block_q=128, block_k=64)  # what `sparge bench` uses at 95%


class FwdBwd:
    """bf16 ``[1, H, L, 128]`` inputs, their grad-requiring copies, and the calls the parts time."""

    def __init__(self, h: int, length: int, *, seed: int | None = None, prebuilt: bool = False) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed) if seed is not None else None
        self.q, self.k, self.v = (torch.randn(1, h, length, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                                  for _ in range(3))
        self.do = torch.randn_like(self.q)
        self.qg, self.kg, self.vg = (t.detach().clone().requires_grad_() for t in (self.q, self.k, self.v))
        self.bm = build_block_mask(self.q, self.k, **KNOBS) if prebuilt else None

    def _backward(self, mask) -> None:
        self.qg.grad = self.kg.grad = self.vg.grad = None
        block_sparse_attention(self.qg, self.kg, self.vg, mask).backward(self.do)

    def total(self) -> None:
        """Mask building + fwd + bwd in one call, as the bench's "total"."""
        self._backward(build_block_mask(self.qg.detach(), self.kg.detach(), **KNOBS))

    def kernel(self) -> None:
        """fwd + bwd on a copy of the prebuilt mask (its column lists built afresh), as the bench's "kernel"."""
        self._backward(dataclasses.replace(self.bm))

    def mask_then_kernel(self) -> None:
        """As `total`, with the mask built from the non-grad originals."""
        self._backward(build_block_mask(self.q, self.k, **KNOBS))

    def cudnn(self) -> None:
        self.qg.grad = self.kg.grad = self.vg.grad = None
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(self.qg, self.kg, self.vg).backward(self.do)


def gap() -> None:
    x = FwdBwd(40, 75600, seed=0, prebuilt=True)
    for name, f in (("total", x.total), ("kernel", x.kernel), ("mask_then_kernel(q not qg)", x.mask_then_kernel),
                    ("total", x.total)):
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            f()
        torch.cuda.synchronize()
        print(name, (time.perf_counter() - t) / 5 * 1e3, "ms", flush=True)
    for name, f in (("total", x.total), ("kernel", x.kernel), ("total", x.total), ("kernel", x.kernel)):
        print("do_bench", name, do_bench(f, warmup=25, rep=100, return_mode="median"), flush=True)
    for name, f in (("total", x.total), ("kernel", x.kernel)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(2):
                f()
            torch.cuda.synchronize()
        print("=====", name)
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        print(p.key_averages().table(sort_by="cpu_time_total", row_limit=8, max_name_column_width=60))


def sync() -> None:
    for h, length in ((40, 75600), (12, 32760)):
        x = FwdBwd(h, length)
        for _ in range(3):
            x.total()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            x.total()
            x.total()
        torch.cuda.set_sync_debug_mode(0)
        print(h, length, "sync warnings:", len(w), [str(m.message)[:150] for m in w][:4])
        s = torch.cuda.memory_stats()
        print("num_alloc_retries", s["num_alloc_retries"], "segments", s["segment.all.current"],
              "cudaMalloc count", s.get("num_device_alloc"), "cudaFree", s.get("num_device_free"))
        torch.cuda.synchronize()
        s = torch.cuda.memory_stats()
        a, f = s.get("num_device_alloc"), s.get("num_device_free")
        print("do_bench total", do_bench(x.total, warmup=25, rep=100, return_mode="median"))
        s = torch.cuda.memory_stats()
        print("during do_bench: cudaMalloc", s.get("num_device_alloc") - a, "cudaFree", s.get("num_device_free") - f)
        del x
        torch.cuda.empty_cache()


def order() -> None:
    x = FwdBwd(40, 75600)

    def stats() -> str:
        s = torch.cuda.memory_stats()
        return (f"reserved {s['reserved_bytes.all.current'] / 2**30:.2f} GiB, segments {s['segment.all.current']}, "
                f"cudaMalloc {s['num_device_alloc']}")

    for _ in range(3):
        x.total()
    print("fresh:", do_bench(x.total, warmup=25, rep=500, return_mode="median"), "ms;", stats(), flush=True)
    for _ in range(10):
        x.cudnn()
    torch.cuda.synchronize()
    print("after cuDNN:", do_bench(x.total, warmup=25, rep=500, return_mode="median"), "ms;", stats(), flush=True)
    torch.cuda.empty_cache()
    print("after empty_cache:", do_bench(x.total, warmup=25, rep=500, return_mode="median"), "ms;", stats(), flush=True)


def bench() -> None:
    from sparge.bench import Shape, bench_attention

    for r in bench_attention(Shape.parse("wan2.1-14b-720p"), [0.95], methods=("sparge",)):
        print("bench_attention", r["pass"], "kernel", round(r["ms"], 3), "mask", round(r["mask_ms"], 3),
              "total", round(r["total_ms"], 3), flush=True)
    x = FwdBwd(40, 75600, seed=0, prebuilt=True)
    for rep in (100, 1000):
        for name, f in (("total", x.total), ("kernel", x.kernel), ("total", x.total)):
            times = do_bench(f, warmup=25, rep=rep, return_mode="all")
            print(f"do_bench rep={rep} {name}: n={len(times)} median {sorted(times)[len(times) // 2]:.2f} ms, all",
                  [round(t, 2) for t in times], flush=True)


def bisect() -> None:
    """The bench's sparge sequence at 14B, step by step, timing "total" with do_bench after each step."""
    import subprocess
    import sys

    steps = ("mask_timer", "fwd_kernel", "fwd_total", "graph_mask", "graph_total", "bwd_kernel", "peak_mem")
    variants = [",".join(steps[:upto]) for upto in (0, 3, 5, 7)]
    variants += ["mask_timer,fwd_kernel,fwd_total,bwd_kernel,peak_mem",  # without the graphs
                 "bwd_kernel,peak_mem", "bwd_kernel,peak_mem,sleep", "bwd_kernel", "total_timer,peak_mem"]
    for v in variants:
        subprocess.run([sys.executable, __file__, "_bisect_one", v], check=True)


def _bisect_one(steps: str) -> None:
    from sparge.bench import capture_graph

    x = FwdBwd(40, 75600, seed=0, prebuilt=True)
    build = lambda: build_block_mask(x.q, x.k, **KNOBS)  # noqa: E731
    bm = x.bm
    whole = lambda: block_sparse_attention(x.q, x.k, x.v, build())  # noqa: E731
    bench = lambda f: do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731

    def graph(fn) -> None:
        bench(capture_graph(fn, torch.device("cuda")).replay)

    def peak() -> None:
        x.total()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        x.total()
        torch.cuda.synchronize()

    run = {"mask_timer": lambda: bench(build), "fwd_kernel": lambda: bench(lambda: block_sparse_attention(x.q, x.k, x.v, bm)),
           "fwd_total": lambda: bench(whole), "graph_mask": lambda: graph(build), "graph_total": lambda: graph(whole),
           "bwd_kernel": lambda: bench(x.kernel), "total_timer": lambda: bench(x.total), "peak_mem": peak,
           "sleep": lambda: time.sleep(3)}
    for step in filter(None, steps.split(",")):
        run[step]()
    clocks: list[tuple[float, int, float]] = []
    sampling = threading.Event()

    def sample() -> None:  # SM clock (MHz) and board power (W) from NVML every 20 ms while do_bench runs
        while not sampling.is_set():
            try:
                clocks.append((time.perf_counter(), torch.cuda.clock_rate(), torch.cuda.power_draw() / 1000))
            except Exception as e:  # noqa: BLE001 - NVML missing: time without the clock trace
                clocks.append((time.perf_counter(), -1, -1.0))
                print("  no NVML:", e)
                return
            time.sleep(0.02)

    s0 = torch.cuda.memory_stats()
    sampler = threading.Thread(target=sample)
    sampler.start()
    times = do_bench(x.total, warmup=25, rep=500, return_mode="all")
    sampling.set()
    sampler.join()
    s1 = torch.cuda.memory_stats()
    t0 = clocks[0][0]
    print("  clock MHz / power W every 100 ms:", [(round(t - t0, 1), c, round(w)) for t, c, w in clocks[::5]])
    print(f"after [{steps}]: total median {sorted(times)[len(times) // 2]:.2f} ms, all {[round(t, 1) for t in times]}; "
          f"cudaMalloc {s1['num_device_alloc'] - s0['num_device_alloc']}, cudaFree {s1['num_device_free'] - s0['num_device_free']}, "
          f"reserved {s1['reserved_bytes.all.current'] / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "_bisect_one":
        _bisect_one(sys.argv[2])
        sys.exit()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("gap", "sync", "order", "bench", "bisect"))
    {"gap": gap, "sync": sync, "order": order, "bench": bench, "bisect": bisect}[ap.parse_args().part]()
