"""Two "nodes" on one machine through the DeepSpeed launcher's multi-node path, against one node with two processes.

Each node is its own ``deepspeed --hostfile H --no_ssh --node_rank R --master_addr 127.0.0.1`` command (what every
node of a cluster runs when the scheduler, not ssh, starts the launcher): the hostfile names two hosts with one slot
each, so each launcher starts one process, node 0 rank 0 and node 1 rank 1, and the ranks meet over TCP on the
loopback (gloo). Stage 1 of the tiny config must log the same per-step losses as ``deepspeed --num_gpus 2`` on one
node (1e-5): same world size, same micro-batches per rank, same collectives.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 420


def _launcher() -> str:
    return str(Path(sys.executable).with_name("deepspeed"))


def two_node_commands(hostfile: Path, port: int, script: Path, args: list[str]) -> list[list[str]]:
    """The command each of the two nodes runs (node rank 0 holds the master address)."""
    return [
        [_launcher(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr",
         "127.0.0.1", "--master_port", str(port), str(script), *args]
        for rank in (0, 1)
    ]  # fmt: skip


def run_two_nodes(hostfile: Path, args: list[str]) -> list[subprocess.CompletedProcess]:
    from helpers import clean_env, free_port

    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    cmds = two_node_commands(hostfile, free_port(), REPO / "train.py", args)
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in cmds
    ]
    done = []
    try:
        for cmd, proc in zip(cmds, procs):
            out, err = proc.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def test_two_nodes_match_one_node_with_two_processes(tmp_path_factory: pytest.TempPathFactory) -> None:
    from helpers import TOTAL_STEPS, by_step, run_deepspeed, tiny_args

    base = tmp_path_factory.getbasetemp()
    one_node = base / "one_node_two_processes"
    proc = run_deepspeed(REPO / "train.py", tiny_args(base, one_node, "--stage", "1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    two_nodes = base / "two_nodes"
    nodes = run_two_nodes(base / "hostfile", tiny_args(base, two_nodes, "--stage", "1"))
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}: " + node.stdout[-3000:] + node.stderr[-5000:]
        # The launcher of each node started one local process, as node `rank` of two.
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in node.stdout + node.stderr

    import json

    for run in (one_node, two_nodes):
        summary = json.loads((run / "stage1" / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == TOTAL_STEPS, summary
    got, want = by_step(two_nodes / "stage1" / "metrics.jsonl"), by_step(one_node / "stage1" / "metrics.jsonl")
    assert sorted(got) == sorted(want) and len([s for s in want if "train/loss" in want[s]]) == TOTAL_STEPS
    worst = 0.0
    for step, row in want.items():
        for key, value in row.items():
            if key.endswith("tokens_per_s") or not isinstance(value, (int, float)):
                continue
            if key.startswith(("train/loss", "eval/loss")):
                worst = max(worst, abs(got[step][key] - value))
            assert got[step][key] == pytest.approx(value, abs=1e-5, rel=1e-5), (step, key)
    print(f"two nodes vs one node, largest per-step loss difference: {worst:.3g}")
    ckpt = two_nodes / "stage1" / "checkpoints" / (two_nodes / "stage1" / "checkpoints" / "latest").read_text()
    for rank in (0, 1):
        assert (ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()


@pytest.mark.slow
def test_a_dead_node_stops_the_run_cleanly_and_resume_auto_continues(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Node 1 is killed (launcher and rank, SIGKILL) after step 6: node 0's rank fails its next collective, prints one
    line naming the last good checkpoint and exits 1 (no traceback); both nodes restarted with ``--resume auto``
    continue from that checkpoint to the end."""
    import json
    import os
    import signal
    import time

    from helpers import TOTAL_STEPS, clean_env, free_port, tiny_args

    base = tmp_path_factory.getbasetemp()
    hostfile, out = base / "hostfile_dead", base / "two_nodes_dead"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    args = tiny_args(base, out, "--stage", "1")

    def launch(extra: list[str]) -> list[subprocess.Popen]:
        cmds = two_node_commands(hostfile, free_port(), REPO / "train.py", args + extra)
        return [subprocess.Popen(c, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True) for c in cmds]  # fmt: skip

    procs = launch([])
    metrics, deadline = out / "stage1" / "metrics.jsonl", time.time() + TIMEOUT
    while not (metrics.is_file() and '"step": 6,' in metrics.read_text()):
        assert procs[0].poll() is None and time.time() < deadline, procs[0].communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)
    procs[1].wait()
    _, err = procs[0].communicate(timeout=TIMEOUT)
    assert procs[0].returncode == 1, err[-3000:]
    assert "alignx: error: another rank stopped" in err and "restart every node with --resume auto" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    latest = (out / "stage1" / "checkpoints" / "latest").read_text()

    for proc in launch(["--resume", "auto"]):
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err[-3000:]
    summary = json.loads((out / "stage1" / "summary.json").read_text())
    assert summary["steps"] == TOTAL_STEPS and summary["resumed_from"] == int(latest.removeprefix("step_")) >= 4
