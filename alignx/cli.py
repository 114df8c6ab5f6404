"""Command line: ``train.py`` (via :func:`train_main`) and the ``alignx`` console script (:func:`main`).

Training::

    deepspeed train.py --config configs/<run>.yaml [--stage 1|2|all] [--resume auto] [--section.key=value ...]
    python train.py --config configs/<run>.yaml ...          # one process, no launcher

``--stage`` defaults to ``all`` when ``stage2.train_file`` is set, else ``1``. ``--resume X`` is short for
``--train.resume=X``. The ``deepspeed`` launcher adds ``--local_rank=N`` (the rank is read from the environment).
The config (file + overrides) is checked completely before anything is loaded: a bad key fails at once, naming it.

Exit codes: 0 done; 1 data, stage, checkpoint or storage error (one line on stderr, no traceback; a full disk or a
read-only file system met deep inside torch, DeepSpeed or datasets included); 2 config or usage error; 143 stopped by
SIGTERM after writing a checkpoint. Under the ``deepspeed`` launcher each rank exits with these codes; what the
launcher itself returns on SIGTERM depends on which process got the signal (README, "Exit codes").
``--trust-checkpoint`` is short for ``--train.trust_checkpoint=true`` (resume a checkpoint this user did not sign).

``alignx`` subcommands: ``train`` (= train.py), ``config`` (every key with its default and documentation; with
``--config`` the resolved values), and ``data build``, ``eval``, ``demo``, ``compare``, ``plan`` (dispatched lazily to
``alignx.data.build``, ``alignx.eval.cli``, ``alignx.demo``, ``alignx.compare``, ``alignx.plan``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from alignx.config import Config, ConfigError, describe, load_config

__all__ = ["main", "train_main"]

USAGE_ERROR, RUN_ERROR, SIGTERM_EXIT = 2, 1, 143

# Subcommand -> (module, function, words of the subcommand consumed before its own arguments).
DISPATCH: dict[str, tuple[str, str, int]] = {
    "data": ("alignx.data.build", "main", 2),  # alignx data build ...
    "eval": ("alignx.eval.cli", "main", 1),
    "demo": ("alignx.demo", "main", 1),
    "compare": ("alignx.compare", "main", 1),
    "plan": ("alignx.plan", "main", 1),
}


def _error(kind: str, err: BaseException) -> None:
    rank = os.environ.get("RANK")
    where = f" [rank {rank}]" if rank not in (None, "0") else ""
    print(f"alignx{where}: {kind}: {err}", file=sys.stderr, flush=True)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train with AlignX on DeepSpeed. Any --section.key=value overrides the config "
        "(see `alignx config` for every key).",
        allow_abbrev=False,
    )
    p.add_argument("--config", help="YAML run config (configs/*.yaml); defaults if omitted")
    p.add_argument("--stage", choices=["1", "2", "all"], default=None, help="stage(s) to run")
    p.add_argument("--resume", default=None, help="auto | none | a checkpoint directory (= --train.resume)")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="resume a checkpoint this user's key did not sign (= --train.trust_checkpoint=true)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``train.py``: parse, check the config, run the stage(s); returns the exit code."""
    args, rest = _train_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(rest)
    if args.resume is not None:
        overrides.append(f"--train.resume={args.resume}")
    if args.trust_checkpoint:
        overrides.append("--train.trust_checkpoint=true")
    try:
        cfg = load_config(args.config, overrides)
        from alignx.schedule import check_stage_inputs, parse_stages

        stage = args.stage or ("all" if cfg.stage2.train_file else "1")
        check_stage_inputs(cfg, parse_stages(stage))
    except ConfigError as e:
        _error("config error", e)
        return USAGE_ERROR
    return _run_training(cfg, stage, args.config, [o for o in rest])


def _run_training(cfg: Config, stage: str, config_path: str | None, overrides: list[str]) -> int:
    import torch.distributed as dist

    from alignx.data import DataError
    from alignx.engine import CheckpointError, lost_peer, shutdown_distributed
    from alignx.schedule import StageError, run_stages
    from alignx.storage import StorageError, last_checkpoint, storage_failure
    from alignx.trainer import TrainingError

    created = not dist.is_initialized()  # leave a caller's process group alone (tests, notebooks)
    clean = False
    try:
        code = run_stages(cfg, stage, config_path=config_path, overrides=overrides)
        clean = True
        return code
    except ConfigError as e:
        _error("config error", e)
        return USAGE_ERROR
    except (DataError, StageError, TrainingError, CheckpointError, StorageError) as e:
        _error("error", e)
        return RUN_ERROR
    except Exception as e:
        # A full disk or a read-only file system reaches us from deep inside torch, DeepSpeed or datasets, as
        # whatever they wrap it in: told in one line with the checkpoint to continue from, not as their traceback.
        failure = storage_failure(e, Path(cfg.train.output_dir))
        last = last_checkpoint(cfg.train.output_dir)
        if failure is not None:
            _error("error", StorageError(f"{failure}; last good checkpoint: {last} (continue with --resume auto)"))
            return RUN_ERROR
        # Another rank (or its node) died: every surviving rank stops with one line instead of a collective's
        # traceback; the run continues from the last complete checkpoint on all nodes (README, "Several nodes").
        peer = lost_peer(e)
        if peer is None:
            raise
        _error("error", RuntimeError(f"{peer}; last good checkpoint: {last} (restart every node with --resume auto)"))
        return RUN_ERROR
    finally:
        if created:
            shutdown_distributed(clean=clean)


def config_main(argv: Sequence[str]) -> int:
    """``alignx config [--config FILE] [--section.key=value ...]``: every key, its value and its documentation."""
    p = argparse.ArgumentParser(prog="alignx config", description=config_main.__doc__, allow_abbrev=False)
    p.add_argument("--config", help="YAML run config to resolve (with the overrides)")
    args, rest = p.parse_known_args(list(argv))
    if args.config is None and not rest:
        print(describe())
        return 0
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        _error("config error", e)
        return USAGE_ERROR
    print(describe(cfg))
    return 0


def _dispatch(name: str, argv: list[str]) -> int:
    module_name, func, consumed = DISPATCH[name]
    if name == "data" and (not argv or argv[0] != "build"):
        _error("usage error", ValueError("expected `alignx data build ...`"))
        return USAGE_ERROR
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a missing subcommand module is reported this way; a missing dependency inside it is a real error.
        if e.name is None or not module_name.startswith(e.name):
            raise
        _error("error", ModuleNotFoundError(f"`alignx {name}` needs {module_name}, which is not installed here"))
        return USAGE_ERROR
    result = getattr(module, func)(argv[consumed - 1 :])
    return int(result or 0)


HELP = """usage: alignx <command> [args]

commands:
  train      train (same as `python train.py`; use `deepspeed train.py` for several processes)
  config     print every config key with its default and documentation (--config FILE: resolved values)
  data build build training data (JSONL) from the packaged sources
  eval       alignment / translation / perplexity report of a model directory
  demo       small real model, real parallel data: stage 1 -> stage 2 -> report
  compare    run several recipes on the same data and budget, one comparison report
  plan       per-GPU memory plan of a config before launch (model states per ZeRO stage, activations, max micro-batch)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """The ``alignx`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0 if argv else USAGE_ERROR
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd == "config":
        return config_main(rest)
    if cmd in DISPATCH:
        return _dispatch(cmd, rest)
    _error("usage error", ValueError(f"unknown command {cmd!r}"))
    print(HELP, file=sys.stderr)
    return USAGE_ERROR


def drop_repo_root_from_path() -> None:
    """Keep the repository's ``kernels/`` from becoming importable as a top-level ``kernels`` module.

    ``python -m alignx.cli`` from the repository root puts the root on ``sys.path``; Hugging Face ``transformers``
    probes for its own ``kernels`` package by name and would import ours. The code runs from the installed
    ``alignx`` package (its ops are ``alignx.kernels``), so the root entry is not needed.
    """
    root = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]


if __name__ == "__main__":
    drop_repo_root_from_path()
    sys.exit(main())
