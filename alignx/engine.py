"""DeepSpeed engine: the only module of alignx that calls ``deepspeed``.

What it owns:

* :func:`init_distributed` — the process group (nccl on GPU, gloo on CPU). ``python train.py`` without the launcher
  runs as rank 0 of 1: the rendezvous variables are filled in, because DeepSpeed otherwise falls back to MPI
  discovery (and fails on a missing ``mpi4py``).
* :func:`build_ds_config` — the DeepSpeed JSON derived from our config, never stored twice: the batch sizes come from
  ``train.global_batch_size = micro_batch_size x world_size x gradient_accumulation_steps``.
* :class:`Engine` — ``deepspeed.initialize`` around the model with torch's AdamW (``torch_adam``: DeepSpeed's
  CPUAdam is a C++ extension compiled on first use, 25-40 s, and is only chosen with optimizer offload),
  warm-up + linear decay, gradient clipping, ZeRO 0-3, fp32/bf16/fp16; checkpoints with client state, per-rank RNG
  states and shared side files (state that is identical on every rank, e.g. the negatives queue: written once by
  rank 0, read by every rank), signed with this user's key (:mod:`alignx.trust`, :func:`verify_checkpoint`); export
  of a Hugging Face directory gathered from ZeRO-3 shards on rank 0, the language-matching head left out.

The learning rate of optimizer step ``s`` (0-based, the number of steps already taken) is

    lr(s) = lr_peak * s / W                                  for s < W  (W = optim.warmup_steps)
    lr(s) = lr_peak * max(0, (S - s) / max(1, S - W))        otherwise   (S = total optimizer steps)

i.e. the Hugging Face ``get_linear_schedule_with_warmup`` that the reference recipe trains with.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
import socket
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import get_linear_schedule_with_warmup

from alignx import trust
from alignx.config import Config, ConfigError
from alignx.export import EXPORT_MANIFEST, write_hf_dir

__all__ = [
    "EXPORT_MANIFEST",
    "CheckpointError",
    "DistInfo",
    "Engine",
    "build_ds_config",
    "check_precision",
    "init_distributed",
    "linear_warmup_decay",
    "lost_peer",
    "partitioned_loading",
    "shutdown_distributed",
    "verify_checkpoint",
]

log = logging.getLogger("alignx.engine")

#: Written last into an exported directory; its presence (with matching file sizes) means the export is complete.
#: Name of the file holding the tag of the newest complete checkpoint (the name DeepSpeed's loader reads).
LATEST = "latest"
_RNG_FILE = "rng_state_rank{rank}.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be loaded by this run."""


# ----------------------------------------------------------------------------------------------------------------
# Process group


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank, its device, and whether it created the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DEFAULTED_ENV = False  # True once this process filled in the rendezvous variables itself


def _default_rendezvous_env() -> None:
    """One process without the launcher is rank 0 of 1; the launcher sets all of these itself."""
    global _DEFAULTED_ENV
    if dist.is_initialized():
        return
    if "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ and not _DEFAULTED_ENV:
        return  # started by a launcher (deepspeed, torchrun, a scheduler)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ or _DEFAULTED_ENV:
        # A free port, so several single-process runs (tests, sweeps, a re-created group) never share one.
        os.environ["MASTER_PORT"] = str(_free_port())
    _DEFAULTED_ENV = True


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every config key at INFO on every rank; keep its warnings and errors only."""
    from deepspeed.utils import logger as ds_logger

    if os.environ.get("ALIGNX_DS_VERBOSE", "0") != "1":
        ds_logger.setLevel(logging.WARNING)
    # torch deprecates the *_tensor collectives DeepSpeed still calls; nothing for a user to act on.
    warnings.filterwarnings(
        "ignore", message=r".*torch\.distributed\.\w+_tensor.* is deprecated", category=FutureWarning
    )


def _skip_cpu_shm_build() -> None:
    """Do not compile DeepSpeed's shared-memory CPU collective (a 25-40 s g++ build on first use per machine).

    DeepSpeed builds it whenever its torch comm backend starts, but only its inference all-reduce (tensor-parallel
    inference) uses it; training collectives go through gloo. ``ALIGNX_DS_SHM=1`` keeps DeepSpeed's default.
    """
    if os.environ.get("ALIGNX_DS_SHM", "0") == "1":
        return
    import deepspeed.ops

    # ``deepspeed.ops.__compatible_ops__`` is probed lazily on first access (compiler subprocesses, ~3 s) and cached
    # in the module; its only reader is ``deepspeed.comm.torch.build_shm_op``. Marking the op incompatible in the
    # cache (creating it if nobody probed yet) skips both the probe and the build.
    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def init_distributed(cfg: Config) -> DistInfo:
    """Start (or join) the process group: ``engine.backend`` or nccl on GPU / gloo on CPU.

    Idempotent: a second call in the same process returns the current ranks without re-initialising.
    """
    _default_rendezvous_env()
    import deepspeed

    _quiet_deepspeed()
    on_gpu = torch.cuda.is_available()
    backend = cfg.engine.backend or ("nccl" if on_gpu else "gloo")
    if backend == "nccl" and not on_gpu:
        raise ConfigError("engine.backend=nccl needs a CUDA device; use gloo (or leave engine.backend null) on CPU")
    if not on_gpu:
        _skip_cpu_shm_build()
    owns = not dist.is_initialized()

    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=cfg.engine.dist_timeout_minutes))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def check_precision(cfg: Config) -> None:
    """Fail before anything is loaded when the device cannot train in ``engine.precision``."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": bool(acc.is_fp16_supported())}
    if not supported[cfg.engine.precision]:
        usable = [k for k, ok in supported.items() if ok]
        raise ConfigError(
            f"engine.precision={cfg.engine.precision} is not supported on this device ({acc.device_name()}); "
            f"use one of {usable}"
        )


# What a collective raises when another rank's process (or its whole node) is gone: gloo reports the closed TCP
# connection at once; NCCL reports it when the collective times out (engine.dist_timeout_minutes).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "NCCL error", "Watchdog caught collective operation timeout", "DistNetworkError")  # fmt: skip


def lost_peer(err: BaseException) -> str | None:
    """One line naming the lost rank when ``err`` is a collective failing because another rank died, else None."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        dist_error = getattr(dist, "DistError", ())
        if (isinstance(e, dist_error) and not isinstance(e, getattr(dist, "DistStoreError", ()))) or any(
            m in text for m in _PEER_LOST
        ):
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            return f"another rank stopped (its process or node died): {first[:300]}"
        e = e.__cause__ or e.__context__
    return None


def shutdown_distributed(*, clean: bool = True) -> None:
    """End the process group: ``barrier`` + ``destroy_process_group`` (ZeRO-3 runs can abort at exit without it).

    ``clean=False`` (after an error on this rank) skips the barrier, which the other ranks may never reach.
    """
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        # DeepSpeed's destroy also drops the groups it cached (a group re-created in this process must not see them).
        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed config


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """Our config -> DeepSpeed's JSON (a dict). Batch sizes are derived; nothing is stored twice.

    Optimizer: AdamW from ``torch.optim`` (``torch_adam``), except with optimizer offload where DeepSpeed's CPUAdam
    is the point of offloading. Clipping: ``optim.max_grad_norm`` (0 disables). The LR schedule is not in here: the
    engine passes :func:`linear_warmup_decay` so a step's learning rate is exactly the documented formula.
    """
    eng, opt, train = cfg.engine, cfg.optim, cfg.train
    grad_accum = train.grad_accum_steps(world_size)
    if len(opt.betas) != 2:
        raise ConfigError(f"optim.betas must hold two numbers, got {opt.betas!r}")
    adam = {"lr": opt.lr, "betas": [float(b) for b in opt.betas], "eps": opt.eps, "weight_decay": opt.weight_decay}
    if not eng.offload_optimizer:
        adam["torch_adam"] = True
    zero: dict[str, Any] = {"stage": eng.zero_stage}
    pin = torch.cuda.is_available()
    if eng.offload_optimizer:
        if eng.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if eng.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if eng.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = eng.zero3_param_persistence_threshold
        # The export gathers layer by layer itself (Engine.export_hf); no extra copy at checkpoint time.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": opt.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": eng.precision == "bf16"},
        "fp16": {
            "enabled": eng.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 1 << 30,  # the trainer logs; DeepSpeed's own step prints are noise
        "wall_clock_breakdown": False,
    }
    return _merge_extra(ds, eng.deepspeed)


# Generated keys ``engine.deepspeed`` may not change, with the setting that controls each.
_DERIVED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (micro batch x world size)",
    "gradient_clipping": "optim.max_grad_norm",
    "optimizer": "optim.*",
    "scheduler": "optim.warmup_steps (the schedule is alignx's)",
    "bf16": "engine.precision",
    "fp16": "engine.precision",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.offload_optimizer": "engine.offload_optimizer",
    "zero_optimization.offload_param": "engine.offload_param",
}


def _merge_extra(ds: dict[str, Any], extra: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Recursive merge of ``engine.deepspeed`` into the generated config; derived keys are refused, named."""
    for key, value in extra.items():
        path = prefix + str(key)
        if path in _DERIVED:
            raise ConfigError(f"engine.deepspeed.{path} is derived by alignx; set {_DERIVED[path]} instead")
        if isinstance(value, Mapping) and isinstance(ds.get(key), dict):
            _merge_extra(ds[key], value, prefix=path + ".")
        else:
            ds[key] = copy.deepcopy(value)
    return ds


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with the factor ``s / W`` during warm-up, then ``(S - s) / (S - W)`` down to 0 (see module doc):
    transformers' ``get_linear_schedule_with_warmup``, with the arguments checked."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
    return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on biases and norm weights (1-D tensors); one group when there is no decay at all."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": 0.0}]
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@contextmanager
def partitioned_loading(cfg: Config, world_size: int) -> Iterator[None]:
    """Inside this context, Hugging Face ``from_pretrained`` builds the model already partitioned (ZeRO-3).

    With ``engine.zero_stage = 3`` transformers sees DeepSpeed's config (``HfDeepSpeedConfig``) and loads under
    ``deepspeed.zero.Init``: each rank materialises only its shard of every weight, so a model larger than one
    device's memory can be loaded. Modules created outside the context (the language-matching head) are partitioned
    by ``deepspeed.initialize``. At other stages this does nothing. The global switch is cleared on exit, so a later
    ``from_pretrained`` in the process (evaluation, tests) loads a plain model.
    """
    if cfg.engine.zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(build_ds_config(cfg, world_size))  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


# ----------------------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) generator states of this process, as tuples, numbers and
    tensors only: the file then loads with ``torch.load(weights_only=True)`` (no unpickling of arbitrary objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng_file(path: Path) -> dict[str, Any]:
    """An RNG state file, unpickled with ``weights_only=True``. Files of earlier versions hold numpy's key array
    as an ``ndarray``; only the three numpy names that rebuild a plain array are allowed in for them."""
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np._core.multiarray._reconstruct]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Engine


class Engine:
    """``deepspeed.initialize`` around ``model`` plus the calls the trainer needs, and nothing else.

    ``model`` is an ``nn.Module`` whose ``forward(**batch)`` returns a dict with a ``loss`` entry; for
    :meth:`export_hf` it holds the Hugging Face model as attribute ``lm`` (the AlignX wrapper does). Every other
    submodule (the language-matching head) is trained, clipped, partitioned and checkpointed with it, and left out of
    the export.

    Usage per micro-batch (DeepSpeed's convention; the update happens at the accumulation boundary)::

        out = engine(batch); engine.backward(out["loss"]); engine.step()
    """

    def __init__(self, model: nn.Module, cfg: Config, total_steps: int, *, lr: float | None = None) -> None:
        import deepspeed

        if not dist.is_initialized():
            raise RuntimeError("call alignx.engine.init_distributed(cfg) before building an Engine")
        self.cfg = cfg
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.total_steps = int(total_steps)
        self.ds_config = build_ds_config(cfg, self.world_size)
        if lr is not None:
            self.ds_config["optimizer"]["params"]["lr"] = lr
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        warmup = cfg.optim.warmup_steps
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, cfg.optim.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: linear_warmup_decay(opt, warmup, self.total_steps),
        )
        self._last_grad_norm: float | None = None

    # -- the training step ----------------------------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by :meth:`load_checkpoint`)."""
        return int(self.ds.global_steps)

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step applies."""
        return float(self.ds.get_lr()[0])

    @property
    def at_boundary(self) -> bool:
        """True when the next :meth:`step` applies the accumulated gradients."""
        return bool(self.ds.is_gradient_accumulation_boundary())

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        moved = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return self.ds(**moved)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (DeepSpeed divides by the accumulation steps and averages over ranks)."""
        self.ds.backward(loss)

    def step(self) -> None:
        """Clip, AdamW update and scheduler step at the accumulation boundary; a no-op before it."""
        if self.at_boundary and self._norm_not_reported():
            self._last_grad_norm = self._local_full_grad_norm()
        self.ds.step()

    def _norm_not_reported(self) -> bool:
        # ZeRO and the mixed-precision wrappers report the global norm; stage 0 fp32 clips without keeping it.
        return self.cfg.engine.zero_stage == 0 and self.cfg.engine.precision == "fp32"

    def _local_full_grad_norm(self) -> float:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.get_total_norm(grads, 2.0))

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm of the last applied step, before clipping (None before the first step)."""
        if self._norm_not_reported():
            return self._last_grad_norm
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    # -- introspection --------------------------------------------------------------------------------------------

    def optimizer_state_numel(self) -> int:
        """Elements held by this rank's AdamW state (``exp_avg`` + ``exp_avg_sq``): ~2P / world_size at ZeRO >= 1."""
        basic = self.ds.basic_optimizer
        return sum(
            t.numel()
            for state in basic.state.values()
            for key, t in state.items()
            if key in ("exp_avg", "exp_avg_sq") and torch.is_tensor(t)
        )

    def num_parameters(self) -> int:
        """Full parameter count (the ZeRO-3 ``ds_numel`` of partitioned parameters)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())

    def destroy(self) -> None:
        """Release ZeRO hooks and buffers (between stage 1 and stage 2 in one process)."""
        self.ds.destroy()
        del self.ds, self.optimizer, self.scheduler

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(
        self,
        root: str | Path,
        tag: str,
        client_state: Mapping[str, Any],
        *,
        shared: Mapping[str, Any] | None = None,
    ) -> Path:
        """Model, optimizer, scheduler, ``client_state`` and every rank's RNG state under ``root/tag``.

        ``shared``: objects that are the same on every rank (large ones that do not belong in the client state,
        which DeepSpeed keeps with the model states), saved once by rank 0 as ``root/tag/<name>.pt`` before the
        checkpoint is marked complete; read back with :meth:`load_shared`. ``root/latest`` names the newest COMPLETE
        checkpoint: it is replaced atomically after every rank has finished writing, so a run killed mid-save resumes
        from the previous one.
        """
        root = Path(root)
        path = root / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), path / _RNG_FILE.format(rank=self.rank))
        if self.rank == 0:
            for name, obj in (shared or {}).items():
                tmp = path / f".{name}.pt.tmp"
                torch.save(obj, tmp)
                os.replace(tmp, path / f"{name}.pt")
        self.ds.save_checkpoint(str(root), tag=tag, client_state=dict(client_state), save_latest=False)
        dist.barrier()
        # Signed once every rank has written: resume loads only what this user's key signed (alignx.trust).
        files = trust.hash_files(path, self.rank, self.world_size, _merge_over_ranks)
        if self.rank == 0:
            trust.sign_checkpoint(path, files)
        dist.barrier()
        if self.rank == 0:
            tmp = root / f".{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, root / LATEST)
        dist.barrier()
        return path

    def load_checkpoint(self, root: str | Path, tag: str | None = None) -> dict[str, Any]:
        """Restore everything :meth:`save_checkpoint` wrote; returns the client state. ``tag=None`` = latest."""
        root = Path(root)
        tag = tag or latest_tag(root)
        if tag is None:
            raise CheckpointError(f"no complete checkpoint in {root} (no '{LATEST}' file)")
        saved_ranks = len(list((root / tag).glob(_RNG_FILE.format(rank="*"))))
        if self.cfg.engine.zero_stage > 0 and saved_ranks not in (0, self.world_size):
            raise CheckpointError(
                f"{root / tag} was written by {saved_ranks} ranks; its ZeRO-{self.cfg.engine.zero_stage} optimizer "
                f"shards load on {saved_ranks} ranks only (this run has {self.world_size}). Resume with the same "
                f"number of processes, or start a new run from its weights (zero_to_fp32.py in {root})"
            )
        load_path, client_state = self.ds.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag}")
        rng_file = root / tag / _RNG_FILE.format(rank=self.rank)
        if not rng_file.is_file():
            # Resumed on a different world size: rank 0's state is the best available.
            log.warning("no RNG state for rank %d in %s; using rank 0's", self.rank, root / tag)
            rng_file = root / tag / _RNG_FILE.format(rank=0)
        set_rng_state(_load_rng_file(rng_file))
        return dict(client_state or {})

    def load_shared(self, root: str | Path, tag: str, name: str) -> Any:
        """A ``shared`` object of :meth:`save_checkpoint` (tensors mapped to the CPU; the caller moves them)."""
        f = Path(root) / tag / f"{name}.pt"
        if not f.is_file():
            raise CheckpointError(f"checkpoint {Path(root) / tag} has no {name}.pt (written by a run without {name}?)")
        return torch.load(f, map_location="cpu", weights_only=True)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """``{name: full gradient}`` of every trainable parameter after ``backward`` and before ``step`` (any ZeRO
        stage: shards are assembled, on every rank; all ranks must call it). The values are what the optimizer
        step will apply before clipping: averaged over the ranks, divided by the accumulation steps."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                g = safe_get_full_grad(p)
                if g is not None:
                    out[name] = g.detach().float().cpu().clone()
        return out

    # -- export ---------------------------------------------------------------------------------------------------

    def _gathered_lm_state(self, lm: nn.Module) -> dict[str, torch.Tensor] | None:
        """Full state dict of ``lm`` on rank 0 (None elsewhere), gathered one module at a time under ZeRO-3."""
        if self.cfg.engine.zero_stage != 3:
            return {k: v.detach().cpu() for k, v in lm.state_dict().items()} if self.rank == 0 else None
        import deepspeed

        state: dict[str, torch.Tensor] | None = {} if self.rank == 0 else None
        seen: dict[int, str] = {}  # ds_id -> first key, so tied weights stay tied

        def visit(module: nn.Module, prefix: str) -> None:
            params = list(module.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if state is not None:
                    for name, p in module.named_parameters(recurse=False):
                        key = prefix + name
                        ds_id = getattr(p, "ds_id", id(p))
                        state[key] = state[seen[ds_id]] if ds_id in seen else p.detach().cpu().clone()
                        seen.setdefault(ds_id, key)
                    for name, buf in module.named_buffers(recurse=False):
                        if buf is not None and name not in module._non_persistent_buffers_set:
                            state[prefix + name] = buf.detach().cpu().clone()
            for name, child in module.named_children():
                visit(child, prefix + name + ".")

        visit(lm, "")
        return state

    def export_hf(
        self,
        out_dir: str | Path,
        tokenizer: Any | None = None,
        *,
        lm_attr: str = "lm",
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``out_dir`` as a Hugging Face model directory: ``save_pretrained`` of ``module.<lm_attr>`` with the
        trained weights (gathered on rank 0 from ZeRO-3 shards) + the tokenizer + :data:`EXPORT_MANIFEST`.

        Only the Hugging Face model is exported: the language-matching head (and any other submodule outside
        ``lm_attr``) is left out. The directory is written under a temporary name and renamed when complete; the
        manifest lists every file with its size, so a reader can check completeness (``alignx.schedule``).
        All ranks must call this.
        """
        out_dir = Path(out_dir)
        lm = getattr(self.module, lm_attr, None)
        if lm is None or not hasattr(lm, "save_pretrained"):
            raise TypeError(f"export_hf needs the HF model as attribute '{lm_attr}' of the wrapped module")
        state = self._gathered_lm_state(lm)
        if self.rank == 0:
            assert state is not None
            excluded = sorted(
                {n.split(".", 1)[0] + "." for n, _ in self.module.named_parameters() if not n.startswith(lm_attr + ".")}
            )
            write_hf_dir(lm, state, out_dir, tokenizer, excluded_prefixes=excluded, meta=meta)
        dist.barrier()
        return out_dir


def _merge_over_ranks(mine: dict[str, Any]) -> dict[str, Any]:
    """Union of every rank's dict (each rank hashed its share of a checkpoint's files)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    return {k: v for share in shares for k, v in share.items()}


def verify_checkpoint(path: str | Path, *, trusted: bool = False) -> str | None:
    """Check that checkpoint ``path`` was signed by this user's key and is unchanged (all ranks call this).

    Returns None when it checks out, or — with ``trusted`` (``--trust-checkpoint``) — the reason it would have been
    refused. Raises :class:`CheckpointError` (one line) otherwise. Every rank reaches the same verdict: the
    signature is checked by all of them and the file hashes are merged over ranks before they are compared.
    """
    path = Path(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        trust.verify_checkpoint(path, rank, world, _merge_over_ranks)
    except trust.UntrustedCheckpoint as e:
        if trusted:
            return str(e)
        raise CheckpointError(
            f"refusing to resume {path}: {e}. Resuming unpickles its files (DeepSpeed loads them with "
            "weights_only=False), which can run code, so only checkpoints signed by this user's key "
            f"({trust.config_dir() / trust.KEY_FILE}) are loaded; pass --trust-checkpoint if you trust whoever "
            "wrote it"
        ) from None
    return None


def latest_tag(root: str | Path) -> str | None:
    """Tag of the newest complete checkpoint under ``root`` (None if there is none)."""
    f = Path(root) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if tag and (Path(root) / tag).is_dir() else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first (tags are ``step_<n>``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(tags, key=lambda p: int(p.name[5:]))


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (never the one ``latest`` names); returns what was removed."""
    if keep <= 0:
        return []
    current = latest_tag(root)
    ckpts = [p for p in list_checkpoints(root) if p.name != current]
    removed = ckpts[: max(0, len(ckpts) - (keep - (current is not None)))]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
