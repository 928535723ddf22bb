"""Student checkpoints: one versioned safetensors file per save, loaded strictly.

Format: a safetensors file holding the transformer's full ``state_dict`` and string metadata with
``format = "sparge-student"`` and ``version = "1"``; every other metadata value (base model id, topk,
topp, training steps, ...) is stored JSON-encoded and decoded again on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from sparge._atomic import atomic_file

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_transformer_weights", "read_checkpoint_metadata", "save_transformer_weights"]

CHECKPOINT_FORMAT = "sparge-student"
CHECKPOINT_VERSION = "1"
_RESERVED = ("format", "version")


def _names(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def save_transformer_weights(path: str | os.PathLike, transformer: torch.nn.Module, *, metadata: dict[str, Any]) -> Path:
    """Write ``transformer.state_dict()`` to ``path`` (safetensors) atomically: temp file, then rename.

    Args:
        path: target ``.safetensors`` file; its directory must exist. An existing file is replaced
            (refusing to overwrite is the caller's decision, e.g. the CLI's ``--overwrite``).
        transformer: the model whose weights to save (any dtype/device; saved as they are).
        metadata: JSON-serialisable values, e.g. ``{"base_model": ..., "topk": 0.03, "topp": 0.2,
            "steps": 1000}``; ``format`` and ``version`` are set here and cannot be given.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    clash = [k for k in metadata if k in _RESERVED]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved: format and version are written by sparge")
    try:
        meta = {str(k): json.dumps(v) for k, v in metadata.items()}
    except TypeError as e:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
    meta.update(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in transformer.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a sparge checkpoint (JSON values decoded); ``ValueError`` if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a .safetensors file written by `sparge finetune`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path} is not a safetensors file ({type(e).__name__}): pass a checkpoint written by `sparge finetune`") from None
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a sparge checkpoint (format={raw.get('format')!r}, expected {CHECKPOINT_FORMAT!r}): pass a file written by `sparge finetune`")
    if raw.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has sparge checkpoint version {raw.get('version')!r}; this sparge reads version {CHECKPOINT_VERSION}")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in _RESERVED:
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_transformer_weights(path: str | os.PathLike, transformer: torch.nn.Module) -> dict[str, Any]:
    """Load a checkpoint written by `save_transformer_weights` into ``transformer``, strictly.

    Every key must match, with the same shape; values are cast to each parameter's dtype and device.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a sparge checkpoint, or missing / unexpected keys or shape mismatches (the
            message names a few of them).

    Returns:
        The checkpoint metadata (``format``, ``version`` and the saved values).
    """
    from safetensors import safe_open

    meta = read_checkpoint_metadata(path)
    own = transformer.state_dict()
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        missing = sorted(set(own) - set(keys))
        unexpected = sorted(set(keys) - set(own))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys ({_names(missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
            raise ValueError(f"checkpoint {path} does not fit this transformer: {'; '.join(parts)}")
        bad = [f"{k} {list(f.get_slice(k).get_shape())} vs {list(own[k].shape)}" for k in keys if list(f.get_slice(k).get_shape()) != list(own[k].shape)]
        if bad:
            raise ValueError(f"checkpoint {path} does not fit this transformer: {len(bad)} shape mismatches ({_names(bad)})")
        state = {k: f.get_tensor(k) for k in keys}
    transformer.load_state_dict(state, strict=True)
    return meta
