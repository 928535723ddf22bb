"""Velocity-distillation fine-tuning of a Wan transformer to its own sparse attention.

The frozen dense model is the teacher, the same model with sparse self-attention is the student; the
loss is the mean squared error between their predicted velocities on the same noisy latents, timesteps
and text embeddings (``loss="distill"``). ``loss="diffusion"`` is the plain flow-matching loss against
the true velocity ``noise - x0`` (for comparison), ``loss="mix"`` the mean of the two.

Flow matching as Wan trains it: ``x_t = (1 - sigma) * x0 + sigma * noise``, target velocity
``v = noise - x0``, model timestep ``t = 1000 * sigma``. ``sigma`` is drawn as ``u ~ U(0, 1)`` pushed
through the scheduler's shift, ``sigma = shift * u / (1 + (shift - 1) * u)`` (the same map the
pipeline's scheduler applies to its inference sigmas; ``shift`` is read from the pipeline's scheduler
config -- ``flow_shift`` of `UniPCMultistepScheduler`, ``shift`` of `FlowMatchEulerDiscreteScheduler`
-- unless given). Each training sample's noise and ``u`` come from a generator seeded with
``(seed, global sample position)``: teacher and student see the same noise, and a run gives the same
numbers whatever its number of GPUs or its gradient accumulation.

What is trained and where the teacher comes from:

* ``train="lora"``: peft LoRA adapters on the attention and FFN projections; the teacher is the same
  module with the adapters disabled and dense attention -- no second copy of the weights.
* ``train="attention"``: the self-attention (``attn1``) weights of every block; the teacher is a copy
  that shares every other weight with the student, so it costs one extra copy of the attn1 weights
  (about a third of the transformer) -- a full copy under FSDP, where modules cannot share storage.
* ``train="all"``: every weight; the teacher is a full frozen copy in the model dtype (+ 2 bytes per
  parameter in bf16, sharded under FSDP).

Trained weights are kept in float32 (master weights) and the forward runs under autocast in the model
dtype. Under ``torchrun`` the student (and a teacher copy) is sharded with FSDP2 (`fully_shard`, one
unit per transformer block, parameters all-gathered in the model dtype, gradients reduced in float32, the
units' inputs left as they come), and the global batch is split over the ranks; without ``torchrun`` it is
one plain process. Every student parameter is float32 under FSDP2 (one dtype per unit), and sharding starts
from the host, one block at a time, so no GPU holds a whole model.

Checkpoints: ``OUT/ckpt-000100/`` (trained weights ``trainable.safetensors``, ``optimizer.pt``,
``trainer.pt`` with step, LR-scheduler and RNG states, ``state.json``), written to a temporary folder
and renamed, the last ``keep`` kept. The data position is a function of the step, so a resumed run
continues bit-for-bit. The final student weights go to ``OUT/student.safetensors`` through
`sparge.checkpoint.save_transformer_weights` (LoRA merged), which ``sparge generate --checkpoint``
loads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from sparge._atomic import atomic_dir
from sparge.attention import SpargeConfig
from sparge.data import LatentCache, sample_order

TrainMode = Literal["all", "attention", "lora"]
LossKind = Literal["distill", "diffusion", "mix"]
TRAIN_MODES = ("all", "attention", "lora")
LOSS_KINDS = ("distill", "diffusion", "mix")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
CKPT_RE = re.compile(r"^ckpt-(\d{6,})$")
FINAL_NAME = "student.safetensors"
LOG_NAME = "log.jsonl"
RUN_NAME = "run.json"
CKPT_FORMAT_VERSION = 1


class TrainingOOM(RuntimeError):
    """The GPU ran out of memory during a training step; the message says what to lower."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (the CLI options of ``sparge finetune``).

    ``batch_size`` is the global batch (all GPUs, all accumulation micro-steps together); it must be
    divisible by ``world_size * grad_accum``. The learning rate warms up linearly over ``warmup`` steps,
    then stays constant.
    """

    steps: int = 500
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-5
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train: TrainMode = "all"
    lora_rank: int = 64
    loss: LossKind = "distill"
    seed: int = 0
    save_every: int = 100
    keep: int = 2
    gradient_checkpointing: bool = False
    shift: float | None = None

    def __post_init__(self) -> None:
        ints = {"steps": (self.steps, 1), "batch-size": (self.batch_size, 1), "grad-accum": (self.grad_accum, 1),
                "warmup": (self.warmup, 0), "lora-rank": (self.lora_rank, 1), "save-every": (self.save_every, 1),
                "keep": (self.keep, 1), "seed": (self.seed, 0)}
        for name, (v, lo) in ints.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"--{name} {v!r} is out of range: use an integer >= {lo}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"--lr {self.lr!r} is out of range: use a number in (0, 1), e.g. 1e-5")
        if not (0 <= self.weight_decay < 1):
            raise ValueError(f"--weight-decay {self.weight_decay!r} is out of range: use a number in [0, 1)")
        if not (self.max_grad_norm >= 0):
            raise ValueError(f"--max-grad-norm {self.max_grad_norm!r} is out of range: use a number >= 0 (0 = no clipping)")
        if self.train not in TRAIN_MODES:
            raise ValueError(f"--train {self.train!r} is not known: use {', '.join(TRAIN_MODES)}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"--loss {self.loss!r} is not known: use {', '.join(LOSS_KINDS)}")
        if self.shift is not None and not (self.shift > 0):
            raise ValueError(f"--shift {self.shift!r} is out of range: use a number > 0 (Wan uses 3.0 to 5.0)")

    def micro_batch(self, world_size: int) -> int:
        """Samples per forward pass on one rank; raises ``ValueError`` when the batch does not split."""
        if self.batch_size % (world_size * self.grad_accum):
            raise ValueError(
                f"--batch-size {self.batch_size} is not divisible by GPUs x --grad-accum = {world_size} x "
                f"{self.grad_accum} = {world_size * self.grad_accum}: use a multiple of {world_size * self.grad_accum}")
        return self.batch_size // (world_size * self.grad_accum)

    # Options a resumed run must share with the run it continues (the rest may change, e.g. --steps).
    RESUME_KEYS = ("batch_size", "train", "lora_rank", "loss", "seed", "shift", "lr", "warmup", "weight_decay")


# ----------------------------------------------------------------------------- flow matching


def scheduler_shift(scheduler_config: Any) -> float:
    """The flow shift of a Wan pipeline's scheduler config (``flow_shift`` or ``shift``)."""
    get = scheduler_config.get if hasattr(scheduler_config, "get") else lambda k, d=None: getattr(scheduler_config, k, d)
    for key in ("flow_shift", "shift"):
        v = get(key, None)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    raise ValueError("the pipeline's scheduler config has no flow_shift/shift: pass --shift (Wan2.1 uses 3.0 at 480p, 5.0 at 720p)")


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform ``u`` in [0, 1] through the flow shift: ``shift * u / (1 + (shift - 1) * u)``."""
    return shift * u / (1 + (shift - 1) * u)


def draw_noise(positions: Sequence[int], shape: Sequence[int], *, seed: int, shift: float,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and sigma for the samples at the given global positions.

    Returns:
        ``(noise [n, *shape] float32, sigma [n] float32)`` on ``device``; sample ``i`` depends only on
        ``(seed, positions[i])``.
    """
    noises, us = [], []
    for pos in positions:
        g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + int(pos)) % (2**63))
        us.append(torch.rand((), generator=g, device=device, dtype=torch.float32))
        noises.append(torch.randn(tuple(shape), generator=g, device=device, dtype=torch.float32))
    return torch.stack(noises), shift_sigmas(torch.stack(us), shift)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) * x0 + sigma * noise``; ``x0``, ``noise``: ``[N, C, F, H, W]``, ``sigma``: ``[N]``."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def velocity_loss(student: torch.Tensor, teacher: torch.Tensor | None, x0: torch.Tensor, noise: torch.Tensor,
                  kind: LossKind) -> torch.Tensor:
    """Mean squared velocity error (float32 scalar) of ``kind``: against the teacher, the true velocity, or both."""
    student = student.float()
    diffusion = lambda: torch.mean((student - (noise - x0).float()) ** 2)
    distill = lambda: torch.mean((student - teacher.float()) ** 2)
    if kind == "diffusion":
        return diffusion()
    if teacher is None:
        raise ValueError(f"loss {kind!r} needs the teacher's velocity")
    return distill() if kind == "distill" else 0.5 * (distill() + diffusion())


def predict_velocity(transformer: torch.nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                     prompt_embeds: torch.Tensor) -> torch.Tensor:
    """One transformer call as `WanPipeline` makes it: timestep ``1000 * sigma``; returns ``[N, C, F, H, W]``."""
    return transformer(hidden_states=x_t, timestep=sigma * 1000.0, encoder_hidden_states=prompt_embeds,
                       return_dict=False)[0]


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (nccl on CUDA, gloo on the CPU); else one process."""
    import torch.distributed as dist

    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def _shard(module: torch.nn.Module, dtype: torch.dtype, *, float32_master: bool = False) -> None:
    """FSDP2: one unit per transformer block plus the root; all-gather in ``dtype``, reduce in float32.

    `fully_shard` moves a unit's parameters to the process group's device and keeps only this rank's shard,
    so the module may come in on the CPU. With ``float32_master`` each unit's parameters become float32 just
    before it is sharded (FSDP2 wants one dtype per unit), one block at a time.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # no cast of the units' inputs: as in one process, autocast alone picks the compute dtype (FSDP2's cast
    # would round the timestep to bf16, and the checkpoint's recomputation, which skips it, would see other dtypes)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)

    def unit(m: torch.nn.Module, params: Iterable[torch.nn.Parameter]) -> None:
        if float32_master:
            for p in params:
                p.data = p.data.float()
        fully_shard(m, mp_policy=mp)

    for block in module.blocks:
        unit(block, block.parameters())
    unit(module, (p for name, p in module.named_parameters() if not name.startswith("blocks.")))


# ----------------------------------------------------------------------------- student / teacher


def add_lora(transformer: torch.nn.Module, rank: int) -> None:
    """Add peft LoRA adapters (alpha = rank) to the attention q/k/v/out and FFN projections of every block."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("--train lora needs peft: pip install 'sparge[lora]'") from None
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(LORA_TARGETS)))


def select_trainable(transformer: torch.nn.Module, train: TrainMode) -> list[str]:
    """Freeze everything except what ``train`` trains; return the trained parameter names."""
    names = []
    for name, p in transformer.named_parameters():
        if train == "all":
            keep = True
        elif train == "attention":
            keep = ".attn1." in f".{name}"
        else:
            keep = "lora_" in name
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"--train {train} selects no parameter of this transformer")
    return names


def make_teacher_copy(transformer: torch.nn.Module, trained: Sequence[str], *, share_frozen: bool) -> torch.nn.Module:
    """A frozen copy of ``transformer``; with ``share_frozen`` the untrained parameters are the student's own."""
    memo: dict[int, Any] = {}
    if share_frozen:
        trained_set = set(trained)
        for name, p in transformer.named_parameters():
            if name not in trained_set:
                memo[id(p)] = p
    teacher = copy.deepcopy(transformer, memo)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class SparseSwitch:
    """Installs the sparse self-attention processors on the student and takes them off for a dense pass.

    Training always runs the student sparse: the config's ``dense_steps`` (an inference setting) is
    dropped, and the step counter stays at 0 (no timestep hook, no host sync).
    """

    def __init__(self, transformer: torch.nn.Module, config: SpargeConfig, layers: Sequence[int] | None = None) -> None:
        from sparge.integrations.diffusers import apply

        self._apply = lambda: apply(transformer, replace(config, dense_steps=0), layers=layers,
                                    collect_stats=True, step_tracking="manual")
        self.handle = self._apply()

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        self.handle.remove()
        try:
            yield
        finally:
            self.handle = self._apply()

    def take_sparsity(self) -> float | None:
        """Mean measured sparsity of the sparse calls since the last call (one host sync), then reset."""
        value = self.handle.mean_sparsity()
        self.handle.reset()
        return value

    def remove(self) -> None:
        self.handle.remove()


# ----------------------------------------------------------------------------- checkpoints


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out_dir`` as (step, path), oldest first (temporary folders are ignored)."""
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / "trainer.pt").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _rng_state(device: torch.device) -> dict[str, Any]:
    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def merged_state_dict(state: dict[str, torch.Tensor], lora_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Fold peft LoRA weights into their base layers: a plain transformer state dict.

    ``W = W_base + scale * B @ A`` for every ``X.base_layer.weight`` with ``X.lora_A.<adapter>.weight``
    and ``X.lora_B.<adapter>.weight``; with no LoRA keys the dict is returned unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.")
            if leaf == "weight":
                a = [v for k, v in state.items() if k.startswith(f"{prefix}.lora_A.") and k.endswith(".weight")]
                b = [v for k, v in state.items() if k.startswith(f"{prefix}.lora_B.") and k.endswith(".weight")]
                if len(a) != 1 or len(b) != 1:
                    raise ValueError(f"{prefix}: expected one LoRA adapter, found {len(a)} A and {len(b)} B matrices")
                t = (t.float() + lora_scale * (b[0].float() @ a[0].float())).to(t.dtype)
            key = f"{prefix}.{leaf}"
        out[key] = t
    return out


# ----------------------------------------------------------------------------- trainer


@dataclass
class StepRecord:
    """One optimizer step, as written to the JSONL log and passed to ``on_step``."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    samples: int
    elapsed_s: float
    steps_per_s: float
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


class Finetuner:
    """Velocity-distillation training of ``transformer`` towards its own sparse attention.

    Args:
        transformer: a `WanTransformer3DModel` as loaded (weights in ``dtype``; modified in place: it is
            the student).
        sparse: the student's sparse attention (`SpargeConfig`, e.g. ``Preset.to_config(0.95)``).
        cache: the training data (`LatentCache` from ``sparge finetune prepare``).
        config: the hyper-parameters.
        out_dir: the run folder (checkpoints, ``log.jsonl``, ``student.safetensors``).
        shift: the flow shift (``config.shift`` wins; see `scheduler_shift`).
        dtype: compute dtype (autocast and FSDP all-gather), e.g. ``torch.bfloat16``.
        device: where to train; under torchrun each rank uses ``cuda:LOCAL_RANK``.
        sparse_layers: block indices with sparse self-attention (None = all; `Preset.layers()`).
        metadata: stored in ``run.json`` and the final safetensors (model id, preset, sparsity...).
    """

    def __init__(self, transformer: torch.nn.Module, sparse: SpargeConfig, cache: LatentCache,
                 config: FinetuneConfig, out_dir: str | os.PathLike[str], *, shift: float,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 sparse_layers: Sequence[int] | None = None, metadata: dict[str, Any] | None = None) -> None:
        self.cfg = config
        self.cache = cache
        self.out = Path(out_dir)
        self.dtype = dtype
        self.shift = float(config.shift if config.shift is not None else shift)
        self.metadata = dict(metadata or {})
        device = torch.device(device)
        self.dist = init_distributed(device.type)
        if self.dist.distributed and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.micro = config.micro_batch(self.dist.world_size)
        self.latent_shape = tuple(cache[0][0].shape)

        self._model_cls = type(transformer)
        self._model_config = dict(transformer.config)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if config.train == "lora":
            with torch.random.fork_rng(devices=[]):  # the adapters' initialisation follows --seed
                torch.manual_seed(config.seed)
                add_lora(transformer, config.lora_rank)
        self.trained = select_trainable(transformer, config.train)
        trained_set = set(self.trained)
        self.teacher: torch.nn.Module | None = None
        need_teacher = config.loss != "diffusion" and config.train != "lora"
        if self.dist.distributed:
            # FSDP2 moves each unit to the GPU as it shards it, so nothing is ever whole on a GPU; the teacher is
            # copied (in the model dtype) and sharded first, and the student becomes float32 one block at a time,
            # so the host holds about one model in the load dtype, not a float32 one beside a teacher
            if need_teacher:
                self.teacher = make_teacher_copy(transformer, self.trained, share_frozen=False).to(dtype)
                _shard(self.teacher, dtype)
            _shard(transformer, dtype, float32_master=True)
        else:
            # master weights: trained parameters in float32; frozen ones stay in the load dtype (and are shared
            # with the teacher)
            for name, p in transformer.named_parameters():
                if name in trained_set:
                    p.data = p.data.float()
            if need_teacher:
                self.teacher = make_teacher_copy(transformer, self.trained, share_frozen=True)
            transformer.to(device)
            if self.teacher is not None:
                self.teacher.to(device)
        self.student = transformer.train()
        self.switch = SparseSwitch(transformer, sparse, sparse_layers)

        params = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        warm = config.warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.step = 0
        self.last_sparsity: float | None = None

    # ------------------------------------------------------------------ passes

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _teacher_velocity(self, x_t: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor, *,
                          force: bool = False) -> torch.Tensor | None:
        if self.cfg.loss == "diffusion" and not force:
            return None
        with torch.no_grad(), self._autocast():
            if self.teacher is not None:
                return predict_velocity(self.teacher, x_t, sigma, emb)
            if self.cfg.train != "lora":
                raise ValueError("no teacher: --loss diffusion with --train all/attention keeps no copy of the dense "
                                 "weights; compare against a separately loaded dense model instead")
            # LoRA: the teacher is the base model -- adapters off, dense attention
            with self.switch.dense():
                self.student.disable_adapters()
                try:
                    return predict_velocity(self.student, x_t, sigma, emb)
                finally:
                    self.student.enable_adapters()

    def micro_step(self, positions: Sequence[int]) -> torch.Tensor:
        """Forward + backward of the samples at ``positions``; returns the detached loss (float32 scalar)."""
        idx = sample_order(len(self.cache), positions[0], len(positions), seed=self.cfg.seed)
        x0, emb = self.cache.batch(idx)
        x0 = x0.to(self.device)
        emb = emb.to(self.device)
        noise, sigma = draw_noise(positions, self.latent_shape, seed=self.cfg.seed, shift=self.shift, device=self.device)
        x_t = noisy_latents(x0, noise, sigma)
        teacher_v = self._teacher_velocity(x_t, sigma, emb)
        with self._autocast():
            student_v = predict_velocity(self.student, x_t, sigma, emb)
        loss = velocity_loss(student_v, teacher_v, x0, noise, self.cfg.loss)
        (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (mean loss, grad norm before clipping).

        The measured sparsity of the student's attention is left in ``self.last_sparsity``.
        """
        cfg, info = self.cfg, self.dist
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for a in range(cfg.grad_accum):
            start = self.step * cfg.batch_size + (a * info.world_size + info.rank) * self.micro
            total += self.micro_step(range(start, start + self.micro))
        total /= cfg.grad_accum
        if info.distributed:
            import torch.distributed as dist

            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        params = [p for p in self.student.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.last_sparsity = self.switch.take_sparsity()
        return float(total), float(norm)

    # ------------------------------------------------------------------ checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.student, options=opts)

    def save_checkpoint(self) -> Path | None:
        """Write ``ckpt-<step>/`` atomically (rank 0) and drop all but the last ``keep``; returns its path."""
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        weights = self._trainable_state()
        optim = get_optimizer_state_dict(self.student, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        final = self.out / f"ckpt-{self.step:06d}"
        if self.dist.is_main:
            with atomic_dir(final) as tmp:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
                torch.save(optim, tmp / "optimizer.pt")
                torch.save({"version": CKPT_FORMAT_VERSION, "step": self.step, "scheduler": self.scheduler.state_dict(),
                            "rng": _rng_state(self.device), "config": asdict(self.cfg)}, tmp / "trainer.pt")
                (tmp / "state.json").write_text(json.dumps({"step": self.step, "config": asdict(self.cfg)}, indent=2) + "\n")
            for _, old in list_checkpoints(self.out)[: -self.cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.dist)
        return final if self.dist.is_main else None

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, LR scheduler, RNG and step from ``path`` (strict on the trained names)."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        if trainer.get("version") != CKPT_FORMAT_VERSION:
            raise ValueError(f"checkpoint {path} has format version {trainer.get('version')!r}, this sparge reads {CKPT_FORMAT_VERSION}")
        old = trainer["config"]
        for key in FinetuneConfig.RESUME_KEYS:
            if old.get(key) != getattr(self.cfg, key):
                raise ValueError(f"cannot resume {path}: it was trained with --{key.replace('_', '-')} {old.get(key)}, "
                                 f"this run has {getattr(self.cfg, key)}: use the same value or a new --out")
        weights = load_file(str(path / "trainable.safetensors"))
        want = set(self.trained)
        if set(weights) != want:
            missing, extra = sorted(want - set(weights)), sorted(set(weights) - want)
            raise ValueError(f"checkpoint {path} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}")
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.student, weights, options=opts)
        optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(self.student, self.optimizer, optim, options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(trainer["scheduler"])
        _set_rng_state(trainer["rng"], self.device)
        self.step = int(trainer["step"])

    def save_final(self) -> Path | None:
        """Write the student's full weights (LoRA merged, model dtype) to ``OUT/student.safetensors`` (rank 0).

        The file is written by `sparge.checkpoint.save_transformer_weights` (what ``sparge generate
        --checkpoint`` loads) from a fresh transformer built on the meta device around the gathered
        weights, so no second copy of the model is made.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        from sparge.checkpoint import save_transformer_weights

        state = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = self.out / FINAL_NAME
        if self.dist.is_main:
            state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in merged_state_dict(state).items()}
            with torch.device("meta"):
                plain = self._model_cls.from_config(self._model_config)
            plain.load_state_dict(state, strict=True, assign=True)
            meta = {**self.metadata, "steps": self.step, "train": self.cfg.train, "loss": self.cfg.loss,
                    "batch_size": self.cfg.batch_size, "lr": self.cfg.lr, "seed": self.cfg.seed}
            save_transformer_weights(path, plain, metadata=meta)
        _barrier(self.dist)
        return path if self.dist.is_main else None

    @torch.no_grad()
    def evaluate(self, cache: LatentCache | None = None, *, positions: Sequence[int] | None = None,
                 seed: int = 12345) -> dict[str, float]:
        """Velocity errors of the current student on fixed samples (no gradients, no optimizer step).

        Position ``i`` gets the sample, noise and sigma that training gives position ``i`` under ``seed``
        (so ``evaluate(range(batch_size), seed=config.seed)`` before training is the loss of step 1);
        the default seed is apart from training's: held-out noise.

        Returns:
            ``{"distill": mean ||v_student - v_teacher||^2, "teacher_rel_l2": ||v_s - v_t|| / ||v_t||,
            "diffusion": mean ||v_student - (noise - x0)||^2}`` averaged over the samples.
        """
        cache = cache or self.cache
        positions = list(positions if positions is not None else range(len(cache)))
        was_training = self.student.training
        self.student.eval()
        sums = {"distill": 0.0, "teacher_rel_l2": 0.0, "diffusion": 0.0}
        try:
            for pos in positions:
                x0, emb = cache.batch(sample_order(len(cache), pos, 1, seed=seed))
                x0, emb = x0.to(self.device), emb.to(self.device)
                noise, sigma = draw_noise([pos], x0.shape[1:], seed=seed, shift=self.shift, device=self.device)
                x_t = noisy_latents(x0, noise, sigma)
                teacher_v = self._teacher_velocity(x_t, sigma, emb, force=True).float()
                with self._autocast():
                    student_v = predict_velocity(self.student, x_t, sigma, emb).float()
                sums["distill"] += float(torch.mean((student_v - teacher_v) ** 2))
                sums["teacher_rel_l2"] += float(torch.linalg.vector_norm(student_v - teacher_v) / torch.linalg.vector_norm(teacher_v))
                sums["diffusion"] += float(torch.mean((student_v - (noise - x0)) ** 2))
        finally:
            self.student.train(was_training)
        return {k: v / len(positions) for k, v in sums.items()}

    # ------------------------------------------------------------------ loop

    def _open_log(self, resume_step: int):
        log = self.out / LOG_NAME
        if not self.dist.is_main:
            return None
        kept = []
        if log.exists():
            for line in log.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", math.inf) <= resume_step:
                        kept.append(line)
        log.write_text("".join(f"{line}\n" for line in kept))
        return log.open("a")

    def run(self, *, resume: bool = False, on_step: Callable[[StepRecord], None] | None = None) -> Path | None:
        """Train to ``config.steps`` (from the latest checkpoint with ``resume``); save checkpoints and the final weights.

        ``on_step`` is called after every optimizer step (progress bars); an exception it raises -- e.g.
        ``KeyboardInterrupt`` -- stops the run with the last checkpoint intact.

        Returns:
            ``OUT/student.safetensors`` on rank 0, None on the other ranks.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            ckpts = list_checkpoints(self.out)
            if ckpts:
                self.load_checkpoint(ckpts[-1][1])
        if self.step > self.cfg.steps:
            raise ValueError(f"--steps {self.cfg.steps} is below the step {self.step} the checkpoint already reached")
        if self.dist.is_main:
            run_info = {"config": asdict(self.cfg), "shift": self.shift, "world_size": self.dist.world_size,
                        "micro_batch": self.micro, "dtype": str(self.dtype), "trained_parameters": len(self.trained),
                        **self.metadata}
            (self.out / RUN_NAME).write_text(json.dumps(run_info, indent=2, default=str) + "\n")
        log = self._open_log(self.step)
        t0, first = time.perf_counter(), self.step
        try:
            while self.step < self.cfg.steps:
                try:
                    loss, norm = self.train_step()
                except torch.OutOfMemoryError:
                    raise TrainingOOM(
                        f"GPU memory ran out at step {self.step + 1} with a micro-batch of {self.micro} "
                        f"(--batch-size {self.cfg.batch_size} / ({self.dist.world_size} GPUs x --grad-accum "
                        f"{self.cfg.grad_accum})): raise --grad-accum, add --gradient-checkpointing, or use more GPUs"
                    ) from None
                elapsed = time.perf_counter() - t0
                extra = {} if self.last_sparsity is None else {"sparsity": self.last_sparsity}
                if self.device.type == "cuda":  # this rank's peak since the start (no sync)
                    extra["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                rec = StepRecord(step=self.step, loss=loss, lr=self.scheduler.get_last_lr()[0], grad_norm=norm,
                                 samples=self.step * self.cfg.batch_size, elapsed_s=elapsed,
                                 steps_per_s=(self.step - first) / elapsed if elapsed > 0 else 0.0, extra=extra)
                if log is not None:
                    log.write(json.dumps(rec.to_json()) + "\n")
                    log.flush()
                if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                    self.save_checkpoint()
                if on_step is not None:
                    on_step(rec)
            return self.save_final()
        finally:
            if log is not None:
                log.close()


def prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool, keep_names: Sequence[str] = ()) -> None:
    """Check the run folder: a non-empty one needs ``resume`` or ``overwrite``.

    ``overwrite`` deletes only what a run writes (checkpoints, log, run.json, the student file);
    entries named in ``keep_names`` (e.g. a latent cache inside the run folder) do not count and stay.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: give a folder")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pass one")
    existing = [p for p in out_dir.iterdir() if p.name not in keep_names] if out_dir.is_dir() else []
    if resume:
        if not list_checkpoints(out_dir):
            raise ValueError(f"--resume: {out_dir} holds no checkpoint (ckpt-NNNNNN/) to continue from")
        return
    if existing and not overwrite:
        raise ValueError(f"--out {out_dir} is not empty: pass --resume to continue its run, --overwrite to start over, "
                         "or choose another folder")
    for p in existing:
        if CKPT_RE.match(p.name) or p.name in (FINAL_NAME, LOG_NAME, RUN_NAME) or p.name.startswith(".ckpt-"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
