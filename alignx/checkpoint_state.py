"""What the trainer saves with a checkpoint besides the engine's own state, and the checks that a resume continues
the run that wrote it.

The client state (``client_state``, stored by :meth:`alignx.engine.Engine.save_checkpoint`) holds the data position
(``step``, ``epoch``, ``steps_per_epoch``, ``total_steps``, ``global_batch_size``), the run's shape (``world_size``,
``stage``, ``seed``), whether the negatives queue and the similarity statistics were saved as shared files
(``negatives_queue.pt``, ``similarity_stats.pt``, written once) and the aligned layer. A resume is refused when the
data order would not continue, or when the run needs a queue or statistics the checkpoint lacks, or aligns another
layer than the checkpoint (unless ``model.align_layer=auto``).

The checks return the problem as a message (None = none); the trainer raises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from alignx.engine import Engine

__all__ = [
    "NEGATIVES_FILE",
    "SHARED_FILES",
    "SIMILARITY_FILE",
    "client_state",
    "data_order_problem",
    "restore_align_layer",
    "restore_run_state",
]

NEGATIVES_FILE = "negatives_queue"  # <checkpoint>/negatives_queue.pt, written once (identical on every rank)
SIMILARITY_FILE = "similarity_stats"  # <checkpoint>/similarity_stats.pt: running statistics of the similarity space
SHARED_FILES = {NEGATIVES_FILE: "negatives", SIMILARITY_FILE: "similarity"}
"""The model's run state saved as shared files (:meth:`alignx.model.AlignXModel.run_state`) -> the objective setting
that asks for it."""
SHARED_FILES_TEXT = {NEGATIVES_FILE: "negatives queue", SIMILARITY_FILE: "similarity statistics"}


def client_state(
    module: nn.Module,
    *,
    step: int,
    steps_per_epoch: int,
    total_steps: int,
    global_batch_size: int,
    world_size: int,
    stage: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(client state, shared files)`` of a checkpoint at ``step``: the shared files are ``{name: object}``."""
    client = {
        "step": step,
        "epoch": step // steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "global_batch_size": global_batch_size,
        "world_size": world_size,
        "stage": stage,
        "seed": seed,
    }
    state = module.run_state()
    shared = {name: state[name] for name in SHARED_FILES if state[name] is not None}
    client.update({name: state[name] is not None for name in SHARED_FILES}, align_layer=state["align_layer"])
    return client, shared


def data_order_problem(
    client: dict[str, Any], where: Path, *, global_batch_size: int, steps_per_epoch: int
) -> str | None:
    """Why the data order would not continue from the checkpoint at ``where`` (None = it does)."""
    expected = {"global_batch_size": global_batch_size, "steps_per_epoch": steps_per_epoch}
    for key, value in expected.items():
        if client.get(key) != value:
            return (
                f"checkpoint {where} was written with {key}={client.get(key)}, this run has {value}: "
                "the data order would not continue (same data and global batch are needed to resume)"
            )
    return None


def restore_run_state(engine: Engine, client: dict[str, Any], where: Path, settings: dict[str, str]) -> str | None:
    """Load the negatives queue and the similarity statistics of the checkpoint at ``where``; the problem when this
    run needs one that the checkpoint lacks (``settings``: the config values that ask for each, for the message)."""
    module = engine.module
    state = module.run_state()
    for name, key in SHARED_FILES.items():
        if client.get(name):
            module.load_run_state(name, engine.load_shared(where.parent, where.name, name), engine.device)
        elif state[name] is not None:
            return (
                f"checkpoint {where} holds no {SHARED_FILES_TEXT[name]} but this run uses objective.{key}="
                f"{settings[key]!r}; resume with the checkpoint's objective settings"
            )
    return None


def restore_align_layer(engine: Engine, client: dict[str, Any], where: Path, align_layer: int | str) -> str | None:
    """Align the checkpoint's layer; the problem when this run (``model.align_layer``) asks for another."""
    module = engine.module
    layer = client.get("align_layer")
    if layer is None or module.lang_head is None or int(layer) == module.align_layer:
        return None
    if align_layer != "auto":
        return (
            f"checkpoint {where} aligned layer {layer}, this run has model.align_layer={module.align_layer}; "
            "resume with the checkpoint's layer (or model.align_layer=auto)"
        )
    module.load_run_state("align_layer", int(layer))
    return None
