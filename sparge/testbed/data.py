"""Procedural, seeded text-to-video data in the Wan2.1 latent layout: captions and clips of moving shapes.

Why latents and not pixels: no Wan VAE weights can be downloaded, and a random VAE would make the
"pixels" meaningless. So a clip is written directly as a 16-channel latent video ``[16, T, H, W]``
(the layout the Wan VAE produces: ``T = (frames - 1) / 4 + 1``, ``H = height / 8``, ``W = width / 8``)
with a fixed, designed meaning per position, which makes every metric readable back from latents:

- the background is one fixed 16-dim code plus a fixed gradient, top to bottom and left to right (like
  sky above ground, or light from one side). The Wan transformer has no absolute position embedding (its
  3D RoPE is relative), so "at the top left" can only be placed against the frame's borders or its content;
  the gradient is that content, present in every clip;
- each colour is one fixed 16-dim code (the codes are orthogonal, norm 4, so about unit variance per
  channel like Wan's normalised latents), painted inside the object's shape with a soft edge;
- objects are composited in caption order (later objects occlude earlier ones).

A caption fully determines each object's trajectory (up to a small start jitter that the caption does
not carry): colour, shape, size, start cell on a 3 x 3 grid, direction, speed. Objects bounce off the
borders. Example::

    a large red circle at the top left moving right quickly and a small blue square at the center moving up slowly

Tokens: the transformer patches (1, 2, 2), so the default `Geometry` (16 x 40 x 40 latent, i.e. 61
frames of 320 x 320 pixels) gives 16 * 20 * 20 = 6400 video tokens: 50 query blocks of 128 and exactly
100 key blocks of 64, so 90 / 95 / 97% sparsity keep 10 / 5 / 3 key blocks per query block and Top-k
can hit those levels exactly. One latent frame is 400 tokens: a query block covers 6.4 patch rows of
one frame, a key block 3.2 rows, so the attention has real spatial and temporal locality.

`latents_to_rgb` turns latents into a meaningful colour preview (soft nearest-code palette), and
`read_back` recovers per-object presence, position and motion direction from any latent clip: the
honest "does the sample follow its caption" metric used by `sparge.testbed.evaluate`.

Held-out split: a caption is held out when a stable hash of its text falls in one tenth of the range;
`sample_scenes(split="train")` never yields a held-out caption and ``split="heldout"`` only those.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "MICRO_GEOMETRY",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPEEDS",
    "Geometry",
    "ObjectSpec",
    "Scene",
    "caption_words",
    "colour_codes",
    "is_held_out",
    "latents_to_rgb",
    "parse_caption",
    "read_back",
    "render_latents",
    "sample_scenes",
    "trajectories",
]

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
PALETTE_RGB: tuple[tuple[float, float, float], ...] = (
    (0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.15, 0.3, 0.95), (0.95, 0.9, 0.1), (0.6, 0.2, 0.8), (0.97, 0.97, 0.97),
)
BACKGROUND_RGB = (0.15, 0.15, 0.18)
SHAPES: tuple[str, ...] = ("square", "circle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
SPEEDS: tuple[str, ...] = ("slowly", "quickly")

# geometry as fractions of the frame (so every Geometry has the same scenes, only finer or coarser)
_CELL = (0.25, 0.5, 0.75)                      # centre of a start cell along one axis
_RADIUS = {"small": 0.075, "large": 0.125}     # of min(H, W)
_TRAVEL = {"slowly": 0.3, "quickly": 0.6}      # distance covered over the whole clip, of the axis length
_DIR_VEC = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx)
_JITTER = 0.03                                 # start offset, uniform in +-0.03 of the axis length
_EDGE = 0.5                                    # soft-edge width of a shape, in latent pixels
_GRADIENT = 3.0                                # amplitude of the background gradient along each axis
_CODE_SEED = 20250611                          # fixes the colour/background codes for every user
_HELD_OUT_BUCKETS = 10                         # 1 in 10 captions is held out

LATENT_CHANNELS = 16


@dataclass(frozen=True)
class Geometry:
    """Latent clip size ``[16, frames, height, width]`` (Wan VAE layout) and its pixel equivalent.

    Attributes:
        frames, height, width: latent frames T and latent height/width H, W (H, W even for the 2x2 patch).
    """

    frames: int = 16
    height: int = 40
    width: int = 40

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"frames={self.frames} is too small: use at least 2 latent frames")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 8 or v % 2:
                raise ValueError(f"{name}={v} is not supported: use an even number of latent pixels >= 8")

    @property
    def pixel_frames(self) -> int:
        """Frames of the decoded video (Wan VAE: 4 pixel frames per latent frame after the first)."""
        return 4 * (self.frames - 1) + 1

    @property
    def pixel_height(self) -> int:
        return 8 * self.height

    @property
    def pixel_width(self) -> int:
        return 8 * self.width

    @property
    def tokens(self) -> int:
        """Video tokens after the (1, 2, 2) patch embedding."""
        return self.frames * (self.height // 2) * (self.width // 2)

    def pipeline_kwargs(self) -> dict[str, int]:
        """``num_frames``, ``height``, ``width`` for a `WanPipeline` call that yields this latent size."""
        return {"num_frames": self.pixel_frames, "height": self.pixel_height, "width": self.pixel_width}


MICRO_GEOMETRY = Geometry(frames=5, height=16, width=16)
"""For CPU tests: 5 x 8 x 8 = 320 tokens (3 query blocks, 5 key blocks)."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a caption: names from `COLOURS`, `SHAPES`, `SIZES`, `POSITIONS`, `DIRECTIONS`, `SPEEDS`."""

    colour: str
    shape: str
    size: str
    position: str
    direction: str
    speed: str

    def phrase(self) -> str:
        where = "the center" if self.position == "center" else f"the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} at {where} moving {self.direction} {self.speed}"


@dataclass(frozen=True)
class Scene:
    """A clip's content: objects (distinct colours and start cells) and their start jitter.

    Attributes:
        objects: 1 to 3 `ObjectSpec`, drawn in this order (later on top).
        jitter: per object ``(dy, dx)`` start offsets as fractions of the frame (not in the caption).
    """

    objects: tuple[ObjectSpec, ...]
    jitter: tuple[tuple[float, float], ...] = ()

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects)


def caption_words() -> list[str]:
    """Every word a caption can contain (the tokenizer's vocabulary), in a fixed order."""
    words: list[str] = []
    for w in ("a", "at", "the", "moving", "and", "center", *SIZES, *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS,
              *" ".join(POSITIONS).split()):
        if w not in words:
            words.append(w)
    return words


_PHRASE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) at the "
    rf"({'|'.join(sorted(POSITIONS, key=len, reverse=True))}) moving ({'|'.join(DIRECTIONS)}) ({'|'.join(SPEEDS)})"
)


def parse_caption(text: str) -> Scene:
    """Inverse of ``Scene.caption`` (without jitter); raises ``ValueError`` naming the first bad phrase."""
    objects = []
    for part in text.strip().split(" and "):
        m = _PHRASE.fullmatch(part.strip())
        if m is None:
            raise ValueError(f"caption phrase {part!r} does not follow the test-bed grammar "
                             "'a <size> <colour> <shape> at the <position> moving <direction> <speed>'")
        size, colour, shape, position, direction, speed = m.groups()
        objects.append(ObjectSpec(colour, shape, size, position, direction, speed))
    return Scene(tuple(objects), tuple((0.0, 0.0) for _ in objects))


def is_held_out(caption: str) -> bool:
    """True for the held-out tenth of captions (stable across processes and machines)."""
    digest = hashlib.blake2b(caption.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _HELD_OUT_BUCKETS == 0


def _random_scene(rng: random.Random, max_objects: int) -> Scene:
    n = rng.randint(1, max_objects)
    colours = rng.sample(COLOURS, n)
    cells = rng.sample(POSITIONS, n)
    objs = tuple(
        ObjectSpec(c, rng.choice(SHAPES), rng.choice(SIZES), p, rng.choice(DIRECTIONS), rng.choice(SPEEDS))
        for c, p in zip(colours, cells)
    )
    jitter = tuple((rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER)) for _ in objs)
    return Scene(objs, jitter)


def sample_scenes(
    n: int, *, seed: int | random.Random, split: Literal["train", "heldout", "any"] = "train", max_objects: int = 3
) -> list[Scene]:
    """``n`` random scenes, deterministic in ``seed`` (an int, or a `random.Random` to continue a stream).

    Args:
        n: number of scenes.
        seed: seed or generator; the same seed gives the same scenes on every machine.
        split: "train" never yields a held-out caption, "heldout" only those, "any" both.
        max_objects: 1 to 6 objects per scene (uniform count).
    """
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split={split!r} is not known: use 'train', 'heldout' or 'any'")
    if not 1 <= max_objects <= len(COLOURS):
        raise ValueError(f"max_objects={max_objects} is out of range: use 1 to {len(COLOURS)}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    out: list[Scene] = []
    while len(out) < n:
        s = _random_scene(rng, max_objects)
        if split == "any" or is_held_out(s.caption) == (split == "heldout"):
            out.append(s)
    return out


def _code_basis(device: torch.device | str) -> torch.Tensor:
    """A fixed orthonormal basis of the 16 latent channels, ``[16, 16]`` float32 (columns)."""
    g = torch.Generator().manual_seed(_CODE_SEED)
    basis, _ = torch.linalg.qr(torch.randn(LATENT_CHANNELS, LATENT_CHANNELS, generator=g, dtype=torch.float64))
    return basis.float().to(device)


def colour_codes(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed latent codes: ``(codes [len(COLOURS), 16], background [16])`` float32.

    Colour codes are orthogonal with norm 4 (about unit variance per channel); the background code is
    orthogonal to all of them with norm 2. Fixed by a module constant seed, so every user has the same.
    """
    basis = _code_basis(device)
    return basis[:, : len(COLOURS)].T * 4.0, basis[:, len(COLOURS)] * 2.0


def _background_field(geometry: Geometry, device: torch.device) -> torch.Tensor:
    """``[16, H, W]``: the background code plus a fixed gradient (same in every frame).

    ``3 cos(pi y)`` along one basis direction and ``3 cos(pi x)`` along another (``x, y`` in [0, 1]), both
    orthogonal to every code, so the gradient never looks like a colour and each axis is readable on its own.
    """
    basis = _code_basis(device)
    _, bg = colour_codes(device)
    u1, u2 = basis[:, len(COLOURS) + 1], basis[:, len(COLOURS) + 2]
    y = torch.linspace(0, 1, geometry.height, device=device)[:, None]
    x = torch.linspace(0, 1, geometry.width, device=device)[None, :]
    pattern = _GRADIENT * (torch.cos(math.pi * y) * u1[:, None, None] + torch.cos(math.pi * x) * u2[:, None, None])
    return bg[:, None, None] + pattern


def _reflect(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    span = (hi - lo).clamp_min(1e-6)
    u = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(u > span, 2 * span - u, u)


def trajectories(scenes: list[Scene], geometry: Geometry, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Object centres over time, in latent pixel coordinates.

    Returns:
        ``(centres [B, O, T, 2] float32 (y, x), valid [B, O] bool)`` with ``O`` the most objects of any scene.
    """
    device = torch.device(device)
    b, o, t = len(scenes), max(len(s.objects) for s in scenes), geometry.frames
    hy, wx = geometry.height - 1.0, geometry.width - 1.0
    rows = []  # per object slot: start y, start x, velocity y, velocity x, radius, valid
    for s in scenes:
        jit = s.jitter or tuple((0.0, 0.0) for _ in s.objects)
        for obj, (jy, jx) in zip(s.objects, jit):
            cell = POSITIONS.index(obj.position)
            step = _TRAVEL[obj.speed] / (t - 1)
            dy, dx = _DIR_VEC[obj.direction]
            r = _RADIUS[obj.size] * min(geometry.height, geometry.width)
            rows.append(((_CELL[cell // 3] + jy) * hy, (_CELL[cell % 3] + jx) * wx, dy * step * hy, dx * step * wx, r, 1.0))
        rows.extend([(0.0, 0.0, 0.0, 0.0, 1.0, 0.0)] * (o - len(s.objects)))
    p = torch.tensor(rows, dtype=torch.float32).view(b, o, 6)
    start, vel, radius, valid = p[..., 0:2], p[..., 2:4], p[..., 4], p[..., 5] > 0
    size = torch.tensor([hy, wx])
    tt = torch.arange(t, dtype=torch.float32)[None, None, :, None]
    raw = start[:, :, None, :] + vel[:, :, None, :] * tt
    lo = radius[:, :, None, None].expand(b, o, 1, 2)
    hi = size - radius[:, :, None, None]
    return _reflect(raw, lo, hi).to(device), valid.to(device)


def render_latents(scenes: list[Scene], geometry: Geometry, device: torch.device | str = "cpu") -> torch.Tensor:
    """Render scenes into latent clips.

    Args:
        scenes: B scenes (from `sample_scenes` or `parse_caption`).
        geometry: latent size.
        device: where to render (rendering is vectorised; a GPU batch takes well under a millisecond).

    Returns:
        ``[B, 16, T, H, W]`` float32, the layout `WanTransformer3DModel` takes (the pipeline's latents).
    """
    device = torch.device(device)
    centres, valid = trajectories(scenes, geometry, device)
    codes, _ = colour_codes(device)
    b, o = valid.shape
    ids = [[(SHAPES.index(obj.shape), COLOURS.index(obj.colour), _RADIUS[obj.size]) for obj in s.objects]
           + [(0, 0, 1.0)] * (o - len(s.objects)) for s in scenes]
    shape_id = torch.tensor([[x[0] for x in r] for r in ids], device=device)
    colour_id = torch.tensor([[x[1] for x in r] for r in ids], device=device)
    radius = torch.tensor([[x[2] for x in r] for r in ids], device=device) * min(geometry.height, geometry.width)
    ys = torch.arange(geometry.height, device=device, dtype=torch.float32)[:, None]
    xs = torch.arange(geometry.width, device=device, dtype=torch.float32)[None, :]
    dy = ys - centres[..., 0, None, None]  # [B, O, T, H, W]
    dx = xs - centres[..., 1, None, None]
    r = radius[:, :, None, None, None]
    sd = torch.stack([
        torch.maximum(dy.abs(), dx.abs()) - 0.9 * r,   # square (a little smaller: equal-ish area)
        torch.sqrt(dy * dy + dx * dx) - r,             # circle
        (dy.abs() + dx.abs()) - 1.25 * r,              # diamond
    ])  # [3, B, O, T, H, W]
    sd = torch.gather(sd, 0, shape_id[None, :, :, None, None, None].expand(1, *sd.shape[1:]))[0]
    alpha = torch.sigmoid(-sd / _EDGE) * valid[:, :, None, None, None]
    x = _background_field(geometry, device)[None, :, None].expand(b, -1, geometry.frames, -1, -1).clone()
    for j in range(o):
        a = alpha[:, j][:, None]  # [B, 1, T, H, W]
        x = x * (1 - a) + a * codes[colour_id[:, j]][:, :, None, None, None]
    return x


def _code_distances(latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Squared distance of every latent pixel to the background and to each colour code: ``[B, 1 + C, T, H, W]``."""
    lat = latents.float()
    codes, _ = colour_codes(lat.device)
    bg = _background_field(geometry, lat.device)[None, :, None]
    d_bg = ((lat - bg) ** 2).sum(1, keepdim=True)
    d_c = ((lat[:, None] - codes[None, :, :, None, None, None]) ** 2).sum(2)
    return torch.cat([d_bg, d_c], 1)


def latents_to_rgb(latents: torch.Tensor, geometry: Geometry, *, temperature: float = 2.0) -> torch.Tensor:
    """Meaningful colour preview of latent clips: a soft nearest-code palette lookup per latent pixel.

    Args:
        latents: ``[B, 16, T, H, W]``.
        geometry: the latents' geometry (for the background pattern).
        temperature: softness of the code assignment (squared-distance units).

    Returns:
        ``[B, T, 3, H, W]`` float32 in [0, 1] (at latent resolution; upsample 8x for viewing).
    """
    w = torch.softmax(-_code_distances(latents, geometry) / temperature, dim=1)  # [B, 1+C, T, H, W]
    pal = torch.tensor((BACKGROUND_RGB, *PALETTE_RGB), device=w.device, dtype=w.dtype)  # [1+C, 3]
    return torch.einsum("bcthw,cr->btrhw", w, pal)


def read_back(latents: torch.Tensor, scenes: list[Scene], geometry: Geometry, *, tolerance: float | None = None) -> dict[str, float]:
    """How well latent clips follow their captions: presence, position and direction of every object.

    Each latent pixel is labelled with its nearest code (background or a colour). For each object of a
    caption, the pixels of its colour give per-frame area and centroid, compared with the caption's
    trajectory (jitter-free, from `parse_caption`, so only what the caption says is checked).

    Args:
        latents: ``[B, 16, T, H, W]`` (generated, or rendered for the upper bound).
        scenes: the B scenes the clips were asked for (their jitter is ignored).
        geometry: latent size.
        tolerance: centroid error counted as correct, in latent pixels (default 8% of min(H, W), i.e.
            3.2 px at 40 x 40: below a small object's radius plus the start jitter).

    Returns:
        ``colour_recall`` (objects whose colour covers >= 30% of its expected area over the clip),
        ``colour_false_positive`` (caption-absent colours covering >= 30% of a small object's area),
        ``position_accuracy`` (object-frames whose centroid is within tolerance; missing = wrong),
        ``position_error_px`` (mean centroid error over object-frames where the colour is present),
        ``direction_accuracy`` (objects whose frame-to-frame centroid moves agree on balance with the
        caption's motion, bounces included: the sum of dot products with the expected moves is > 0),
        each averaged over all objects (or colours, or object-frames) of the batch.
    """
    if latents.dim() != 5 or latents.shape[0] != len(scenes):
        raise ValueError(f"latents must be [B, 16, T, H, W] with B = len(scenes) = {len(scenes)}, got {tuple(latents.shape)}")
    if tuple(latents.shape[2:]) != (geometry.frames, geometry.height, geometry.width):
        raise ValueError(f"latents {tuple(latents.shape)} do not match {geometry}")
    tol = 0.08 * min(geometry.height, geometry.width) if tolerance is None else tolerance
    labels = _code_distances(latents, geometry).argmin(1)  # [B, T, H, W]; 0 = background, 1 + c = colour c
    plain = [Scene(s.objects, tuple((0.0, 0.0) for _ in s.objects)) for s in scenes]
    centres, valid = trajectories(plain, geometry, latents.device)
    ys = torch.arange(geometry.height, device=latents.device, dtype=torch.float32)[:, None]
    xs = torch.arange(geometry.width, device=latents.device, dtype=torch.float32)[None, :]
    small_area = math.pi * (_RADIUS["small"] * min(geometry.height, geometry.width)) ** 2
    found = pos_ok = frames_total = dir_ok = 0
    err_sum, err_n, false_pos, absent_total = 0.0, 0, 0, 0
    for i, s in enumerate(plain):
        for c, name in enumerate(COLOURS):
            m = (labels[i] == 1 + c).float()  # [T, H, W]
            area = m.sum((1, 2))  # [T]
            obj = next((j for j, o in enumerate(s.objects) if o.colour == name), None)
            if obj is None:
                absent_total += 1
                false_pos += int(area.mean().item() >= 0.3 * small_area)
                continue
            r = _RADIUS[s.objects[obj].size] * min(geometry.height, geometry.width)
            expected = math.pi * r * r
            found += int(area.mean().item() >= 0.3 * expected)
            present = area >= 0.3 * expected
            cy = (m * ys).sum((1, 2)) / area.clamp_min(1e-6)
            cx = (m * xs).sum((1, 2)) / area.clamp_min(1e-6)
            err = torch.sqrt((cy - centres[i, obj, :, 0]) ** 2 + (cx - centres[i, obj, :, 1]) ** 2)
            pos_ok += int(((err <= tol) & present).sum().item())
            frames_total += geometry.frames
            if present.any():
                err_sum += float(err[present].sum())
                err_n += int(present.sum())
            # direction: do the measured frame-to-frame moves agree with the caption's (bounces included)?
            both = present[1:] & present[:-1]
            if both.any():
                step_meas = torch.stack([cy[1:] - cy[:-1], cx[1:] - cx[:-1]], -1)
                step_true = centres[i, obj, 1:] - centres[i, obj, :-1]
                dir_ok += int(float(((step_meas * step_true).sum(-1) * both).sum()) > 0)
    n_obj = int(valid.sum())
    return {
        "colour_recall": found / max(n_obj, 1),
        "colour_false_positive": false_pos / max(absent_total, 1),
        "position_accuracy": pos_ok / max(frames_total, 1),
        "position_error_px": err_sum / err_n if err_n else float("nan"),
        "direction_accuracy": dir_ok / max(n_obj, 1),
        "objects": n_obj,
    }
