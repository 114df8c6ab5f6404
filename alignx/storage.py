"""The run's storage: probed before anything is loaded, and a storage failure during the run told in one line.

* :func:`probe_output_dir` — before the data is read: the output directory (and the data cache) can be created and
  written, and its file system has room for what the run will write (:func:`bytes_needed`: checkpoints, exports,
  data cache). A read-only file system or too little space is one line naming the path and the bytes needed.
* :func:`storage_failure` — during the run: an exception caused by a full disk, a quota or a read-only file system
  is recognised, also when a library hides the errno (``torch.save`` on a full disk raises ``RuntimeError: ...
  unexpected pos``): the directory is probed with a small write, which reports the errno. The command line turns it
  into one line that names the last good checkpoint (:func:`last_checkpoint`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from alignx.engine import latest_tag

if TYPE_CHECKING:
    from alignx.config import Config

__all__ = ["StorageError", "bytes_needed", "last_checkpoint", "probe_output_dir", "storage_failure"]

STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
# Optimizer state bytes per parameter kept in a checkpoint: AdamW's two fp32 moments, plus the fp32 master copy of
# mixed precision; the weights themselves are counted in the training dtype.
_ADAM, _MASTER = 8, 4
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}
_PROBE_BYTES = 1 << 16


class StorageError(RuntimeError):
    """The run's directory cannot hold what the run writes (read-only, full, over quota)."""


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where free space is measured before the directory exists)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_write(directory: Path) -> int | None:
    """Write, sync and delete a small file in ``directory``; the errno of a storage failure, else None."""
    probe = directory / f".alignx-probe-{os.getpid()}"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno if e.errno in STORAGE_ERRNOS else None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def _weights_bytes(model_dir: Path) -> tuple[int, int]:
    """(bytes of the ``*.safetensors`` weights in ``model_dir``, bytes per parameter of their dtype)."""
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return size, _BYTES.get(stored, 4)


def _checkpoints_on_disk(cfg: Config, stage: int) -> int:
    """Checkpoints a stage holds at once: ``keep_checkpoints + 1`` (a new one is complete before the oldest is
    pruned; 0 keeps all), at most the number it writes when that is known (``save_every`` 0: only the last one)."""
    t = cfg.train
    if t.save_every == 0:
        return 1
    max_steps = t.max_steps if stage == 1 else cfg.stage2.max_steps
    writes = max_steps // t.save_every + 1 if max_steps > 0 else None
    kept = t.keep_checkpoints + 1 if t.keep_checkpoints > 0 else (writes or 1)
    return min(kept, writes) if writes is not None else kept


def bytes_needed(cfg: Config, stages: tuple[int, ...], model_dir: Path | None) -> tuple[int, str]:
    """Estimate of what the run writes under ``train.output_dir`` and how it was counted.

    Per stage: the checkpoints it holds at once (:func:`_checkpoints_on_disk`), each the weights in the training
    dtype + AdamW's two fp32 moments (+ an fp32 master copy in bf16/fp16), and one export in ``model.dtype``. Plus the
    data cache, about 10 x the input files (Arrow rows of text and of token ids). The weights are counted from the
    model directory's safetensors (unknown for a hub id not downloaded yet).
    """
    files = [cfg.data.train_file, cfg.data.eval_file, cfg.stage2.train_file, cfg.stage2.eval_file]
    data = 10 * sum(Path(f).stat().st_size for f in files if f and Path(f).is_file())
    if model_dir is None or not model_dir.is_dir():
        return data, "data cache (model size unknown)"
    size, stored = _weights_bytes(model_dir)
    params = size // stored
    train_dtype = _BYTES[cfg.engine.precision]
    per_ckpt = params * (train_dtype + _ADAM + (_MASTER if train_dtype < 4 else 0))
    kept = [_checkpoints_on_disk(cfg, s) for s in stages]
    export = params * _BYTES[cfg.model.dtype]
    total = sum(k * per_ckpt + export for k in kept) + data
    how = f"{' + '.join(map(str, kept))} checkpoints of {per_ckpt:,} bytes, {len(stages)} export(s) of {export:,}"
    how += f", data cache {data:,}"
    return total, how


def probe_output_dir(cfg: Config, stages: tuple[int, ...], model_dir: Path | None) -> None:
    """Raise :class:`StorageError` (one line) unless ``train.output_dir`` and the data cache can be written and
    have the room :func:`bytes_needed` estimates."""
    out = Path(cfg.train.output_dir).expanduser()
    dirs = [out] + ([Path(cfg.data.cache_dir).expanduser()] if cfg.data.cache_dir else [])
    for key, directory in zip(("train.output_dir", "data.cache_dir"), dirs):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{key}={directory} cannot be created: {e.strerror or e}") from None
        code = _probe_write(directory)
        if code is not None or not os.access(directory, os.W_OK):
            why = STORAGE_ERRNOS.get(code, "not writable") if code is not None else "not writable"
            raise StorageError(f"{key}={directory} cannot be written: {why}; choose another directory")
    needed, how = bytes_needed(cfg, stages, model_dir)
    free = shutil.disk_usage(_existing(out)).free
    if free < needed:
        raise StorageError(
            f"train.output_dir={out} has {free:,} bytes free, the run needs about {needed:,} ({how}); free space, "
            "lower train.keep_checkpoints or choose another train.output_dir"
        )


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def storage_failure(err: BaseException, directory: Path) -> str | None:
    """What storage failure caused ``err`` ("no space left on device", ...), or None if it was not one.

    An ``OSError`` in the exception chain tells its errno. A ``RuntimeError`` from torch's file writer (a full disk
    makes ``torch.save`` fail with "unexpected pos" or "file write failed", without the errno) is checked by writing
    a small file into ``directory``.
    """
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return f"{STORAGE_ERRNOS[e.errno]} ({e.filename or directory})"
    text = str(err)
    if isinstance(err, RuntimeError) and any(s in text for s in ("unexpected pos", "file write failed", "Writer")):
        code = _probe_write(_existing(directory))
        if code is not None:
            return f"{STORAGE_ERRNOS[code]} ({directory})"
    return None


def last_checkpoint(output_dir: str | Path) -> str:
    """The newest complete checkpoint of any stage under ``output_dir`` ("none" if there is none)."""
    found = []
    for stage_dir in sorted(Path(output_dir).glob("stage*")):
        tag = latest_tag(stage_dir / "checkpoints")
        if tag is not None:
            found.append(str(stage_dir / "checkpoints" / tag))
    return found[-1] if found else "none"
