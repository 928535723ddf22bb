"""Memory and throughput of velocity-distillation fine-tuning on full-size Wan2.1 architectures (random weights).

Runs the `sparge.distill.Finetuner` that `sparge finetune` runs (FSDP2 under ``torchrun``, gradient
checkpointing, the block-sparse student and the dense teacher) on a full-size Wan2.1 transformer with random
weights and a synthetic latent cache at the given resolution, for 1 and/or several GPUs, and records per GPU
count: seconds per optimizer step, samples/s, the loss of each step, each rank's peak GPU memory (during set-up
and during training, `torch.cuda.max_memory_allocated`) and each rank's peak host memory (ru_maxrss).
Checkpoints are not written (a 14B optimizer state is ~100 GB of disk); the CPU tests cover them.

    # 1.3B at 480p, --train all, global batch 4 (micro-batch 1 everywhere: --grad-accum 4 on 1 GPU, 2 on 2)
    python benchmarks/finetune_fullsize.py --arch 1.3b --height 480 --width 832 --gpus 1,2 --train all \\
        --batch-size 4 --steps 4 --out results/finetune_fullsize_13b.json
    # 14B at 720p, --train attention, 2 GPUs
    python benchmarks/finetune_fullsize.py --arch 14b --height 720 --width 1280 --gpus 2 --train attention \\
        --batch-size 2 --steps 3 --out results/finetune_fullsize_14b.json

Each GPU count is one ``torchrun --standalone --nproc_per_node N`` of this file with ``--worker``; N = 1 runs
without torchrun (one plain process, as `sparge finetune` without torchrun does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparge._atomic import atomic_file  # noqa: E402
from sparge.attention import SpargeConfig  # noqa: E402
from sparge.data import LatentCache, write_cache  # noqa: E402
from sparge.distill import FinetuneConfig, Finetuner  # noqa: E402
from sparge.integrations.diffusers import (  # noqa: E402
    WAN_2_1_T2V_1_3B_CONFIG,
    WAN_2_1_T2V_14B_CONFIG,
    build_random_wan_transformer,
)

ARCHS = {"1.3b": WAN_2_1_T2V_1_3B_CONFIG, "14b": WAN_2_1_T2V_14B_CONFIG}
GIB = 2**30


def write_json(path: Path, obj: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def build_cache(path: Path, *, count: int, frames: int, height: int, width: int, text_tokens: int, text_dim: int) -> None:
    """Random latents ``[16, (frames-1)/4+1, H/8, W/8]`` and text states ``[text_tokens, text_dim]``."""
    g = torch.Generator().manual_seed(0)
    shape = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    items = ((({"latents": torch.randn(shape, generator=g),
                "prompt_embeds": 0.1 * torch.randn(text_tokens, text_dim, generator=g)}), {"caption": f"random {i}"})
             for i in range(count))
    write_cache(path, items, max_sequence_length=512, metadata={"synthetic": True})


def worker(a: argparse.Namespace) -> None:
    """One rank: random full-size transformer -> Finetuner -> ``--steps`` optimizer steps, timed."""
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    t0 = time.perf_counter()
    # built on the GPU (fast), then on the host in the load dtype, as from_pretrained leaves a model
    model = build_random_wan_transformer(ARCHS[a.arch], dtype=torch.bfloat16, device=dev, seed=0).cpu()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    cfg = FinetuneConfig(steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=1e-5, warmup=0,
                         train=a.train, loss="distill", seed=0, gradient_checkpointing=True)
    t1 = time.perf_counter()
    trainer = Finetuner(model, SpargeConfig(topk=a.topk, topp=0.0), LatentCache(a.cache), cfg, a.run_dir,
                        shift=5.0 if a.height >= 720 else 3.0, dtype=torch.bfloat16, device=dev)
    del model
    torch.cuda.synchronize(dev)
    setup_s = time.perf_counter() - t1
    setup_peak = torch.cuda.max_memory_allocated(dev) / GIB
    torch.cuda.reset_peak_memory_stats(dev)
    steps = []
    for _ in range(a.steps):
        ts = time.perf_counter()
        loss, norm = trainer.train_step()  # floats: synchronised
        steps.append({"step": trainer.step, "seconds": time.perf_counter() - ts, "loss": loss, "grad_norm": norm,
                      "sparsity": trainer.last_sparsity})
    rank = {"gpu_setup_peak_gib": setup_peak, "gpu_train_peak_gib": torch.cuda.max_memory_allocated(dev) / GIB,
            "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    ranks = [rank]
    if trainer.dist.distributed:
        ranks = [None] * trainer.dist.world_size
        dist.all_gather_object(ranks, rank)
    if trainer.dist.is_main:
        steady = [s["seconds"] for s in steps[1:]] or [steps[0]["seconds"]]  # the first step compiles the kernels
        sec = sum(steady) / len(steady)
        res = {"gpus": trainer.dist.world_size, "micro_batch": trainer.micro, "grad_accum": a.grad_accum,
               "build_s": t1 - t0, "setup_s": setup_s, "steps": steps, "seconds_per_step": sec,
               "samples_per_s": a.batch_size / sec, "ranks": ranks,
               "trained_parameters": sum(p.numel() for p in trainer.student.parameters() if p.requires_grad)}
        write_json(Path(a.result), res)
    if trainer.dist.distributed:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="1.3b")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--gpus", default="1,2", help="comma-separated GPU counts to run, e.g. 1,2")
    ap.add_argument("--train", choices=("all", "attention", "lora"), default="all")
    ap.add_argument("--batch-size", type=int, default=4, help="global batch; micro-batch 1 (grad-accum = batch / GPUs)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed: compilation)")
    ap.add_argument("--topk", type=float, default=0.05, help="Top-k fraction (Top-p off): 0.05 = about 95%% sparsity")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=int, default=540, help="seconds per GPU count")
    ap.add_argument("--out", type=Path, required=True)
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    if not torch.cuda.is_available():
        sys.exit("finetune_fullsize.py needs CUDA GPUs")
    counts = [int(x) for x in a.gpus.split(",")]
    if max(counts) > torch.cuda.device_count():
        sys.exit(f"--gpus {a.gpus}: only {torch.cuda.device_count()} GPU(s) visible")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = {"benchmark": "finetune_fullsize", "arch": a.arch, "height": a.height, "width": a.width, "frames": a.frames,
           "train": a.train, "global_batch": a.batch_size, "topk": a.topk, "gradient_checkpointing": True,
           "dtype": "bf16", "gpu": torch.cuda.get_device_name(0), "gpus_visible": torch.cuda.device_count(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="sparge-ftfull-") as work:
        w = Path(work)
        build_cache(w / "cache", count=max(4, a.batch_size), frames=a.frames, height=a.height, width=a.width,
                    text_tokens=a.text_tokens, text_dim=ARCHS[a.arch]["text_dim"])
        for n in counts:
            if a.batch_size % n:
                sys.exit(f"--batch-size {a.batch_size} does not divide by {n} GPUs")
            args = [__file__, "--worker", "--arch", a.arch, "--height", str(a.height), "--train", a.train,
                    "--batch-size", str(a.batch_size), "--grad-accum", str(a.batch_size // n), "--steps", str(a.steps),
                    "--topk", str(a.topk), "--cache", str(w / "cache"), "--run-dir", str(w / f"run{n}"),
                    "--result", str(w / f"result{n}.json"), "--out", str(a.out)]
            cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
                   if n > 1 else [sys.executable, *args])
            print(f"[run] {n} GPU(s): {a.arch} {a.height}x{a.width}x{a.frames} --train {a.train}", file=sys.stderr, flush=True)
            try:
                p = subprocess.run(cmd, env=env, timeout=a.timeout)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            res = w / f"result{n}.json"
            out["runs"][f"{n}gpu"] = json.loads(res.read_text()) if res.is_file() else {"error": f"exit {rc}"}
    r1, r2 = out["runs"].get("1gpu", {}), out["runs"].get("2gpu", {})
    if "samples_per_s" in r1 and "samples_per_s" in r2:
        out["speedup_2_over_1"] = r2["samples_per_s"] / r1["samples_per_s"]
        k = min(len(r1["steps"]), len(r2["steps"]))
        out["loss_rel_diff_max"] = max(abs(x["loss"] - y["loss"]) / abs(x["loss"])
                                       for x, y in zip(r1["steps"][:k], r2["steps"][:k]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, out)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"} | {
        n: {kk: r.get(kk) for kk in ("seconds_per_step", "samples_per_s", "error")}
        | {"gpu_train_peak_gib": [x["gpu_train_peak_gib"] for x in r.get("ranks", [])],
           "gpu_setup_peak_gib": [x["gpu_setup_peak_gib"] for x in r.get("ranks", [])],
           "host_peak_rss_gib": [x["host_peak_rss_gib"] for x in r.get("ranks", [])]}
        for n, r in out["runs"].items()}, indent=2))


if __name__ == "__main__":
    main()
