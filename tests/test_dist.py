"""Two CPU processes started by the ``deepspeed`` launcher (gloo) against one process on the same global batch.

With reference micro-batch negatives the objective of a step is the mean over its micro-batches, so 2 ranks x
micro m x accumulation 1 must equal 1 rank x micro m x accumulation 2 (the interleaved order gives both the same
micro-batches; see "Distributed semantics" in ``alignx/trainer.py``). Checked at two levels:

* engine: ZeRO 0-3 on 2 ranks give the 1-process losses, gradient norms and weights, and at ZeRO >= 1 each rank's
  AdamW state holds half of the elements;
* trainer: ``deepspeed --num_gpus 2 train.py --stage all`` trains, checkpoints (one shard and one RNG state per
  rank) and exports, and matches the 1-process run of ``tests/test_trainer.py`` step for step.

Run as a script (``deepspeed ... tests/test_dist.py --out F``) this file is the engine worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    TOTAL_STEPS,
    TinyWithHead,
    batches,
    by_step,
    clean_env,
    free_port,
    load_weights,
    process_group_scope,
    reference_run,
    run_deepspeed,
    tiny_args,
)
from helpers import engine_cfg as make_cfg

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = 5


@pytest.fixture(scope="module", autouse=True)
def _own_process_group():
    with process_group_scope():
        yield


# ----------------------------------------------------------------------------------------------------------------
# Engine level


def _engine_run(stage: int) -> dict:
    """5 steps of the test_engine model at ``stage`` on this process's share of global micro-batches 2s, 2s+1."""
    import torch.distributed as dist

    from alignx.engine import Engine

    world, rank = dist.get_world_size(), dist.get_rank()
    data = batches(2 * STEPS, micro=4)
    engine = Engine(TinyWithHead(seed=0), make_cfg(stage), total_steps=STEPS)
    losses, norms = [], []
    for step in range(STEPS):
        local = 0.0
        for a in range(engine.grad_accum):
            out = engine(data[(step * engine.grad_accum + a) * world + rank])
            engine.backward(out["loss"])
            engine.step()
            local += out["loss"].item() / engine.grad_accum
        mean = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        norms.append(engine.grad_norm)
    numel = [None] * world
    dist.all_gather_object(numel, engine.optimizer_state_numel())
    weights = engine._gathered_lm_state(engine.module.lm)
    result = {"losses": losses, "norms": norms, "numel": numel, "params": engine.num_parameters()}
    engine.destroy()
    return result | {"weights": weights}


def _worker(argv: list[str]) -> None:
    import torch.distributed as dist
    from helpers import worker_setup

    from alignx.engine import shutdown_distributed

    args, info = worker_setup(argv)
    assert info.world_size == 2, info
    results = {stage: _engine_run(stage) for stage in (0, 1, 2, 3)}
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    shutdown_distributed()


def test_two_ranks_engine_matches_one_process_at_every_zero_stage(tmp_path: Path) -> None:
    from alignx.config import Config
    from alignx.engine import init_distributed

    out = tmp_path / "two_ranks.pt"
    proc = run_deepspeed(Path(__file__), ["--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    two = torch.load(out, weights_only=False)

    init_distributed(Config())  # this process: rank 0 of 1, accumulation 2 over the same micro-batches
    for stage in (0, 1, 2, 3):
        one = _engine_run(stage)
        assert len(one["numel"]) == 1
        got = two[stage]
        torch.testing.assert_close(got["losses"], one["losses"], atol=1e-5, rtol=0, msg=f"ZeRO-{stage} losses")
        torch.testing.assert_close(got["norms"], one["norms"], atol=0, rtol=1e-5, msg=f"ZeRO-{stage} norms")
        for key, ref in one["weights"].items():
            torch.testing.assert_close(got["weights"][key], ref, atol=1e-5, rtol=0, msg=f"ZeRO-{stage} {key}")
        full = 2 * one["params"]
        if stage == 0:
            assert got["numel"] == [full, full]  # replicated
        else:
            for n in got["numel"]:  # partitioned: each rank holds half, up to padding of the flat buffers
                assert full / 2 <= n <= full / 2 + 64, (stage, got["numel"], full)
    assert two[0]["losses"][-1] < two[0]["losses"][0]


# ----------------------------------------------------------------------------------------------------------------
# Trainer level


def test_deepspeed_launcher_two_processes_match_one(tmp_path_factory: pytest.TempPathFactory) -> None:

    base = tmp_path_factory.getbasetemp()
    reference = reference_run(base)
    out = base / "two_processes"
    proc = run_deepspeed(REPO / "train.py", tiny_args(base, out, "--stage", "all"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for stage in (1, 2):
        run, ref = out / f"stage{stage}", reference / f"stage{stage}"
        summary = json.loads((run / "summary.json").read_text())
        ref_summary = json.loads((ref / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["grad_accum"] == 1 and ref_summary["grad_accum"] == 2
        assert summary["steps"] == ref_summary["steps"]
        # ZeRO-3 over 2 ranks: each rank's AdamW state is half of the single process's.
        (single,) = ref_summary["optimizer_state_numel_per_rank"]
        assert all(single / 2 <= n <= single / 2 + 64 for n in summary["optimizer_state_numel_per_rank"])
        got, want = by_step(run / "metrics.jsonl"), by_step(ref / "metrics.jsonl")
        assert sorted(got) == sorted(want)
        for step, row in want.items():
            for key, value in row.items():
                if not key.endswith("tokens_per_s"):
                    assert got[step][key] == pytest.approx(value, abs=1e-5, rel=1e-5), (stage, step, key)
        two, one = load_weights(run / "export"), load_weights(ref / "export")
        assert set(two) == set(one)
        for key, ref_w in one.items():
            torch.testing.assert_close(two[key], ref_w, atol=1e-5, rtol=0, msg=f"stage {stage} {key}")
        ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
        for rank in (0, 1):
            assert (ckpt / f"rng_state_rank{rank}.pt").is_file()
            assert (ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    assert json.loads((out / "stage1" / "summary.json").read_text())["steps"] == TOTAL_STEPS


def test_sigterm_to_the_ranks_under_the_launcher_exits_143(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGTERM delivered to the rank processes (as a scheduler that signals the job's processes does): both ranks
    agree at the end of the step, write one checkpoint, exit 143, and the launcher passes 143 on. (When the
    launcher process itself gets the signal it exits 1 instead; README "Exit codes" says why.)"""
    import signal
    import time

    import psutil

    from alignx.trust import verify_checkpoint

    base = tmp_path_factory.getbasetemp()
    out = base / "two_processes_sigterm"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "train.py")]
    proc = subprocess.Popen(
        [*cmd, *tiny_args(base, out, "--stage", "1")],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics, deadline = out / "stage1" / "metrics.jsonl", time.time() + 400
    while not (metrics.is_file() and '"step": 6,' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    ranks = [p for p in ranks if "deepspeed.launcher" not in " ".join(p.cmdline())]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    ckpt = out / "stage1" / "checkpoints" / (out / "stage1" / "checkpoints" / "latest").read_text()
    assert 6 <= int(ckpt.name.removeprefix("step_")) < TOTAL_STEPS
    assert all((ckpt / f"rng_state_rank{r}.pt").is_file() for r in (0, 1))
    verify_checkpoint(ckpt)  # the manifest both ranks hashed (each its share of the files) is whole and signed


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(sys.argv[1:])
