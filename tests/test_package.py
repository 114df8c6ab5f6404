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
