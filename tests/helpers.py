"""Helpers shared by the test modules (no test module imports another): runs of ``train.py`` and the process
environment, the ``deepspeed`` launcher, the tiny engine model, synthetic stage-1 records and batches, and the
``benchmarks`` package.

The test directory is on ``sys.path`` under pytest (rootdir ``prepend`` import mode) and when a test file runs as a
script (``deepspeed ... tests/test_dist.py --out F``: the script's directory comes first), so ``from helpers import
...`` works in both. ``conftest.py`` registers this module for pytest's assertion rewriting.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignx.config import Config, load_config
from alignx.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
N_PAIRS, N_INSTRUCTIONS = 56, 24  # 48 training records -> 12 steps of global batch 4; 8 held out
TOTAL_STEPS = 12
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")


# ----------------------------------------------------------------------------------------------------------------
# Training runs (train.py on configs/tiny_cpu.yaml) and their processes


def clean_env() -> dict[str, str]:
    """The environment of a child run: no rank variables of this process, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@contextmanager
def process_group_scope() -> Iterator[None]:
    """In-process runs leave this process as they found it: a process group they created is destroyed and the
    rank variables they set are removed (later tests, and their subprocesses, must not inherit them)."""
    import torch.distributed as dist

    from alignx.engine import shutdown_distributed

    saved = {k: os.environ.get(k) for k in RANK_ENV}
    had_group = dist.is_initialized()
    try:
        yield
    finally:
        if not had_group:
            shutdown_distributed()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """``n`` intra-op threads inside the block, the previous count after it (tiny shapes: more threads only add
    hand-over latency on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def one_process_group() -> Iterator[Any]:
    """One thread and a process group of this process alone (yields ``init_distributed``'s ``DistInfo``), both
    undone afterwards."""
    from alignx.engine import init_distributed

    with torch_threads(1), process_group_scope():
        yield init_distributed(Config())


def worker_setup(argv: list[str], threads: int | None = 1) -> tuple[argparse.Namespace, Any]:
    """A test module run as a 2-rank script (``run_deepspeed``): its arguments (the launcher's ``--local_rank``,
    ``--out``), ``threads`` intra-op threads (None: unchanged) and the started process group's ``DistInfo``."""
    from alignx.engine import init_distributed

    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if threads is not None:
        torch.set_num_threads(threads)
    return args, init_distributed(Config())


def shared_data(base: Path) -> tuple[Path, Path]:
    from alignx.testing import write_instructions_jsonl, write_pairs_jsonl

    pairs, instructions = base / "data" / "pairs.jsonl", base / "data" / "instructions.jsonl"
    if not pairs.is_file():
        write_pairs_jsonl(pairs, N_PAIRS, seed=3)
        write_instructions_jsonl(instructions, N_INSTRUCTIONS, seed=3)
    return pairs, instructions


def tiny_args(base: Path, out: Path, *extra: str) -> list[str]:
    pairs, instructions = shared_data(base)
    return [
        "--config",
        str(TINY),
        f"--data.train_file={pairs}",
        f"--stage2.train_file={instructions}",
        f"--train.output_dir={out}",
        f"--data.cache_dir={base / 'data_cache'}",
        *extra,
    ]


def run_train(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reference_run(base: Path) -> Path:
    """``python train.py --stage all`` once per test session (1 process, micro 2 x accumulation 2)."""
    out = base / "reference"
    if not (out / "stage2" / "summary.json").is_file():
        proc = run_train(tiny_args(base, out, "--stage", "all"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def by_step(path: Path) -> dict[int, dict]:
    """Metrics rows keyed by step (train and eval rows of a step merged); a step logged twice fails."""
    merged: dict[int, dict] = {}
    for row in read_metrics(path):
        step = row["step"]
        keys = [k for k in row if k not in ("step", "time")]
        dup = [k for k in keys if k in merged.get(step, {})]
        assert not dup, f"step {step} logged twice: {dup}"
        merged.setdefault(step, {}).update({k: row[k] for k in keys})
    return merged


def load_weights(export: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(export / "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# The deepspeed launcher: 2 processes on CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(script: Path, args: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2`` (2 processes on CPU), one thread each, on a free port."""
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------------
# The engine's tiny model (an HF Llama + a head used inside forward), its batches and config


ENGINE_VOCAB, ENGINE_D = 96, 32


class TinyWithHead(nn.Module):
    """HF causal LM as ``lm`` + a head whose parameters are used inside ``forward`` (left out of the export)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=ENGINE_VOCAB,
            hidden_size=ENGINE_D,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        self.lm = LlamaForCausalLM(cfg)
        self.lang_head = nn.Linear(ENGINE_D, 2, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, cls: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.lm(input_ids=input_ids, labels=labels, output_hidden_states=True)
        pooled = out.hidden_states[-1].mean(dim=1)  # [B, D]
        head = nn.functional.cross_entropy(self.lang_head(pooled).float(), cls)
        return {"loss": out.loss + 0.5 * head, "ntp": out.loss.detach(), "head": head.detach()}


def batches(n: int, micro: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, ENGINE_VOCAB, (micro, 16), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "cls": torch.randint(0, 2, (micro,), generator=g)})
    return out


def engine_cfg(stage: int, **over) -> Config:
    base = {
        "engine.zero_stage": stage,
        "engine.zero3_param_persistence_threshold": 0,  # partition every parameter of the tiny model
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,  # 2 accumulation steps on one rank
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        "optim.max_grad_norm": 0.5,
        "optim.weight_decay": 0.01,
    }
    base.update(over)
    return load_config(None, base)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic stage-1 records and batches, AlignX model and config (negatives across ranks, objective)

VOCAB, HIDDEN, LAYERS = 256, 32, 2  # make_batch draws from VOCAB too (test_objective's vocabulary: 256)
MICRO = 3  # records per rank and micro-batch; the 1-process reference runs 2 * MICRO as one micro-batch


def make_records(n: int, seed: int, dropped: tuple[int, ...] = ()) -> list[dict]:
    """``n`` synthetic stage-1 rows (BOS, prompt, source span 1, middle, target span 2, EOS) of varied lengths;
    the rows in ``dropped`` have 2 target tokens (below ``min_target_tokens = 3``: dropped by the filter)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        pre, src, mid = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 5), (1, 7), (1, 4)))
        tgt = 2 if i in dropped else int(torch.randint(3, 8, (1,), generator=g))
        body = torch.randint(4, VOCAB, (pre + src + mid + tgt,), generator=g).tolist()
        ids = [1, *body, 2]
        spans = [0] * (1 + pre) + [1] * src + [0] * mid + [2] * tgt + [0]
        rows.append({"input_ids": ids, "labels": ids, "span_ids": spans, "src_lang": i % 3, "tgt_lang": 3 + i % 2})
    return rows


def collate(rows: list[dict], packed: bool = False) -> dict[str, torch.Tensor]:
    """Right padding (a left-padded row's first token would be predicted from padding, which depends on the batch's
    width and so on how records are split) or one packed row."""
    from alignx.data import Collator, PackedCollator

    return PackedCollator()(rows) if packed else Collator(pad_token_id=0, padding_side="right")(rows)


def make_cfg(**over):
    from alignx.config import load_config

    base = {
        "model.attn_implementation": "sdpa",
        "objective.kernel_backend": "torch",
        "optim.lr": 0.0,  # weights stay put, so every step of a run compares with the same 1-process model
        "optim.warmup_steps": 0,
        "train.global_batch_size": 2 * MICRO,
        "train.micro_batch_size": MICRO,
        "engine.zero3_param_persistence_threshold": 0,
    }
    return load_config(None, {**base, **over})


def make_model(cfg):
    """The same initial weights in every process: seeded LM and language-matching head."""
    from alignx.model import AlignXModel
    from alignx.testing import tiny_causal_lm

    lm = tiny_causal_lm("llama", vocab_size=VOCAB, num_layers=LAYERS, hidden=HIDDEN, seed=0)
    torch.manual_seed(0)
    return AlignXModel(lm, cfg).train()


def make_batch(rows: list[tuple[int, int, int, int]], langs: list[tuple[int, int]], *, seed: int = 0) -> dict:
    """A left-padded batch marked the way the official code marks it.

    Each row ``(prefix, src, mid, tgt)`` is ``BOS, prefix tokens, src tokens (1), mid tokens, tgt tokens (2), EOS``;
    EOS is unmarked (the official target marks stop at L - 2). Padded to a multiple of 8 on the left.
    """
    g = torch.Generator().manual_seed(seed)
    seqs, spans = [], []
    for prefix, src, mid, tgt in rows:
        body = torch.randint(4, VOCAB, (prefix + src + mid + tgt,), generator=g)
        seqs.append(torch.cat([torch.tensor([1]), body, torch.tensor([2])]))
        spans.append(torch.tensor([0] * (1 + prefix) + [1] * src + [0] * mid + [2] * tgt + [0]))
    t = max(len(s) for s in seqs)
    t = (t + 7) // 8 * 8
    n = len(rows)
    input_ids = torch.zeros(n, t, dtype=torch.long)
    attention_mask = torch.zeros(n, t, dtype=torch.long)
    span_ids = torch.zeros(n, t, dtype=torch.long)
    for b, (s, sp) in enumerate(zip(seqs, spans)):
        input_ids[b, t - len(s) :] = s
        attention_mask[b, t - len(s) :] = 1
        span_ids[b, t - len(s) :] = sp
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "span_ids": span_ids,
        "src_lang": torch.tensor([a for a, _ in langs]),
        "tgt_lang": torch.tensor([b for _, b in langs]),
    }


# ----------------------------------------------------------------------------------------------------------------
# The repository's benchmarks package


def import_benchmarks():
    """Import the repository's ``benchmarks`` package by path (conftest keeps the repo root off sys.path)."""
    if "benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", REPO / "benchmarks" / "__init__.py", submodule_search_locations=[str(REPO / "benchmarks")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = module
        spec.loader.exec_module(module)
    import benchmarks.harness as harness

    return harness
