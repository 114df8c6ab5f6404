"""Negatives across ranks: 2 CPU processes (gloo, ``deepspeed`` launcher) against one process holding every record.

* The gather (:func:`alignx.dist.all_gather_rows`) returns every rank's rows in rank order, with unequal and zero row
  counts, and its backward hands each owner the SUM of all ranks' gradients for its rows (checked against the
  analytic gradient: an averaging or slicing backward is off by the world size and fails).
* ``objective.negatives = "global"``: 2 ranks x micro 3 (one record of rank 0 dropped by the filter, so the ranks
  hold 2 and 3 rows) give the loss terms and the gradient of every parameter of ONE process running the 6 records as
  one micro-batch with the reference objective (``negatives = "local"``), within 1e-5 in fp32, at ZeRO 0, 1, 2 and 3;
  also packed and symmetric, and with every record of one rank dropped.
* ``"global+queue"``: over 3 steps the candidate count is ``min(capacity, k * global batch) + global batch``, both
  ranks hold the same queue, and losses, gradients and queue contents match one process step for step.

Run as a script (``deepspeed ... tests/test_dist_negatives.py --out F``) this file is the 2-rank worker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import MICRO, collate, make_cfg, make_model, make_records, one_process_group, run_deepspeed

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
STAGES = (0, 1, 2, 3)
QUEUE_SIZE, QUEUE_STEPS = 8, 3
TOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Records of the runs (make_records, make_cfg, make_model and collate are in helpers.py)


def global_records() -> list[dict]:
    """Rank 0 gets records 0..2 (record 1 dropped: 2 rows), rank 1 records 3..5 (3 rows)."""
    return make_records(2 * MICRO, seed=11, dropped=(1,))


def empty_rank0_records() -> list[dict]:
    """Every record of rank 0 is dropped: rank 0 has no anchor, and must still gather and back-propagate."""
    return make_records(2 * MICRO, seed=12, dropped=tuple(range(MICRO)))


def queue_records(step: int) -> list[dict]:
    return make_records(2 * MICRO, seed=100 + step)


TERM_KEYS = ("loss", "ntp", "ctr", "lam")


# ----------------------------------------------------------------------------------------------------------------
# The 2-rank worker


def _gather_checks() -> dict:
    """``all_gather_rows`` on unequal (2, 3) and one-sided empty (0, 3) row counts: values and summed gradients."""
    from alignx.dist import all_gather_rows, gather_sizes, rank_and_world

    rank, world = rank_and_world()
    out = {}
    for case, counts in (("unequal", (2, 3)), ("empty_rank0", (0, 3))):
        xs = [torch.randn(n, 4, generator=torch.Generator().manual_seed(10 + r)) for r, n in enumerate(counts)]
        ws = [torch.randn(sum(counts), 4, generator=torch.Generator().manual_seed(20 + r)) for r in range(world)]
        x = xs[rank].clone().requires_grad_(True)
        sizes = gather_sizes([x.shape[0]])
        gathered = all_gather_rows(x, sizes)
        (ws[rank] * gathered).sum().backward()
        offset = sum(counts[:rank])
        out[case] = {
            "gathered": gathered.detach(),
            "expected": torch.cat(xs),
            "grad": x.grad.clone(),
            "summed": sum(w[offset : offset + counts[rank]] for w in ws),  # every rank's gradient for my rows
            "offset": sizes.offset,
            "expected_offset": offset,
        }
    return out


def _one_step(engine, batch: dict) -> dict:
    out = engine(batch)
    engine.backward(out["loss"])
    grads = engine.full_gradients()
    engine.step()
    return {"terms": {k: float(out[k].detach()) for k in TERM_KEYS}, "grads": grads}


def _engine_global(stage: int, records: list[dict], **over) -> dict:
    import torch.distributed as dist

    from alignx.engine import Engine

    rank = dist.get_rank()
    cfg = make_cfg(**{"objective.negatives": "global", "engine.zero_stage": stage, **over})
    engine = Engine(make_model(cfg), cfg, total_steps=1)
    rows = records[rank * MICRO : (rank + 1) * MICRO]
    result = _one_step(engine, collate(rows, packed=cfg.data.packing))
    engine.destroy()
    return result


def _engine_queue(stage: int) -> dict:
    import torch.distributed as dist

    from alignx.engine import Engine

    rank = dist.get_rank()
    cfg = make_cfg(
        **{
            "objective.negatives": "global+queue",
            "objective.queue_size": QUEUE_SIZE,
            "objective.symmetric": True,
            "engine.zero_stage": stage,
        }
    )
    engine = Engine(make_model(cfg), cfg, total_steps=QUEUE_STEPS)
    model = engine.module
    steps = []
    for k in range(QUEUE_STEPS):
        rows = queue_records(k)[rank * MICRO : (rank + 1) * MICRO]
        step = _one_step(engine, collate(rows))
        step["candidates"] = model.objective.last_candidates
        model.end_step(k + 1)
        queues = {name: (q.rows(), q.langs(), q.steps()) for name, q in model.objective.queues.items()}
        both = [None, None]
        dist.all_gather_object(both, queues)
        step["queues"] = queues
        step["queues_identical_on_ranks"] = all(
            all(torch.equal(a, b) for a, b in zip(both[0][name], both[1][name])) for name in queues
        )
        steps.append(step)
    engine.destroy()
    return {"steps": steps}


def _worker(argv: list[str]) -> None:
    import torch.distributed as dist
    from helpers import worker_setup

    from alignx.engine import shutdown_distributed

    args, info = worker_setup(argv)
    assert info.world_size == 2, info
    results = {"gather": _gather_checks()}
    for stage in STAGES:
        results[f"global_zero{stage}"] = _engine_global(stage, global_records())
    packed_symmetric = {"data.packing": True, "objective.symmetric": True}
    results["global_packed_symmetric"] = _engine_global(0, global_records(), **packed_symmetric)
    results["global_empty_rank0_zero3"] = _engine_global(3, empty_rank0_records())
    results["queue"] = _engine_queue(3)
    per_rank = [None, None]
    dist.all_gather_object(per_rank, results)
    if dist.get_rank() == 0:
        torch.save(per_rank, args.out)
    shutdown_distributed()


# ----------------------------------------------------------------------------------------------------------------
# The tests (in the pytest process)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One 2-process launch for the whole module; per-rank results."""
    out = tmp_path_factory.mktemp("dist_negatives") / "two_ranks.pt"
    proc = run_deepspeed(Path(__file__), ["--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process():
    """This process as rank 0 of 1 (the reference runs; ``negatives = global`` needs a process group)."""
    with one_process_group():
        yield


def reference_step(model, rows: list[dict], packed: bool = False) -> dict:
    """Plain autograd (no DeepSpeed) on all rows as one micro-batch: terms and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    out = model(**collate(rows, packed))
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"terms": {k: float(out[k].detach()) for k in TERM_KEYS}, "grads": grads}


def assert_same_step(got: dict, want: dict, what: str) -> None:
    for k in TERM_KEYS:
        assert got["terms"][k] == pytest.approx(want["terms"][k], abs=TOL, rel=0), (what, k)
    assert set(got["grads"]) == set(want["grads"]), what
    for name, ref in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], ref, atol=TOL, rtol=0, msg=f"{what}: {name}")


def test_gather_returns_rank_order_and_sums_gradients_to_owners(two_ranks: list[dict]) -> None:
    for rank, res in enumerate(two_ranks):
        for case, r in res["gather"].items():
            torch.testing.assert_close(r["gathered"], r["expected"], atol=0, rtol=0, msg=f"rank {rank} {case}")
            assert r["offset"] == r["expected_offset"], (rank, case)
            # The owner gets the SUM over ranks (not the mean, not only its own rank's part).
            torch.testing.assert_close(r["grad"], r["summed"], atol=1e-6, rtol=1e-6, msg=f"rank {rank} {case}")
    own_part_only = two_ranks[1]["gather"]["unequal"]
    assert not torch.allclose(own_part_only["grad"], own_part_only["summed"] / 2)


def test_two_ranks_global_negatives_equal_one_process(two_ranks: list[dict], one_process: None) -> None:
    ref_cfg = make_cfg(**{"objective.negatives": "local"})
    want = reference_step(make_model(ref_cfg), global_records())
    assert want["terms"]["ctr"] > 0 and want["terms"]["lam"] > 0
    for stage in STAGES:
        for rank, res in enumerate(two_ranks):
            got = res[f"global_zero{stage}"]
            # Every rank holds the averaged (= global) gradient; the terms are means over ranks.
            mean_terms = {k: sum(r[f"global_zero{stage}"]["terms"][k] for r in two_ranks) / 2 for k in TERM_KEYS}
            assert_same_step({"terms": mean_terms, "grads": got["grads"]}, want, f"ZeRO-{stage} rank {rank}")
    # Negative control: the local-negatives objective of one rank's micro-batch is a different objective.
    local = reference_step(make_model(ref_cfg), global_records()[MICRO:])
    assert abs(local["terms"]["ctr"] - want["terms"]["ctr"]) > 1e-3


def test_a_rank_without_rows_still_matches_one_process(two_ranks: list[dict], one_process: None) -> None:
    """All of rank 0's records are dropped (ZeRO-3): it gathers, back-propagates and runs the head like rank 1."""
    want = reference_step(make_model(make_cfg(**{"objective.negatives": "local"})), empty_rank0_records())
    key = "global_empty_rank0_zero3"
    mean_terms = {k: sum(r[key]["terms"][k] for r in two_ranks) / 2 for k in TERM_KEYS}
    assert two_ranks[0][key]["terms"]["ctr"] == 0.0 and want["terms"]["ctr"] > 0
    for rank, res in enumerate(two_ranks):
        assert_same_step({"terms": mean_terms, "grads": res[key]["grads"]}, want, f"empty rank 0, rank {rank}")


def test_two_ranks_global_packed_symmetric_equal_one_process(two_ranks: list[dict], one_process: None) -> None:
    ref_cfg = make_cfg(**{"objective.negatives": "local", "objective.symmetric": True})
    want = reference_step(make_model(ref_cfg), global_records())
    mean_terms = {k: sum(r["global_packed_symmetric"]["terms"][k] for r in two_ranks) / 2 for k in TERM_KEYS}
    for rank, res in enumerate(two_ranks):
        got = {"terms": mean_terms, "grads": res["global_packed_symmetric"]["grads"]}
        assert_same_step(got, want, f"packed symmetric rank {rank}")


def test_two_ranks_queue_equal_one_process(two_ranks: list[dict], one_process: None) -> None:
    cfg = make_cfg(
        **{"objective.negatives": "global+queue", "objective.queue_size": QUEUE_SIZE, "objective.symmetric": True}
    )
    model = make_model(cfg)
    global_batch = 2 * MICRO
    for k in range(QUEUE_STEPS):
        want = reference_step(model, queue_records(k))
        candidates = model.objective.last_candidates
        model.end_step(k + 1)
        assert candidates == min(QUEUE_SIZE, k * global_batch) + global_batch
        for rank, res in enumerate(two_ranks):
            step = res["queue"]["steps"][k]
            assert step["candidates"] == candidates, (k, rank)
            assert step["queues_identical_on_ranks"], k
            mean_terms = {kk: sum(r["queue"]["steps"][k]["terms"][kk] for r in two_ranks) / 2 for kk in TERM_KEYS}
            assert_same_step({"terms": mean_terms, "grads": step["grads"]}, want, f"queue step {k + 1} rank {rank}")
            for name, q in model.objective.queues.items():
                rows, langs, steps = step["queues"][name]
                torch.testing.assert_close(rows, q.rows(), atol=TOL, rtol=0, msg=f"{name} queue step {k + 1}")
                assert torch.equal(langs, q.langs()) and torch.equal(steps, q.steps())
    assert model.objective.queue.size == QUEUE_SIZE  # wrapped around: 3 x 6 rows through 8 slots


def test_one_process_global_is_local(one_process: None) -> None:
    """World size 1: the global objective is the reference one, to the last bit of every term and gradient."""
    rows = make_records(5, seed=3, dropped=(2,))
    local = reference_step(make_model(make_cfg()), rows)
    for packed in (False, True):
        glob = reference_step(make_model(make_cfg(**{"objective.negatives": "global"})), rows, packed)
        assert_same_step(glob, local, f"global packed={packed}")
    centred = {"objective.center": "batch"}
    local_c = reference_step(make_model(make_cfg(**centred)), rows)
    glob_c = reference_step(make_model(make_cfg(**centred, **{"objective.negatives": "global"})), rows)
    assert_same_step(glob_c, local_c, "global centred")
    assert abs(local_c["terms"]["ctr"] - local["terms"]["ctr"]) > 1e-4  # centring changes the term


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(sys.argv[1:])
