"""Shared CLI plumbing: one-line errors with exit codes, rich console, atomic writes, device/dtype parsing.

Every command body runs inside `cli_errors()`: a `UsageError` (or a `ValueError` raised by the core
library for a bad argument) prints one red line and exits 2; any other failure prints one line and
exits 1. No traceback reaches the user unless ``SPARGE_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console


console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


class UsageError(Exception):
    """A user mistake: bad option value, missing input, refused overwrite. Exit code 2."""


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn exceptions into one clear line and the documented exit code."""
    debug = os.environ.get("SPARGE_DEBUG") == "1"
    try:
        yield
    except typer.Exit:
        raise
    except (UsageError, ValueError, FileNotFoundError) as e:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as e:  # runtime failure
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "out of memory" in msg.lower():
            msg += " (lower --batch-size/--frames/resolution, or use --cpu-offload / --gradient-checkpointing)"
        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {msg}", soft_wrap=True)
        raise typer.Exit(1) from None


def check_writable_target(path: Path, overwrite: bool, what: str = "output") -> None:
    """Refuse an existing file without --overwrite, and a directory we cannot write into."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{what} {path} already exists: pass --overwrite to replace it, or choose another path")
    if path.exists() and path.is_dir():
        raise UsageError(f"{what} {path} is a directory: give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"cannot write {what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {what} {path}: directory {parent} is not writable")


DEFAULT_PRESET = "wan2.1-t2v-1.3b-480p"  # without --model and --preset


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """`sparge._atomic.atomic_file`, imported only when used: the CLI starts without importing torch."""
    from sparge._atomic import atomic_file

    with atomic_file(path) as tmp:
        yield tmp


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def parse_dtype(name: str):
    import torch

    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise UsageError(f"--dtype {name!r} is not known: use bf16, fp16 or fp32")
    return table[name]


def parse_device(name: str, need_cuda: bool = False):
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device: use cuda, cuda:N or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} needs a CUDA GPU, but none is visible: use --device cpu")
    if need_cuda and dev.type != "cuda":
        raise UsageError(f"this command needs a CUDA GPU (--device cuda), got --device {name}")
    return dev


def quiet_hf() -> None:
    """Silence diffusers' and transformers' own progress bars and info logs (ours replace them)."""
    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def default_geometry(pr: Any, model_id: str | None, height: int | None, width: int | None,
                     frames: int | None) -> tuple[int, int, int]:
    """``(height, width, frames)``: each given value, else the preset's, else the geometry a test-bed model
    was trained on (its ``testbed.json``), else Wan2.1's 480 x 832 x 81."""
    from sparge.testbed import pixel_geometry, read_info

    if pr is not None:
        fallback = (pr.height, pr.width, pr.frames)
    else:
        info = read_info(model_id) if model_id else None
        fallback = pixel_geometry(info) if info is not None else (480, 832, 81)
    return (height if height is not None else fallback[0], width if width is not None else fallback[1],
            frames if frames is not None else fallback[2])

