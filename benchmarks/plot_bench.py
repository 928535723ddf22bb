"""Markdown table and speedup-vs-sparsity plot from `sparge bench --out` JSON files.

    python benchmarks/plot_bench.py benchmarks/results/bench_h100_wan13b_2026-11-23.json [...] \
        --png benchmarks/results/speedup_vs_sparsity_h100.png > table.md

Prints, for each file, the machine line and one row per (shape, sparsity, pass) with sparge's kernel and
mask times, the dense cuDNN and Flex times, and the speedups (mask building included, and kernel only).
The plot shows speedup over dense cuDNN SDPA against sparsity, for sparge (mask included) and Flex.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _index(rows: list[dict]) -> dict:
    return {(r["shape"], r["method"], r.get("target_sparsity"), r.get("pass")): r for r in rows if "error" not in r}


def table(result: dict) -> str:
    env = result["environment"]
    idx = _index(result["rows"])
    lines = [
        f"Machine: {env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; "
        f"{env['date']}; bf16 matmul peak measured in the run: {result.get('matmul_peak_tflops_bf16') or 0:.0f} TFLOP/s.",
        f"Command: `{result.get('command', 'sparge bench')}`",
        "",
        "| shape | sparsity (measured) | pass | cuDNN ms | Flex ms | sparge kernel ms | mask ms (eager / graph) | sparge total ms | vs cuDNN | vs cuDNN (graph) | vs Flex | kernel vs Flex | sparge TFLOP/s eff. | peak MiB sparge / cuDNN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("method") != "sparge" or "error" in r:
            continue
        key = (r["shape"], r["target_sparsity"], r["pass"])
        cud = idx.get((r["shape"], "sdpa-cudnn", 0.0, r["pass"]))
        flex = idx.get((r["shape"], "flex", *key[1:]))
        fwd = idx.get((r["shape"], "sparge", r["target_sparsity"], "fwd"), {})
        f = lambda x, spec=".3f": "-" if x is None else format(x, spec)
        graph_total = r.get("total_graph_ms")
        lines.append(
            f"| {r['shape']} | {r['target_sparsity']:.2f} ({r['measured_sparsity']:.4f}) | {r['pass']} | {f(cud and cud['ms'], '.2f')} | "
            f"{f(flex and flex['ms'])} | {r['ms']:.3f} | {r['mask_ms']:.3f} / {f(fwd.get('mask_graph_ms'))} | {r['total_ms']:.3f} | "
            f"{f(cud and cud['ms'] / r['total_ms'], '.2f')}x | {f(cud and graph_total and cud['ms'] / graph_total, '.2f')}"
            f"{'x' if cud and graph_total else ''} | {f(flex and flex['ms'] / r['total_ms'], '.2f')}x | {f(flex and flex['ms'] / r['ms'], '.2f')}x | "
            f"{r['tflops_effective']:.0f} | {f(r['peak_mem_mib'], '.0f')} / {f(cud and cud.get('peak_mem_mib'), '.0f')} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, pas in zip(axes, ("fwd", "fwd+bwd")):
        for result in results:
            idx = _index(result["rows"])
            for shape in sorted({r["shape"] for r in result["rows"] if "error" not in r}):
                cud = idx.get((shape, "sdpa-cudnn", 0.0, pas))
                if not cud:
                    continue
                for method, style in (("sparge", "o-"), ("flex", "s--")):
                    pts = sorted(
                        (r["measured_sparsity"], cud["ms"] / r["total_ms"])
                        for r in result["rows"]
                        if "error" not in r and r["shape"] == shape and r["method"] == method and r["pass"] == pas and r["target_sparsity"] > 0
                    )
                    if pts:
                        label = f"{method} ({'mask incl.' if method == 'sparge' else 'mask given'}) {shape}"
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(f"{pas}: speedup over dense cuDNN SDPA")
        ax.set_xlabel("block sparsity")
        ax.set_ylabel("x faster")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    gpu = results[0]["environment"].get("gpu")
    fig.suptitle(f"{gpu}, bf16, D=128 (measured; see RESULTS.md)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--png", type=Path)
    a = ap.parse_args()
    results = [json.loads(p.read_text()) for p in a.files]
    for res in results:
        print(table(res))
        print()
    if a.png:
        plot(results, a.png)


if __name__ == "__main__":
    main()
