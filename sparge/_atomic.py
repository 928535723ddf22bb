"""Atomic outputs: a file or directory is written beside its target, then renamed onto it.

A crash or an exception leaves the target as it was (never half-written) and removes the temporary.
Results get the modes a plain ``open()`` / ``mkdir()`` would give (``mkstemp``/``mkdtemp`` make 0600/0700).
Refusing to replace an existing target is the caller's decision (the CLI's ``--overwrite``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (same suffix); on success, rename it onto ``path``.

    ``mode``: the file's permission bits; default ``0o666`` less the umask.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=str(path.parent))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, (0o666 & ~umask()) if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success, replace ``path`` (file or tree) with it."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=str(path.parent)))
    try:
        yield tmp
        mask = umask()
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
