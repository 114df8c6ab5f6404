"""Deterministic, rank-aware, resumable micro-batch order (length-grouped as the reference, or shuffled).

Semantics
---------
Let ``m`` = micro-batch size (records per forward on one rank), ``W`` = world size, ``A`` = gradient-accumulation
steps and ``G = m * W * A`` the global batch (records per optimizer step).

1. **Epoch order.** A permutation of all record indices, a function of ``(lengths, G, seed, epoch)`` only (never
   of ``m``, ``W`` or ``A`` separately): ``torch.randperm`` with a generator seeded ``seed + epoch``; with
   ``group_by_length`` the permutation is cut into mega-batches of ``M = min(50, n // (4 G)) * G`` records (at
   least ``G``), each sorted by length (longest first, stable), and the longest record of the epoch is swapped
   to the very front (so an out-of-memory shows on the first step). This is Hugging Face's
   ``get_length_grouped_indices`` with ``batch_size = G``, which is what the reference gets
   (``LengthGroupedSampler(micro * grad_accum)`` in one process).
2. **Epoch length.** ``drop_last=True`` keeps the first ``floor(n / G) * G`` positions of the order: the
   ``n mod G`` records at the end (the shortest of the last mega-batch) are not seen this epoch, and a different
   subset is left out in each epoch. ``drop_last=False`` pads the order cyclically with its own beginning up to a
   multiple of ``G`` (as ``DistributedSampler``), so every record is seen and a few twice; every rank still runs
   the same number of micro-batches, which collective ops (ZeRO) require.
3. **Micro-batches.** Global micro-batch ``k`` is positions ``[k m, (k + 1) m)`` of the order. Optimizer step
   ``g``, accumulation micro-step ``a`` on rank ``r`` runs global micro-batch ``k = (g A + a) W + r``
   (interleaved), so rank ``r`` gets ``k = r, r + W, r + 2W, ...``. Step ``g`` as a whole covers positions
   ``[g G, (g + 1) G)`` whatever ``m, W, A`` are: one process with ``m' = G`` (or any split of ``G``) sees the same
   records per step as ``W`` ranks.
4. **Negatives.** The records of one micro-batch are ``m`` consecutive records of the order, i.e. of similar
   length within a mega-batch. With ``objective.negatives = "local"`` (reference) they are each other's only
   contrastive negatives, so changing ``m`` or ``W`` at a fixed ``G`` keeps each step's records but changes
   which records are negatives of which: the contrastive and language-matching losses (and so the gradients)
   then differ, the LM loss does not. With ``"global"`` the candidates are all micro-batches of the same
   micro-step on all ranks (``W m`` consecutive records of the order): the objective then depends only on ``m W``,
   and is the same as one process with micro-batch ``m W`` (docs/negatives.md). Packing (``data.packing``) changes
   only the layout of a micro-batch, never which records it holds.
5. **Resume.** The list is a pure function of its arguments: after ``s`` optimizer steps of an epoch, a rank
   resumes at ``micro_batches(...)[s * A:]``.
6. **Direction-homogeneous batches** (``strata``, ``data.batching = direction``): every micro-batch holds records
   of one stratum (a ``(src_lang, tgt_lang)`` direction), so every contrastive candidate shares the anchor's target
   language. Each stratum is ordered on its own (length-grouped into chunks of ``m`` or shuffled), cut into chunks
   of ``m`` records (a stratum's last incomplete chunk is left out of the epoch with ``drop_last``, filled
   cyclically from the stratum's own start otherwise), and the chunks are shuffled together; the chunk holding the
   longest record goes first. The order is a pure function of ``(lengths, strata, m, G, seed, epoch)``: it depends
   on ``m`` too (a chunk is a micro-batch), and stays resumable as in 5.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

__all__ = ["direction_order", "epoch_order", "length_grouped_order", "micro_batches", "steps_per_epoch"]


def length_grouped_order(lengths: Sequence[int], group_size: int, generator: torch.Generator) -> list[int]:
    """Hugging Face ``get_length_grouped_indices(lengths, batch_size=group_size)`` with an explicit generator.

    A random permutation cut into mega-batches of ``min(50, n // (4 group_size)) * group_size`` indices (at least
    ``group_size``), each sorted by decreasing length; the longest index overall is swapped to position 0.
    """
    n = len(lengths)
    mult = min(n // (group_size * 4), 50) or 1
    mega = mult * group_size
    perm = torch.randperm(n, generator=generator).tolist()
    groups = [sorted(perm[i : i + mega], key=lambda j: lengths[j], reverse=True) for i in range(0, n, mega)]
    if not groups:
        return []
    maxima = [lengths[g[0]] for g in groups]
    top = max(range(len(groups)), key=lambda i: maxima[i])
    groups[0][0], groups[top][0] = groups[top][0], groups[0][0]
    return [i for g in groups for i in g]


def epoch_order(
    lengths: Sequence[int], global_batch: int, *, seed: int, epoch: int, group_by_length: bool, drop_last: bool
) -> list[int]:
    """The epoch's record order (steps 1-2 of the module docstring), a multiple of ``global_batch`` long."""
    lengths = [int(x) for x in lengths]  # a datasets Column reads faster once than element by element
    n = len(lengths)
    generator = torch.Generator().manual_seed(int(seed) + int(epoch))
    if group_by_length:
        order = length_grouped_order(lengths, global_batch, generator)
    else:
        order = torch.randperm(n, generator=generator).tolist()
    if drop_last:
        return order[: (n // global_batch) * global_batch]
    pad = (-n) % global_batch
    while pad > 0:
        take = order[: min(pad, n)]
        order = order + take
        pad -= len(take)
    return order


def direction_order(
    lengths: Sequence[int],
    strata: Sequence[Hashable],
    micro_batch_size: int,
    global_batch: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool,
    drop_last: bool,
) -> list[int]:
    """The epoch order of direction-homogeneous micro-batches (step 6 of the module docstring), a multiple of
    ``global_batch`` long, every aligned run of ``micro_batch_size`` positions from one stratum."""
    if len(strata) != len(lengths):
        raise ValueError(f"strata has {len(strata)} entries for {len(lengths)} records")
    m = micro_batch_size
    lengths = [int(x) for x in lengths]
    generator = torch.Generator().manual_seed(int(seed) + int(epoch))
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(strata):
        members.setdefault(key, []).append(i)
    chunks: list[list[int]] = []
    for key in sorted(members, key=repr):
        idx = members[key]
        sub = [lengths[i] for i in idx]
        if group_by_length:
            local = length_grouped_order(sub, m, generator)
        else:
            local = torch.randperm(len(idx), generator=generator).tolist()
        order = [idx[j] for j in local]
        if not drop_last and len(order) % m:
            order += (order * m)[: m - len(order) % m]
        chunks += [order[k : k + m] for k in range(0, len(order) - m + 1, m)]
    if not chunks:
        raise ValueError(f"no direction has {m} records for one homogeneous micro-batch (micro_batch_size={m})")
    chunks = [chunks[j] for j in torch.randperm(len(chunks), generator=generator).tolist()]
    if group_by_length:
        top = max(range(len(chunks)), key=lambda j: max(lengths[i] for i in chunks[j]))
        chunks[0], chunks[top] = chunks[top], chunks[0]
    per_step = global_batch // m
    if drop_last:
        chunks = chunks[: (len(chunks) // per_step) * per_step]
    else:
        chunks += (chunks * per_step)[: (-len(chunks)) % per_step]
    return [i for c in chunks for i in c]


def micro_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    *,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    group_by_length: bool,
    drop_last: bool = True,
    grad_accum: int = 1,
    strata: Sequence[Hashable] | None = None,
) -> list[list[int]]:
    """The record indices of this rank's micro-batches for one epoch, in order (see the module docstring).

    Args:
        lengths: token length of every record (``Prepared.train["length"]``).
        micro_batch_size: ``m``, records per forward on one rank.
        world_size, rank: data-parallel size and this rank.
        seed, epoch: the order is a pure function of ``(seed + epoch)`` and the other arguments.
        group_by_length: length-grouped mega-batches (reference) or a plain shuffle.
        drop_last: drop the incomplete last optimizer step (True) or pad it cyclically (False).
        grad_accum: ``A``; with ``G = m * world_size * A`` the order depends only on ``G``, so pass it for the
            "same records per step for any (m, W, A) at fixed G" guarantee.
        strata: one hashable per record (e.g. ``(src_lang, tgt_lang)``): direction-homogeneous micro-batches
            (module docstring, step 6); None = the mixed order.

    Returns:
        ``n_steps * A`` lists of ``m`` indices (``n_steps = steps_per_epoch(...)``); rank ``r``'s ``j``-th list is
        global micro-batch ``j W + r``.
    """
    global_batch = _global_batch(micro_batch_size, world_size, rank, grad_accum, n=len(lengths), drop_last=drop_last)
    if strata is None:
        order = epoch_order(
            lengths, global_batch, seed=seed, epoch=epoch, group_by_length=group_by_length, drop_last=drop_last
        )
    else:
        order = direction_order(
            lengths,
            strata,
            micro_batch_size,
            global_batch,
            seed=seed,
            epoch=epoch,
            group_by_length=group_by_length,
            drop_last=drop_last,
        )
        if not order:
            raise ValueError(
                f"direction-homogeneous batching leaves fewer whole micro-batches than one global batch of "
                f"{global_batch}; lower train.global_batch_size or use data.batching=mixed"
            )
    m = micro_batch_size
    return [order[k * m : (k + 1) * m] for k in range(rank, len(order) // m, world_size)]


def _global_batch(
    micro_batch_size: int, world_size: int, rank: int, grad_accum: int, *, n: int, drop_last: bool
) -> int:
    """``G = m * W * A`` after checking the arguments of :func:`micro_batches` for ``n`` records."""
    for name, value in (("micro_batch_size", micro_batch_size), ("world_size", world_size), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    global_batch = micro_batch_size * world_size * grad_accum
    if n == 0:
        raise ValueError("micro_batches got no records")
    if drop_last and n < global_batch:
        raise ValueError(
            f"{n} records are fewer than one global batch of {global_batch} (micro {micro_batch_size} x world "
            f"{world_size} x accumulation {grad_accum}); with drop_last there would be no step"
        )
    return global_batch


def steps_per_epoch(n: int, micro_batch_size: int, world_size: int, grad_accum: int, drop_last: bool = True) -> int:
    """Optimizer steps in one epoch of ``n`` records: ``floor`` (drop_last) or ``ceil`` of ``n / G``."""
    global_batch = micro_batch_size * world_size * grad_accum
    return n // global_batch if drop_last else -(-n // global_batch)
