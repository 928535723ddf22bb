"""Sparse self-attention for diffusers' Wan2.1 transformers (`WanTransformer3DModel` / `WanPipeline`).

`apply(model_or_pipeline, config)` installs a `SpargeWanAttnProcessor` on the self-attention (``attn1``)
of every Wan transformer block through diffusers' public ``set_processor``; cross-attention (``attn2``,
including the I2V image branch) keeps its own processor and stays dense. The processor does what
diffusers' `WanAttnProcessor` does -- Q/K/V projections (fused or not), RMS QK-norm across heads, the
3D rotary embedding, ``[B, L, H, D]`` layout, output projection -- and replaces only the attention call
by `sparge.build_block_mask` + `sparge.block_sparse_attention`. ``handle.remove()`` puts the original
processor objects back, so behaviour is then bit-identical to an untouched model.

Denoising steps. ``config.dense_steps``, per-step statistics and the observer need the index of the
current denoising step. Two ways to know it (``step_tracking``):

* ``"auto"`` (default): a forward pre-hook on the transformer reads the ``timestep`` argument. Within
  one step WanPipeline calls the transformer twice with the same timestep (cond, then uncond, when
  ``guidance_scale > 1``); a new, lower timestep starts the next step, and a higher one starts a new
  generation at step 0. Reading the value costs one tiny device-to-host copy per transformer forward
  (not per attention call), and the hook is only installed when the step is needed.
* ``"manual"``: no hook, no sync; the caller sets ``handle.step`` (e.g. pass
  ``callback_on_step_end=handle.step_callback`` to the pipeline, which sets ``step = i + 1`` after
  step ``i``), or leaves it at 0 (training, CUDA graphs).

Statistics (``collect_stats=True``): every sparse call adds the mask's skipped fraction (a 0-dim
device tensor, no host sync) to a per-(layer, step) accumulator; ``handle.stats()`` converts them once.
Dense steps record 0.0 (nothing skipped), so the mean is the sparsity the run actually had.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from sparge.attention import SpargeConfig, block_sparse_attention
from sparge.mask import build_block_mask

try:  # private helpers of diffusers' Wan processor; re-implemented below if a release moves them
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections
except ImportError:  # pragma: no cover - depends on the diffusers release

    def _get_qkv_projections(attn, hidden_states, encoder_hidden_states):  # type: ignore[no-redef]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        if getattr(attn, "fused_projections", False) and not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)


try:
    from diffusers.models.attention_dispatch import dispatch_attention_fn
except ImportError:  # pragma: no cover - older diffusers

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=None, parallel_config=None):  # type: ignore[no-redef]
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
        )
        return out.transpose(1, 2)


__all__ = [
    "SparseAttention",
    "SpargeWanAttnProcessor",
    "WAN_2_1_T2V_1_3B_CONFIG",
    "WAN_2_1_T2V_14B_CONFIG",
    "WanModelError",
    "apply",
    "build_random_wan_transformer",
    "load_wan_pipeline",
    "time_transformer_step",
    "wan_transformers",
]

Observer = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]

# transformer/config.json of the published Diffusers checkpoints (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers)
WAN_2_1_T2V_1_3B_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
WAN_2_1_T2V_14B_CONFIG: dict[str, Any] = {**WAN_2_1_T2V_1_3B_CONFIG, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}

_GET_WAN = (
    "get one with `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR` "
    "(or the 14B: Wan-AI/Wan2.1-T2V-14B-Diffusers) and pass --model DIR"
)


class WanModelError(ValueError):
    """A model path or hub id that is not a loadable diffusers Wan2.1 text-to-video checkpoint."""


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved 3D rotary embedding on ``[B, L, H, D]``, as in diffusers' `WanAttnProcessor`."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SpargeWanAttnProcessor:
    """Wan self-attention processor whose attention call is hybrid Top-k+Top-p block-sparse attention.

    Installed on ``block.attn1`` by `apply`; same call signature as diffusers' `WanAttnProcessor`. A call
    with ``encoder_hidden_states`` or an ``attention_mask`` (not self-attention as Wan makes it) goes to
    the original processor unchanged, as do dense steps when nothing needs Q/K/V.

    Args:
        layer: index of the transformer block (key of ``config.per_layer`` and of the statistics).
        handle: the `SparseAttention` that owns the config, the step counter and the statistics.
        original: the processor this one replaced (used for dense calls and restored by ``remove``).
    """

    def __init__(self, layer: int, handle: "SparseAttention", original: Any) -> None:
        self.layer = layer
        self.handle = handle
        self.original = original
        # diffusers' set_attention_backend / context parallelism set these on every processor
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        h = self.handle
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        step = h.step
        dense = step < h.config.dense_steps
        if dense and h.observer is None:
            if h.collect_stats:
                h._record(self.layer, step, torch.zeros((), dtype=torch.float64, device=hidden_states.device))
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        if h.observer is not None:
            h.observer(self.layer, step, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))

        if dense:
            if h.collect_stats:
                h._record(self.layer, step, torch.zeros((), dtype=torch.float64, device=query.device))
            out = dispatch_attention_fn(
                query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        else:
            out = self._sparse(query, key, value, step)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _sparse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, step: int) -> torch.Tensor:
        """Block-sparse attention on ``[B, L, H, D]`` tensors; returns ``[B, L, H, D]``."""
        h = self.handle
        if self._parallel_config is not None:
            raise RuntimeError("sparge: sparse self-attention does not support diffusers context parallelism yet")
        cfg = h.config
        topk, topp = cfg.knobs_for(self.layer)
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        with torch.no_grad():
            bm = build_block_mask(q, k, topk=topk, topp=topp, block_q=cfg.block_q, block_k=cfg.block_k, backend=cfg.backend)
        if h.collect_stats:
            h._record(self.layer, step, bm.sparsity_tensor())
        return block_sparse_attention(q, k, v, bm, backend=cfg.backend).transpose(1, 2)


class _SkipSelfAttentionProcessor(SpargeWanAttnProcessor):
    """Everything of Wan self-attention except the attention product: output = V (for the attention share)."""

    def _sparse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, step: int) -> torch.Tensor:
        return value


class SparseAttention:
    """Handle returned by `apply`: remove the processors, read statistics, track the denoising step.

    Attributes:
        config: the `SpargeConfig` in force.
        layers: transformer block indices that got the sparse processor.
        step: current denoising step (see the module docstring for how it advances).
        collect_stats: record per-(layer, step) sparsity (may be switched on and off at any time).
        observer: ``observer(layer, step, q, k, v)`` with q/k/v ``[B, H, L, D]`` after QK-norm and rotary
            embedding, called before every self-attention call of the patched layers; or None.

    Use as a context manager to remove the processors on exit::

        with apply(pipe, SpargeConfig(topk=0.03, topp=0.2), collect_stats=True) as sa:
            video = pipe(prompt, ...).frames[0]
        print(sa.mean_sparsity())
    """

    def __init__(self, config: SpargeConfig, *, collect_stats: bool, observer: Observer | None) -> None:
        self.config = config
        self.collect_stats = collect_stats
        self.observer = observer
        self.step = 0
        self.layers: list[int] = []
        self._installed: list[tuple[Any, Any]] = []  # (attention module, original processor)
        self._hooks: list[Any] = []
        self._last_t: float | None = None
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._counts: dict[tuple[int, int], int] = {}

    # -- statistics -------------------------------------------------------------------------------
    def _record(self, layer: int, step: int, sparsity: torch.Tensor) -> None:
        key = (layer, step)
        s = sparsity.detach().to(torch.float64)
        self._sums[key] = self._sums[key] + s if key in self._sums else s
        self._counts[key] = self._counts.get(key, 0) + 1

    def stats(self) -> dict[tuple[int, int], float]:
        """Measured sparsity per ``(layer, step)``: mean skipped fraction over the calls of that step.

        Calls of one step (CFG cond + uncond, several prompts) are averaged; empty unless
        ``collect_stats`` was on. One device-to-host copy for all entries.
        """
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        values = torch.stack([self._sums[k].to("cpu") if self._sums[k].device.type != "cpu" else self._sums[k] for k in keys]).tolist()
        return {k: v / self._counts[k] for k, v in zip(keys, values)}

    def mean_sparsity(self) -> float | None:
        """Mean of `stats` over layers and steps (dense steps count as 0), or None when nothing was recorded."""
        st = self.stats()
        return sum(st.values()) / len(st) if st else None

    def reset(self) -> None:
        """Forget the statistics and start again from step 0."""
        self._sums.clear()
        self._counts.clear()
        self.step = 0
        self._last_t = None

    # -- steps --------------------------------------------------------------------------------------
    def step_callback(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` for diffusers pipelines: after step ``i`` the next one is ``i + 1``."""
        self.step = i + 1
        return {}

    def _timestep_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if not isinstance(t, torch.Tensor):
            if t is None:
                return
            t = torch.as_tensor(t)
        value = float(t.reshape(-1)[0])
        if self._last_t is None or value > self._last_t:
            self.step = 0
        elif value < self._last_t:
            self.step += 1
        self._last_t = value

    # -- life cycle ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the original processors (the same objects) and drop the hooks; safe to call twice."""
        for attn, original in reversed(self._installed):
            attn.set_processor(original)
        self._installed.clear()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @property
    def active(self) -> bool:
        return bool(self._installed)

    def __enter__(self) -> "SparseAttention":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"SparseAttention(layers={len(self.layers)}, topk={self.config.topk}, topp={self.config.topp}, "
            f"dense_steps={self.config.dense_steps}, step={self.step}, active={self.active})"
        )


def wan_transformers(model_or_pipeline: Any) -> list[torch.nn.Module]:
    """The Wan transformers of a pipeline (``transformer`` and, in Wan2.2, ``transformer_2``) or of a model."""
    if hasattr(model_or_pipeline, "blocks"):
        models = [model_or_pipeline]
    else:
        models = [m for m in (getattr(model_or_pipeline, "transformer", None), getattr(model_or_pipeline, "transformer_2", None)) if m is not None]
    if not models or not all(_is_wan_transformer(m) for m in models):
        raise ValueError(
            f"apply() needs a diffusers WanTransformer3DModel or a Wan pipeline, got {type(model_or_pipeline).__name__}"
        )
    return models


def _is_wan_transformer(m: Any) -> bool:
    blocks = getattr(m, "blocks", None)
    return isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0 and all(
        hasattr(b, "attn1") and hasattr(b.attn1, "set_processor") for b in blocks
    )


def apply(
    model_or_pipeline: Any,
    config: SpargeConfig,
    *,
    collect_stats: bool = False,
    observer: Observer | None = None,
    layers: Sequence[int] | Literal["all"] | None = None,
    step_tracking: Literal["auto", "manual"] = "auto",
    _processor_cls: type[SpargeWanAttnProcessor] = SpargeWanAttnProcessor,
) -> SparseAttention:
    """Make the self-attention of a Wan transformer (or of a pipeline's transformers) block-sparse.

    Args:
        model_or_pipeline: a `WanTransformer3DModel` or a pipeline holding one (``.transformer``,
            and ``.transformer_2`` when present). Works in any dtype, with or without gradients.
        config: Top-k / Top-p knobs, block sizes, ``dense_steps``, per-layer overrides, backend.
        collect_stats: record measured sparsity per (layer, step) on the device (read with ``stats()``).
        observer: ``observer(layer, step, q, k, v)``, q/k/v ``[B, H, L, D]`` after QK-norm and rotary
            embedding, called before each self-attention call of the sparse layers (dense steps included).
        layers: block indices to make sparse; None or "all" for every block.
        step_tracking: "auto" (timestep pre-hook, see module docstring) or "manual" (set ``handle.step``).

    Returns:
        A `SparseAttention` handle; ``handle.remove()`` (or leaving its ``with`` block) restores the model.

    Example:
        >>> pipe = load_wan_pipeline("Wan2.1-T2V-1.3B-Diffusers", dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
        >>> with apply(pipe, SpargeConfig(topk=0.03, topp=0.2), collect_stats=True) as sa:            # doctest: +SKIP
        ...     frames = pipe("a cat surfing", num_frames=81).frames[0]
    """
    if not isinstance(config, SpargeConfig):
        raise ValueError(f"config must be a sparge.SpargeConfig, got {type(config).__name__}")
    if step_tracking not in ("auto", "manual"):
        raise ValueError(f"step_tracking={step_tracking!r} is not known: use 'auto' or 'manual'")
    models = wan_transformers(model_or_pipeline)
    n_blocks = min(len(m.blocks) for m in models)
    if layers is None or layers == "all":
        chosen = list(range(n_blocks))
    else:
        chosen = sorted(set(int(i) for i in layers))
        bad = [i for i in chosen if not 0 <= i < n_blocks]
        if bad:
            raise ValueError(f"layers {bad} out of range: the transformer has blocks 0..{n_blocks - 1}")
    for m in models:
        for i, block in enumerate(m.blocks):
            if isinstance(block.attn1.processor, SpargeWanAttnProcessor):
                raise ValueError(f"block {i} already has a sparge processor: call remove() on the first handle before applying again")

    handle = SparseAttention(config, collect_stats=collect_stats, observer=observer)
    handle.layers = chosen
    for m in models:
        for i in chosen:
            attn = m.blocks[i].attn1
            original = attn.processor
            attn.set_processor(_processor_cls(i, handle, original))
            handle._installed.append((attn, original))
        needs_step = config.dense_steps > 0 or collect_stats or observer is not None
        if step_tracking == "auto" and needs_step:
            handle._hooks.append(m.register_forward_pre_hook(handle._timestep_hook, with_kwargs=True))
    return handle


# -- loading a pipeline --------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WanModelError(f"{path} is not readable JSON ({e.__class__.__name__}): the checkpoint is damaged; {_GET_WAN}") from None


def check_wan_checkpoint(path: str | Path) -> Path:
    """Check that ``path`` is a local diffusers-format Wan2.1 text-to-video pipeline directory.

    Raises:
        WanModelError: one line saying what is wrong and how to get a checkpoint.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WanModelError(f"model path {path} does not exist: {_GET_WAN}")
    if not p.is_dir():
        raise WanModelError(f"model path {path} is a file, not a diffusers pipeline directory: {_GET_WAN}")
    index = p / "model_index.json"
    if not index.is_file():
        raise WanModelError(f"{path} is not a diffusers pipeline directory (no model_index.json): {_GET_WAN}")
    cls = _read_json(index).get("_class_name")
    if cls != "WanPipeline":
        raise WanModelError(f"{path} holds a {cls or 'unknown'} pipeline, not a Wan text-to-video WanPipeline: {_GET_WAN}")
    tcfg = p / "transformer" / "config.json"
    if not tcfg.is_file() or _read_json(tcfg).get("_class_name") != "WanTransformer3DModel":
        raise WanModelError(f"{path} has no WanTransformer3DModel in transformer/: {_GET_WAN}")
    return p


def load_wan_pipeline(
    model: str,
    *,
    dtype: torch.dtype,
    device: str | torch.device | None = None,
    cpu_offload: bool = False,
) -> Any:
    """Load a Wan2.1 text-to-video `WanPipeline` from a local diffusers directory or a hub id.

    The transformer and text encoder are loaded in ``dtype``; the VAE in float32, as the Wan model cards
    recommend (the decode is a small part of the time and bf16 decoding shows banding).

    Args:
        model: local directory (``huggingface-cli download ... --local-dir DIR``) or a hub id
            such as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (needs network or a filled HF cache).
        dtype: torch.bfloat16, torch.float16 or torch.float32.
        device: where to put the pipeline; with ``cpu_offload`` the GPU that each model visits (default cuda).
        cpu_offload: diffusers' model CPU offload (needs CUDA and accelerate).

    Raises:
        WanModelError (a ValueError): the path does not exist, is not a diffusers Wan checkpoint, or the
        hub id cannot be fetched; one line that says how to get a checkpoint.
    """
    from diffusers import AutoencoderKLWan, WanPipeline

    local = Path(model).expanduser()
    if local.exists() or not _HUB_ID.match(model):
        src = str(check_wan_checkpoint(model))
    else:
        src = model
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype to dtype; torch_dtype still works on every release we support
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            vae = AutoencoderKLWan.from_pretrained(src, subfolder="vae", torch_dtype=torch.float32)
            pipe = WanPipeline.from_pretrained(src, vae=vae, torch_dtype=dtype)
    except WanModelError:
        raise
    except Exception as e:  # hub errors (offline, 404, gated) and damaged files all land here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if src == model and not local.exists():
            raise WanModelError(f"could not load {model!r} from the Hugging Face hub ({first[:200]}); {_GET_WAN}") from None
        raise WanModelError(f"could not load the Wan checkpoint in {model} ({type(e).__name__}: {first[:200]}); {_GET_WAN}") from None
    pipe.set_progress_bar_config(disable=True)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device if device is not None else "cuda")
    elif device is not None:
        pipe.to(device)
    return pipe


# -- end-to-end step timing ------------------------------------------------------------------------------


def build_random_wan_transformer(
    config: dict[str, Any], *, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> torch.nn.Module:
    """A `WanTransformer3DModel` with random weights, built on ``device`` and cast as ``from_pretrained`` casts.

    Parameters listed in the class's ``_keep_in_fp32_modules`` stay float32 (as when a checkpoint is
    loaded with ``torch_dtype``); all other parameters become ``dtype``.
    """
    from diffusers import WanTransformer3DModel

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config)
    finally:
        torch.random.set_rng_state(gen_state)
    keep = tuple(WanTransformer3DModel._keep_in_fp32_modules or ())
    for name, p in model.named_parameters():
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        p.data = p.data.to(target)
    return model.eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_transformer_step(
    transformer: torch.nn.Module,
    config: SpargeConfig | None,
    *,
    batch: int = 2,
    frames: int = 81,
    height: int = 480,
    width: int = 832,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    warmup: int = 2,
    iters: int = 5,
    text_len: int = 512,
    attention_share: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one denoising step of a Wan transformer: one forward over the CFG batch, dense or sparse.

    Inputs have the real shapes: latents ``[batch, C, (frames - 1) // 4 + 1, height // 8, width // 8]``
    (Wan2.1's VAE compression 4 x 8 x 8) and text embeddings ``[batch, text_len, text_dim]``, random,
    in ``dtype``. ``batch = 2`` is the classifier-free-guidance batch (WanPipeline makes the same work as
    two batch-1 calls). Timing: ``warmup`` untimed forwards, then ``iters`` forwards, each synchronised
    and timed with ``time.perf_counter`` under ``torch.no_grad``.

    With a config, one extra untimed forward with statistics on measures the sparsity; the timed
    forwards run without statistics. ``attention_share=True`` also times the same step with the
    self-attention product replaced by ``output = V`` (projections, QK-norm, RoPE and everything else
    kept): the share is ``(t_step - t_without) / t_step``, the part of the step that attention costs.

    Returns:
        dict with ``ms_per_step`` (mean), ``ms_min``, ``ms_std``, ``ms_all``, ``measured_sparsity``
        (None for dense), ``topk``/``topp``, ``tokens``, shapes, dtype, device, and with
        ``attention_share`` also ``ms_per_step_without_self_attention`` and ``self_attention_share``.
    """
    device = torch.device(device)
    cfg = getattr(transformer, "config", None)
    if cfg is None:
        raise ValueError("time_transformer_step needs a diffusers WanTransformer3DModel (with .config)")
    if (frames - 1) % 4 or frames < 1:
        raise ValueError(f"frames={frames} must be of the form 4n+1 (e.g. 81)")
    if height % 16 or width % 16:
        raise ValueError(f"height={height}, width={width} must be multiples of 16")
    for name, n in (("batch", batch), ("iters", iters)):
        if n < 1:
            raise ValueError(f"{name}={n} must be >= 1")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lat_shape = (batch, cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(lat_shape, generator=gen).to(device, dtype)
    text = torch.randn((batch, text_len, cfg.text_dim), generator=gen).to(device, dtype)
    timestep = torch.full((batch,), 500.0, device=device)
    pt, ph, pw = cfg.patch_size
    tokens = lat_shape[2] // pt * (lat_shape[3] // ph) * (lat_shape[4] // pw)

    def forward() -> None:
        transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)

    def timed() -> list[float]:
        for _ in range(warmup):
            forward()
        _sync(device)
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            forward()
            _sync(device)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    result: dict[str, Any] = {
        "mode": "dense" if config is None else "sparse",
        "batch": batch, "frames": frames, "height": height, "width": width, "latent_shape": list(lat_shape),
        "tokens": tokens, "text_len": text_len, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "warmup": warmup, "iters": iters, "topk": None, "topp": None, "measured_sparsity": None,
    }
    with torch.no_grad():
        if config is None:
            ms = timed()
        else:
            result.update(topk=config.topk, topp=config.topp, block_q=config.block_q, block_k=config.block_k)
            with apply(transformer, config, collect_stats=True, step_tracking="manual") as sa:
                sa.step = config.dense_steps  # time a sparse step, not a dense warm-up step
                forward()
                result["measured_sparsity"] = sa.mean_sparsity()
                sa.collect_stats = False
                ms = timed()
        result.update(
            ms_per_step=statistics.fmean(ms), ms_min=min(ms), ms_std=statistics.pstdev(ms), ms_all=ms,
        )
        if attention_share:
            with apply(transformer, SpargeConfig(), step_tracking="manual", _processor_cls=_SkipSelfAttentionProcessor):
                ms_skip = timed()
            result["ms_per_step_without_self_attention"] = statistics.fmean(ms_skip)
            result["self_attention_share"] = max(0.0, 1.0 - result["ms_per_step_without_self_attention"] / result["ms_per_step"])
    return result
