"""Data-parallel pieces of the contrastive objective: ranks, autograd-aware row gathers, the negatives queue.

Nothing here imports deepspeed; the collectives are plain ``torch.distributed`` calls on the data-parallel group
(``None`` = the default group, which is the data-parallel group when only data parallelism is used). They move
*activations* (pooled embeddings), never parameters, so they are used inside the module's forward under any ZeRO
stage: ZeRO-3 has already gathered and released the parameters that produced them.

Gradient semantics of the gather (read this before changing any normalisation)
-----------------------------------------------------------------------------
``W`` ranks, rank ``r`` holds ``x_r`` (``[n_r, D]``, ``n_r`` may differ between ranks and may be 0). The global
batch is ``X = [x_0; x_1; ...; x_{W-1}]`` (``[N, D]``, ``N = sum_r n_r``, rows in rank order, so rank ``r``'s rows
start at ``offset_r = sum_{r' < r} n_r'``). Each rank computes its own loss ``L_r`` from its local rows and from
``X``. DeepSpeed then **averages** parameter gradients over the ranks (all ZeRO stages; ``engine.backward`` divides
by the accumulation steps, the reduction divides by ``W``), so the optimizer sees ``(1/W) sum_r dL_r/dtheta``.

* :func:`all_gather_rows` returns ``X`` on every rank. Its backward on rank ``r`` receives ``dL_r/dX`` and returns
  ``sum_{r'} dL_{r'}/dx_r``: the gradients of all ranks for rank ``r``'s rows are **summed** (a reduce-scatter with
  SUM) and handed to their owner. Each rank's own shard keeps its gradient (its rows in ``X`` are the same tensor
  as ``x_r``, so ``dL_r/dx_r`` is part of that sum) and no rank gets gradients for rows it does not own.
* With that backward, ``sum_r (gradient of rank r) = d(sum_r L_r)/dtheta`` and the optimizer sees
  ``d/dtheta [(1/W) sum_r L_r]``. **The per-rank loss must therefore be ``W`` times the rank's share of the global
  objective**: for a global mean over ``N`` items of which rank ``r`` holds ``n_r``,
  ``L_r = (W / N) * sum_{i in rank r} l_i`` (:func:`global_share` gives ``n_r W / N`` for the rank's mean). Then
  ``(1/W) sum_r L_r = (1/N) sum_i l_i`` exactly, for equal or unequal ``n_r``. A term every rank computes in full
  and identically (``L_r = L`` for all r, e.g. a loss over all pairs of ``X``) needs no factor:
  ``(1/W) sum_r L = L``, and the summed backward gives each owner ``W * dL/dx_r`` which the averaging divides by
  ``W`` again.
* The two classic bugs this rules out: a gather *without* gradient plus a local slice (the optimizer then sees
  ``1/W`` of the true gradient unless the loss is multiplied by ``W``), and a gather whose backward *averages*
  instead of summing (``1/W`` again). Both are silent; ``tests/test_dist_negatives.py`` checks the sum against an
  analytic gradient and the whole objective against one process holding the whole batch.

Unequal ``n_r`` (rows dropped by the record filter): the sizes are gathered first (one small integer all-gather),
every rank pads its rows to ``max_r n_r``, the padded blocks are gathered in one collective and the padding is cut
out again, so ``X`` holds exactly the real rows in rank order and positives are indexed by ``offset_r + b``; the
backward pads the incoming gradient the same way for the reduce-scatter. The collective runs in fp32 when the
embeddings are 16-bit (summing the gradients of many ranks in bf16 loses bits).

Every rank must make the same calls in the same order, forward and backward; callers keep their code path
independent of the local row count (a rank with no rows still gathers and still back-propagates through the
gather, see ``alignx.objective``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "GatherSizes",
    "NegativeQueue",
    "all_gather_objects",
    "all_gather_rows",
    "any_rank",
    "broadcast_from_rank0",
    "gather_sizes",
    "global_share",
    "is_distributed",
    "rank_and_world",
    "sum_over_ranks",
]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group exists (one process started by ``init_distributed`` is a
    group of 1)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group`` (``(0, 1)`` without a process group)."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather_single(out: Tensor, inp: Tensor, group: Any) -> None:
    # torch >= 2.13 names it all_gather_single; all_gather_into_tensor is the older (now deprecated) name.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _reduce_scatter_single(out: Tensor, inp: Tensor, group: Any) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.SUM, group=group)


class GatherSizes:
    """Per-rank integer counts gathered once per micro-step: ``counts[r, k]`` (``[W, K]`` int64 on the host).

    Column 0 is the number of rows each rank contributes to :func:`all_gather_rows` (``sizes``); other columns are
    whatever else the caller needs summed or compared across ranks in the same collective (token counts).
    """

    def __init__(self, counts: Tensor, rank: int) -> None:
        self.counts = counts
        self.rank = rank

    @property
    def world_size(self) -> int:
        return int(self.counts.shape[0])

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows per rank, in rank order."""
        return tuple(int(n) for n in self.counts[:, 0].tolist())

    @property
    def total(self) -> int:
        """``N = sum_r n_r``."""
        return int(self.counts[:, 0].sum())

    @property
    def offset(self) -> int:
        """First row of this rank in the gathered tensor: ``sum_{r' < rank} n_r'``."""
        return int(self.counts[: self.rank, 0].sum())

    def column_total(self, k: int) -> int:
        return int(self.counts[:, k].sum())


def gather_sizes(
    values: Sequence[int], *, device: torch.device | str = "cpu", group: Any = None, local_only: bool = False
) -> GatherSizes:
    """All-gather a few integers per rank (first = this rank's row count) in one collective.

    ``device`` must suit the backend (CUDA for nccl, CPU for gloo): pass the device of the tensors being gathered.
    Without a process group, or with ``local_only`` (a group of this process alone, no collective), the result is
    this process's values as rank 0 of 1.
    """
    local = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    rank, world = (0, 1) if local_only else rank_and_world(group)
    if world == 1:
        return GatherSizes(local.view(1, -1).cpu(), 0)
    out = torch.empty(world * local.numel(), dtype=torch.int64, device=device)
    _all_gather_single(out, local, group)
    return GatherSizes(out.view(world, -1).cpu(), rank)


class _AllGatherRows(torch.autograd.Function):
    """Forward: ``X = [x_0; ...; x_{W-1}]`` (padded all-gather, unpadded). Backward: reduce-scatter SUM (module doc)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...], rank: int, group: Any) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        world, n_max = len(sizes), max(sizes)
        rest = tuple(x.shape[1:])
        if n_max == 0:  # every rank has 0 rows: no collective on any rank
            return x.new_empty((0, *rest))
        send = x.new_zeros((n_max, *rest))
        send[: x.shape[0]] = x
        recv = x.new_empty((world * n_max, *rest))
        _all_gather_single(recv, send, group)
        return torch.cat([recv[r * n_max : r * n_max + n] for r, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        world, n_max = len(sizes), max(sizes)
        rest = tuple(grad.shape[1:])
        if n_max == 0:
            return grad.new_empty((0, *rest)), None, None, None
        comm_dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
        send = grad.new_zeros((world * n_max, *rest), dtype=comm_dtype)
        start = 0
        for r, n in enumerate(sizes):
            send[r * n_max : r * n_max + n] = grad[start : start + n]
            start += n
        recv = send.new_empty((n_max, *rest))
        _reduce_scatter_single(recv, send, group)
        return recv[: sizes[rank]].to(grad.dtype), None, None, None


def all_gather_rows(x: Tensor, sizes: GatherSizes, *, group: Any = None) -> Tensor:
    """Rows of every rank, in rank order, with gradients: ``[N, ...]`` from this rank's ``x [n_r, ...]``.

    ``sizes`` comes from :func:`gather_sizes` (its column 0 must be ``x.shape[0]`` on every rank). Differentiable
    in ``x`` with the summed backward of the module docstring; integer tensors (languages) are gathered the same way
    without gradient. Every rank must call it, also with ``n_r = 0``.
    """
    if x.shape[0] != sizes.sizes[sizes.rank]:
        raise ValueError(f"x has {x.shape[0]} rows but this rank announced {sizes.sizes[sizes.rank]} in gather_sizes")
    if sizes.world_size == 1:
        return x
    return _AllGatherRows.apply(x.contiguous(), sizes.sizes, sizes.rank, group)


def global_share(sizes: GatherSizes, column: int = 0) -> float:
    """``n_r W / N`` (0 when ``N = 0``): multiply this rank's *mean* over its ``n_r`` items by it so that DeepSpeed's
    average of the ranks' gradients is the gradient of the global mean over all ``N`` items (module docstring).
    Exactly 1.0 on a group of one, so a one-rank objective is its local mean. ``column`` picks the count: 0 =
    gathered rows (anchors), another column = e.g. token counts."""
    total = sizes.column_total(column)
    return int(sizes.counts[sizes.rank, column]) * sizes.world_size / total if total > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The trainer's collectives: every rank calls each of them, in the same order


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a pickled broadcast)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a pickled all-gather)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """Whether ``flag`` is set on any rank (a one-element all-reduce with MAX on ``device``)."""
    vec = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    return bool(vec.item() > 0)


def sum_over_ranks(vec: Tensor, device: torch.device | str) -> Tensor:
    """``vec`` summed over the ranks (all-reduce on ``device``, in ``vec``'s dtype), back on the host."""
    vec = vec.to(device)
    dist.all_reduce(vec)
    return vec.cpu()


# ----------------------------------------------------------------------------------------------------------------
# The negatives queue


class _LiveThenQueue(torch.autograd.Function):
    """``buf[start:stop]`` after writing ``live`` into ``buf[start:start + n]``; gradients go to ``live`` only.

    ``buf`` does not require gradients. The output is a *view* of ``buf``, so the queue rows are never copied; if
    the buffer is written again before this graph's backward (a second forward through the same queue), autograd's
    version check raises instead of silently using the new rows.
    """

    @staticmethod
    def forward(ctx: Any, live: Tensor, buf: Tensor, start: int, stop: int) -> Tensor:
        buf[start : start + live.shape[0]].copy_(live)
        ctx.n = live.shape[0]
        return buf[start:stop]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad[: ctx.n], None, None, None


class NegativeQueue:
    """A FIFO of detached embeddings from earlier optimizer steps, used as extra InfoNCE candidates.

    Storage: one buffer ``[H + C, D]`` in the training dtype on the training device (``C`` = ``capacity``,
    ``H`` = room for the live rows of one micro-step, grown on demand), with ``langs [C]`` (language id of each row)
    and ``steps [C]`` (the optimizer step that enqueued it). The queue occupies a ring of ``C`` slots after the live
    room; :meth:`candidates` writes the live rows right before the filled slots and returns the view
    ``[live; queue]`` without copying the queue, so the candidate matrix costs no memory beyond the buffer.

    Semantics:

    * **What is enqueued**: the gathered global batch of each micro-step (identical bytes on every rank, so every
      rank keeps the same queue), staged by :meth:`stage` during the forward passes of an optimizer step and
      appended by :meth:`commit` *after* the step. All micro-batches of a step therefore see the same queue, the
      queue after step ``k`` holds the newest ``min(C, rows of steps 1..k)`` rows, and its contents do not depend on
      how the step's records are split into micro-batches and ranks.
    * **FIFO**: when full, each new row overwrites the oldest. The candidate order is the slot order; the loss does
      not depend on it and resume restores it exactly (:meth:`state_dict`).
    * Rows are detached: InfoNCE gets ``num_grad_candidates = n_live`` and the queue receives no gradient.
    """

    VERSION = 1

    def __init__(self, capacity: int, *, name: str = "targets") -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"queue capacity (objective.queue_size) must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.name = name
        self._buf: Tensor | None = None
        self._langs: Tensor | None = None
        self._steps: Tensor | None = None
        self.head = 0  # rows reserved in front of the ring for the live candidates
        self.size = 0  # filled slots
        self.ptr = 0  # next slot to write (the oldest row once full)
        self.enqueued = 0  # rows ever enqueued
        self._pending: list[tuple[Tensor, Tensor]] = []

    # -- storage --------------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int | None:
        return None if self._buf is None else int(self._buf.shape[1])

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self._buf is None else self._buf.dtype

    @property
    def device(self) -> torch.device | None:
        return None if self._buf is None else self._buf.device

    def nbytes(self) -> int:
        """Bytes held: the buffer (live room + ring) and the per-row language and step ids."""
        if self._buf is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._buf, self._langs, self._steps))

    def _allocate(self, dim: int, dtype: torch.dtype, device: torch.device, head: int) -> None:
        old = self._buf
        buf = torch.zeros((head + self.capacity, dim), dtype=dtype, device=device)
        if old is not None:
            buf[head : head + self.size] = old[self.head : self.head + self.size].to(dtype=dtype, device=device)
        self._buf, self.head = buf, head
        if self._langs is None:
            self._langs = torch.full((self.capacity,), -1, dtype=torch.int64, device=device)
            self._steps = torch.full((self.capacity,), -1, dtype=torch.int64, device=device)
        else:
            self._langs, self._steps = self._langs.to(device), self._steps.to(device)

    def ensure(self, dim: int, dtype: torch.dtype, device: torch.device, live_rows: int = 0) -> None:
        """Allocate (or convert, or grow the live room of) the buffer: width ``dim``, ``dtype`` on ``device``."""
        if self._buf is not None and self._buf.shape[1] != dim:
            raise ValueError(f"the {self.name} queue holds {self._buf.shape[1]}-wide rows, got {dim}-wide embeddings")
        if (
            self._buf is None
            or self._buf.dtype != dtype
            or self._buf.device != torch.device(device)
            or live_rows > self.head
        ):
            head = max(live_rows, self.head, 1)
            if self._buf is not None and live_rows > self.head:
                head = max(live_rows, 2 * self.head)  # amortised growth
            self._allocate(dim, dtype, torch.device(device), head)

    # -- use ------------------------------------------------------------------------------------------------------

    def candidates(self, live: Tensor) -> Tensor:
        """``[n + size, D]``: ``live [n, D]`` (keeps its gradient; cast to the queue dtype) then the queued rows.

        Pass ``num_grad_candidates = n`` to InfoNCE. The result is a view of the queue's buffer: use it in one
        forward and run that forward's backward before the next call (autograd raises otherwise).
        """
        n = live.shape[0]
        self.ensure(live.shape[1], self.dtype or live.dtype, self.device or live.device, live_rows=n)
        assert self._buf is not None
        start = self.head - n
        return _LiveThenQueue.apply(live.to(self._buf.dtype), self._buf, start, self.head + self.size)

    def stage(self, rows: Tensor, langs: Tensor) -> None:
        """Remember ``rows [n, D]`` (detached) and their ``langs [n]`` for the next :meth:`commit`."""
        if rows.dim() != 2 or langs.shape != rows.shape[:1]:
            raise ValueError(f"stage needs rows [n, D] and langs [n], got {tuple(rows.shape)} and {tuple(langs.shape)}")
        self._pending.append((rows.detach(), langs.detach().to(torch.int64)))

    @property
    def pending_rows(self) -> int:
        return sum(r.shape[0] for r, _ in self._pending)

    @torch.no_grad()
    def commit(self, step: int = -1) -> int:
        """Append the staged rows in order (oldest first), overwriting the oldest slots when full.

        ``step`` is recorded per row (the optimizer step they come from). Returns the number of rows appended.
        """
        if not self._pending:
            return 0
        rows = torch.cat([r for r, _ in self._pending])
        langs = torch.cat([lang for _, lang in self._pending])
        self._pending = []
        n = rows.shape[0]
        self.enqueued += n
        self.ensure(rows.shape[1], self.dtype or rows.dtype, self.device or rows.device)
        assert self._buf is not None and self._langs is not None and self._steps is not None
        if n > self.capacity:  # only the newest C rows survive; advance the pointer as if all were written
            self.ptr = (self.ptr + n - self.capacity) % self.capacity
            rows, langs, n = rows[-self.capacity :], langs[-self.capacity :], self.capacity
        slots = (self.ptr + torch.arange(n, device=self._buf.device)) % self.capacity
        self._buf[self.head + slots] = rows.to(self._buf.dtype)
        self._langs[slots] = langs.to(self._langs.device)
        self._steps[slots] = step
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        return n

    def clear_pending(self) -> None:
        self._pending = []

    # -- inspection -----------------------------------------------------------------------------------------------

    def _fifo_slots(self) -> Tensor:
        device = self._buf.device if self._buf is not None else "cpu"
        if self.size < self.capacity:
            return torch.arange(self.size, device=device)
        return (self.ptr + torch.arange(self.capacity, device=device)) % self.capacity

    def rows(self) -> Tensor:
        """The queued rows, oldest first (a copy), ``[size, D]``."""
        if self._buf is None:
            return torch.empty(0, 0)
        return self._buf[self.head + self._fifo_slots()].clone()

    def langs(self) -> Tensor:
        """Language id of each queued row, oldest first, ``[size]``."""
        if self._langs is None:
            return torch.empty(0, dtype=torch.int64)
        return self._langs[self._fifo_slots()].clone()

    def slot_langs(self) -> Tensor:
        """Language id of each queued row in slot order, ``[size]``: the order of the rows after the live ones in
        :meth:`candidates`."""
        if self._langs is None:
            return torch.empty(0, dtype=torch.int64)
        return self._langs[: self.size]

    def steps(self) -> Tensor:
        """Optimizer step that enqueued each queued row, oldest first, ``[size]``."""
        if self._steps is None:
            return torch.empty(0, dtype=torch.int64)
        return self._steps[self._fifo_slots()].clone()

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: the filled slots (ring order, on the CPU), languages, steps,
        pointer and counters. Staged rows are not saved: checkpoints are written after :meth:`commit`."""
        if self._pending:
            raise RuntimeError(f"the {self.name} queue has {self.pending_rows} staged rows; commit() before saving")
        state: dict[str, Any] = {
            "version": self.VERSION,
            "name": self.name,
            "capacity": self.capacity,
            "size": self.size,
            "ptr": self.ptr,
            "enqueued": self.enqueued,
            "dim": self.dim,
            "dtype": None if self._buf is None else str(self._buf.dtype).removeprefix("torch."),
        }
        if self._buf is not None:
            assert self._langs is not None and self._steps is not None
            state["rows"] = self._buf[self.head : self.head + self.size].to("cpu", copy=True)
            state["langs"] = self._langs[: self.size].to("cpu", copy=True)
            state["steps"] = self._steps[: self.size].to("cpu", copy=True)
        return state

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
        """Restore :meth:`state_dict` exactly (rows in the saved dtype; moved to ``device``)."""
        if state.get("version") != self.VERSION:
            raise ValueError(f"unknown {self.name} queue state version {state.get('version')!r}")
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"the checkpoint's {self.name} queue has capacity {state['capacity']}, this run has "
                f"objective.queue_size={self.capacity}; resume with the same queue_size"
            )
        self._pending = []
        self._buf = self._langs = self._steps = None
        self.head = self.size = self.ptr = self.enqueued = 0
        if state.get("rows") is not None:
            rows = state["rows"]
            dev = torch.device(device) if device is not None else rows.device
            self._allocate(int(rows.shape[1]), rows.dtype, dev, max(self.head, 1))
            assert self._buf is not None and self._langs is not None and self._steps is not None
            n = rows.shape[0]
            self._buf[self.head : self.head + n] = rows.to(dev)
            self._langs[:n] = state["langs"].to(dev)
            self._steps[:n] = state["steps"].to(dev)
        self.size, self.ptr, self.enqueued = int(state["size"]), int(state["ptr"]), int(state["enqueued"])

    def __repr__(self) -> str:
        return (
            f"NegativeQueue({self.name}, {self.size}/{self.capacity} rows, dim={self.dim}, dtype={self.dtype}, "
            f"enqueued={self.enqueued}, pending={self.pending_rows})"
        )
