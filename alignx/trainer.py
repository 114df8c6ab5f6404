"""The training loop of one stage: ``Trainer(cfg, stage).run()``.

``run()`` reads top-down: process group -> tokenizer -> data (rank 0 tokenises first, the others read its cache)
-> step plan -> model + DeepSpeed engine -> resume -> loop (train step, metrics, evaluation, checkpoint, SIGTERM)
-> export -> summary. Everything DeepSpeed-specific is in :mod:`alignx.engine`, the objective in
:mod:`alignx.model`, the batch order in :mod:`alignx.data.sampler`.

Distributed semantics (data parallel, ``W`` ranks)
--------------------------------------------------
* **Batch sizes.** ``train.global_batch_size = G`` records per optimizer step, ``train.micro_batch_size = m``
  records per forward on one rank, gradient accumulation ``A = G / (m W)`` (derived, an error if not an integer).
* **Which records.** The epoch order depends on ``G`` and the seed only. Optimizer step ``g`` covers positions
  ``[g G, (g + 1) G)`` of it; rank ``r`` runs global micro-batches ``(g A + a) W + r`` for ``a < A`` (interleaved).
  So every step sees the same ``G`` records whatever ``(m, W, A)`` is.
* **What is averaged.** Each micro-batch's objective is a mean over that micro-batch (NTP: token mean over its
  labelled tokens; CTR: mean over its source anchors; LAM: mean over its ``(2m)^2`` pairs). DeepSpeed divides each
  micro-batch loss by ``A`` and averages gradients over the ``W`` ranks, so the step minimises the **mean over the
  ``A W`` micro-batches of the step** of their objectives.
* **Micro-batch negatives (``objective.negatives = "local"``, the reference).** The contrastive candidates of an
  anchor are the ``m`` targets of its own micro-batch on its own rank, and language matching pairs the ``2m``
  pooled states of that micro-batch only. The objective of a step therefore depends on how its ``G`` records are cut
  into micro-batches, not only on which records they are:

  - ``W`` ranks x micro ``m`` x accumulation ``A`` and ``1`` rank x micro ``m`` x accumulation ``A W`` run the same
    micro-batches (the interleaving above) -> the same objective, the same gradients, the same run up to
    floating-point summation order. ``tests/test_dist.py`` checks this with 2 processes.
  - 2 ranks x micro 2 and 1 rank x micro 4 are **different objectives**: with micro 4 each anchor has 3 negatives
    instead of 1, and the NTP token mean is taken over 4 records instead of 2 (so even plain next-token prediction
    differs when lengths differ). Keep ``m`` fixed when scaling out.
  - The reference trains with ``m = 16`` on each of 8 GPUs: 16 candidates per anchor, not 128.
* **Global negatives (``objective.negatives = "global"``).** The unit of the objective is the micro-step's batch over
  all ranks, ``W m`` records: pooled states are gathered with gradients (:mod:`alignx.dist`), every anchor is
  contrasted with the ``W m`` targets, language matching pairs all ``2 W m`` states and the NTP token mean runs over
  all ranks' tokens. Each rank's loss is scaled so that DeepSpeed's average of the gradients is exactly the gradient
  of that global objective: ``W`` ranks x micro ``m`` give the loss and the gradients of one process running the same
  ``W m`` records as one micro-batch (``tests/test_dist_negatives.py``), also when the record filter leaves the ranks
  with different numbers of rows. The logged terms are means over ranks, i.e. the global values.
* **Negatives queue (``"global+queue"``).** The gathered targets (and sources, if symmetric) of every micro-step are
  staged during the step and enter the FIFO queue after the optimizer step (:meth:`AlignXModel.end_step`), so all
  micro-batches of a step see the same queue and the queue after step ``k`` holds the newest
  ``min(queue_size, rows of steps 1..k)`` rows on every rank. It is saved once per checkpoint
  (``negatives_queue.pt``, rank 0) and restored on resume exactly (same rows, same slots), so a resumed run continues
  the uninterrupted one step for step. Evaluation uses the queue as it stands and never adds to it.
* **Packing (``data.packing``).** Each micro-batch (the same ``m`` records) is one row without padding; every term is
  the padded batch's (``tests/test_packing.py``). ``train/padding_fraction`` and ``train/positions_per_step`` show
  what the layout costs: positions processed per optimizer step (all ranks) and the share of them that is padding.
* **Evaluation** runs every ``train.eval_every`` steps on the held-out rows, cut into micro-batches of ``m`` in a
  fixed seeded order (the same micro-batches for any ``W`` at a fixed ``m``), padded cyclically so every rank runs
  the same number of forwards (ZeRO-3 needs it); reported terms are means over those micro-batches.
* **Resume.** A checkpoint holds the model, AdamW state, LR schedule, the step (= data position: step ``g`` fixes
  epoch ``g // steps_per_epoch`` and the position in it) and every rank's RNG state. ``--resume auto`` restarts from
  the newest complete checkpoint and reproduces the uninterrupted run step for step; lines of ``metrics.jsonl`` past
  the checkpoint are dropped. Resuming with a different ``G`` or different data is refused, and so is a ZeRO >= 1
  checkpoint on a different number of ranks (its optimizer shards are per rank).
* **SIGTERM** (a scheduler's pre-emption; the ``deepspeed`` launcher forwards it to every rank): the ranks agree at
  the end of the current step, write a checkpoint, and exit with code 143 — ``--resume auto`` continues. What the
  launcher process returns depends on which process got the signal (README, "Exit codes").
* **Trust.** A checkpoint is resumed only if this user's key signed its manifest (:mod:`alignx.trust`), checked by
  every rank before anything is loaded; ``train.trust_checkpoint`` overrides it for a checkpoint from elsewhere.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import alignx.model
from alignx.checkpoint_state import client_state, data_order_problem, restore_align_layer, restore_run_state
from alignx.config import Config, ConfigError, save_config
from alignx.data import batch_tokens, micro_batches
from alignx.dist import all_gather_objects, any_rank, broadcast_from_rank0
from alignx.engine import (
    DistInfo,
    Engine,
    check_precision,
    init_distributed,
    latest_tag,
    partitioned_loading,
    prune_checkpoints,
    verify_checkpoint,
)
from alignx.layer_select import choose_align_layer
from alignx.layout import export_dir, stage_dir
from alignx.metrics import MetricsLogger, MetricWindow, format_table
from alignx.model import AlignXModel
from alignx.monitor import InertAlignmentMonitor
from alignx.recipes import stage_recipe
from alignx.similarity import build_space

__all__ = ["RunResult", "Trainer", "TrainingError"]

ROW_COLUMNS = ["input_ids", "labels", "span_ids", "src_lang", "tgt_lang"]


class TrainingError(RuntimeError):
    """The run cannot go on (no usable data, a non-finite loss, an inconsistent resume)."""


@dataclass
class Plan:
    """How many optimizer steps, of what."""

    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    n_train: int
    n_eval: int


@dataclass
class RunResult:
    """What :meth:`Trainer.run` returns: ``status`` is "completed" or "interrupted" (SIGTERM, checkpoint written)."""

    status: str
    step: int
    run_dir: Path
    export_dir: Path | None
    summary: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: the head's initialisation must agree (ZeRO-3 keeps each rank's own shard)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Sigterm:
    """Turns SIGTERM into a flag checked at step boundaries (restores the previous handler on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Sigterm:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. an embedding application): no handler
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """One stage of training. ``cfg`` is the stage's view of the config (:func:`alignx.schedule.stage_config`)."""

    def __init__(self, cfg: Config, stage: int = 1) -> None:
        if stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {stage!r}")
        self.cfg = cfg
        self.stage = stage
        self.run_dir = stage_dir(cfg, stage)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dist: DistInfo | None = None
        self._bar: Any = None

        # The stage's records, columns, collator, batch order and unused terms (alignx.recipes.Recipe).
        self.recipe = stage_recipe(cfg, stage)
        self._direction_strata: list[tuple[int, int]] | None = None
        self._align_probe: dict[str, Any] | None = None  # model.align_layer=auto: the measurement
        self._monitor = InertAlignmentMonitor(
            cfg.objective.inert_warn_steps,
            cfg.objective.inert_tolerance,
            build_space(cfg.objective).name if cfg.objective.kind == "alignx" else "cosine",
        )

    # ------------------------------------------------------------------------------------------------------------
    # The story

    def run(self) -> RunResult:
        self.dist = init_distributed(self.cfg)
        check_precision(self.cfg)
        self.cfg.train.grad_accum_steps(self.dist.world_size)  # the batch split, before any data work
        resume_tag = self._check_run_dir()
        seed_everything(self.cfg.train.seed)
        tokenizer = alignx.model.load_tokenizer(self.cfg.model)
        data = self._rank0_first(lambda: self._prepare_data(tokenizer))
        plan = self._plan(data)
        self._say(self._plan_text(plan, data))

        with partitioned_loading(self.cfg, self.dist.world_size):  # ZeRO-3: each rank loads only its shards
            lm = alignx.model.load_causal_lm(self.cfg.model)
        engine = Engine(AlignXModel(lm, self.cfg), self.cfg, plan.total_steps)
        start = self._resume(engine, plan, resume_tag)
        if self.cfg.model.align_layer == "auto" and engine.module.lang_head is not None:
            if start == 0:
                self._auto_align_layer(engine, data, tokenizer)
            self.cfg.model.align_layer = engine.module.align_layer  # the saved config records the choice
        if self.dist.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        metrics = MetricsLogger(
            self.run_dir, enabled=self.dist.is_main, tensorboard=self.cfg.train.tensorboard, resume_step=start
        )
        if start == 0:
            if self._align_probe is not None:
                metrics.log(0, {"align/layer": float(self._align_probe["layer"])})
            drops = {f"data/dropped/{k}": v for k, v in data.drops.items()}
            drops.update({f"data/eval_dropped/{k}": v for k, v in data.stats.get("eval_drops", {}).items()})
            metrics.log(0, drops)

        collate = self._collator(tokenizer)
        with _Sigterm() as sigterm:
            history = self._train(engine, data, plan, start, collate, metrics, sigterm)
        interrupted = history["interrupted"]
        out_dir = None
        if not interrupted:
            out_dir = engine.export_hf(
                export_dir(self.cfg, self.stage),
                tokenizer,
                meta={"stage": self.stage, "step": engine.global_step, "base_model": self.cfg.model.name_or_path},
            )
        summary = self._summary(engine, plan, data, history, out_dir)
        metrics.close()
        engine.destroy()
        status = "interrupted" if interrupted else "completed"
        return RunResult(status, history["step"], self.run_dir, out_dir, summary)

    # ------------------------------------------------------------------------------------------------------------
    # Set-up

    def _say(self, text: str) -> None:
        if self.dist is None or self.dist.is_main:
            if self._bar is not None:
                self._bar.write(text)
            else:
                print(text, flush=True)

    def _check_run_dir(self) -> str | None:
        """The checkpoint tag to resume from (None = fresh). A fresh run refuses a directory holding checkpoints."""
        mode = self.cfg.train.resume
        if mode == "auto":
            tag = latest_tag(self.ckpt_dir)
            if tag is None:
                self._say(f"[train] stage {self.stage}: no checkpoint in {self.ckpt_dir}, starting from step 0")
        elif mode == "none":
            tag = None
            if latest_tag(self.ckpt_dir) is not None:
                raise TrainingError(
                    f"{self.run_dir} already holds checkpoints; continue it with --resume auto (train.resume=auto) "
                    "or choose another train.output_dir"
                )
        else:
            path = Path(mode)
            if not path.is_dir():
                raise ConfigError(f"train.resume={mode!r}: not 'auto', 'none' or a checkpoint directory")
            tag = str(path.resolve())
        if tag is None and self.dist is not None and self.dist.is_main:
            # A fresh start: metrics of an earlier attempt that never reached a checkpoint are stale.
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
        if tag is not None:
            # Before anything is loaded: resuming unpickles the checkpoint, so it must be this user's (alignx.trust).
            path = Path(tag) if Path(tag).is_absolute() else self.ckpt_dir / tag
            doubt = verify_checkpoint(path, trusted=self.cfg.train.trust_checkpoint)
            if doubt is not None:
                self._say(f"[train] --trust-checkpoint: resuming {path} unverified ({doubt})")
        return tag

    def _rank0_first(self, fn):
        """Run ``fn`` on rank 0 first (it fills the datasets cache), then on the others; an error on rank 0 is
        raised on every rank instead of leaving them waiting."""
        assert self.dist is not None
        if self.dist.world_size == 1:
            return fn()
        result, error = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except Exception as e:  # re-raised below, after the other ranks know
                error = e
        msg = broadcast_from_rank0(f"{type(error).__name__}: {error}" if error is not None else None)
        if error is not None:
            raise error
        if msg is not None:
            raise TrainingError(f"rank 0 failed to prepare the data: {msg}")
        return result if self.dist.is_main else fn()

    def _prepare_data(self, tokenizer: Any) -> Any:
        assert self.dist is not None
        return self.recipe.prepare(
            self.cfg,
            tokenizer,
            train_file=self.cfg.data.train_file,
            eval_file=self.cfg.data.eval_file,
            verbose=self.dist.is_main,
        )

    def _plan(self, data: Any) -> Plan:
        assert self.dist is not None
        t = self.cfg.train
        grad_accum = t.grad_accum_steps(self.dist.world_size)
        n_train = len(data.train)
        per_epoch = n_train // t.global_batch_size
        strata = self._strata(data.train) if self.stage == 1 else None
        if strata is not None:  # direction-homogeneous: whole micro-batches per direction only
            chunks = sum(n // t.micro_batch_size for n in Counter(strata).values())
            per_epoch = chunks * t.micro_batch_size // t.global_batch_size
        if per_epoch == 0:
            raise TrainingError(
                f"{n_train} usable training records are fewer than one global batch of {t.global_batch_size} "
                f"(dropped at preprocessing: {sum(data.drops.values())}); lower train.global_batch_size or add data"
            )
        total = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * per_epoch)
        if total < 1:
            raise ConfigError(f"train.epochs={t.epochs} gives no optimizer step ({per_epoch} steps per epoch)")
        n_eval = len(data.eval) if data.eval is not None else 0
        return Plan(grad_accum, per_epoch, total, n_train, n_eval)

    def _plan_text(self, plan: Plan, data: Any) -> str:
        t = self.cfg.train
        ws = self.dist.world_size if self.dist else 1
        return (
            f"[train] stage {self.stage}: {plan.n_train} training records, {plan.n_eval} held out; "
            f"global batch {t.global_batch_size} = micro {t.micro_batch_size} x {ws} ranks x {plan.grad_accum} "
            f"accumulation; {plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps; "
            f"ZeRO-{self.cfg.engine.zero_stage} {self.cfg.engine.precision}; {self._layout_text(ws)}; "
            f"run directory {self.run_dir}"
        )

    def _layout_text(self, world_size: int) -> str:
        """Negatives per anchor and the batch layout, in words (docs/negatives.md)."""
        obj, m = self.cfg.objective, self.cfg.train.micro_batch_size
        if obj.kind == "ntp":
            negatives = "no contrastive term"
        elif obj.negatives == "local":
            negatives = f"negatives: local ({m} candidates per anchor)"
        elif obj.negatives == "global":
            negatives = f"negatives: global ({m * world_size} candidates per anchor, gathered over {world_size} ranks)"
        else:
            negatives = (
                f"negatives: global+queue ({m * world_size} gathered + up to {obj.queue_size} queued per anchor, "
                f"{'queues of targets and sources' if obj.symmetric else 'queue of targets'})"
            )
        layout = "packed (no padding)" if self.cfg.data.packing else f"{self.cfg.data.padding_side}-padded"
        return f"{negatives}; {layout} micro-batches"

    def _auto_align_layer(self, engine: Engine, data: Any, tokenizer: Any) -> None:
        """``model.align_layer=auto``: measure the base model's retrieval per layer on a held-out slice and hook the
        best middle layer (:mod:`alignx.layer_select`). Every rank runs the same forwards (ZeRO-3 gathers the
        weights); rank 0's choice is broadcast."""
        assert self.dist is not None
        rows = data.eval if data.eval is not None and len(data.eval) > 0 else data.train
        n = min(self.cfg.model.align_probe_records, len(rows))
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.cfg.train.seed))[:n].tolist()
        chosen = rows.select(pick).select_columns(["input_ids", "span_ids", "src_lang", "tgt_lang"])
        t0 = time.time()
        engine.eval()
        result = choose_align_layer(engine.module.lm, chosen, engine.module.num_layers, tokenizer.bos_token_id)
        engine.train()
        if self.dist.world_size > 1:
            result = broadcast_from_rank0(result)
        engine.module.set_align_layer(result["layer"])
        self._align_probe = result
        best = ", ".join(f"{k}: {result['scores'][k]:.3f}" for k in result["candidates"])
        self._say(
            f"[train] model.align_layer=auto: layer {result['layer']} (source->target top-1 on {result['records']} "
            f"held-out records per middle layer: {best}; reference middle {engine.module.num_layers // 2}; "
            f"{time.time() - t0:.0f} s)"
        )

    def _collator(self, tokenizer: Any) -> Any:
        return self.recipe.collator(tokenizer, self.cfg)

    def _resume(self, engine: Engine, plan: Plan, tag: str | None) -> int:
        """Load the checkpoint (model, optimizer, schedule, RNG) and return the step to continue from."""
        if tag is None:
            return 0
        root, name = (Path(tag).parent, Path(tag).name) if Path(tag).is_absolute() else (self.ckpt_dir, tag)
        client = engine.load_checkpoint(root, name)
        where = root / name
        batch = self.cfg.train.global_batch_size
        problem = data_order_problem(client, where, global_batch_size=batch, steps_per_epoch=plan.steps_per_epoch)
        if problem is not None:
            raise TrainingError(problem)
        step = int(client["step"])
        obj = self.cfg.objective
        settings = {"negatives": obj.negatives, "similarity": obj.similarity}
        problem = restore_run_state(engine, client, where, settings) or restore_align_layer(
            engine, client, where, self.cfg.model.align_layer
        )
        if problem is not None:
            raise TrainingError(problem)
        self._say(f"[train] stage {self.stage}: resumed from {root / name} at step {step}")
        return step

    # ------------------------------------------------------------------------------------------------------------
    # The loop

    def _strata(self, rows: Any) -> list[tuple[int, int]] | None:
        """The direction of every record for ``data.batching=direction`` (None = mixed batches)."""
        if self.cfg.data.batching != "direction":
            return None
        if self.recipe.own_batch_order:
            raise ConfigError(
                f"data.batching=direction: objective.kind={self.cfg.objective.kind!r} orders its own batches "
                "(language-balanced); use data.batching=mixed"
            )
        if "src_lang" not in rows.column_names or "tgt_lang" not in rows.column_names:
            raise ConfigError("data.batching=direction needs src_lang and tgt_lang on every record (stage 1 data)")
        return list(zip(rows["src_lang"], rows["tgt_lang"]))

    def _micro_batches(self, rows: Any, epoch: int, plan: Plan) -> list[list[int]]:
        """This rank's micro-batches of ``epoch`` over the prepared training ``rows`` (the recipe's order)."""
        assert self.dist is not None
        extra = {"strata": self._direction_strata} if self._direction_strata is not None else {}
        return self.recipe.micro_batches(
            rows,
            self.cfg.train.micro_batch_size,
            world_size=self.dist.world_size,
            rank=self.dist.rank,
            seed=self.cfg.train.seed,
            epoch=epoch,
            group_by_length=self.cfg.data.group_by_length,
            drop_last=True,
            grad_accum=plan.grad_accum,
            **extra,
        )

    def _train(
        self,
        engine: Engine,
        data: Any,
        plan: Plan,
        start: int,
        collate: Any,
        metrics: MetricsLogger,
        sigterm: _Sigterm,
    ) -> dict[str, Any]:
        from tqdm.auto import tqdm

        assert self.dist is not None
        t = self.cfg.train
        train = data.train.select_columns(self._row_columns())
        self._direction_strata = self._strata(data.train) if self.stage == 1 else None
        epoch_batches: tuple[int, list[list[int]]] | None = None
        window = MetricWindow(self._unused_terms())
        history: dict[str, Any] = {"interrupted": False, "step": start, "train": [], "eval": [], "start": start}
        engine.train()
        self._bar = tqdm(
            total=plan.total_steps, initial=start, desc=f"stage {self.stage}", unit="step",
            disable=not self.dist.is_main, dynamic_ncols=True,
        )  # fmt: skip
        t0 = time.time()
        try:
            for step in range(start, plan.total_steps):
                epoch, in_epoch = divmod(step, plan.steps_per_epoch)
                if epoch_batches is None or epoch_batches[0] != epoch:
                    epoch_batches = (epoch, self._micro_batches(data.train, epoch, plan))
                micro = epoch_batches[1][in_epoch * plan.grad_accum : (in_epoch + 1) * plan.grad_accum]
                window.lr.append(engine.lr)
                self._train_step(engine, train, micro, collate, window, step)
                done = step + 1
                history["step"] = done
                self._check_finite(engine, window, done)
                self._bar.update(1)

                if done % t.log_every == 0 or done == plan.total_steps:
                    history["train"].append((done, self._log_window(window, engine, metrics, done)))
                paused = time.time()  # evaluation and checkpoints do not count in tokens/s
                if (
                    data.eval is not None
                    and t.eval_every > 0
                    and (done % t.eval_every == 0 or done == plan.total_steps)
                ):
                    row = self._evaluate(engine, data.eval, collate)
                    metrics.log(done, row)
                    history["eval"].append((done, row))
                    self._say(f"[eval] stage {self.stage} step {done}: loss {row['eval/loss']:.4f}")
                history["interrupted"] = self._save_or_stop(engine, plan, done, sigterm)
                if history["interrupted"]:
                    break
                window.t0 += time.time() - paused
        finally:
            self._bar.close()
            self._bar = None
        history["seconds"] = time.time() - t0
        return history

    def _save_or_stop(self, engine: Engine, plan: Plan, done: int, sigterm: _Sigterm) -> bool:
        """Checkpoint where ``train.save_every`` and the last step ask for one, or at once on SIGTERM; True = stop."""
        if self._stop_requested(sigterm):
            self._checkpoint(engine, plan, done)
            self._say(f"[train] SIGTERM: checkpoint written at step {done}; continue with --resume auto")
            return True
        every = self.cfg.train.save_every
        if done == plan.total_steps or (every > 0 and done % every == 0):
            self._checkpoint(engine, plan, done)
        return False

    def _log_window(self, window: MetricWindow, engine: Engine, metrics: MetricsLogger, done: int) -> dict[str, float]:
        """Reduce the metric window over the ranks, log it (with the inert-alignment warning, once) and return it."""
        assert self.dist is not None
        steps_logged = window.steps
        row = window.reduce(self.dist, engine)
        warning = self._monitor.update(row, steps_logged)
        if warning is not None:
            row["train/inert_warning"] = 1.0
            self._say(warning)
        metrics.log(done, row)
        self._bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{row['train/lr']:.2e}")
        return row

    def _train_step(
        self, engine: Engine, train: Any, micro: list[list[int]], collate: Any, window: MetricWindow, step: int
    ) -> None:
        """``grad_accum`` micro-batches: forward, backward, and the optimizer step at the last one."""
        for idx in micro:
            cols = train[idx]
            rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
            batch = collate(rows)
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            window.add(out, *batch_tokens(batch))
            window.add_diagnostics(engine.module.diagnostics)
        # The step's gathered embeddings enter the negatives queue now, after the update (a no-op without a queue).
        engine.module.end_step(step + 1)
        window.candidates.append(engine.module.candidates)
        window.steps += 1
        norm = engine.grad_norm
        if norm is not None:
            window.grad_norm.append(norm)

    def _row_columns(self) -> list[str]:
        return ROW_COLUMNS + list(self.recipe.extra_columns)

    def _unused_terms(self) -> tuple[str, ...]:
        return self.recipe.unused_terms

    def _check_finite(self, engine: Engine, window: MetricWindow, step: int) -> None:
        """Stop on a non-finite gradient norm (the same value on every rank, so all ranks stop together).

        fp16 is exempt: an overflow there is expected and the loss scaler skips the step.
        """
        if self.cfg.engine.precision == "fp16":
            return
        norm = engine.grad_norm
        if norm is not None and not math.isfinite(norm):
            last = latest_tag(self.ckpt_dir)
            raise TrainingError(
                f"stage {self.stage} step {step}: non-finite gradient norm ({norm}); last local loss "
                f"{window.last_loss}; newest checkpoint: {last or 'none'}"
            )

    def _stop_requested(self, sigterm: _Sigterm) -> bool:
        """All ranks agree: stop if any rank got SIGTERM (one tiny all-reduce per step)."""
        assert self.dist is not None
        if self.dist.world_size == 1:
            return sigterm.requested
        return any_rank(sigterm.requested, self.dist.device)

    @torch.no_grad()
    def _evaluate(self, engine: Engine, eval_ds: Any, collate: Any) -> dict[str, float]:
        """Mean of every term over the held-out micro-batches of all ranks."""
        assert self.dist is not None
        ds = eval_ds.select_columns(self._row_columns())
        batches = micro_batches(
            list(eval_ds["length"]),
            self.cfg.train.micro_batch_size,
            world_size=self.dist.world_size,
            rank=self.dist.rank,
            seed=self.cfg.train.seed,
            epoch=0,
            group_by_length=False,
            drop_last=False,
        )
        window = MetricWindow(self._unused_terms())
        engine.eval()
        for idx in batches:
            cols = ds[idx]
            batch = collate([dict(zip(cols, values)) for values in zip(*cols.values())])
            window.add(engine(batch), *batch_tokens(batch))
            window.add_diagnostics(engine.module.diagnostics)
        engine.train()
        row = window.reduce(self.dist, None, prefix="eval")
        for key in ("tokens_per_s", "positions_per_step", "padding_fraction"):
            row.pop(f"eval/{key}", None)
        return row

    def _checkpoint(self, engine: Engine, plan: Plan, step: int) -> None:
        assert self.dist is not None
        client, shared = client_state(
            engine.module,
            step=step,
            steps_per_epoch=plan.steps_per_epoch,
            total_steps=plan.total_steps,
            global_batch_size=self.cfg.train.global_batch_size,
            world_size=self.dist.world_size,
            stage=self.stage,
            seed=self.cfg.train.seed,
        )
        engine.save_checkpoint(self.ckpt_dir, f"step_{step}", client, shared=shared or None)
        if self.dist.is_main:
            prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------------------------------------------------
    # The end

    def _summary(
        self, engine: Engine, plan: Plan, data: Any, history: dict[str, Any], out_dir: Path | None
    ) -> dict[str, Any]:
        """Gather per-rank facts, print the table and write ``summary.json`` (rank 0)."""
        assert self.dist is not None
        per_rank = all_gather_objects(engine.optimizer_state_numel())
        peaks = all_gather_objects(_peak_memory(self.dist.device))
        train, evals = history["train"], history["eval"]
        speeds = [r["train/tokens_per_s"] for _, r in train if r.get("train/tokens_per_s")]
        summary: dict[str, Any] = {
            "stage": self.stage,
            "status": "interrupted" if history["interrupted"] else "completed",
            "model": self.cfg.model.name_or_path,
            "objective": self.cfg.objective.kind,
            "world_size": self.dist.world_size,
            "global_batch_size": self.cfg.train.global_batch_size,
            "micro_batch_size": self.cfg.train.micro_batch_size,
            "grad_accum": plan.grad_accum,
            "zero_stage": self.cfg.engine.zero_stage,
            "precision": self.cfg.engine.precision,
            "steps": history["step"],
            "total_steps": plan.total_steps,
            "resumed_from": history["start"],
            "train_records": plan.n_train,
            "eval_records": plan.n_eval,
            "dropped_records": {k: v for k, v in data.drops.items() if v},
            "eval_dropped_records": {k: v for k, v in data.stats.get("eval_drops", {}).items() if v},
            "first_train_loss": train[0][1]["train/loss"] if train else None,
            "last_train_loss": train[-1][1]["train/loss"] if train else None,
            "last_eval_loss": evals[-1][1]["eval/loss"] if evals else None,
            "best_eval_loss": min(r["eval/loss"] for _, r in evals) if evals else None,
            "tokens_per_s": float(np.mean(speeds)) if speeds else None,
            "seconds": round(history.get("seconds", 0.0), 2),
            "parameters": engine.num_parameters(),
            "optimizer_state_numel_per_rank": per_rank,
            "peak_memory_bytes_per_rank": [b for b, _ in peaks],
            "peak_memory_method": peaks[0][1],
            "checkpoint": str(self.ckpt_dir / (latest_tag(self.ckpt_dir) or "")),
            "export": str(out_dir) if out_dir else None,
            "align_layer": getattr(engine.module, "align_layer", None),
            "align_layer_probe": self._align_probe,
            "alignment_warning": self._monitor.message,
        }
        if self.dist.is_main:
            import json

            rows = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))]
            rows += [(f"dropped/{k}", v) for k, v in summary["dropped_records"].items()]
            rows.append(("optimizer state / rank", ", ".join(str(n) for n in per_rank)))
            print(format_table(rows, title=f"alignx stage {self.stage} summary"), flush=True)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """This process's peak memory so far: the CUDA allocator's peak on a GPU, the peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM (peak resident set of the process)"
    except OSError:
        pass
    return -1, "unavailable"
