"""Quality test bed: a small trained Wan-structured text-to-video model (see sparge.testbed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

INFO_FILE = "testbed.json"


def read_info(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``testbed.json`` that `sparge.testbed.train.save_pipeline` writes beside a test-bed model, or
    ``None`` when ``model_dir`` is not a local directory holding one (a hub id, a real Wan model)."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}): re-save the model with sparge.testbed.train") from None


def pixel_geometry(info: dict[str, Any]) -> tuple[int, int, int]:
    """``(height, width, num_frames)`` in pixels that a test-bed model was trained on, from its `read_info`."""
    kw = info["pipeline_kwargs"]
    return int(kw["height"]), int(kw["width"]), int(kw["num_frames"])
