"""Calibration: capture Q/K/V from real forward passes, then search (topk, topp) for a target sparsity.

Two halves, used by ``sparge calibrate`` and usable on their own:

1. **Capture** (:func:`capture_attention`): run a few real denoising steps of a Wan pipeline with the
   diffusers integration installed in a *dense* observing mode (outputs unchanged), and keep Q and K
   (after the QK norms and the rotary embedding) and V of a sub-sample of the self-attention layers,
   heads and steps in a :class:`CaptureStore`. Memory is bounded: a sample costs
   ``4 * B * H_kept * L * D * itemsize`` bytes (q, k, v and the dense output); up to ``max_bytes`` of
   them stay in host memory, the rest are written to safetensors files in a spill directory and read
   back one at a time. During the search the accelerator holds the pooled block scores
   (``H_kept * Tq * Tk`` floats per sample) and either one sample at a time or, when they fit in 30% of
   its free memory (16 GiB at most), all of them (see :class:`CalibrationData`).

2. **Search** (:func:`search_target`): the pooled block scores of every sample are computed once
   (:func:`sparge.block_scores`); the mask for any (k, p) is then :func:`sparge.mask.mask_from_scores`
   of those scores, so the *sparsity* of a candidate costs a sort, not an attention pass. Sparsity is
   monotone non-increasing in k for fixed p and in p for fixed k, so each candidate is found by
   bisection on one knob:

   - Top-k alone (p = 0): bisect k; its solution is ``k*``.
   - Top-p alone (k = 0): bisect p.
   - Hybrid: for k = f * k* with a few fractions f in (0, 1), Top-k alone is too sparse, so bisect p
     to add the missing blocks where the pooled mass asks for them. f -> 0 tends to Top-p alone and
     f -> 1 to Top-k alone, so the fractions walk the one-parameter family of hybrid masks that hit
     the target between the two single rules. Optionally the best interior fraction is refined once.

   Only candidates whose sparsity lands within ``tolerance`` of the target get the expensive
   *attention error*: the relative L2 distance ``||O_sparse - O_dense|| / ||O_dense||`` of
   :func:`sparge.block_sparse_attention` against dense attention on the captured q, k, v, averaged
   over the samples (layers x steps x prompts). The chosen level is the lowest-error hit. With few key
   blocks (short sequences) sparsity moves in coarse steps and some targets cannot be hit exactly:
   the search then reports the closest reachable sparsity (:class:`UnreachableTargetError`).

   Per layer (:func:`search_per_layer`): each layer keeps the sparsity the global level gives it and
   gets its own (k, p) there when that lowers its error, so the comparison with the global level is at
   equal overall sparsity.

Conventions as everywhere in sparge: sparsity is the skipped fraction of the real score matrix,
``topk`` the kept fraction of key blocks per query block, ``topp`` the kept pooled-probability mass.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparge.attention import Backend, block_sparse_attention
from sparge.mask import block_scores, mask_from_scores, mask_sparsity

__all__ = [
    "DEFAULT_PROMPTS",
    "Candidate",
    "CalibrationData",
    "CaptureStore",
    "PerLayerResult",
    "TargetResult",
    "UnreachableTargetError",
    "capture_attention",
    "check_target",
    "relative_l2",
    "sample_bytes",
    "search_per_layer",
    "search_target",
    "spread",
]

# Short, varied prompts (motion, texture, lighting, people, scenery, text-free close-ups) so the captured
# attention covers more than one kind of scene.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "A red fox trots through fresh snow in a pine forest at dawn, steam rising from its breath.",
    "Close-up of rain drops hitting a puddle on a neon-lit city street at night, reflections shimmering.",
    "A surfer rides a large turquoise wave, spray in the air, camera tracking from the side.",
    "Two chefs cook in a busy restaurant kitchen, flames leaping from a wok, fast cuts.",
    "Aerial shot over terraced rice fields in the mountains, clouds drifting slowly.",
    "A slow pan across an old library, dust floating in sunbeams between tall bookshelves.",
)

# Smallest knob value the bisection tries: keeps exactly one key block per query block.
_KNOB_MIN = 1e-6
_MAX_BISECT = 30

ProgressFn = Callable[[str, int, int], None]
"""``on_progress(task, done, total)``: called as work advances (the CLI draws rich bars with it)."""


class UnreachableTargetError(ValueError):
    """No (k, p) reaches the target within tolerance; ``closest`` is the nearest reachable sparsity."""

    def __init__(self, message: str, closest: float) -> None:
        super().__init__(message)
        self.closest = closest


def check_target(target: float) -> float:
    """Validate a target sparsity; must be strictly between 0 and 1."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or math.isnan(target) or not 0.0 < float(target) < 1.0:
        raise ValueError(f"target sparsity {target!r} is out of range: use a number strictly between 0 and 1 (e.g. 0.95 = 95% skipped)")
    return float(target)


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_2 / ||ref||_2`` over all elements, computed in float32 (0 when both are zero)."""
    ref32 = ref.float()
    num = torch.linalg.vector_norm(out.float() - ref32)
    den = torch.linalg.vector_norm(ref32)
    return float(num / den) if float(den) > 0 else float(num)


# --------------------------------------------------------------------------------------------------
# Capture store: bounded host memory, safetensors spill
# --------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    layer: int
    step: int
    prompt: int
    heads: tuple[int, ...]
    nbytes: int
    tensors: dict[str, torch.Tensor] | None = None  # in memory
    path: Path | None = None  # spilled


class CaptureStore:
    """Captured attention inputs, one entry per (prompt, layer, step): q, k, v ``[B, H_kept, L, D]``.

    Entries stay in host memory (on the CPU) while the total is under ``max_bytes``; later ones are
    written as safetensors files into ``spill_dir`` (a temporary directory unless given) and loaded back
    one at a time. Spilled files are scratch: :meth:`close` deletes them. The dense attention output ``o`` is added by :class:`CalibrationData` and counts
    toward the same bound.

    Args:
        max_bytes: host-memory bound for the tensors kept in memory (default 4 GiB).
        spill_dir: where spilled entries go; created if missing; a temporary directory by default
            (removed by :meth:`close`).
    """

    def __init__(self, *, max_bytes: int = 4 << 30, spill_dir: str | os.PathLike[str] | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} is out of range: use an integer >= 0")
        self.max_bytes = int(max_bytes)
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._own_spill = spill_dir is None
        self.entries: list[_Entry] = []
        self.bytes_in_memory = 0
        self.bytes_spilled = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _spill_path(self, index: int) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="sparge-calibrate-"))
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        return self._spill_dir / f"sample-{index:05d}.safetensors"

    def _put(self, entry: _Entry, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Place ``tensors`` as entry ``index``: in memory while under the bound, else in a safetensors file."""
        from safetensors.torch import save_file

        if entry.tensors is not None:
            self.bytes_in_memory -= entry.nbytes
        elif entry.path is not None:
            self.bytes_spilled -= entry.nbytes
        entry.tensors = None
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        entry.nbytes = nbytes
        if entry.path is None and self.bytes_in_memory + nbytes <= self.max_bytes:
            entry.tensors = tensors
            self.bytes_in_memory += nbytes
            return
        path = entry.path or self._spill_path(index)
        tmp = path.with_name(path.name + ".tmp")
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        entry.path = path
        self.bytes_spilled += nbytes

    def add(self, *, layer: int, step: int, prompt: int, heads: Sequence[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one sample (copied to the CPU). q, k, v: ``[B, H_kept, L, D]`` of one dtype."""
        tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in (("q", q), ("k", k), ("v", v))}
        entry = _Entry(layer=int(layer), step=int(step), prompt=int(prompt), heads=tuple(int(h) for h in heads), nbytes=0)
        self._put(entry, len(self.entries), tensors)
        self.entries.append(entry)

    def load(self, index: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors of entry ``index`` (``q``, ``k``, ``v`` and, once computed, ``o``) on ``device``."""
        from safetensors.torch import load_file

        entry = self.entries[index]
        tensors = entry.tensors if entry.tensors is not None else load_file(str(entry.path))
        return {n: t.to(device) for n, t in tensors.items()}

    def update(self, index: int, **new: torch.Tensor) -> None:
        """Add or replace tensors of entry ``index`` (e.g. the dense output ``o``), keeping the bound.

        An in-memory entry that no longer fits is moved to the spill directory.
        """
        tensors = self.load(index)
        tensors.update({n: t.detach().to("cpu", copy=True).contiguous() for n, t in new.items()})
        entry = self.entries[index]
        grown = sum(t.numel() * t.element_size() for t in tensors.values())
        if entry.tensors is not None and self.bytes_in_memory - entry.nbytes + grown > self.max_bytes:
            self.bytes_in_memory -= entry.nbytes
            entry.tensors = None
            entry.nbytes = 0
            entry.path = self._spill_path(index)
        self._put(entry, index, tensors)

    @property
    def spill_dir(self) -> Path | None:
        return self._spill_dir

    def close(self) -> None:
        """Drop in-memory tensors and delete the spilled files (and the spill directory if this store made it)."""
        for e in self.entries:
            e.tensors = None
            if e.path is not None:
                e.path.unlink(missing_ok=True)
                e.path = None
        if self._own_spill and self._spill_dir is not None and self._spill_dir.exists():
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    def __enter__(self) -> "CaptureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def from_tensors(cls, samples: Sequence[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]], **kwargs: Any) -> "CaptureStore":
        """A store from ``(layer, step, q, k, v)`` tuples (synthetic data, tests); all heads kept."""
        store = cls(**kwargs)
        for layer, step, q, k, v in samples:
            store.add(layer=layer, step=step, prompt=0, heads=range(q.shape[1]), q=q, k=k, v=v)
        return store


# --------------------------------------------------------------------------------------------------
# Prepared data: pooled scores once, sparsity and error of any (k, p)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    layer: int
    step: int
    scores: torch.Tensor  # [B, H, Tq, Tk] float32 on the evaluation device
    q_len: int
    k_len: int


class CalibrationData:
    """The captured samples made ready for the search.

    Computes, once per sample, the pooled block scores (kept on ``device``) and the dense attention
    output (``F.scaled_dot_product_attention``, stored back into the store as ``o``). Afterwards
    :meth:`sparsity` costs one sort per sample and :meth:`error` one block-sparse attention per sample.
    On an accelerator the samples (q, k, v, o) also stay resident there when they fit in
    ``device_cache_bytes`` (default: 30% of the free memory, at most 16 GiB), so the error evaluations
    do not copy them from the host again and again; otherwise each is loaded per evaluation.

    Args:
        store: the captured samples.
        block_q, block_k: block sizes (query, key) of the masks being calibrated.
        device: where scores live and attention runs (the GPU for real models).
        backend: attention backend passed to :func:`sparge.block_sparse_attention`.
        on_progress: optional ``(task, done, total)`` callback.
        device_cache_bytes: bound for samples kept resident on ``device`` (None: automatic, i.e. 0 on
            the CPU, where the store's own memory bound applies; 0 disables).
    """

    def __init__(
        self,
        store: CaptureStore,
        *,
        block_q: int = 128,
        block_k: int = 64,
        device: torch.device | str = "cpu",
        backend: Backend = "auto",
        on_progress: ProgressFn | None = None,
        device_cache_bytes: int | None = None,
    ) -> None:
        if len(store) == 0:
            raise ValueError("nothing was captured: no self-attention call matched the requested layers and steps")
        self.store = store
        self.block_q, self.block_k = block_q, block_k
        self.device = torch.device(device)
        self.backend = backend
        self.items: list[_Prepared] = []
        self.sparsity_evaluations = 0
        self.error_evaluations = 0
        self._error_cache: dict[tuple[float, float, tuple[int, ...]], float] = {}
        n = len(store)
        if device_cache_bytes is None:
            device_cache_bytes = 0
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                device_cache_bytes = min(int(0.3 * free), 16 << 30)
        total = sum(e.nbytes for e in store.entries) * 4 // 3  # q, k, v now; o joins them
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        keep = 0 < total <= device_cache_bytes
        for i, entry in enumerate(store.entries):
            t = store.load(i, self.device)
            q, k, v = t["q"], t["k"], t["v"]
            scores = block_scores(q, k, block_q=block_q, block_k=block_k)
            if "o" not in t:
                with torch.no_grad():
                    t["o"] = F.scaled_dot_product_attention(q, k, v)
                store.update(i, o=t["o"])
            if keep:
                self._resident[i] = t
            self.items.append(_Prepared(entry.layer, entry.step, scores, q.shape[2], k.shape[2]))
            del t, q, k, v
            if on_progress is not None:
                on_progress("prepare", i + 1, n)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def layers(self) -> list[int]:
        return sorted({it.layer for it in self.items})

    def indices_for_layer(self, layer: int) -> tuple[int, ...]:
        return tuple(i for i, it in enumerate(self.items) if it.layer == layer)

    def _sel(self, indices: Sequence[int] | None) -> tuple[int, ...]:
        return tuple(range(len(self.items))) if indices is None else tuple(indices)

    def topk_counts(self, topk: float, indices: Sequence[int] | None = None) -> tuple[int, ...]:
        """Key blocks Top-k keeps per query block, ``max(1, ceil(topk * Tk))``, for each distinct Tk of the samples."""
        tks = sorted({self.items[i].scores.shape[-1] for i in self._sel(indices)})
        return tuple(min(tk, max(1, math.ceil(topk * tk))) if topk > 0 else 0 for tk in tks)

    def max_sparsity(self, indices: Sequence[int] | None = None) -> float:
        """Sparsity of the sparsest legal mask (one key block per query block)."""
        return self.sparsity(_KNOB_MIN, 0.0, indices)

    def sparsity(self, topk: float, topp: float, indices: Sequence[int] | None = None) -> float:
        """Mean over samples of the hybrid mask's sparsity (each averaged over batch and heads)."""
        self.sparsity_evaluations += 1
        sel = self._sel(indices)
        total = 0.0
        for i in sel:
            it = self.items[i]
            mask = mask_from_scores(it.scores, topk=topk, topp=topp)
            total += mask_sparsity(mask, it.q_len, it.k_len, self.block_q, self.block_k)
        return total / len(sel)

    def error(self, topk: float, topp: float, indices: Sequence[int] | None = None) -> float:
        """Mean over samples of the relative L2 error of block-sparse attention against dense attention."""
        sel = self._sel(indices)
        key = (float(topk), float(topp), sel)
        if key in self._error_cache:
            return self._error_cache[key]
        self.error_evaluations += 1
        total = 0.0
        with torch.no_grad():
            for i in sel:
                it = self.items[i]
                t = self._resident.get(i) or self.store.load(i, self.device)
                mask = mask_from_scores(it.scores, topk=topk, topp=topp)
                out = block_sparse_attention(
                    t["q"], t["k"], t["v"], mask, block_q=self.block_q, block_k=self.block_k, backend=self.backend
                )
                total += relative_l2(out, t["o"])
                del t, out
        err = total / len(sel)
        self._error_cache[key] = err
        return err


# --------------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One (k, p) tried for a target.

    Attributes:
        family: "topk" (p = 0), "topp" (k = 0) or "hybrid".
        topk, topp: the knobs.
        sparsity: mean sparsity over the samples searched.
        hit: sparsity within tolerance of the target.
        error: mean relative L2 attention error (None when not evaluated, i.e. missed the target).
        chosen: the level picked for the target.
    """

    family: str
    topk: float
    topp: float
    sparsity: float
    hit: bool
    error: float | None = None
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "topk": self.topk, "topp": self.topp, "sparsity": self.sparsity,
                "hit": self.hit, "error": self.error, "chosen": self.chosen}


@dataclass(frozen=True)
class TargetResult:
    """The outcome of searching one target.

    Attributes:
        target, tolerance: what was asked.
        chosen: the lowest-error candidate that hit the target.
        candidates: every candidate found by bisection, in the order tried.
        sparsity_evaluations, error_evaluations: how much work the search did.
        seconds: wall time of the search (capture and preparation excluded).
    """

    target: float
    tolerance: float
    chosen: Candidate
    candidates: tuple[Candidate, ...]
    sparsity_evaluations: int
    error_evaluations: int
    seconds: float

    def best_of(self, family: str) -> Candidate | None:
        """Lowest-error hit of one family (None if that family missed the target)."""
        hits = [c for c in self.candidates if c.family == family and c.hit and c.error is not None]
        return min(hits, key=lambda c: c.error) if hits else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "tolerance": self.tolerance,
            "chosen": self.chosen.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "sparsity_evaluations": self.sparsity_evaluations,
            "error_evaluations": self.error_evaluations,
            "seconds": self.seconds,
        }


def _bisect(fn: Callable[[float], float], target: float, tolerance: float) -> tuple[float, float]:
    """Find x in [_KNOB_MIN, 1] with ``fn(x)`` (non-increasing) closest to ``target``; returns (x, fn(x)).

    Every x tried is already rounded to 6 significant digits, so the value reported (and written to a
    preset) is exactly the one whose sparsity was measured. Stops as soon as ``|fn(x) - target| <= tolerance / 10``; otherwise keeps halving the bracket and
    returns the closest point seen (``fn`` is a step function, so an exact hit may not exist).
    """
    lo, hi = _KNOB_MIN, 1.0
    s_lo = fn(lo)
    best = (lo, s_lo)
    if s_lo <= target:  # even the sparsest setting is at or below the target
        return best
    s_hi = fn(hi)
    if abs(s_hi - target) < abs(best[1] - target):
        best = (hi, s_hi)
    for _ in range(_MAX_BISECT):
        mid = _round_knob(0.5 * (lo + hi))
        if abs(best[1] - target) <= tolerance / 10 or not lo < mid < hi:
            break
        s = fn(mid)
        if abs(s - target) < abs(best[1] - target):
            best = (mid, s)
        if s > target:
            lo = mid
        else:
            hi = mid
    return best


def _round_knob(x: float) -> float:
    # 6 significant digits: enough to keep the block counts the bisection found, readable in YAML.
    return float(f"{x:.6g}")


def search_target(
    data: CalibrationData,
    target: float,
    *,
    tolerance: float = 0.005,
    hybrid_fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
    refine: bool = True,
    indices: Sequence[int] | None = None,
    on_progress: ProgressFn | None = None,
) -> TargetResult:
    """Search (topk, topp) reaching ``target`` sparsity with the least attention error.

    Candidates (see the module docstring): Top-k alone, Top-p alone, and hybrids k = f * k* (k* the
    Top-k-alone solution) for each fraction f with p bisected; with ``refine`` the best interior
    fraction is refined once by trying the midpoints to its neighbours. Only hits are evaluated for
    error.

    Args:
        data: prepared samples.
        target: sparsity in (0, 1), e.g. 0.95.
        tolerance: absolute tolerance on the reached sparsity (0.005 = +-0.5 percentage points).
        hybrid_fractions: fractions f in (0, 1) of k* for the hybrid candidates.
        refine: refine around the best hybrid fraction.
        indices: restrict to these samples (per-layer search); all by default.
        on_progress: optional ``(task, done, total)`` callback (task ``"search <target>"``).

    Returns:
        A :class:`TargetResult`.

    Raises:
        ValueError: target or tolerance out of range.
        UnreachableTargetError: no candidate hits the target; the message names the closest sparsity.

    Example:
        >>> res = search_target(data, 0.9)
        >>> res.chosen.topk, res.chosen.topp, res.chosen.sparsity
    """
    target = check_target(target)
    if not 0.0 < tolerance < 0.5:
        raise ValueError(f"tolerance={tolerance!r} is out of range: use a number in (0, 0.5), e.g. 0.005")
    for f in hybrid_fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"hybrid fraction {f!r} is out of range: use numbers strictly between 0 and 1")
    t0 = time.perf_counter()
    n_sp0, n_err0 = data.sparsity_evaluations, data.error_evaluations
    label = f"search {target:g}"
    fracs = sorted(set(float(f) for f in hybrid_fractions))
    total_steps = 2 + len(fracs) + (2 if refine else 0)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(label, min(done, total_steps), total_steps)

    smax = data.max_sparsity(indices)
    if smax < target - tolerance:
        raise UnreachableTargetError(
            f"target sparsity {target:g} is unreachable on this model and resolution: even one key block per "
            f"query block only reaches {smax:.4f} (closest reachable); use a lower target, or more frames / a "
            "higher resolution (more key blocks)",
            closest=smax,
        )

    found: list[tuple[str, float, float, float]] = []  # family, k, p, sparsity
    k_star, s_k = _bisect(lambda x: data.sparsity(x, 0.0, indices), target, tolerance)
    found.append(("topk", k_star, 0.0, s_k))
    tick()
    p_star, s_p = _bisect(lambda x: data.sparsity(0.0, x, indices), target, tolerance)
    found.append(("topp", 0.0, p_star, s_p))
    tick()

    def hybrid(frac: float) -> tuple[str, float, float, float]:
        k = _round_knob(max(_KNOB_MIN, frac * k_star))
        p, s = _bisect(lambda x: data.sparsity(k, x, indices), target, tolerance)
        return ("hybrid", k, p, s)

    hybrid_by_frac: dict[float, tuple[str, float, float, float]] = {}
    seen_masks: set[tuple[tuple[int, ...], float]] = set()

    def add_hybrid(f: float) -> None:
        # two fractions that give the same Top-k block counts give the same masks: list them once
        c = hybrid(f)
        hybrid_by_frac[f] = c
        sig = (data.topk_counts(c[1], indices), c[2])
        if sig not in seen_masks:
            seen_masks.add(sig)
            found.append(c)
            errors[len(found) - 1] = err_of(c)
        tick()

    def err_of(c: tuple[str, float, float, float]) -> float | None:
        return data.error(c[1], c[2], indices) if abs(c[3] - target) <= tolerance else None

    errors: dict[int, float | None] = {i: err_of(c) for i, c in enumerate(found)}
    for f in fracs:
        add_hybrid(f)

    if refine and fracs:
        scored = [(errors[found.index(hybrid_by_frac[f])], f) for f in fracs if hybrid_by_frac[f] in found]
        scored = [(e, f) for e, f in scored if e is not None]
        if scored:
            _, f_best = min(scored)
            grid = [0.0, *fracs, 1.0]
            j = grid.index(f_best)
            for nb in (grid[j - 1], grid[j + 1]):
                f_new = 0.5 * (f_best + nb)
                if 0.0 < f_new < 1.0 and f_new not in hybrid_by_frac:
                    add_hybrid(f_new)

    hits = [(errors[i], i) for i, c in enumerate(found) if errors[i] is not None]
    if not hits:
        closest = min(found, key=lambda c: abs(c[3] - target))
        raise UnreachableTargetError(
            f"target sparsity {target:g} cannot be hit within +-{tolerance:g} on this model and resolution "
            f"(too few key blocks for fine steps): the closest reachable is {closest[3]:.4f} "
            f"(topk={closest[1]:g}, topp={closest[2]:g}); use that as the target or a wider --tolerance",
            closest=closest[3],
        )
    _, best_i = min(hits)
    candidates = tuple(
        Candidate(family=c[0], topk=c[1], topp=c[2], sparsity=c[3], hit=errors[i] is not None, error=errors[i], chosen=(i == best_i))
        for i, c in enumerate(found)
    )
    return TargetResult(
        target=target,
        tolerance=tolerance,
        chosen=candidates[best_i],
        candidates=candidates,
        sparsity_evaluations=data.sparsity_evaluations - n_sp0,
        error_evaluations=data.error_evaluations - n_err0,
        seconds=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class PerLayerResult:
    """A (k, p) per captured layer at one target, compared with the single global level.

    Attributes:
        target: the target sparsity.
        levels: ``{layer: Candidate}`` chosen per layer, each at that layer's sparsity under the global
            level; layers whose own search missed it keep the global knobs (listed in ``fallback_layers``).
        sparsity, error: overall (all samples) sparsity and mean error with the per-layer levels.
        global_sparsity, global_error: the same for the global level.
        lowers_error: the per-layer error is at least ``MIN_GAIN`` (1%) below the global error, at
            equal overall sparsity within tolerance; smaller differences are within what the sparsity wobble
            inside the tolerance explains, and do not justify a per-layer table.
    """

    MIN_GAIN = 0.01

    target: float
    levels: dict[int, Candidate]
    fallback_layers: tuple[int, ...]
    sparsity: float
    error: float
    global_sparsity: float
    global_error: float
    seconds: float

    @property
    def lowers_error(self) -> bool:
        return self.error < self.global_error * (1.0 - self.MIN_GAIN)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "levels": {str(layer): c.to_dict() for layer, c in sorted(self.levels.items())},
            "fallback_layers": list(self.fallback_layers),
            "sparsity": self.sparsity,
            "error": self.error,
            "global_sparsity": self.global_sparsity,
            "global_error": self.global_error,
            "lowers_error": self.lowers_error,
            "seconds": self.seconds,
        }


def search_per_layer(
    data: CalibrationData,
    global_result: TargetResult,
    *,
    hybrid_fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
    refine: bool = True,
    on_progress: ProgressFn | None = None,
) -> PerLayerResult:
    """Search a (k, p) for each captured layer, keeping each layer's share of the sparsity budget.

    The global level gives every layer ``l`` a sparsity ``s_l`` of its own (a peaked layer ends up sparser
    than a flat one at the same knobs); their mean is the target. Forcing every layer to the target instead
    would move budget from where it is cheap to where it is expensive, and lose to the global level. So
    each layer is searched exactly like :func:`search_target`, on its own samples, at target ``s_l``; the
    global knobs are one more candidate there, and the lower-error one is kept. Every layer therefore
    stays within tolerance of ``s_l`` (the overall sparsity equals the global one within tolerance) and
    no layer's error exceeds its error under the global level: the comparison is at equal overall
    sparsity.

    Layers whose own search cannot reach ``s_l`` keep the global knobs (``fallback_layers``).

    Returns:
        A :class:`PerLayerResult`.
    """
    t0 = time.perf_counter()
    target, tol = global_result.target, global_result.tolerance
    g = global_result.chosen
    levels: dict[int, Candidate] = {}
    fallback: list[int] = []
    sp_sum = err_sum = 0.0
    layers = data.layers
    for j, layer in enumerate(layers):
        idx = data.indices_for_layer(layer)
        s_g = data.sparsity(g.topk, g.topp, idx)
        keep = Candidate(family=g.family, topk=g.topk, topp=g.topp, sparsity=s_g, hit=True,
                         error=data.error(g.topk, g.topp, idx), chosen=True)
        c = keep
        try:
            res = search_target(data, check_target(s_g), tolerance=tol, hybrid_fractions=hybrid_fractions,
                                refine=refine, indices=idx)
            if res.chosen.error is not None and res.chosen.error < float(keep.error):  # type: ignore[arg-type]
                c = res.chosen
        except (UnreachableTargetError, ValueError):  # nothing within tolerance, or s_g is 0 (a dense layer)
            fallback.append(layer)
        levels[layer] = c
        sp_sum += c.sparsity * len(idx)
        err_sum += float(c.error) * len(idx)  # type: ignore[arg-type]
        if on_progress is not None:
            on_progress(f"per-layer {target:g}", j + 1, len(layers))
    n = len(data)
    return PerLayerResult(
        target=target,
        levels=levels,
        fallback_layers=tuple(fallback),
        sparsity=sp_sum / n,
        error=err_sum / n,
        global_sparsity=g.sparsity,
        global_error=float(g.error),  # type: ignore[arg-type]
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------------
# Capture from a real pipeline
# --------------------------------------------------------------------------------------------------

# dense_steps larger than any run: every step is dense, so the model output is exactly the unpatched one
_ALL_DENSE = 1 << 30


def spread(n: int, total: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)``, first and last included (all of them if n >= total)."""
    if n <= 0 or total <= 0:
        raise ValueError(f"cannot pick {n} of {total}: both must be >= 1")
    if n >= total:
        return list(range(total))
    if n == 1:
        return [total // 2]
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})


def sample_bytes(*, heads: int, tokens: int, head_dim: int, itemsize: int, batch: int = 1) -> int:
    """Host bytes of one captured sample: q, k, v and the dense output ``o``, each ``[B, heads, L, D]``."""
    return 4 * batch * heads * tokens * head_dim * itemsize


def capture_attention(
    pipe: Any,
    prompts: Sequence[str],
    *,
    store: CaptureStore,
    height: int,
    width: int,
    num_frames: int,
    num_inference_steps: int,
    capture_steps: Sequence[int],
    layers: Sequence[int] | None = None,
    heads: int | None = None,
    guidance_scale: float = 5.0,
    negative_prompt: str | None = None,
    seed: int = 0,
    on_progress: ProgressFn | None = None,
) -> CaptureStore:
    """Run real denoising steps of a Wan pipeline and capture self-attention q, k, v into ``store``.

    The diffusers integration is installed with every step dense (`SpargeConfig` with a huge
    ``dense_steps``) and an observer, so the pipeline computes exactly what the unpatched model does
    while the observer sees q and k after the QK norms and the rotary embedding, and v, as
    ``[B, H, L, D]``. For each prompt, layer in ``layers`` and step in ``capture_steps`` one sample is
    kept: the first self-attention call of that step (the conditional pass; the unconditional pass of
    classifier-free guidance is skipped), restricted to ``heads`` heads per layer chosen at random
    (seeded) per layer. The run stops after the last captured step and returns latents (no VAE decode).

    Memory: ``len(prompts) * len(layers) * len(capture_steps)`` samples of
    :func:`sample_bytes` each; the store keeps at most its ``max_bytes`` in host memory and spills the
    rest to safetensors files.

    Args:
        pipe: a loaded `WanPipeline` (see `sparge.integrations.diffusers.load_wan_pipeline`).
        prompts: text prompts, one pipeline run each (batch 1).
        store: where samples go.
        height, width, num_frames: the resolution being calibrated (as passed to the pipeline).
        num_inference_steps: the scheduler's number of steps for the run.
        capture_steps: step indices (0-based, < num_inference_steps) to capture.
        layers: transformer block indices to capture; all by default.
        heads: heads kept per layer (all by default).
        guidance_scale, negative_prompt: as for the pipeline.
        seed: seeds the initial noise (prompt i uses ``seed + i``) and the head choice.
        on_progress: ``(task, done, total)`` callback with task ``"capture"`` counting denoising steps.

    Returns:
        ``store``, filled.
    """
    from sparge.attention import SpargeConfig
    from sparge.integrations.diffusers import apply, wan_transformers

    transformer = wan_transformers(pipe)[0]
    n_layers = len(transformer.blocks)
    n_heads = int(transformer.config.num_attention_heads)
    layers = list(range(n_layers)) if layers is None else sorted(set(int(i) for i in layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the transformer has blocks 0..{n_layers - 1}")
    heads = n_heads if heads is None else int(heads)
    if not 1 <= heads <= n_heads:
        raise ValueError(f"heads={heads} is out of range: the model has {n_heads} heads per layer, use 1..{n_heads}")
    steps = sorted(set(int(s) for s in capture_steps))
    if not steps or steps[0] < 0 or steps[-1] >= num_inference_steps:
        raise ValueError(f"capture steps {steps} must lie in 0..{num_inference_steps - 1} (the run has {num_inference_steps} steps)")
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt")
    wanted = set(steps)
    last = steps[-1]
    g = torch.Generator().manual_seed(seed)
    head_of = {layer: sorted(torch.randperm(n_heads, generator=g)[:heads].tolist()) for layer in layers}
    index_of: dict[int, torch.Tensor] = {}
    seen: set[tuple[int, int, int]] = set()
    current = {"prompt": 0}

    def observer(layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        key = (current["prompt"], layer, step)
        if step not in wanted or key in seen:
            return
        seen.add(key)
        idx = index_of.get(layer)
        if idx is None or idx.device != q.device:
            idx = index_of[layer] = torch.tensor(head_of[layer], device=q.device)
        store.add(layer=layer, step=step, prompt=current["prompt"], heads=head_of[layer],
                  q=q.index_select(1, idx), k=k.index_select(1, idx), v=v.index_select(1, idx))

    total = len(prompts) * (last + 1)
    done = 0

    def on_step_end(p: Any, i: int, t: Any, kwargs: dict) -> dict:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress("capture", done, total)
        handle.step_callback(p, i, t, kwargs)
        if i >= last:
            p._interrupt = True  # WanPipeline skips the remaining steps (its public `interrupt` property)
        return {}

    handle = apply(pipe, SpargeConfig(dense_steps=_ALL_DENSE), observer=observer, layers=layers, step_tracking="manual")
    with handle, torch.no_grad():
        for pi, prompt in enumerate(prompts):
            current["prompt"] = pi
            handle.step = 0
            gen = torch.Generator(device="cpu").manual_seed(seed + pi)
            pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=gen,
                output_type="latent",
                callback_on_step_end=on_step_end,
            )
            done = (pi + 1) * (last + 1)
    return store
