"""Collation (padding sides, multiples, ignore values) and the micro-batch order (determinism, ranks, coverage)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from alignx.data import Collator, epoch_order, micro_batches, steps_per_epoch
from alignx.testing import test_tokenizer


def _rows(lengths: list[int]) -> list[dict]:
    rows = []
    for b, n in enumerate(lengths):
        ids = [10 + b * 100 + i for i in range(n)]
        spans = [0] + [1] * ((n - 1) // 2) + [2] * (n - 1 - (n - 1) // 2)
        rows.append({"input_ids": ids, "labels": [i + 1 for i in ids], "span_ids": spans, "src_lang": b, "tgt_lang": 7})
    return rows


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("multiple", [1, 8])
def test_collator_pads_every_tensor(side: str, multiple: int) -> None:
    tok = test_tokenizer()
    lengths = [3, 9, 6]
    rows = _rows(lengths)
    batch = Collator(tok, padding_side=side, pad_to_multiple_of=multiple, return_position_ids=True)(rows)
    T = 9 if multiple == 1 else 16
    for key in ("input_ids", "attention_mask", "labels", "span_ids", "position_ids"):
        assert batch[key].shape == (3, T) and batch[key].dtype == torch.long
    assert batch["src_lang"].tolist() == [0, 1, 2] and batch["tgt_lang"].tolist() == [7, 7, 7]
    for b, (row, n) in enumerate(zip(rows, lengths)):
        real = slice(T - n, T) if side == "left" else slice(0, n)
        pad = torch.ones(T, dtype=torch.bool)
        pad[real] = False
        assert batch["input_ids"][b, real].tolist() == row["input_ids"]
        assert batch["labels"][b, real].tolist() == row["labels"]
        assert batch["span_ids"][b, real].tolist() == row["span_ids"]
        assert batch["position_ids"][b, real].tolist() == list(range(n))
        assert (batch["attention_mask"][b] == (~pad).long()).all()
        assert (batch["input_ids"][b, pad] == tok.pad_token_id).all()
        assert (batch["labels"][b, pad] == -100).all()
        assert (batch["span_ids"][b, pad] == 0).all()
    if side == "left":  # the last column is every row's last real token (the official filter relies on it)
        assert batch["input_ids"][:, -1].tolist() == [r["input_ids"][-1] for r in rows]
    assert "position_ids" not in Collator(tok)(rows)


def test_collator_errors_and_pad_fallback() -> None:
    tok = test_tokenizer()
    with pytest.raises(ValueError, match="padding_side"):
        Collator(tok, padding_side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        Collator(tok, pad_to_multiple_of=0)
    rows = _rows([4])
    rows[0]["span_ids"] = rows[0]["span_ids"][:-1]
    with pytest.raises(ValueError, match=r"row 0: len\(span_ids\)=3 != len\(input_ids\)=4"):
        Collator(tok)(rows)
    with pytest.raises(ValueError, match="empty list"):
        Collator(tok)([])
    tok.pad_token = None
    assert Collator(tok).pad_token_id == tok.eos_token_id


# ----------------------------------------------------------------------------------------------------------------
# Sampler


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(20, 500) for _ in range(n)]


def _kwargs(**kw) -> dict:
    base = {"world_size": 1, "rank": 0, "seed": 42, "epoch": 0, "group_by_length": True}
    return {**base, **kw}


def test_order_is_hugging_face_length_grouping_with_a_seeded_generator() -> None:
    lengths = _lengths(1000)
    for G in (16, 128):
        ours = epoch_order(lengths, G, seed=42, epoch=3, group_by_length=True, drop_last=False)[: len(lengths)]
        hf = get_length_grouped_indices(lengths, G, generator=torch.Generator().manual_seed(45))
        assert ours == hf
    assert (
        epoch_order(lengths, 16, seed=42, epoch=0, group_by_length=False, drop_last=True)
        == torch.randperm(1000, generator=torch.Generator().manual_seed(42)).tolist()[:992]
    )


def test_deterministic_and_epoch_dependent() -> None:
    lengths = _lengths(300)
    a = micro_batches(lengths, 4, **_kwargs(world_size=2, rank=1))
    assert a == micro_batches(lengths, 4, **_kwargs(world_size=2, rank=1))
    assert a != micro_batches(lengths, 4, **_kwargs(world_size=2, rank=1, epoch=1))
    assert a != micro_batches(lengths, 4, **_kwargs(world_size=2, rank=1, seed=7))


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize(("m", "world", "accum"), [(4, 1, 1), (4, 2, 1), (3, 3, 2), (2, 2, 4)])
def test_ranks_disjoint_and_cover_each_record_once(group_by_length: bool, m: int, world: int, accum: int) -> None:
    n = 203
    G = m * world * accum
    lengths = _lengths(n)
    per_rank = [
        micro_batches(
            lengths, m, **_kwargs(world_size=world, rank=r, grad_accum=accum, group_by_length=group_by_length)
        )
        for r in range(world)
    ]
    steps = steps_per_epoch(n, m, world, accum)
    assert all(len(batches) == steps * accum for batches in per_rank)  # same count on every rank
    assert all(len(b) == m for batches in per_rank for b in batches)
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    # drop_last: each record at most once, exactly floor(n / G) * G of them, the rest (n mod G) left out.
    assert max(seen.values()) == 1 and len(seen) == steps * G == n - n % G
    # drop_last=False: every record at least once, the last step padded cyclically (n mod G > 0 here).
    padded = [
        micro_batches(
            lengths,
            m,
            **_kwargs(world_size=world, rank=r, grad_accum=accum, group_by_length=group_by_length),
            drop_last=False,
        )
        for r in range(world)
    ]
    seen = Counter(i for batches in padded for b in batches for i in b)
    assert set(seen) == set(range(n)) and sum(seen.values()) == steps_per_epoch(n, m, world, accum, False) * G
    assert sum(c - 1 for c in seen.values()) == (-n) % G


def _step_sets(lengths: list[int], m: int, world: int, accum: int, epoch: int = 0) -> list[set[int]]:
    """Records consumed by each optimizer step over all ranks (rank r's micro j belongs to step j // accum)."""
    per_rank = [
        micro_batches(lengths, m, **_kwargs(world_size=world, rank=r, grad_accum=accum, epoch=epoch))
        for r in range(world)
    ]
    n_steps = len(per_rank[0]) // accum
    return [
        {i for batches in per_rank for b in batches[g * accum : (g + 1) * accum] for i in b} for g in range(n_steps)
    ]


def test_one_process_with_global_micro_batch_sees_the_same_records_per_step() -> None:
    lengths = _lengths(250)
    reference = _step_sets(lengths, 16, 1, 1, epoch=1)  # one process, micro = global batch 16
    for m, world, accum in [(8, 2, 1), (4, 2, 2), (2, 4, 2), (1, 8, 2), (4, 1, 4)]:
        assert _step_sets(lengths, m, world, accum, epoch=1) == reference, (m, world, accum)
    # Interleaving: rank r's j-th micro-batch is global micro-batch j * W + r.
    order = epoch_order(lengths, 16, seed=42, epoch=1, group_by_length=True, drop_last=True)
    for r in range(2):
        mine = micro_batches(lengths, 4, **_kwargs(world_size=2, rank=r, grad_accum=2, epoch=1))
        assert mine == [order[k * 4 : (k + 1) * 4] for k in range(r, len(order) // 4, 2)]


def test_length_grouping_puts_similar_lengths_together_and_the_longest_first() -> None:
    lengths = _lengths(2000, seed=1)

    def spread(group_by_length: bool) -> float:
        batches = micro_batches(lengths, 8, **_kwargs(group_by_length=group_by_length))
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert spread(True) < 0.1 * spread(False)
    first = micro_batches(lengths, 8, **_kwargs(world_size=2, rank=0, grad_accum=2))[0]
    assert max(lengths) in [lengths[i] for i in first]


def test_resume_is_a_suffix_and_errors_are_clear() -> None:
    lengths = _lengths(100)
    full = micro_batches(lengths, 4, **_kwargs(world_size=2, rank=0, grad_accum=2))
    # A resumed process has a different global RNG state; the order must not depend on it.
    torch.manual_seed(1234)
    torch.rand(7)
    random.seed(99)
    steps_done = 3
    resumed = micro_batches(lengths, 4, **_kwargs(world_size=2, rank=0, grad_accum=2))[steps_done * 2 :]
    assert resumed == full[6:] and len(resumed) == len(full) - 6
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        micro_batches(lengths, 4, **_kwargs(world_size=2, rank=2))
    with pytest.raises(ValueError, match="fewer than one global batch of 128"):
        micro_batches(lengths, 16, **_kwargs(world_size=2, grad_accum=4))
    assert len(micro_batches(lengths, 16, **_kwargs(world_size=2, grad_accum=4), drop_last=False)) == 4
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int"):
        micro_batches(lengths, 0, **_kwargs())


def test_collator_accepts_a_columnar_batch() -> None:
    """``dataset[indices]`` gives columns; the result equals collating the rows one by one."""
    tok = test_tokenizer()
    rows = _rows([3, 11, 5])
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    by_rows, by_columns = Collator(tok)(rows), Collator(tok)(columns)
    assert by_rows.keys() == by_columns.keys()
    assert all(torch.equal(by_rows[k], by_columns[k]) for k in by_rows)


# ----------------------------------------------------------------------------------------------------------------
# Direction-homogeneous micro-batches (data.batching = direction)


def _directions(n: int) -> list[tuple[int, int]]:
    """Four directions of unequal sizes (en->sw, sw->en, en->hi, hi->en as ids)."""
    dirs = [(0, 1), (1, 0), (0, 2), (2, 0)]
    return [dirs[i % 4] if i % 7 else dirs[0] for i in range(n)]


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize(("m", "world", "accum"), [(4, 1, 1), (3, 2, 2), (2, 2, 1)])
def test_direction_batches_hold_one_direction_and_ranks_stay_disjoint(group_by_length, m, world, accum) -> None:
    n = 97
    lengths = [(i * 37) % 50 + 1 for i in range(n)]
    strata = _directions(n)
    seen: list[int] = []
    per_rank = []
    for rank in range(world):
        kw = dict(world_size=world, rank=rank, seed=3, epoch=1, group_by_length=group_by_length, grad_accum=accum)
        batches = micro_batches(lengths, m, strata=strata, **kw)
        assert batches == micro_batches(lengths, m, strata=strata, **kw)  # a pure function: resume = suffix
        per_rank.append(len(batches))
        for b in batches:
            assert len(b) == m and len({strata[i] for i in b}) == 1, [strata[i] for i in b]
            seen += b
    assert len(seen) == len(set(seen))  # every record at most once per epoch
    assert len(set(per_rank)) == 1  # every rank runs the same number of micro-batches
    counts = {d: strata.count(d) for d in set(strata)}
    whole = sum(c // m for c in counts.values())
    assert len(seen) == (whole // (world * accum)) * world * accum * m
    other = micro_batches(lengths, m, strata=strata, world_size=world, rank=0, seed=3, epoch=2,
                          group_by_length=group_by_length, grad_accum=accum)  # fmt: skip
    assert other != micro_batches(lengths, m, strata=strata, world_size=world, rank=0, seed=3, epoch=1,
                                  group_by_length=group_by_length, grad_accum=accum)  # fmt: skip


def test_direction_batches_mix_directions_across_steps_and_put_the_longest_first() -> None:
    n = 64
    lengths = list(range(1, n + 1))
    strata = _directions(n)
    batches = micro_batches(lengths, 4, strata=strata, world_size=1, rank=0, seed=0, epoch=0, group_by_length=True)
    assert max(lengths[i] for i in batches[0]) == n
    assert len({strata[b[0]] for b in batches}) == 4
    with pytest.raises(ValueError, match="no direction has 40 records"):
        micro_batches(lengths, 40, strata=strata, world_size=1, rank=0, seed=0, epoch=0, group_by_length=True)
    with pytest.raises(ValueError, match="strata has 3 entries"):
        micro_batches(lengths, 4, strata=strata[:3], world_size=1, rank=0, seed=0, epoch=0, group_by_length=True)
