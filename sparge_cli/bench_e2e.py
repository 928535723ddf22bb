"""`sparge bench --e2e`: Wan transformer time per denoising step, dense vs sparse, for a preset.

The architecture is the preset's model (Wan2.1-T2V 1.3B or 14B, their published transformer configs)
with random weights built on the device: no download. Timing is one transformer forward over the CFG
batch of 2 at the preset's resolution and frame count (`time_transformer_step`).
"""

from __future__ import annotations

import torch
from rich.table import Table

from sparge_cli.common import UsageError, console, err_console


def _architecture(model: str) -> tuple[str, dict]:
    from sparge.integrations.diffusers import WAN_2_1_T2V_1_3B_CONFIG, WAN_2_1_T2V_14B_CONFIG

    name = model.lower()
    if "14b" in name:
        return "Wan2.1-T2V-14B", WAN_2_1_T2V_14B_CONFIG
    if "1.3b" in name or "1_3b" in name:
        return "Wan2.1-T2V-1.3B", WAN_2_1_T2V_1_3B_CONFIG
    raise UsageError(f"--preset model {model!r} is not a Wan2.1-T2V 1.3B or 14B model: --e2e builds only those two architectures")


def run_e2e(*, preset: str, level: float, device: torch.device, dtype: torch.dtype, json_out: bool) -> dict:
    """Time dense and sparse steps; print a table unless ``json_out``; return the results as a dict."""
    from sparge.bench import environment
    from sparge.integrations.diffusers import build_random_wan_transformer, time_transformer_step
    from sparge.presets import load_preset

    if device.type != "cuda":
        raise UsageError(f"--e2e needs a CUDA device, got --device {device}: a full-size Wan step on the CPU would take hours")
    p = load_preset(preset)
    config = p.to_config(level)
    arch_name, arch = _architecture(p.model)
    say = (lambda _m: None) if json_out else (lambda m: err_console.print(f"[dim]{m}[/]"))
    say(f"building {arch_name} with random weights on {device} ({dtype})")
    transformer = build_random_wan_transformer(arch, dtype=dtype, device=device)
    shape = dict(frames=p.frames, height=p.height, width=p.width, dtype=dtype, device=device)
    # the dense baseline is the strongest SDPA kernel on the machine: cuDNN first where it runs
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        say("timing the dense step (and the step without self-attention, for its share)")
        dense = time_transformer_step(transformer, None, attention_share=True, **shape)
        say(f"timing the sparse step at level {level} (k={config.topk}, p={config.topp})")
        sparse = time_transformer_step(transformer, config, **shape)
    result = {
        "environment": environment(device),
        "architecture": arch_name,
        "preset": p.name,
        "level": level,
        "topk": config.topk,
        "topp": config.topp,
        "dense": dense,
        "sparse": sparse,
        "speedup_per_step": dense["ms_per_step"] / sparse["ms_per_step"],
    }
    if not json_out:
        t = Table(title=f"{arch_name} {p.width}x{p.height} {p.frames} frames, CFG batch 2, {str(dtype).replace('torch.', '')}")
        for col in ("run", "ms / step", "measured sparsity", "self-attention share"):
            t.add_column(col)
        share = dense.get("self_attention_share")
        t.add_row("dense", f"{dense['ms_per_step']:.1f}", "-", "-" if share is None else f"{100 * share:.0f}%")
        ms = sparse.get("measured_sparsity")
        t.add_row(f"sparse {level}", f"{sparse['ms_per_step']:.1f}", "-" if ms is None else f"{ms:.3f}", "")
        console.print(t)
        console.print(f"speedup per denoising step: {result['speedup_per_step']:.2f}x")
    return result
