"""Test-session set-up: chosen before any kernel module is imported.

Without CUDA the Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, read by ``@triton.jit``
at decoration time, hence set here, first). With CUDA the same tests run compiled, and ``gpu`` tests add large shapes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# The helpers shared by the test modules (tests/helpers.py) assert too: their failures get pytest's messages.
pytest.register_assert_rewrite("helpers")

REPO = Path(__file__).resolve().parents[1]
# The repository's top-level ``kernels/`` folder must never be importable as ``kernels`` (that is Hugging Face's
# package name); the package is used as the installed ``alignx.kernels``.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Checkpoints written by the tests are signed with a key of the test session, never the user's own (alignx.trust).
os.environ.setdefault("ALIGNX_CONFIG_DIR", tempfile.mkdtemp(prefix="alignx-test-config-"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def nan_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``torch.empty``/``empty_like`` return NaN-filled float tensors, so an unwritten output element fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
