"""Attention benchmarks: dense SDPA (flash, cuDNN), FlexAttention on the same block mask, and sparge.

Every figure is measured on the machine it runs on and labelled with it: GPU name, dtype, shapes,
library versions, measured sparsity. Times are medians of CUDA-event timings
(`triton.testing.do_bench`) after a warm-up long enough for the GPU's clocks to settle (1 s), over at
least 5 calls; mask building is timed on its own and also included in
sparge's "total" figures.

FLOP conventions: forward = ``4 * B * H * pairs * D`` where ``pairs`` is the number of (query, key)
pairs actually computed (``Lq * Lk`` for dense, the kept blocks' real area for block-sparse);
forward+backward = 3.5x forward (FlashAttention's convention). "Effective" TFLOP/s counts computed
pairs; "dense-equivalent" TFLOP/s counts ``Lq * Lk`` for every method.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sparge.attention import block_sparse_attention
from sparge.mask import BlockMask, build_block_mask, mask_sparsity_tensor

if TYPE_CHECKING:
    import cProfile

SHAPES: dict[str, tuple[int, int, int, int]] = {
    # name: (B, H, L, D); L = latent frames x (H/16) x (W/16) for 81 frames
    "wan2.1-1.3b-480p": (1, 12, 32760, 128),
    "wan2.1-14b-720p": (1, 40, 75600, 128),
}
METHODS = ("sdpa-flash", "sdpa-cudnn", "flex", "sparge")


@dataclass(frozen=True)
class Shape:
    name: str
    b: int
    h: int
    l: int
    d: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """A preset name (see `SHAPES`) or ``BxHxLxD`` such as ``1x12x32760x128``."""
        if text in SHAPES:
            return cls(text, *SHAPES[text])
        parts = text.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {text!r} is not known: use one of {', '.join(SHAPES)} or BxHxLxD like 1x12x32760x128")
        return cls(text, *(int(p) for p in parts))


def environment(device: torch.device) -> dict:
    """Machine and versions, for labelling results."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        from sparge.kernels import hopper_fwd

        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   sparge_forward_kernel="gluon-hopper" if hopper_fwd.available(device) else "triton")
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


MIN_SAMPLES = 5


def _timer(device: torch.device, warmup_ms: int, rep_ms: int) -> Callable[[Callable[[], object]], float]:
    """Median time (ms) of one call of ``fn``.

    On CUDA: triton's `do_bench` (CUDA events, L2 emptied before each call) after ``warmup_ms`` of calls, over
    at least ``rep_ms`` and at least `MIN_SAMPLES` calls. The warm-up has to outlast the GPU's power-management
    transient: on the lent H100, after a pause the clocks overshoot and then dip (to ~1050 MHz) for about half
    a second once the load reaches the 700 W cap, so a 50 ms call timed twice right away read 20% slow
    (benchmarks/diag_total_gap.py bisect). The same timer serves every method.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        def cuda_time(fn: Callable[[], object]) -> float:
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            rep = max(rep_ms, MIN_SAMPLES * start.elapsed_time(end))
            return float(do_bench(fn, warmup=warmup_ms, rep=rep, return_mode="median"))

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        times = []
        deadline = time.perf_counter() + rep_ms / 1000
        while True:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
            if time.perf_counter() > deadline or len(times) >= 50:
                break
        return float(sorted(times)[len(times) // 2])

    return cpu_time


def capture_graph(fn: Callable[[], object], device: torch.device) -> "torch.cuda.CUDAGraph":
    """``fn`` captured in a CUDA graph after 3 warm-up calls on a side stream (as torch's docs ask)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def host_ms_per_call(fn: Callable[[], object], calls: int, profiler: cProfile.Profile | None = None) -> float:
    """Host (enqueue) time of one call of ``fn``, in ms, on a CUDA device: after one warm call, ~0.5 s of device
    work (`torch.cuda._sleep`) is queued ahead of the ``calls`` timed calls, so none of them waits for the GPU.
    ``profiler`` (a `cProfile.Profile`), if given, runs around the timed calls only. Keep ``calls`` times the
    kernels per call well under the driver's launch queue (about a thousand): once it is full, the host waits
    for the sleeping GPU and the figure is no longer host time (300 calls of `sparge_attention` read 1.7 ms)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(0.5 * torch.cuda.clock_rate() * 1e6))  # clock_rate is in MHz: cycles for 0.5 s
    if profiler is not None:
        profiler.enable()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    if profiler is not None:
        profiler.disable()
    torch.cuda.synchronize()
    return host


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float | None:
    """bf16 matrix-product rate measured now on random data (the ceiling to compare against)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _timer(device, 1000, 500)(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _kept_pairs(bm: BlockMask) -> float:
    """Computed (query, key) pairs summed over batch and heads."""
    return float((1.0 - mask_sparsity_tensor(bm.to_dense(), bm.q_len, bm.k_len, bm.block_q, bm.block_k))) * bm.q_len * bm.k_len * bm.shape[0] * bm.shape[1]


def _flex_block_mask(bm: BlockMask):
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    # every kept block is passed as a "full" block, so Flex evaluates no mask_mod (its fastest path)
    zeros = torch.zeros_like(bm.row_count)
    return FlexBlockMask.from_kv_blocks(
        zeros, torch.zeros_like(bm.row_index), bm.row_count, bm.row_index,
        BLOCK_SIZE=(bm.block_q, bm.block_k), seq_lengths=(bm.q_len, bm.k_len),
    )


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa": SDPBackend.MATH}[backend_name]

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return run


def bench_attention(
    shape: Shape,
    sparsities: list[float],
    *,
    methods: tuple[str, ...] = METHODS,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    backward: bool = True,
    block_q: int = 128,
    block_k: int = 64,
    warmup_ms: int = 1000,
    rep_ms: int = 100,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time every method at one shape, for each sparsity; returns one row per (method, sparsity, pass).

    The sparse mask for target sparsity ``s`` is the hybrid mask with ``topk = 1 - s`` and
    ``topp = (1 - s) / 2`` on random inputs (whose pooled scores are flat, so Top-k decides); the
    sparsity it actually reaches is measured and reported. Dense methods are timed once per shape.
    """
    device = torch.device(device)
    timer = _timer(device, warmup_ms, rep_ms)
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape.b, shape.h, shape.l, shape.d, device=device, dtype=dtype, generator=g) for _ in range(3))
    do = torch.randn_like(q)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dense_pairs = float(shape.l) * shape.l * shape.b * shape.h
    rows: list[dict] = []
    say = progress or (lambda _m: None)

    def fwd_bwd(fn):
        def run():
            qg.grad = kg.grad = vg.grad = None
            fn(qg, kg, vg).backward(do)

        return run

    def peak_mem(fn) -> float | None:
        if device.type != "cuda":
            return None
        fn()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20

    def graph_ms(fn) -> float | None:
        """Median time of ``fn`` replayed from a CUDA graph: device time without host launch overhead."""
        if device.type != "cuda":
            return None
        return timer(capture_graph(fn, device).replay)

    def record(method, sparsity, measured, passname, ms, pairs, mask_ms=None, mem=None, total_ms=None):
        mult = 4 * shape.d * (3.5 if passname == "fwd+bwd" else 1.0)
        if total_ms is None:
            total_ms = ms + (mask_ms or 0.0)
        rows.append({
            "shape": shape.name, "B": shape.b, "H": shape.h, "L": shape.l, "D": shape.d, "dtype": str(dtype).replace("torch.", ""),
            "method": method, "target_sparsity": sparsity, "measured_sparsity": measured, "pass": passname,
            "ms": ms, "mask_ms": mask_ms, "total_ms": total_ms,
            "tflops_effective": mult * pairs / (ms * 1e-3) / 1e12,
            "tflops_dense_equiv": mult * dense_pairs / (total_ms * 1e-3) / 1e12,
            "peak_mem_mib": mem,
        })

    for method in methods:
        if method.startswith("sdpa"):
            say(f"{shape.name}: {method}")
            fn = _sdpa(method)
            try:
                record(method, 0.0, 0.0, "fwd", timer(lambda: fn(q, k, v)), dense_pairs)
                if backward:
                    run = fwd_bwd(fn)
                    record(method, 0.0, 0.0, "fwd+bwd", timer(run), dense_pairs, mem=peak_mem(run))
            except RuntimeError as e:  # backend not available for this GPU/dtype/shape
                rows.append({"shape": shape.name, "method": method, "error": str(e).splitlines()[0]})

    # every sparge measurement first: Flex's compilation leaves worker processes busy on the host for a
    # while, which would inflate the (host-launched) eager mask-building times measured after it
    masks = {}
    for s in sparsities:
        kept = 1.0 - s
        topk, topp = (1.0, 0.0) if kept >= 1.0 else (kept, kept / 2)
        build = lambda: build_block_mask(q, k, topk=topk, topp=topp, block_q=block_q, block_k=block_k)
        bm = build()
        measured = float(mask_sparsity_tensor(bm.to_dense(), shape.l, shape.l, block_q, block_k))
        pairs = _kept_pairs(bm)
        masks[s] = (bm, measured, pairs)
        mask_ms = timer(build)
        if "sparge" in methods:
            say(f"{shape.name}: sparge @ {s:.2f}")
            # "ms": the kernel alone on a prebuilt mask; "total_ms": mask building + kernel in one eager call
            # (what `sparge_attention` does); "total_graph_ms": the same captured in one CUDA graph
            fwd = lambda qq, kk, vv: block_sparse_attention(qq, kk, vv, bm)
            whole = lambda: block_sparse_attention(q, k, v, build())
            record("sparge", s, measured, "fwd", timer(lambda: fwd(q, k, v)), pairs, mask_ms=mask_ms, total_ms=timer(whole))
            rows[-1]["kernel_plus_mask_ms"] = rows[-1]["ms"] + mask_ms
            rows[-1]["mask_graph_ms"] = graph_ms(build)
            rows[-1]["total_graph_ms"] = graph_ms(whole)  # also proves there is no host sync on the path
            if backward:
                run = fwd_bwd(lambda qq, kk, vv: block_sparse_attention(qq, kk, vv, build_block_mask(
                    qq.detach(), kk.detach(), topk=topk, topp=topp, block_q=block_q, block_k=block_k)))
                # a fresh BlockMask per call, so the column lists the backward builds are timed too
                ms = timer(fwd_bwd(lambda qq, kk, vv: block_sparse_attention(qq, kk, vv, dataclasses.replace(bm))))
                record("sparge", s, measured, "fwd+bwd", ms, pairs, mask_ms=mask_ms, mem=peak_mem(run), total_ms=timer(run))
                rows[-1]["kernel_plus_mask_ms"] = ms + mask_ms
    for s in sparsities:
        bm, measured, pairs = masks[s]
        fwd = lambda qq, kk, vv: block_sparse_attention(qq, kk, vv, bm)
        if "flex" in methods and device.type == "cuda":
            say(f"{shape.name}: flex @ {s:.2f}")
            try:
                from torch.nn.attention.flex_attention import flex_attention

                flex = _compiled_flex(flex_attention)
                fbm = _flex_block_mask(bm)
                ffwd = lambda qq, kk, vv: flex(qq, kk, vv, block_mask=fbm)
                agree = float((ffwd(q, k, v).float() - fwd(q, k, v).float()).norm() / fwd(q, k, v).float().norm()) if "sparge" in methods else None
                record("flex", s, measured, "fwd", timer(lambda: ffwd(q, k, v)), pairs)
                rows[-1]["rel_diff_vs_sparge"] = agree
                if backward:
                    run = fwd_bwd(ffwd)
                    record("flex", s, measured, "fwd+bwd", timer(run), pairs, mem=peak_mem(run))
            except Exception as e:  # noqa: BLE001 - report, don't crash the whole run
                rows.append({"shape": shape.name, "method": "flex", "target_sparsity": s, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    return rows


_FLEX = None


def _compiled_flex(flex_attention):
    global _FLEX
    if _FLEX is None:
        # max-autotune: Flex's default Hopper backward tile (BLOCK_N1=128) does not divide a 64-key sparse
        # block, so without autotuning its backward has no valid config; autotuning also gives Flex its best
        # forward tiles, which is the fair comparison.
        _FLEX = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    return _FLEX


def summarize(rows: list[dict]) -> list[dict]:
    """Speedups of sparge against cuDNN SDPA, flash SDPA and Flex at the same shape, sparsity and pass."""
    out = []
    index = {(r["shape"], r["method"], r.get("target_sparsity"), r.get("pass")): r for r in rows if "error" not in r}
    for r in rows:
        if r.get("method") != "sparge" or "error" in r:
            continue
        entry = {"shape": r["shape"], "sparsity": r["target_sparsity"], "measured_sparsity": r["measured_sparsity"], "pass": r["pass"],
                 "sparge_total_ms": r["total_ms"], "sparge_kernel_ms": r["ms"], "mask_ms": r["mask_ms"]}
        for dense in ("sdpa-cudnn", "sdpa-flash"):
            d = index.get((r["shape"], dense, 0.0, r["pass"]))
            if d:
                entry[f"speedup_vs_{dense}"] = d["ms"] / r["total_ms"]
        if r.get("total_graph_ms"):
            entry["sparge_total_graph_ms"] = r["total_graph_ms"]
            d = index.get((r["shape"], "sdpa-cudnn", 0.0, r["pass"]))
            if d:
                entry["graph_speedup_vs_sdpa-cudnn"] = d["ms"] / r["total_graph_ms"]
        f = index.get((r["shape"], "flex", r["target_sparsity"], r["pass"]))
        if f:
            entry["speedup_vs_flex"] = f["ms"] / r["total_ms"]
            entry["kernel_speedup_vs_flex"] = f["ms"] / r["ms"]
        out.append(entry)
    return out
