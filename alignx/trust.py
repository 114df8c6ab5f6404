"""Which checkpoints a run may resume: those this user's machine signed.

Resuming unpickles files: DeepSpeed reads its model and optimizer shards with ``torch.load(weights_only=False)``,
which runs whatever code the file names. So a checkpoint is loaded only when it comes from this user, the way
notebook servers trust only the notebooks they signed:

* **Key.** A random 256-bit key per user, created on first use in ``$ALIGNX_CONFIG_DIR`` (default
  ``$XDG_CONFIG_HOME/alignx`` or ``~/.config/alignx``) as ``checkpoint.key`` with mode 0600 — outside every run
  directory, so copying a run never copies the key. A key file others can read is refused (they could sign).
* **Manifest.** Every checkpoint directory gets :data:`MANIFEST`, written after every rank has finished writing and
  before ``latest`` names the checkpoint: each file's size and SHA-256, and an HMAC-SHA256 of all of it under the
  key. The files are hashed by all ranks in parallel (rank ``r`` hashes files ``r, r + W, ...``), which assumes
  the ranks see one checkpoint directory — as ``latest`` already does.
* **Verification** before a resume loads anything: the manifest is there, was signed with this user's key, was not
  changed, and lists exactly the files present with their hashes. Anything else is refused with one line, unless
  the user says ``--trust-checkpoint`` (``train.trust_checkpoint``).

alignx's own state files (RNG states, negatives queue, similarity statistics) are also read with
``weights_only=True`` whatever the verdict; only DeepSpeed's shards need the signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "KEY_FILE",
    "MANIFEST",
    "UntrustedCheckpoint",
    "config_dir",
    "hash_files",
    "sign_checkpoint",
    "user_key",
    "verify_checkpoint",
]

MANIFEST = "alignx_manifest.json"
KEY_FILE = "checkpoint.key"
FORMAT = 1
_CHUNK = 1 << 22  # 4 MiB reads: hashing runs at disk speed, memory stays flat

# (files to hash on this rank) -> {file: digest} merged over all ranks; the identity on one process.
Gather = Callable[[dict[str, Any]], dict[str, Any]]


class UntrustedCheckpoint(RuntimeError):
    """A checkpoint this user's key did not sign (or that changed since); the message says which check failed."""


def config_dir() -> Path:
    """``$ALIGNX_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/alignx``, else ``~/.config/alignx``."""
    if os.environ.get("ALIGNX_CONFIG_DIR"):
        return Path(os.environ["ALIGNX_CONFIG_DIR"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "alignx"


def user_key(create: bool = True) -> bytes:
    """This user's signing key (created with mode 0600 on first use when ``create``)."""
    path = config_dir() / KEY_FILE
    if not path.exists():
        if not create:
            raise UntrustedCheckpoint(f"no signing key at {path} (this user has never written a checkpoint)")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            # O_EXCL: two ranks (or two runs) creating the key at once agree on the first one written.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UntrustedCheckpoint(
            f"the signing key {path} is accessible to other users (mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
    text = path.read_text().strip()
    if len(text) < 32:  # a key file still being written by another process reads short; it is never this short
        raise UntrustedCheckpoint(f"the signing key {path} is empty or truncated; delete it to create a new one")
    return text.encode()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"alignx-key-id|" + key).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(ckpt: Path) -> list[str]:
    """Every regular file under the checkpoint (relative POSIX paths, sorted), the manifest excluded."""
    names = (p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(n for n in names if n != MANIFEST)


def hash_files(ckpt: Path, rank: int = 0, world_size: int = 1, gather: Gather | None = None) -> dict[str, Any]:
    """``{file: {"size", "sha256"}}`` of every file of ``ckpt``; rank ``r`` of ``W`` hashes files ``r::W`` and
    ``gather`` merges the ranks' shares (None = one process)."""
    mine = {
        name: {"size": (ckpt / name).stat().st_size, "sha256": _sha256(ckpt / name)}
        for name in _files(ckpt)[rank::world_size]
    }
    return gather(mine) if gather is not None else mine


def _signature(key: bytes, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def sign_checkpoint(ckpt: Path, files: dict[str, Any], key: bytes | None = None) -> Path:
    """Write ``ckpt/MANIFEST`` for ``files`` (from :func:`hash_files`), signed with this user's key."""
    key = user_key() if key is None else key
    body = {"format": FORMAT, "tag": ckpt.name, "key_id": _key_id(key), "files": files}
    tmp = ckpt / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({**body, "signature": _signature(key, body)}, indent=1, sort_keys=True))
    os.replace(tmp, ckpt / MANIFEST)
    return ckpt / MANIFEST


def _read_manifest(ckpt: Path, key: bytes) -> dict[str, Any]:
    """The manifest's body once its signature checks out (the file list is compared by :func:`verify_checkpoint`)."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise UntrustedCheckpoint(f"it has no signed {MANIFEST} (written by someone else, or by an older alignx)")
    try:
        manifest = json.loads(path.read_text())
        body = {k: v for k, v in manifest.items() if k != "signature"}
        signature = str(manifest["signature"])
        files = body["files"]
    except (ValueError, KeyError, TypeError):
        raise UntrustedCheckpoint(f"its {MANIFEST} is not a readable manifest") from None
    if body.get("key_id") != _key_id(key):
        raise UntrustedCheckpoint("its manifest was signed with another key (another user or machine)")
    if not hmac.compare_digest(signature, _signature(key, body)):
        raise UntrustedCheckpoint("its manifest was changed after it was signed")
    if not isinstance(files, dict):
        raise UntrustedCheckpoint(f"its {MANIFEST} is not a readable manifest")
    return body


def verify_checkpoint(ckpt: Path, rank: int = 0, world_size: int = 1, gather: Gather | None = None) -> None:
    """Raise :class:`UntrustedCheckpoint` unless ``ckpt`` is exactly what this user's key signed.

    Every rank calls it (each hashes its share of the files); the verdict is the same on every rank.
    """
    ckpt = Path(ckpt)
    body = _read_manifest(ckpt, user_key(create=False))
    signed = body["files"]
    present = _files(ckpt)
    extra = sorted(set(present) - set(signed))
    missing = sorted(set(signed) - set(present))
    if extra:
        raise UntrustedCheckpoint(f"{extra[0]} is not in its signed manifest" + _more(extra))
    if missing:
        raise UntrustedCheckpoint(f"{missing[0]} is listed in its signed manifest but missing" + _more(missing))
    actual = hash_files(ckpt, rank, world_size, gather)
    changed = sorted(n for n in signed if actual.get(n) != signed[n])
    if changed:
        raise UntrustedCheckpoint(f"{changed[0]} changed after the checkpoint was signed" + _more(changed))


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
