"""Block masks: pooled block scores, Top-k / Top-p / hybrid selection, sparsity, and `BlockMask`.

Block sizes are always given in the order (block_q, block_k): query blocks of ``block_q`` tokens
(default 128) and key/value blocks of ``block_k`` tokens (default 64). With ``Lq`` query and ``Lk``
key tokens there are ``Tq = ceil(Lq / block_q)`` query blocks and ``Tk = ceil(Lk / block_k)`` key
blocks; a partial last block is pooled over its real tokens only.

Scores: ``softmax_j(mean(Q_i) . mean(K_j) * scale)`` over the key blocks j of each query block i,
``scale = 1/sqrt(D)`` by default.

Selection: both rules take a prefix of the same descending order of scores (ties broken by the
lower block index), so Top-k keeps the first ``max(1, ceil(k * Tk))`` blocks, Top-p the first
``n_p`` blocks where ``n_p`` is the fewest whose probabilities sum to at least ``p`` (at least one),
and the hybrid mask -- their union -- is the first ``max(k-count, n_p)`` blocks. ``k = 0`` or
``p = 0`` disables that rule; ``k = 1`` or ``p = 1`` means dense.

Everything here runs without host synchronisation, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "BlockMask",
    "block_pool",
    "block_scores",
    "build_block_mask",
    "hybrid_block_mask",
    "mask_sparsity",
    "topk_block_mask",
    "topp_block_mask",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_block(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value!r} is not supported: use a power of two >= 16 (default 128 for block_q, 64 for block_k)")


def check_qk(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> None:
    """Validate a query/key pair in ``[B, H, L, D]`` layout; raise ``ValueError`` naming the argument."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} is not supported: use bfloat16, float16, float32 or float64")
        if t.shape[2] == 0:
            raise ValueError(f"{name} has sequence length 0: at least one token is needed")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same batch and heads [B, H], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim D, got q D={q.shape[3]} and k D={k.shape[3]}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0) or math.isnan(value):
        raise ValueError(f"{name}={value!r} is out of range: use a number in [0, 1] (0 disables the rule, 1 keeps every block)")
    return float(value)


def check_knobs(topk: float, topp: float) -> tuple[float, float]:
    """Validate Top-k / Top-p fractions; both zero is an error."""
    topk = _check_fraction("topk", topk)
    topp = _check_fraction("topp", topp)
    if topk == 0.0 and topp == 0.0:
        raise ValueError("topk=0 and topp=0 together would keep no block: set topk > 0, topp > 0, or both")
    return topk, topp


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def block_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of ``x`` over consecutive blocks of ``block`` tokens (a partial last block over its real tokens).

    Args:
        x: ``[B, H, L, D]`` in any float dtype and any strides.
        block: tokens per block.

    Returns:
        ``[B, H, ceil(L / block), D]`` float32.
    """
    from sparge.kernels.pool import block_mean

    return block_mean(x, block)


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Pooled block scores: the softmax over key blocks of ``mean(Q_i) . mean(K_j) * scale``.

    Args:
        q: queries ``[B, H, Lq, D]``.
        k: keys ``[B, H, Lk, D]``.
        block_q, block_k: block sizes (query, key).
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``[B, H, Tq, Tk]`` float32; each row sums to 1.

    Example:
        >>> s = block_scores(torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64))
        >>> s.shape
        torch.Size([1, 2, 3, 5])
    """
    check_qk(q, k, block_q, block_k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    pq = block_pool(q, block_q)
    pk = block_pool(k, block_k)
    logits = torch.matmul(pq, pk.transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1)


def _keep_counts(sorted_scores: torch.Tensor, topk: float, topp: float) -> torch.Tensor:
    """Blocks kept per query block (a prefix length of the descending order), ``[B, H, Tq]`` int32."""
    tk = sorted_scores.shape[-1]
    shape = sorted_scores.shape[:-1]
    dev = sorted_scores.device
    if topk >= 1.0 or topp >= 1.0:
        return torch.full(shape, tk, dtype=torch.int32, device=dev)
    n_k = max(1, math.ceil(topk * tk)) if topk > 0 else 0
    count = torch.full(shape, min(n_k, tk), dtype=torch.int32, device=dev)
    if topp > 0:
        # keep block r while the mass of the blocks ranked before it is still below p
        before = torch.cumsum(sorted_scores, dim=-1) - sorted_scores
        n_p = (before < topp).sum(dim=-1, dtype=torch.int32).clamp_(min=1)
        count = torch.maximum(count, n_p)
    return count


def _sort_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # stable descending sort: equal scores keep ascending index order (ties go to the lower index)
    return torch.sort(scores, dim=-1, descending=True, stable=True)


def kept_slots(count: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., n]`` bool: which of a list's ``n`` slots hold entries (slot ``i`` does when ``i < count``)."""
    return torch.arange(n, device=count.device) < count.unsqueeze(-1)


def _prefix_to_dense(order: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    keep_sorted = kept_slots(count, order.shape[-1])
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def mask_from_scores(scores: torch.Tensor, *, topk: float, topp: float) -> torch.Tensor:
    """Hybrid (union) mask from pooled scores ``[..., Tq, Tk]``; returns a bool tensor of the same shape."""
    topk, topp = check_knobs(topk, topp)
    sorted_scores, order = _sort_scores(scores)
    return _prefix_to_dense(order, _keep_counts(sorted_scores, topk, topp))


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    """Whether the mask path runs its Triton kernels: ``backend="torch"`` forces plain torch everywhere."""
    from sparge.kernels import triton_available

    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is not known: use 'auto', 'triton' or 'torch'")
    return backend != "torch" and x.dtype != torch.float64 and triton_available(x)


def _select(
    q: torch.Tensor, k: torch.Tensor, topk: float, topp: float, block_q: int, block_k: int, scale: float | None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_count, row_index ascending, dense mask) of the hybrid selection; one path per device."""
    topk, topp = check_knobs(topk, topp)
    check_qk(q, k, block_q, block_k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    fast = _use_triton(q, backend)
    if fast:
        from sparge.kernels.pool import block_mean_pair

        pq, pk = block_mean_pair(q, k, block_q, block_k)
    else:
        from sparge.kernels.pool import block_mean_torch

        pq, pk = block_mean_torch(q, block_q), block_mean_torch(k, block_k)
    tk = pk.shape[2]
    if fast:
        from sparge.kernels.mask_lut import pooled_logits, select_blocks

        n_k = tk if topk >= 1.0 else (max(1, math.ceil(topk * tk)) if topk > 0 else 0)
        return select_blocks(pooled_logits(pq, pk), scale, n_k, topp)
    scores = torch.softmax(torch.matmul(pq, pk.transpose(-1, -2)) * scale, dim=-1)
    sorted_scores, order = _sort_scores(scores)
    count = _keep_counts(sorted_scores, topk, topp)
    dense = _prefix_to_dense(order, count)
    return (*_index_lists(dense, backend), dense)


def hybrid_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topk: float = 0.03,
    topp: float = 0.2,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Union of the Top-k and Top-p block masks.

    Args:
        q: queries ``[B, H, Lq, D]``; k: keys ``[B, H, Lk, D]``.
        topk: fraction of key blocks kept per query block (0 disables Top-k).
        topp: cumulative pooled-probability mass to keep (0 disables Top-p).
        block_q, block_k: block sizes (query, key).
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``[B, H, Tq, Tk]`` bool, True where the block is computed. Every row keeps at least one block.

    Example:
        >>> m = hybrid_block_mask(torch.randn(1, 2, 512, 64), torch.randn(1, 2, 512, 64), topk=0.25, topp=0.5)
        >>> m.shape, bool(m.any(-1).all())
        (torch.Size([1, 2, 4, 8]), True)
    """
    return _select(q, k, topk, topp, block_q, block_k, scale)[2]


def topk_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topk: float = 0.03,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Top-k alone: the ``max(1, ceil(topk * Tk))`` highest-scoring key blocks per query block.

    Same arguments and return as :func:`hybrid_block_mask`; ``topk`` must be in (0, 1].
    """
    if _check_fraction("topk", topk) == 0.0:
        raise ValueError("topk=0 would keep no block: use a fraction in (0, 1]")
    return hybrid_block_mask(q, k, topk=topk, topp=0.0, block_q=block_q, block_k=block_k, scale=scale)


def topp_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topp: float = 0.2,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Top-p alone: the fewest highest-scoring key blocks whose pooled probability reaches ``topp``.

    Same arguments and return as :func:`hybrid_block_mask`; ``topp`` must be in (0, 1].
    """
    if _check_fraction("topp", topp) == 0.0:
        raise ValueError("topp=0 would keep no block: use a fraction in (0, 1]")
    return hybrid_block_mask(q, k, topk=0.0, topp=topp, block_q=block_q, block_k=block_k, scale=scale)


def _index_lists(mask: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(count, ascending indices) of the True entries along the last dim of a ``[B, H, R, C]`` bool mask."""
    if _use_triton(mask, backend):
        from sparge.kernels.mask_lut import mask_lists

        return mask_lists(mask)
    m8 = mask.to(torch.int8)
    index = torch.sort(m8, dim=-1, descending=True, stable=True).indices.to(torch.int32)
    count = m8.sum(-1, dtype=torch.int32)
    return count, index.masked_fill_(~kept_slots(count, index.shape[-1]), 0).contiguous()


def _block_sizes(length: int, block: int, device: torch.device) -> torch.Tensor:
    """Real tokens in each block, ``[ceil(length / block)]`` float64."""
    t = num_blocks(length, block)
    sizes = torch.full((t,), float(block), dtype=torch.float64, device=device)
    sizes[-1] = length - (t - 1) * block
    return sizes


def check_dense_mask(mask: torch.Tensor, q_len: int, k_len: int, block_q: int, block_k: int, batch_heads: tuple[int, int] | None = None) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor [B, H, Tq, Tk] (or a sparge.BlockMask), got {got}")
    tq, tk = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    if mask.dim() != 4 or tuple(mask.shape[2:]) != (tq, tk):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}: expected [B, H, {tq}, {tk}] for Lq={q_len}, Lk={k_len}, "
            f"block_q={block_q}, block_k={block_k}"
        )
    if batch_heads is not None and tuple(mask.shape[:2]) != tuple(batch_heads):
        raise ValueError(f"mask has batch/heads {tuple(mask.shape[:2])}: expected {tuple(batch_heads)} to match q")


def mask_sparsity_tensor(mask: torch.Tensor, q_len: int, k_len: int, block_q: int = 128, block_k: int = 64) -> torch.Tensor:
    """Like :func:`mask_sparsity` but returns a 0-dim float64 tensor on the mask's device (no host sync)."""
    check_dense_mask(mask, q_len, k_len, block_q, block_k)
    rows = _block_sizes(q_len, block_q, mask.device)
    cols = _block_sizes(k_len, block_k, mask.device)
    kept = torch.einsum("bhij,i,j->bh", mask.to(torch.float64), rows, cols) / float(q_len * k_len)
    return 1.0 - kept.mean()


def mask_sparsity(mask: torch.Tensor, q_len: int, k_len: int, block_q: int = 128, block_k: int = 64) -> float:
    """Fraction of the real ``Lq x Lk`` score matrix that the mask skips, averaged over batch and heads.

    Partial last blocks count by their real size. 0.95 means 95% of the scores are skipped.

    Args:
        mask: ``[B, H, Tq, Tk]`` bool.
        q_len, k_len: real sequence lengths Lq and Lk.
        block_q, block_k: block sizes (query, key).
    """
    return float(mask_sparsity_tensor(mask, q_len, k_len, block_q, block_k))


@dataclass(frozen=True, eq=False)
class BlockMask:
    """A block-sparse mask as the kernels read it: row lists for forward/dQ, column lists for dK/dV.

    Attributes:
        row_count: ``[B, H, Tq]`` int32, key blocks kept by each query block.
        row_index: ``[B, H, Tq, Tk]`` int32, the kept key-block indices first (ascending), then zeros.
        q_len, k_len: real sequence lengths; block_q, block_k: block sizes.
        dense: the ``[B, H, Tq, Tk]`` bool mask, when it was built (else derived from the row lists).
        backend: how the column lists are built ("auto", "triton" or "torch").

    The column lists (``col_count`` ``[B, H, Tk]`` and ``col_index`` ``[B, H, Tk, Tq]`` int32: the query
    blocks that keep each key block, ascending) are only needed by the backward pass; they are built on
    first access and cached, so inference never pays for them.
    """

    row_count: torch.Tensor
    row_index: torch.Tensor
    q_len: int
    k_len: int
    block_q: int
    block_k: int
    dense: torch.Tensor | None = None
    backend: str = "auto"
    _columns: list = field(default_factory=list, init=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, tq, tk = self.row_index.shape
        return (b, h, tq, tk)

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(col_count, col_index)``, built from the dense mask on first call (no host synchronisation)."""
        if not self._columns:
            self._columns.extend(_index_lists(self.to_dense().transpose(-1, -2), self.backend))
        return self._columns[0], self._columns[1]

    @property
    def col_count(self) -> torch.Tensor:
        return self.columns()[0]

    @property
    def col_index(self) -> torch.Tensor:
        return self.columns()[1]

    @classmethod
    def from_dense(cls, mask: torch.Tensor, q_len: int, k_len: int, *, block_q: int = 128, block_k: int = 64) -> "BlockMask":
        """Build the row lists (and, lazily, the column lists) from a dense ``[B, H, Tq, Tk]`` bool mask."""
        _check_block("block_q", block_q)
        _check_block("block_k", block_k)
        check_dense_mask(mask, q_len, k_len, block_q, block_k)
        row_count, row_index = _index_lists(mask)
        return cls(row_count, row_index, q_len, k_len, block_q, block_k, dense=mask)

    def to_dense(self) -> torch.Tensor:
        """``[B, H, Tq, Tk]`` bool."""
        if self.dense is not None:
            return self.dense
        kept = kept_slots(self.row_count, self.row_index.shape[-1]).to(torch.int32)
        return torch.zeros_like(kept).scatter_add_(-1, self.row_index.long(), kept) > 0

    def sparsity_tensor(self) -> torch.Tensor:
        """0-dim float64 tensor on the mask's device: skipped fraction of the real score matrix (no host sync)."""
        return mask_sparsity_tensor(self.to_dense(), self.q_len, self.k_len, self.block_q, self.block_k)

    def sparsity(self) -> float:
        """Skipped fraction of the real ``Lq x Lk`` score matrix, averaged over batch and heads."""
        return float(self.sparsity_tensor())

    def __repr__(self) -> str:
        b, h, tq, tk = self.shape
        return (
            f"BlockMask(B={b}, H={h}, Tq={tq}, Tk={tk}, q_len={self.q_len}, k_len={self.k_len}, "
            f"block_q={self.block_q}, block_k={self.block_k}, device={self.row_count.device})"
        )


def build_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topk: float = 0.03,
    topp: float = 0.2,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
    backend: str = "auto",
) -> BlockMask:
    """Hybrid mask straight into the kernels' `BlockMask` form (same selection as :func:`hybrid_block_mask`).

    ``backend="torch"`` builds it with plain torch ops only (no Triton, not even the interpreter);
    ``"auto"``/``"triton"`` use the fused kernels where Triton runs.

    The row lists come from the same pass that selects the blocks (on GPU one fused Triton launch does
    softmax, Top-k/Top-p and the lists); the column lists, needed only for gradients, are built from the
    dense mask when first used. No host synchronisation.
    """
    row_count, row_index, dense = _select(q, k, topk, topp, block_q, block_k, scale, backend)
    return BlockMask(row_count, row_index, q.shape[2], k.shape[2], block_q, block_k, dense=dense, backend=backend)
