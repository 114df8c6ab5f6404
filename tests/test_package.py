"""The package layout: ``kernels/`` is ``alignx.kernels``, never a top-level ``kernels`` module."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_installed_under_alignx() -> None:
    import alignx.kernels

    assert Path(alignx.kernels.__file__).resolve().parent == REPO / "kernels"


def test_no_top_level_kernels_from_repo_root() -> None:
    spec = importlib.util.find_spec("kernels")
    assert spec is None or REPO not in Path(spec.origin or "").resolve().parents


def test_train_py_does_not_shadow_kernels() -> None:
    """Launched from the repository root, train.py must not leave the repo's kernels/ importable as ``kernels``."""
    probe = (
        "import runpy, importlib.util as u; runpy.run_path('train.py', run_name='probe');"
        "s = u.find_spec('kernels'); print(s.origin if s else None)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    origin = out.stdout.strip().splitlines()[-1]
    assert origin == "None" or not origin.startswith(str(REPO)), origin
    # The probe can fail: without the sys.path clean-up in train.py, '' (the repo root) finds kernels/.
    bare = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('kernels').origin)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert bare.stdout.strip().startswith(str(REPO))


def test_cli_module_from_repo_root_does_not_shadow_kernels() -> None:
    """``python -m alignx.cli`` (how ``make demo`` runs) from the repository root drops the root from sys.path."""
    probe = (
        "import runpy, sys, importlib.util as u\n"
        "sys.argv = ['alignx', 'help']\n"
        "try:\n    runpy.run_module('alignx.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "s = u.find_spec('kernels'); print(s.origin if s else None)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    origin = out.stdout.strip().splitlines()[-1]
    assert origin == "None" or not origin.startswith(str(REPO)), origin


def test_transformers_probe_of_kernels_from_repo_root() -> None:
    """Even where the root is on sys.path, transformers' probe for its ``kernels`` package must not fail on ours.

    transformers imports any ``kernels`` it finds without a version; ours must import cleanly as a top-level
    module (no relative import beyond it) and must not pass for the Hugging Face package.
    """
    probe = "from transformers.utils.import_utils import is_kernels_available as f; print(f())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
