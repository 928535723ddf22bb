"""Presets: per model x resolution YAML files with calibrated Top-k / Top-p levels.

Schema (unknown keys and out-of-range values are errors naming the file, the key and what is allowed)::

    model: Wan-AI/Wan2.1-T2V-1.3B-Diffusers   # hub id or local path
    height: 480                               # multiple of 16
    width: 832                                # multiple of 16
    frames: 81                                # 4n+1
    block_q: 128                              # power of two >= 16
    block_k: 64                               # power of two >= 16
    sparse_layers: all                        # or a list of block indices
    dense_steps: 0                            # first N denoising steps dense
    description: "..."                        # optional
    levels:
      0.95:                                   # target sparsity in (0, 1)
        topk: 0.03                            # [0, 1]; topk = topp = 0 is an error
        topp: 0.2                             # [0, 1]
        measured_sparsity: null               # [0, 1] or null (not measured)
        source: "..."                         # where the values come from, and/or
        calibrated_on: {...}                  # what `sparge calibrate` measured them on
        per_layer: {3: [0.05, 0.3]}           # optional per-block (topk, topp) overrides

Shipped presets live in the ``sparge._presets`` package (the repository's ``presets/`` directory).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparge._atomic import atomic_file
from sparge.attention import SpargeConfig

__all__ = ["Level", "Preset", "find_preset", "list_presets", "load_preset", "presets_dir", "write_level"]

_TOP_KEYS = ("model", "height", "width", "frames", "block_q", "block_k", "sparse_layers", "dense_steps", "description", "levels")
_REQUIRED = ("model", "height", "width", "frames", "levels")
_LEVEL_KEYS = ("topk", "topp", "measured_sparsity", "source", "calibrated_on", "per_layer")


class PresetError(ValueError):
    """A preset file that does not follow the schema, or a level that does not exist."""


@dataclass(frozen=True)
class Level:
    """One sparsity level of a preset.

    Attributes:
        topk, topp: the hybrid mask knobs (see `sparge.SpargeConfig`).
        measured_sparsity: sparsity measured with these knobs on the preset's model, or None.
        source: where the values come from (paper, person, run) when not calibrated here.
        calibrated_on: what `sparge calibrate` measured them on (prompts, steps, date, ...).
        per_layer: optional ``{block: (topk, topp)}`` overrides.
    """

    topk: float
    topp: float
    measured_sparsity: float | None = None
    source: str | None = None
    calibrated_on: Any = None
    per_layer: dict[int, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"topk": self.topk, "topp": self.topp, "measured_sparsity": self.measured_sparsity}
        if self.source is not None:
            d["source"] = self.source
        if self.calibrated_on is not None:
            d["calibrated_on"] = self.calibrated_on
        if self.per_layer:
            d["per_layer"] = {int(k): [float(a), float(b)] for k, (a, b) in sorted(self.per_layer.items())}
        return d


@dataclass(frozen=True)
class Preset:
    """A model x resolution preset (see the module docstring for the file schema)."""

    name: str
    path: Path
    model: str
    height: int
    width: int
    frames: int
    block_q: int = 128
    block_k: int = 64
    sparse_layers: str | tuple[int, ...] = "all"
    dense_steps: int = 0
    description: str | None = None
    levels: dict[float, Level] = field(default_factory=dict)

    def level(self, sparsity: float) -> Level:
        """The level for target ``sparsity``; ``PresetError`` listing the levels when there is none."""
        for s, lv in self.levels.items():
            if math.isclose(s, float(sparsity), abs_tol=1e-9):
                return lv
        have = ", ".join(f"{s:g}" for s in sorted(self.levels)) or "none"
        raise PresetError(
            f"preset {self.name} has no level for sparsity {sparsity:g} (available: {have}); "
            f"make one with `sparge calibrate --preset {self.name} --target {sparsity:g}`"
        )

    def default_sparsity(self) -> float:
        """The highest level (the preset's headline setting)."""
        if not self.levels:
            raise PresetError(f"preset {self.name} has no levels: make one with `sparge calibrate --preset {self.name} --target 0.95`")
        return max(self.levels)

    def to_config(self, sparsity: float, *, backend: str = "auto") -> SpargeConfig:
        """`SpargeConfig` for the level ``sparsity`` with the preset's block sizes and dense steps."""
        lv = self.level(sparsity)
        return SpargeConfig(
            topk=lv.topk, topp=lv.topp, block_q=self.block_q, block_k=self.block_k,
            dense_steps=self.dense_steps, per_layer=dict(lv.per_layer), backend=backend,  # type: ignore[arg-type]
        )

    def layers(self) -> list[int] | None:
        """Sparse block indices, or None for all blocks (the form `integrations.diffusers.apply` takes)."""
        return None if self.sparse_layers == "all" else list(self.sparse_layers)


def presets_dir() -> Path:
    """Directory of the shipped presets (installed package data, or the repository's ``presets/``)."""
    try:
        from importlib.resources import files

        p = Path(str(files("sparge._presets")))
        if p.is_dir():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "presets"


def _err(path: Path, key: str, msg: str) -> PresetError:
    return PresetError(f"preset {path}: {key} {msg}")


def _int(path: Path, key: str, v: Any, *, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _err(path, key, f"= {v!r} is out of range: use an integer >= {minimum}")
    return v


def _frac(path: Path, key: str, v: Any, *, allow_none: bool = False, open_interval: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and not math.isnan(v)
    ok = ok and ((0.0 < v < 1.0) if open_interval else (0.0 <= v <= 1.0))
    if not ok:
        rng = "(0, 1)" if open_interval else "[0, 1]"
        raise _err(path, key, f"= {v!r} is out of range: use a number in {rng}" + (" or null" if allow_none else ""))
    return float(v)


def _block(path: Path, key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
        raise _err(path, key, f"= {v!r} is not allowed: use a power of two >= 16")
    return v


def _parse_level(path: Path, target: Any, d: Any) -> tuple[float, Level]:
    s = _frac(path, f"levels key {target!r}", target, open_interval=True)
    where = f"levels.{target}"
    if not isinstance(d, dict):
        raise _err(path, where, f"must be a mapping with keys {', '.join(_LEVEL_KEYS)}")
    unknown = [k for k in d if k not in _LEVEL_KEYS]
    if unknown:
        raise _err(path, f"{where}.{unknown[0]}", f"is not a known key: allowed {', '.join(_LEVEL_KEYS)}")
    for k in ("topk", "topp"):
        if k not in d:
            raise _err(path, f"{where}.{k}", "is missing: every level needs topk and topp")
    topk = _frac(path, f"{where}.topk", d["topk"])
    topp = _frac(path, f"{where}.topp", d["topp"])
    if topk == 0.0 and topp == 0.0:
        raise _err(path, f"{where}.topk/topp", "are both 0: at least one must be > 0")
    measured = _frac(path, f"{where}.measured_sparsity", d.get("measured_sparsity"), allow_none=True)
    source = d.get("source")
    if source is not None and not isinstance(source, str):
        raise _err(path, f"{where}.source", f"= {source!r} must be a string")
    if source is None and d.get("calibrated_on") is None:
        raise _err(path, where, "has neither source nor calibrated_on: say where topk/topp come from")
    per_layer: dict[int, tuple[float, float]] = {}
    raw_pl = d.get("per_layer") or {}
    if not isinstance(raw_pl, dict):
        raise _err(path, f"{where}.per_layer", "must be a mapping {block index: [topk, topp]}")
    for layer, kp in raw_pl.items():
        li = _int(path, f"{where}.per_layer key", layer)
        if not isinstance(kp, (list, tuple)) or len(kp) != 2:
            raise _err(path, f"{where}.per_layer.{layer}", f"= {kp!r} must be a [topk, topp] pair")
        a = _frac(path, f"{where}.per_layer.{layer}[0]", kp[0])
        b = _frac(path, f"{where}.per_layer.{layer}[1]", kp[1])
        if a == 0.0 and b == 0.0:
            raise _err(path, f"{where}.per_layer.{layer}", "has topk = topp = 0: at least one must be > 0")
        per_layer[li] = (a, b)  # type: ignore[assignment]
    return s, Level(topk=topk, topp=topp, measured_sparsity=measured, source=source, calibrated_on=d.get("calibrated_on"), per_layer=per_layer)  # type: ignore[arg-type]


def _parse(path: Path, data: Any) -> Preset:
    if not isinstance(data, dict):
        raise PresetError(f"preset {path}: the file must hold a YAML mapping with keys {', '.join(_TOP_KEYS)}")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise _err(path, str(unknown[0]), f"is not a known key: allowed {', '.join(_TOP_KEYS)}")
    for k in _REQUIRED:
        if k not in data:
            raise _err(path, k, "is missing")
    model = data["model"]
    if not isinstance(model, str) or not model.strip():
        raise _err(path, "model", f"= {model!r} must be a hub id or a local path")
    h = _int(path, "height", data["height"], minimum=16)
    w = _int(path, "width", data["width"], minimum=16)
    for k, v in (("height", h), ("width", w)):
        if v % 16:
            raise _err(path, k, f"= {v} is not allowed: use a multiple of 16")
    frames = _int(path, "frames", data["frames"], minimum=1)
    if (frames - 1) % 4:
        raise _err(path, "frames", f"= {frames} is not allowed: use 4n+1 (e.g. 81)")
    layers = data.get("sparse_layers", "all")
    if layers != "all":
        if not isinstance(layers, list) or not layers:
            raise _err(path, "sparse_layers", f"= {layers!r} is not allowed: use \"all\" or a list of block indices")
        layers = tuple(_int(path, "sparse_layers item", i) for i in layers)
    desc = data.get("description")
    if desc is not None and not isinstance(desc, str):
        raise _err(path, "description", "must be a string")
    raw_levels = data["levels"] or {}
    if not isinstance(raw_levels, dict):
        raise _err(path, "levels", "must be a mapping {target sparsity: {topk, topp, ...}}")
    levels = dict(_parse_level(path, t, d) for t, d in raw_levels.items())
    return Preset(
        name=path.stem, path=path, model=model, height=h, width=w, frames=frames,
        block_q=_block(path, "block_q", data.get("block_q", 128)), block_k=_block(path, "block_k", data.get("block_k", 64)),
        sparse_layers=layers, dense_steps=_int(path, "dense_steps", data.get("dense_steps", 0)), description=desc, levels=levels,
    )


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise PresetError(f"preset {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def list_presets() -> list[str]:
    """Names (file stems) of the shipped presets, sorted."""
    d = presets_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_preset(name_or_path: str | os.PathLike) -> Preset:
    """Load and validate a preset by shipped name (e.g. ``wan2.1-t2v-1.3b-480p``) or by file path.

    Raises:
        FileNotFoundError: neither a shipped name nor an existing file (the message lists the names).
        PresetError (a ValueError): the file breaks the schema (names the file, key and allowed range).
    """
    p = Path(name_or_path).expanduser()
    if not p.is_file():
        shipped = presets_dir() / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise FileNotFoundError(
                f"preset {name_or_path!r} is neither a shipped preset ({', '.join(list_presets()) or 'none'}) nor a YAML file"
            )
        p = shipped
    return _parse(p, _read(p))


def _model_matches(query: str, preset_model: str) -> bool:
    q, m = query.rstrip("/").lower(), preset_model.rstrip("/").lower()
    # a local download (huggingface-cli download ID --local-dir .../Wan2.1-T2V-1.3B-Diffusers) matches by its last part
    return q == m or Path(q).name == Path(m).name


def find_preset(model: str, height: int | None = None, width: int | None = None) -> Preset | None:
    """The shipped preset for ``model`` (hub id, or a local directory named like the hub repo) at this resolution.

    With ``height``/``width`` None any resolution matches (the first by name). Returns None if none fits.
    """
    for name in list_presets():
        pr = load_preset(name)
        if not _model_matches(model, pr.model):
            continue
        if (height is None or height == pr.height) and (width is None or width == pr.width):
            return pr
    return None


def write_level(path: str | os.PathLike, target: float, level: Level | dict[str, Any], *, overwrite_level: bool = True) -> Preset:
    """Add or replace the level ``target`` in the preset file ``path``, atomically.

    The other levels, the other keys and the file's leading comment block are kept; the result is
    validated before it replaces the file.

    Raises:
        PresetError: the level exists and ``overwrite_level`` is False, or the result breaks the schema.

    Returns:
        The preset as written.
    """
    path = Path(path)
    text = path.read_text()
    data = _read(path)
    _parse(path, data)
    lv = level.to_dict() if isinstance(level, Level) else dict(level)
    target = _frac(path, "target sparsity", target, open_interval=True)  # type: ignore[assignment]
    levels = data.get("levels") or {}
    existing = next((k for k in levels if isinstance(k, (int, float)) and math.isclose(k, target, abs_tol=1e-9)), None)
    if existing is not None and not overwrite_level:
        raise PresetError(f"preset {path}: level {target:g} already exists; allow replacing it (--overwrite) or pick another target")
    if existing is not None:
        del levels[existing]
    levels[float(target)] = lv
    data["levels"] = dict(sorted(levels.items()))
    new = _parse(path, data)
    header = "".join(line for line in text.splitlines(keepends=True)[: _comment_lines(text)])
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
    with atomic_file(path, mode=path.stat().st_mode & 0o777) as tmp:
        tmp.write_text(header + body)
    return new


def _comment_lines(text: str) -> int:
    n = 0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            n += 1
        else:
            break
    return n


def resolve_preset(
    preset: str | os.PathLike | None, model: str | None, height: int | None = None, width: int | None = None, *, default: str
) -> tuple[Preset | None, str]:
    """The preset a command uses and the model it runs: ``preset`` if given; else the shipped preset for
    ``model`` (at ``height`` x ``width`` when given); else, without a model, the preset named ``default``.

    Returns ``(preset or None when the model has none, model id or path)``.
    """
    if preset is not None:
        pr: Preset | None = load_preset(preset)
    elif model is None:
        pr = load_preset(default)
    else:
        pr = find_preset(model, height, width) or (find_preset(model) if height is None and width is None else None)
    model_id = model or (pr.model if pr is not None else None)
    assert model_id is not None  # a preset always names its model
    return pr, model_id
