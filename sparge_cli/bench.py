"""`sparge bench`: attention micro-benchmark (dense SDPA flash/cuDNN, FlexAttention, sparge) and end-to-end step timing."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.table import Table

from sparge_cli.common import UsageError, check_writable_target, cli_errors, console, err_console, parse_device, parse_dtype, print_json, write_json_atomic

EXAMPLES = """
Examples:

  sparge bench                                   # both Wan2.1 shapes, sparsity 0.90/0.95/0.97, fwd and fwd+bwd
  sparge bench --shape wan2.1-1.3b-480p --sparsity 0.95 --json > r.json
  sparge bench --shape 1x12x32760x128 --methods sdpa-cudnn,sparge --no-backward
  sparge bench --e2e --preset wan2.1-t2v-1.3b-480p   # transformer time per denoising step, dense vs sparse
"""


def _parse_sparsity(values: list[float]) -> list[float]:
    for s in values:
        if not 0.0 <= s < 1.0:
            raise UsageError(f"--sparsity {s} is out of range: use a fraction in [0, 1), e.g. 0.95")
    return values


def register(app: typer.Typer) -> None:
    @app.command("bench", help="Benchmark attention: dense SDPA (flash, cuDNN), FlexAttention on the same block mask, and sparge.\n" + EXAMPLES)
    def bench(
        shape: list[str] = typer.Option(None, "--shape", help="Shape preset (wan2.1-1.3b-480p, wan2.1-14b-720p) or BxHxLxD; repeatable. Default: both presets."),
        sparsity: list[float] = typer.Option(None, "--sparsity", help="Target block sparsity (skipped fraction); repeatable. Default: 0.90 0.95 0.97."),
        methods: str = typer.Option("sdpa-flash,sdpa-cudnn,flex,sparge", "--methods", help="Comma-separated subset of sdpa-flash, sdpa-cudnn, sdpa (math), flex, sparge."),
        dtype: str = typer.Option("bf16", "--dtype", help="bf16 or fp16 (fp32 for tests)."),
        device: str = typer.Option("cuda", "--device", help="cuda or cuda:N (cpu only for smoke tests: slow, no flex)."),
        backward: bool = typer.Option(True, "--backward/--no-backward", help="Also time forward+backward."),
        warmup_ms: int = typer.Option(1000, "--warmup-ms", min=0, help="Warm-up per measurement (ms): long enough for the GPU's clocks to settle under load (shorter ones time its power-management transient)."),
        rep_ms: int = typer.Option(100, "--rep-ms", min=1, help="Timed repetitions per measurement (ms, and at least 5 calls); the median is reported."),
        e2e: bool = typer.Option(False, "--e2e", help="Instead: full-size Wan transformer time per denoising step, dense vs sparse (see --preset)."),
        preset: str = typer.Option("wan2.1-t2v-1.3b-480p", "--preset", help="With --e2e: preset giving the model architecture, resolution and (k, p) level."),
        level: float = typer.Option(0.95, "--level", help="With --e2e: preset sparsity level to use."),
        json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
        out: Path = typer.Option(None, "--out", help="Also write the JSON results to this file (atomic)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing --out."),
    ) -> None:
        with cli_errors():
            import torch

            from sparge import bench as B

            dev = parse_device(device)
            dt = parse_dtype(dtype)
            if out is not None:
                check_writable_target(out, overwrite, "--out")
            if e2e:
                from sparge_cli.bench_e2e import run_e2e

                result = run_e2e(preset=preset, level=level, device=dev, dtype=dt, json_out=json_out)
            else:
                chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
                bad = [m for m in chosen if m not in (*B.METHODS, "sdpa")]
                if bad or not chosen:
                    raise UsageError(f"--methods {methods!r}: unknown {bad or 'empty'}; use a comma-separated subset of sdpa-flash, sdpa-cudnn, sdpa, flex, sparge")
                shapes = [B.Shape.parse(s) for s in (shape or list(B.SHAPES))]
                sps = _parse_sparsity(sparsity or [0.90, 0.95, 0.97])
                env = B.environment(dev)
                if not json_out:
                    err_console.print(f"[dim]{env.get('gpu') or env.get('cpu')} | torch {env['torch']} | triton {env['triton']} | {dtype}[/]")
                peak = B.matmul_peak_tflops(dev)
                rows = []
                for shp in shapes:
                    rows += B.bench_attention(shp, sps, methods=chosen, dtype=dt, device=dev, backward=backward, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                              progress=None if json_out else (lambda m: err_console.print(f"[dim]  timing {m}[/]")))
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                result = {"environment": env, "matmul_peak_tflops_bf16": peak, "rows": rows, "summary": B.summarize(rows)}
                if not json_out:
                    _print_tables(result)
            result["command"] = "sparge " + shlex.join(sys.argv[1:])
            if out is not None:
                write_json_atomic(out, result)
            if json_out:
                print_json(result)


def _print_tables(result: dict) -> None:
    t = Table(title="attention timings (median ms)")
    for col in ("shape", "method", "sparsity", "measured", "pass", "ms", "mask ms", "total ms (1 call)", "TFLOP/s eff", "TFLOP/s dense-eq", "peak MiB"):
        t.add_column(col, justify="right" if col not in ("shape", "method", "pass") else "left")
    fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)
    for r in result["rows"]:
        if "error" in r:
            t.add_row(r["shape"], r["method"], fmt(r.get("target_sparsity"), "{:.2f}"), "", "", "error: " + r["error"][:60], "", "", "", "", "")
            continue
        t.add_row(r["shape"], r["method"], fmt(r["target_sparsity"], "{:.2f}"), fmt(r["measured_sparsity"], "{:.4f}"), r["pass"],
                  fmt(r["ms"]), fmt(r["mask_ms"]), fmt(r["total_ms"]), fmt(r["tflops_effective"], "{:.0f}"),
                  fmt(r["tflops_dense_equiv"], "{:.0f}"), fmt(r["peak_mem_mib"], "{:.0f}"))
    console.print(t)
    s = Table(title="sparge speedup (mask building included)")
    for col in ("shape", "sparsity", "pass", "vs cuDNN", "vs cuDNN (graph)", "vs flash", "vs Flex", "kernel-only vs Flex"):
        s.add_column(col)
    for e in result["summary"]:
        f = lambda key: "-" if key not in e else f"{e[key]:.2f}x"
        s.add_row(e["shape"], f"{e['sparsity']:.2f}", e["pass"], f("speedup_vs_sdpa-cudnn"), f("graph_speedup_vs_sdpa-cudnn"), f("speedup_vs_sdpa-flash"), f("speedup_vs_flex"), f("kernel_speedup_vs_flex"))
    console.print(s)
    if result.get("matmul_peak_tflops_bf16"):
        console.print(f"bf16 matmul peak measured in this run: {result['matmul_peak_tflops_bf16']:.0f} TFLOP/s")
