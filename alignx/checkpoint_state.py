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
    "SIMILARITY_FILE",
    "client_state",
    "data_order_problem",
    "restore_alignment",
    "restore_negatives",
]

NEGATIVES_FILE = "negatives_queue"  # <checkpoint>/negatives_queue.pt, written once (identical on every rank)
SIMILARITY_FILE = "similarity_stats"  # <checkpoint>/similarity_stats.pt: running statistics of the similarity space


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
    queue = module.negatives_state()
    client["negatives_queue"] = queue is not None
    shared = {NEGATIVES_FILE: queue} if queue is not None else {}
    stats = module.similarity_state() if hasattr(module, "similarity_state") else None
    client["similarity_stats"] = stats is not None
    if stats is not None:
        shared[SIMILARITY_FILE] = stats
    client["align_layer"] = getattr(module, "align_layer", None)
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


def restore_negatives(engine: Engine, client: dict[str, Any], root: Path, name: str, negatives: str) -> str | None:
    """Load the negatives queue of the checkpoint ``root/name``; the problem when this run (``objective.negatives``)
    has a queue and the checkpoint none."""
    if client.get("negatives_queue"):
        engine.module.load_negatives_state(engine.load_shared(root, name, NEGATIVES_FILE), engine.device)
    elif engine.module.negatives_state() is not None:
        return (
            f"checkpoint {root / name} holds no negatives queue but this run uses objective.negatives="
            f"{negatives!r}; resume with the checkpoint's objective settings"
        )
    return None


def restore_alignment(
    engine: Engine, client: dict[str, Any], where: Path, *, similarity: str, align_layer: int | str
) -> str | None:
    """The similarity space's running statistics and the aligned layer of the checkpoint; the problem when this run
    (``objective.similarity``, ``model.align_layer``) cannot take them."""
    module = engine.module
    if not hasattr(module, "similarity_state"):
        return None
    if client.get("similarity_stats"):
        module.load_similarity_state(engine.load_shared(where.parent, where.name, SIMILARITY_FILE))
    elif module.similarity_state() is not None:
        return (
            f"checkpoint {where} holds no similarity statistics but this run uses objective.similarity="
            f"{similarity!r}; resume with the checkpoint's objective settings"
        )
    layer = client.get("align_layer")
    if layer is None or module.lang_head is None or int(layer) == module.align_layer:
        return None
    if align_layer != "auto":
        return (
            f"checkpoint {where} aligned layer {layer}, this run has model.align_layer={module.align_layer}; "
            "resume with the checkpoint's layer (or model.align_layer=auto)"
        )
    module.set_align_layer(int(layer))
    return None
