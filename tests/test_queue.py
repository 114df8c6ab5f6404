"""The negatives queue (:class:`alignx.dist.NegativeQueue`) and ``objective.negatives = "global+queue"``.

* FIFO semantics: capacity, wrap-around, more rows than capacity in one commit, languages and steps kept per row,
  storage in the training dtype, and the ``[live; queue]`` candidate view that copies nothing.
* After k steps the candidate count is ``min(capacity, k * global batch) + global batch`` (also with dropped rows);
  queued rows receive no gradient and the live rows get exactly the gradient of the dense reference with a detached
  queue; staged rows enter only at the end of the step and evaluation (no grad) stages nothing.
* Checkpoints: ``state_dict`` round-trips bit for bit; the trainer saves the queue with every checkpoint and a run
  resumed from step 2 ends step 4 with the uninterrupted run's queue (rows, languages, steps, slots) and losses.
* ``benchmarks/bench_queue.py --tiny`` runs end to end and within its memory bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignx.dist import NegativeQueue


@pytest.fixture(scope="module")
def one_process():
    from helpers import one_process_group

    with one_process_group():
        yield


def _rows(n: int, start: int, d: int = 3) -> torch.Tensor:
    """Row i holds the value ``start + i`` everywhere: the FIFO order is readable from the values."""
    return (start + torch.arange(n, dtype=torch.float32)).unsqueeze(1).expand(n, d).clone()


# ----------------------------------------------------------------------------------------------------------------
# The queue itself


def test_fifo_wraps_and_keeps_languages_and_steps() -> None:
    q = NegativeQueue(5)
    assert q.size == 0 and q.rows().numel() == 0
    q.stage(_rows(2, 0), torch.tensor([7, 8]))
    q.stage(_rows(1, 2), torch.tensor([9]))
    assert q.size == 0 and q.pending_rows == 3  # staged rows wait for the end of the step
    assert q.commit(step=1) == 3 and q.pending_rows == 0
    assert q.rows()[:, 0].tolist() == [0, 1, 2] and q.langs().tolist() == [7, 8, 9] and q.steps().tolist() == [1] * 3
    q.stage(_rows(4, 3), torch.arange(4))
    q.commit(step=2)  # 7 rows through 5 slots: the 2 oldest are gone
    assert q.size == 5 and q.enqueued == 7
    assert q.rows()[:, 0].tolist() == [2, 3, 4, 5, 6]
    assert q.langs().tolist() == [9, 0, 1, 2, 3] and q.steps().tolist() == [1, 2, 2, 2, 2]
    q.stage(_rows(12, 100), torch.arange(12))
    q.commit(step=3)  # more than the capacity at once: only the newest 5 survive, still oldest first
    assert q.rows()[:, 0].tolist() == [107, 108, 109, 110, 111] and q.enqueued == 19


def test_candidate_view_copies_nothing_and_only_live_rows_get_gradients() -> None:
    torch.manual_seed(0)
    q = NegativeQueue(6)
    q.ensure(4, torch.float32, torch.device("cpu"))
    q.stage(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    q.commit()
    live = torch.randn(3, 4, requires_grad=True)
    anchors = torch.randn(3, 4, requires_grad=True)
    cand = q.candidates(live)
    assert cand.shape == (7, 4)
    assert cand.data_ptr() == q._buf[q.head - 3].data_ptr()  # a view of the queue's buffer
    assert not q._buf.requires_grad
    (3.0 * F.cross_entropy(F.normalize(anchors) @ F.normalize(cand).t() / 0.1, torch.arange(3))).backward()

    ref_live = live.detach().clone().requires_grad_(True)
    ref_anchors = anchors.detach().clone().requires_grad_(True)
    queued = q.rows().requires_grad_(True)
    dense = torch.cat([ref_live, queued])
    (3.0 * F.cross_entropy(F.normalize(ref_anchors) @ F.normalize(dense).t() / 0.1, torch.arange(3))).backward()
    torch.testing.assert_close(live.grad, ref_live.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(anchors.grad, ref_anchors.grad, atol=1e-6, rtol=1e-6)
    assert queued.grad.abs().sum() > 0  # the queued rows DO influence the loss; their gradient is just not kept
    # Writing the buffer before this forward's backward would use other rows: autograd refuses.
    live2 = torch.randn(3, 4, requires_grad=True)
    loss = q.candidates(live2).pow(2).sum()
    q.stage(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    q.commit()
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()


def test_state_dict_round_trip_is_exact_in_the_training_dtype() -> None:
    torch.manual_seed(1)
    q = NegativeQueue(7, name="targets")
    q.ensure(5, torch.bfloat16, torch.device("cpu"))
    for step in range(3):
        q.stage(torch.randn(3, 5), torch.randint(0, 9, (3,)))
        q.commit(step)
    assert q.dtype == torch.bfloat16 and q.nbytes() >= 7 * 5 * 2
    state = q.state_dict()
    restored = NegativeQueue(7, name="targets")
    restored.load_state_dict(state)
    for attr in ("size", "ptr", "enqueued", "dtype"):
        assert getattr(restored, attr) == getattr(q, attr), attr
    assert torch.equal(restored.rows(), q.rows()) and torch.equal(restored.langs(), q.langs())
    live = torch.randn(2, 5)
    assert torch.equal(restored.candidates(live), q.candidates(live))  # same slots, same order
    with pytest.raises(ValueError, match="queue_size"):
        NegativeQueue(8).load_state_dict(state)
    q.stage(torch.randn(1, 5), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="commit"):
        q.state_dict()


# ----------------------------------------------------------------------------------------------------------------
# The queue inside the objective


def test_candidate_count_after_k_steps_and_no_gradient_for_the_queue(one_process: None) -> None:
    from helpers import collate, make_cfg, make_model, make_records

    capacity, steps = 10, 4
    cfg = make_cfg(**{"objective.negatives": "global+queue", "objective.queue_size": capacity})
    model = make_model(cfg)
    queue = model.objective.queue
    kept_so_far = 0
    for k in range(steps):
        dropped = (1,) if k == 2 else ()  # a filtered record: only kept rows become candidates
        rows = make_records(4, seed=50 + k, dropped=dropped)
        kept = 4 - len(dropped)
        model.zero_grad(set_to_none=True)
        out = model(**collate(rows))
        out["loss"].backward()
        assert model.objective.last_candidates == min(capacity, kept_so_far) + kept, k
        assert queue.size == min(capacity, kept_so_far) and queue.pending_rows == kept  # enters after the step
        assert not queue._buf.requires_grad and queue._buf.grad is None
        model.end_step(k + 1)
        kept_so_far += kept
        assert queue.size == min(capacity, kept_so_far) and queue.steps()[-1] == k + 1
    # Evaluation (no grad) uses the queue and stages nothing.
    with torch.no_grad():
        model(**collate(make_records(4, seed=99)))
    assert queue.pending_rows == 0 and model.objective.last_candidates == capacity + 4


def test_queue_gradient_equals_dense_reference_with_detached_queue(one_process: None) -> None:
    """The objective's contrastive term with a queue = InfoNCE over [gathered; queue.detach()] written densely."""
    from helpers import collate, make_cfg, make_model, make_records

    cfg = make_cfg(**{"objective.negatives": "global+queue", "objective.queue_size": 6})
    model = make_model(cfg)
    obj = model.objective
    model(**collate(make_records(4, seed=1)))["loss"].backward()
    model.end_step(1)
    torch.manual_seed(0)
    h_src, h_tgt = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    from alignx.dist import gather_sizes

    sizes = gather_sizes([4, 0])
    langs = torch.zeros(4, 2, dtype=torch.long)
    got = obj._global_contrastive(h_src, h_tgt, h_src, h_tgt, langs, sizes, torch.float32)
    got.backward()
    queued = obj.queue.rows()
    ref_src, ref_tgt = h_src.detach().clone().requires_grad_(), h_tgt.detach().clone().requires_grad_()
    logits = F.normalize(ref_src) @ F.normalize(torch.cat([ref_tgt, queued])).t() / cfg.objective.temperature
    want = cfg.objective.ctr_scale * F.cross_entropy(logits, torch.arange(4))
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h_src.grad, ref_src.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h_tgt.grad, ref_tgt.grad, atol=1e-6, rtol=1e-5)
    assert obj.queue.size == 4 and obj.last_candidates == 8


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints through the trainer


def _run(base: Path, out: Path, *extra: str):
    from helpers import TINY, shared_data

    from alignx.config import load_config
    from alignx.trainer import Trainer

    pairs, _ = shared_data(base)
    cfg = load_config(
        TINY,
        [
            f"--data.train_file={pairs}",
            f"--train.output_dir={out}",
            f"--data.cache_dir={base / 'data_cache'}",
            "--objective.negatives=global+queue",
            "--objective.queue_size=10",
            "--data.packing=true",
            "--train.max_steps=4",
            "--train.save_every=2",
            "--train.eval_every=0",
            "--train.keep_checkpoints=3",
            "--train.tensorboard=false",
            *extra,
        ],
    )
    return Trainer(cfg, stage=1).run()


def _queue_file(run: Path, step: int) -> dict:
    saved = torch.load(run / "stage1" / "checkpoints" / f"step_{step}" / "negatives_queue.pt", weights_only=True)
    assert set(saved) == {"targets"}  # not symmetric: no source queue
    return saved["targets"]


def test_resume_restores_the_queue_exactly(tmp_path_factory: pytest.TempPathFactory) -> None:
    from helpers import by_step, process_group_scope

    base = tmp_path_factory.getbasetemp()
    full, resumed = tmp_path_factory.mktemp("queue_full"), tmp_path_factory.mktemp("queue_resumed")
    with process_group_scope():
        _run(base, full)
    with process_group_scope():
        step2 = full / "stage1" / "checkpoints" / "step_2"
        _run(base, resumed, f"--train.resume={step2}")

    want, got = _queue_file(full, 4), _queue_file(resumed, 4)
    assert want["size"] == 10 and want["enqueued"] == 16  # 4 steps x global batch 4 through 10 slots
    for key in ("size", "ptr", "enqueued", "capacity", "dtype"):
        assert got[key] == want[key], key
    for key in ("rows", "langs", "steps"):
        assert torch.equal(got[key], want[key]), key  # bit for bit, slot for slot
    # The step-2 queue was really used: it differs from what steps 3-4 alone would leave.
    assert set(_queue_file(full, 2)["steps"].tolist()) == {1, 2} and 2 in want["steps"].tolist()

    a, b = by_step(full / "stage1" / "metrics.jsonl"), by_step(resumed / "stage1" / "metrics.jsonl")
    for step in (3, 4):
        for key in ("train/loss", "train/ctr", "train/lam", "train/ntp", "train/candidates"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6, rel=1e-6), (step, key)
    assert [a[s]["train/candidates"] for s in (1, 2, 3, 4)] == [2, 6, 10, 12]  # min(10, 4 (k - 1)) + micro 2
    # Packed layout: no padding is processed; the padded layout of the same micro-batches would have some.
    assert all(a[s]["train/padding_fraction"] == 0.0 for s in (1, 2, 3, 4))
    summary = json.loads((full / "stage1" / "summary.json").read_text())
    assert summary["steps"] == 4


def test_bench_queue_smoke() -> None:
    """``benchmarks/bench_queue.py --tiny`` runs end to end (timing here, memory in its child) within its bound."""
    import subprocess
    import sys

    from helpers import REPO, clean_env

    cmd = [sys.executable, "-m", "benchmarks.bench_queue", "--tiny", "--no-csv", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "of the step" in proc.stdout
