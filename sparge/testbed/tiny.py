"""A tiny Wan2.1 text-to-video pipeline from the real diffusers/transformers classes, with random weights.

Used by the tests (and by anyone who wants to try the CLI without a 5 GB download): every component is
the class a real Wan2.1 checkpoint uses -- `WanTransformer3DModel`, `AutoencoderKLWan`,
`UMT5EncoderModel`, a fast tokenizer, `UniPCMultistepScheduler` in flow-prediction mode -- only much
smaller, and it is saved with ``save_pretrained`` so it loads through the real ``from_pretrained`` path.
Nothing is downloaded: the tokenizer is built offline from a small word-level vocabulary.

Sizes: with `tiny_generation_kwargs()` (9 frames, 128 x 160) the latent video is 3 x 16 x 20, i.e.
3 x 8 x 10 = 240 tokens after the (1, 2, 2) patch embedding, so self-attention has 2 query blocks of
128 (one partial) and 4 key blocks of 64 (one partial): masks have real choices and tails.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sparge._atomic import atomic_dir
from sparge.testbed.train import build_tokenizer

__all__ = ["TINY_MODEL_NAME", "build_tiny_pipeline", "tiny_generation_kwargs", "tiny_transformer_config"]

TINY_MODEL_NAME = "sparge-tiny-wan2.1"

_WORDS = (
    "a an the of in on at with and or to from by over under near far red green blue yellow black white "
    "cat dog bird fish horse car boat plane tree flower river sea sky cloud sun moon star city street "
    "house mountain forest beach snow rain fire light night day runs walks flies swims jumps sits "
    "slowly quickly happy small big old young beautiful dark bright video camera shot close wide"
).split()


def tiny_transformer_config(num_layers: int = 2, num_heads: int = 2, head_dim: int = 16, text_dim: int = 32) -> dict[str, Any]:
    """`WanTransformer3DModel` config of the tiny model (Wan2.1 layout: patch (1, 2, 2), 16 latent channels)."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=2 * num_heads * head_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )


def tiny_generation_kwargs() -> dict[str, int]:
    """Pipeline call arguments that fit the tiny model and run in seconds on a CPU.

    Returns ``height``, ``width``, ``num_frames`` (4n+1) and ``num_inference_steps``.
    """
    return {"height": 128, "width": 160, "num_frames": 9, "num_inference_steps": 3}


def build_tiny_pipeline(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    text_dim: int = 32,
    overwrite: bool = False,
) -> Path:
    """Build a tiny random-weight `WanPipeline` and save it in diffusers format under ``path``.

    Args:
        path: target directory (created; must be empty or absent unless ``overwrite``).
        seed: seed of the random weights (same seed, same weights).
        num_layers, num_heads, head_dim: transformer size (Wan2.1-1.3B has 30, 12, 128).
        text_dim: UMT5 ``d_model`` and the transformer's ``text_dim`` (4096 in Wan2.1).
        overwrite: allow a non-empty target directory.

    Returns:
        The directory, loadable with ``WanPipeline.from_pretrained(path)``.

    Example:
        >>> d = build_tiny_pipeline("/tmp/tiny-wan")            # doctest: +SKIP
        >>> pipe = WanPipeline.from_pretrained(d)                # doctest: +SKIP
        >>> video = pipe("a cat", **tiny_generation_kwargs()).frames[0]   # doctest: +SKIP
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"tiny pipeline target {path} is not empty: choose an empty directory or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**tiny_transformer_config(num_layers, num_heads, head_dim, text_dim))
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        tokenizer = build_tokenizer(list(_WORDS))
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=text_dim,
                d_kv=8,
                d_ff=2 * text_dim,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        ).eval()
    finally:
        torch.random.set_rng_state(state)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    # write into a sibling temp dir, then rename: a half-written model directory never appears at `path`
    with atomic_dir(path) as tmp:
        pipe.save_pretrained(tmp)
    return path


if __name__ == "__main__":  # pragma: no cover - manual helper
    import sys

    print(build_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "tiny-wan"))
