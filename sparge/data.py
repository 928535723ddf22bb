"""Fine-tuning data: video folders / JSONL manifests, and the latent cache that training reads.

A data source is either

* a folder of videos (``.mp4 .mov .mkv .webm .avi .gif``), each with a caption file of the same stem
  (``clip01.mp4`` + ``clip01.txt``), searched recursively; or
* a JSONL manifest, one object per line: ``{"video": "clips/a.mp4", "caption": "a cat ..."}``
  (``"prompt"`` or ``"text"`` are accepted for the caption; relative paths are resolved against the
  manifest's folder).

`prepare_cache` encodes every sample once with the pipeline's VAE and text encoder into a cache folder
(one safetensors file per sample + ``cache.json``), so training holds neither in memory:

* ``latents``: ``[C, F', H/8, W/8]`` float, normalised as the Wan pipeline expects its latents
  (``(mean_of_posterior - latents_mean) / latents_std``: the inverse of what the pipeline does before
  decoding);
* ``prompt_embeds``: ``[S, D]`` float, the text encoder's states for the real tokens only (the
  pipeline zero-pads them to ``max_sequence_length``; `LatentCache` pads them back).

The cache folder is written to a temporary sibling and renamed when complete, so an interrupted
``prepare`` never leaves a half cache behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparge._atomic import atomic_dir

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
CACHE_FORMAT = "sparge-latent-cache"
CACHE_VERSION = 1
CAPTION_KEYS = ("caption", "prompt", "text")


@dataclass(frozen=True)
class Sample:
    """One training video and its caption."""

    video: Path
    caption: str


def _read_caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"caption file {path} cannot be read: {e}") from None
    if not text:
        raise ValueError(f"caption file {path} is empty: write the video's caption into it")
    return text


def _scan_folder(root: Path) -> list[Sample]:
    try:
        videos = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())
    except PermissionError as e:
        raise ValueError(f"data folder {root} cannot be read: {e}") from None
    if not videos:
        raise ValueError(f"data folder {root} has no videos: expected files ending in {', '.join(VIDEO_EXTS)} "
                         "with a same-stem .txt caption each, or pass a .jsonl manifest")
    missing = [v for v in videos if not v.with_suffix(".txt").is_file()]
    if missing:
        shown = ", ".join(str(v.relative_to(root)) for v in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{len(missing)} of {len(videos)} videos in {root} have no caption file: {shown}{more} "
                         f"(expected e.g. {missing[0].with_suffix('.txt').name} beside {missing[0].name})")
    return [Sample(v, _read_caption(v.with_suffix(".txt"))) for v in videos]


def _scan_manifest(path: Path) -> list[Sample]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest {path} cannot be read: {e}") from None
    samples: list[Sample] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {path} line {n} is not JSON: {e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("video"), str):
            raise ValueError(f"manifest {path} line {n} has no \"video\" path: each line must be "
                             '{"video": "clip.mp4", "caption": "..."}')
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        if caption is None:
            raise ValueError(f"manifest {path} line {n} ({row['video']}) has no caption: "
                             f"give one of the keys {', '.join(CAPTION_KEYS)}")
        video = Path(row["video"])
        video = video if video.is_absolute() else path.parent / video
        if not video.is_file():
            raise ValueError(f"manifest {path} line {n}: video {video} does not exist")
        samples.append(Sample(video, caption.strip()))
    if not samples:
        raise ValueError(f"manifest {path} is empty: write one JSON object per line")
    return samples


def scan_dataset(source: str | os.PathLike[str]) -> list[Sample]:
    """List the (video, caption) pairs of a video folder or a ``.jsonl`` manifest.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no videos, an unreadable folder or file, a missing or empty caption, a bad manifest line.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist: give a folder of videos or a .jsonl manifest")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"data folder {path} cannot be read: check its permissions")
        return _scan_folder(path)
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"data source {path} is neither a folder nor a .jsonl manifest")
    return _scan_manifest(path)


def read_video(path: Path, *, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Decode the first ``num_frames`` frames, centre-crop to the target aspect and resize.

    Returns:
        ``[3, num_frames, height, width]`` float32 in ``[-1, 1]`` (the VAE's input range).

    Raises:
        ValueError: the file cannot be decoded, or has fewer than ``num_frames`` frames.
    """
    import imageio.v2 as imageio
    import numpy as np

    frames = []
    try:
        reader = imageio.get_reader(str(path))
        try:
            for frame in reader:
                frames.append(np.asarray(frame)[..., :3])
                if len(frames) == num_frames:
                    break
        finally:
            reader.close()
    except Exception as e:  # imageio raises many types for corrupt or unknown files
        raise ValueError(f"video {path} cannot be decoded: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if len(frames) < num_frames:
        raise ValueError(f"video {path} has {len(frames)} frames, fewer than --frames {num_frames}: "
                         "lower --frames or drop the clip")
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()  # [F, 3, h, w]
    h, w = video.shape[-2:]
    target = width / height
    if w / h > target:  # too wide: crop width
        cw = max(1, round(h * target))
        video = video[..., (w - cw) // 2:(w - cw) // 2 + cw]
    else:
        ch = max(1, round(w / target))
        video = video[..., (h - ch) // 2:(h - ch) // 2 + ch, :]
    video = torch.nn.functional.interpolate(video, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


@torch.no_grad()
def encode_sample(pipe: Any, sample: Sample, *, num_frames: int, height: int, width: int,
                  max_sequence_length: int) -> dict[str, torch.Tensor]:
    """Encode one sample with ``pipe``'s VAE and text encoder.

    Returns:
        ``{"latents": [C, F', H', W'] float32, "prompt_embeds": [S, D] float32}`` (S = real tokens).
    """
    vae = pipe.vae
    dev = next(vae.parameters()).device
    video = read_video(sample.video, num_frames=num_frames, height=height, width=width)
    video = video.unsqueeze(0).to(dev, vae.dtype)
    posterior = vae.encode(video).latent_dist
    lat = posterior.mode().float()
    mean = torch.tensor(vae.config.latents_mean, device=dev).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=dev).view(1, -1, 1, 1, 1)
    lat = ((lat - mean) / std)[0]

    embeds, _ = pipe.encode_prompt(sample.caption, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                   max_sequence_length=max_sequence_length, device=dev)
    embeds = embeds[0].float()
    # the pipeline zero-pads after the real tokens; keep the real ones (the padding is rebuilt on load)
    nonzero = embeds.abs().amax(dim=-1).nonzero()
    n_real = int(nonzero[-1]) + 1 if nonzero.numel() else 0
    return {"latents": lat.cpu().contiguous(), "prompt_embeds": embeds[:n_real].cpu().contiguous()}


def prepare_cache(
    pipe: Any,
    samples: Sequence[Sample],
    out_dir: str | os.PathLike[str],
    *,
    num_frames: int,
    height: int,
    width: int,
    max_sequence_length: int = 512,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> Path:
    """Encode ``samples`` into a latent cache at ``out_dir`` (atomic: temp folder, then rename).

    Args:
        pipe: a loaded `WanPipeline` (its VAE and text encoder are used; the transformer is not).
        num_frames, height, width: the training resolution (``num_frames = 4k + 1``, sides multiple of 16).
        on_sample: called with the index of each finished sample (progress bars).

    Returns:
        The cache folder.
    """
    if (num_frames - 1) % 4:
        raise ValueError(f"--frames {num_frames} is not 4k+1 (the Wan VAE's temporal stride is 4): use e.g. 17, 33, 81")
    if height % 16 or width % 16:
        raise ValueError(f"resolution {height}x{width} is not a multiple of 16 (VAE stride 8 x patch 2)")
    items = ((encode_sample(pipe, s, num_frames=num_frames, height=height, width=width,
                            max_sequence_length=max_sequence_length), {"video": str(s.video), "caption": s.caption})
             for s in samples)
    return write_cache(out_dir, items, max_sequence_length=max_sequence_length, overwrite=overwrite,
                       metadata={"num_frames": num_frames, "height": height, "width": width, **(metadata or {})},
                       on_sample=on_sample)


def write_cache(
    out_dir: str | os.PathLike[str],
    items: Iterable[tuple[dict[str, torch.Tensor], dict[str, str]]],
    *,
    max_sequence_length: int,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> Path:
    """Write a latent cache from already-encoded items (atomic: temp folder, then rename).

    Args:
        items: ``({"latents": [C, F', H', W'], "prompt_embeds": [S, D]}, {"caption": ..., ...})`` pairs;
            ``S <= max_sequence_length`` real tokens (zero padding is added on load).
        metadata: extra keys of ``cache.json`` (model, resolution, ...).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ValueError(f"cache folder {out} already exists: pass --overwrite to rebuild it, or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        lat_shape, text_dim, index_rows = None, None, []
        for i, (item, info) in enumerate(items):
            shape = list(item["latents"].shape)
            if lat_shape is not None and shape != lat_shape:
                raise ValueError(f"sample {i} has latent shape {shape}, the others {lat_shape}: one resolution per cache")
            if item["prompt_embeds"].shape[0] > max_sequence_length:
                raise ValueError(f"sample {i} has {item['prompt_embeds'].shape[0]} text tokens > max_sequence_length {max_sequence_length}")
            lat_shape, text_dim = shape, int(item["prompt_embeds"].shape[-1])
            tensors = {k: item[k].float().contiguous().cpu() for k in ("latents", "prompt_embeds")}
            save_file(tensors, str(tmp / f"{i:07d}.safetensors"), metadata={k: str(v) for k, v in info.items()})
            index_rows.append({k: str(v) for k, v in info.items()})
            if on_sample is not None:
                on_sample(i)
        if not index_rows:
            raise ValueError("no samples to cache")
        index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "count": len(index_rows),
                 "max_sequence_length": max_sequence_length, "latent_shape": lat_shape, "text_dim": text_dim,
                 **(metadata or {}), "samples": index_rows}
        (tmp / "cache.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def is_cache(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder written by `prepare_cache`."""
    return (Path(path) / "cache.json").is_file()


class LatentCache:
    """Read access to a cache written by `prepare_cache`.

    ``cache[i]`` is ``(latents [C, F', H', W'] float32, prompt_embeds [max_sequence_length, D] float32)``,
    the embeddings zero-padded as `WanPipeline.encode_prompt` pads them.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        index_file = self.path / "cache.json"
        if not index_file.is_file():
            raise ValueError(f"{self.path} is not a latent cache (no cache.json): build one with `sparge finetune prepare`")
        try:
            self.index: dict[str, Any] = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"latent cache index {index_file} cannot be read: {e}") from None
        if self.index.get("format") != CACHE_FORMAT or self.index.get("version") != CACHE_VERSION:
            raise ValueError(f"{index_file} is not a {CACHE_FORMAT} v{CACHE_VERSION} index: rebuild it with `sparge finetune prepare`")
        self.count = int(self.index["count"])
        if self.count < 1:
            raise ValueError(f"latent cache {self.path} is empty")
        self.max_sequence_length = int(self.index["max_sequence_length"])
        missing = [i for i in range(self.count) if not self._file(i).is_file()]
        if missing:
            raise ValueError(f"latent cache {self.path} misses {len(missing)} sample files (first: {self._file(missing[0]).name}): rebuild it")

    def _file(self, i: int) -> Path:
        return self.path / f"{i:07d}.safetensors"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        item = load_file(str(self._file(i)))
        emb = item["prompt_embeds"]
        padded = emb.new_zeros(self.max_sequence_length, emb.shape[-1])
        padded[: emb.shape[0]] = emb
        return item["latents"], padded

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack samples: ``([N, C, F', H', W'], [N, S, D])`` float32 on the CPU."""
        items = [self[i] for i in indices]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def sample_order(count: int, position: int, n: int, *, seed: int) -> list[int]:
    """Indices of the samples at global positions ``position .. position + n - 1``.

    Epoch ``e`` visits the samples in the order ``randperm(count)`` drawn from a generator seeded with
    ``seed + e``; the position alone determines the data, so a resumed run reads what the uninterrupted
    run would have read, whatever the number of processes.
    """
    out: list[int] = []
    perms: dict[int, torch.Tensor] = {}
    for pos in range(position, position + n):
        epoch, off = divmod(pos, count)
        if epoch not in perms:
            perms[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perms[epoch][off]))
    return out
