#!/usr/bin/env bash
# 1 GPU vs 2 GPUs (FSDP2 under torchrun), same global batch: loss curves and throughput of `sparge finetune`.
#
# On a 2 x H200 machine (about 2 minutes in all):
#     bash benchmarks/distill_multigpu.sh "$OUT/multigpu"                      # random-init test-bed model
#     bash benchmarks/distill_multigpu.sh "$OUT/multigpu" path/to/testbed/model  # or a trained one
# CPU smoke run (gloo, micro model, under a minute or two on 2 cores):
#     bash benchmarks/distill_multigpu.sh /tmp/mg-tiny --tiny
#
# Both runs are the same command, `torchrun --standalone --nproc_per_node N -m sparge_cli.app finetune ...`,
# with N = 1 and N = 2; the data order, noise and timesteps depend only on the global sample position, so
# the two loss curves must agree up to floating-point reduction order. Writes under OUT (the latent cache and
# the run folders stay in a temporary folder): distill_multigpu.json (per-step losses of both runs, the
# largest relative difference, steps/s and samples/s per GPU count, speed-up), log_1gpu.jsonl,
# log_2gpu.jsonl, summary_1gpu.json, summary_2gpu.json, distill_multigpu.png.
# Environment knobs: STEPS (default 30; --tiny 3), BATCH (global batch, default 16; --tiny 4),
# RUN_TIMEOUT (seconds per run, default 150).
set -euo pipefail

OUT=${1:?usage: bash benchmarks/distill_multigpu.sh OUT_DIR [TESTBED_MODEL_DIR | --tiny]}
ARG2=${2:-}
TINY=0
MODEL=""
if [[ "$ARG2" == "--tiny" ]]; then TINY=1; else MODEL=$ARG2; fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# NVLink multicast stays off on the shared machines (see the device notes)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [[ $TINY == 1 ]]; then
    STEPS=${STEPS:-3}; BATCH=${BATCH:-4}; DEVICE=cpu; DTYPE=fp32; export TRITON_INTERPRET=0 OMP_NUM_THREADS=1
else
    STEPS=${STEPS:-30}; BATCH=${BATCH:-16}; DEVICE=cuda; DTYPE=bf16
fi
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/sparge-multigpu-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)

echo "[fixture] model, latent cache and preset in $WORK" >&2
python - "$WORK" "$MODEL" "$TINY" "$DEVICE" <<'EOF'
import sys
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from distill_testbed import _build_cache  # noqa: E402  (same cache the quality benchmark trains on)

from sparge.integrations.diffusers import load_wan_pipeline
from sparge.testbed.data import Geometry
from sparge.testbed.train import TestbedConfig, build_pipeline, save_pipeline

work, model, tiny, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", torch.device(sys.argv[4])
if not model:
    cfg = TestbedConfig.micro() if tiny else TestbedConfig()
    model = work / "model"
    save_pipeline(build_pipeline(cfg), model, cfg)
import json

tb = json.loads((Path(model) / "testbed.json").read_text())["config"]
geometry = Geometry(tb["frames"], tb["height"], tb["width"])
pipe = load_wan_pipeline(str(model), dtype=torch.float32, device=device)
_build_cache(pipe, geometry, 8 if tiny else 64, work / "cache", device, seed=0)
topk = 0.2 if tiny else 0.05  # 1 of 5 / 5 of 100 key blocks per query block: 80% / 95% sparsity
level = 0.8 if tiny else 0.95
(work / "preset.yaml").write_text(
    f"model: {model}\nheight: {geometry.pixel_height}\nwidth: {geometry.pixel_width}\nframes: {geometry.pixel_frames}\n"
    f"block_q: 128\nblock_k: 64\nlevels:\n  {level}:\n    topk: {topk}\n    topp: 0.0\n    measured_sparsity: null\n"
    "    source: Top-k alone, exact block count\n")
print(level)
EOF
LEVEL=$([[ $TINY == 1 ]] && echo 0.8 || echo 0.95)

for N in 1 2; do
    echo "[run] $N process(es): torchrun --standalone --nproc_per_node $N -m sparge_cli.app finetune --steps $STEPS --batch-size $BATCH" >&2
    timeout "$RUN_TIMEOUT" torchrun --standalone --nproc_per_node "$N" -m sparge_cli.app finetune \
        --preset "$WORK/preset.yaml" --sparsity "$LEVEL" --data "$WORK/cache" --out "$WORK/g$N" \
        --steps "$STEPS" --batch-size "$BATCH" --lr 3e-5 --train all --loss distill --save-every 1000 \
        --dtype "$DTYPE" --device "$DEVICE" --json > "$OUT/summary_${N}gpu.json" || echo "[run] $N: exit code $?" >&2
    cp "$WORK/g$N/log.jsonl" "$OUT/log_${N}gpu.jsonl" 2>/dev/null || true
done

python - "$OUT" "$STEPS" "$BATCH" "$DEVICE" "$(( $(date +%s) - T0 ))" <<'EOF'
import json
import os
import sys
from pathlib import Path

import torch

out, steps, batch, device, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
res = {"benchmark": "distill_multigpu", "steps": steps, "global_batch": batch, "device": device, "torch": torch.__version__,
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "gpus_visible": torch.cuda.device_count(),
       "runs": {}, "seconds_total_before_compare": seconds}
for n in (1, 2):
    f = out / f"log_{n}gpu.jsonl"
    recs = [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []
    run = {"steps_done": len(recs), "loss": [r["loss"] for r in recs], "grad_norm": [r["grad_norm"] for r in recs]}
    if len(recs) > 3:  # steady state: from the end of step 3 (compilation and warm-up before) to the last step
        dt = recs[-1]["elapsed_s"] - recs[2]["elapsed_s"]
        run["steps_per_s"] = (len(recs) - 3) / dt if dt > 0 else None
        run["samples_per_s"] = run["steps_per_s"] * batch if run["steps_per_s"] else None
    s = out / f"summary_{n}gpu.json"
    try:
        run["summary"] = json.loads(s.read_text())
    except (OSError, json.JSONDecodeError):
        run["summary"] = None
    res["runs"][f"{n}gpu"] = run
a, b = res["runs"]["1gpu"], res["runs"]["2gpu"]
k = min(len(a["loss"]), len(b["loss"]))
if k:
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a["loss"][:k], b["loss"][:k])]
    res["loss_rel_diff_max"], res["loss_rel_diff_mean"] = max(rel), sum(rel) / k
    # "within noise": the step-to-step wiggle of the 1-GPU curve itself, for scale
    wiggle = [abs(a["loss"][i + 1] - a["loss"][i]) / max(abs(a["loss"][i]), 1e-12) for i in range(k - 1)]
    res["loss_step_to_step_rel_change_mean_1gpu"] = sum(wiggle) / len(wiggle) if wiggle else None
if a.get("steps_per_s") and b.get("steps_per_s"):
    res["speedup_2_over_1"] = b["steps_per_s"] / a["steps_per_s"]
tmp = out / ".distill_multigpu.json.tmp"
tmp.write_text(json.dumps(res, indent=2) + "\n")
os.replace(tmp, out / "distill_multigpu.json")
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in res["runs"].items():
        if run["loss"]:
            sps = run.get("steps_per_s")
            ax.plot(range(1, len(run["loss"]) + 1), run["loss"], "o-" if name == "1gpu" else "x--",
                    label=f"{name}" + (f" ({sps:.2f} steps/s)" if sps else ""))
    ax.set(xlabel="step", ylabel="distillation loss (global batch %d)" % batch, title="sparge finetune: 1 vs 2 GPUs (FSDP2)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "distill_multigpu.png", dpi=110)
except ImportError:
    pass
print(json.dumps({k: v for k, v in res.items() if k != "runs"} | {n: {kk: r.get(kk) for kk in ("steps_done", "steps_per_s", "samples_per_s")}
                                                                 for n, r in res["runs"].items()}, indent=2), flush=True)
EOF
