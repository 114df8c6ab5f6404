"""Trust on resume: only checkpoints signed by this user's key are resumed; alignx's state files never unpickle code.

* The key is created once, outside any run directory, with mode 0600; a key others can read is refused.
* A manifest signed with the key lists every file of a checkpoint with its SHA-256: an unchanged checkpoint verifies;
  a tampered manifest, a changed, added or missing file, a checkpoint without a manifest and one signed with another
  user's key are refused, each with a one-line reason.
* ``train.py --resume`` refuses such a checkpoint with one line and exit code 1 before any model is loaded;
  ``--trust-checkpoint`` resumes it (and says so in one line).
* RNG state files load with ``weights_only=True``: a pickle that would run code is rejected, not run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from helpers import process_group_scope, reference_run, run_train, tiny_args

from alignx import trust
from alignx.cli import train_main
from alignx.engine import _load_rng_file


@pytest.fixture(scope="module", autouse=True)
def _own_process_group():
    with process_group_scope():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def reference(base: Path) -> Path:
    return reference_run(base)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import alignx.model

    monkeypatch.setattr(alignx.model, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.fixture
def own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh per-user config directory (the key is created in it on first use)."""
    monkeypatch.setenv("ALIGNX_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


def _checkpoint(root: Path) -> Path:
    ckpt = root / "step_4"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(os.urandom(3000))
    (ckpt / "rng_state_rank0.pt").write_bytes(os.urandom(500))
    trust.sign_checkpoint(ckpt, trust.hash_files(ckpt))
    return ckpt


def test_key_is_private_and_created_once(own_key: Path) -> None:
    key = trust.user_key()
    path = own_key / trust.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(own_key.stat().st_mode) == 0o700
    assert trust.user_key() == key and len(key) == 64
    path.chmod(0o644)
    with pytest.raises(trust.UntrustedCheckpoint, match="accessible to other users .*chmod 600"):
        trust.user_key()


def test_signed_checkpoint_verifies_and_every_change_is_refused(own_key: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpts")
    trust.verify_checkpoint(ckpt)
    manifest = json.loads((ckpt / trust.MANIFEST).read_text())

    # The manifest edited to match a swapped file: its signature no longer matches.
    edited = json.loads(json.dumps(manifest))
    edited["files"]["rng_state_rank0.pt"]["sha256"] = "0" * 64
    (ckpt / trust.MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(trust.UntrustedCheckpoint, match="manifest was changed after it was signed"):
        trust.verify_checkpoint(ckpt)
    (ckpt / trust.MANIFEST).write_text(json.dumps(manifest))

    weights = ckpt / "mp_rank_00_model_states.pt"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(trust.UntrustedCheckpoint, match="mp_rank_00_model_states.pt changed after"):
        trust.verify_checkpoint(ckpt)
    weights.write_bytes(original)

    (ckpt / "extra.pt").write_bytes(b"planted")
    with pytest.raises(trust.UntrustedCheckpoint, match="extra.pt is not in its signed manifest"):
        trust.verify_checkpoint(ckpt)
    (ckpt / "extra.pt").unlink()
    weights.unlink()
    with pytest.raises(trust.UntrustedCheckpoint, match="listed in its signed manifest but missing"):
        trust.verify_checkpoint(ckpt)
    weights.write_bytes(original)
    trust.verify_checkpoint(ckpt)

    (ckpt / trust.MANIFEST).unlink()
    with pytest.raises(trust.UntrustedCheckpoint, match="has no signed alignx_manifest.json"):
        trust.verify_checkpoint(ckpt)


def test_checkpoint_of_another_users_key_is_refused(own_key: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ALIGNX_CONFIG_DIR", str(tmp_path / "someone_else"))
    ckpt = _checkpoint(tmp_path / "theirs")  # signed with their key
    monkeypatch.setenv("ALIGNX_CONFIG_DIR", str(own_key))
    trust.user_key()  # this user has a key of their own
    with pytest.raises(trust.UntrustedCheckpoint, match="signed with another key"):
        trust.verify_checkpoint(ckpt)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/alignx-pwned",))


def test_rng_state_loads_weights_only(tmp_path: Path) -> None:
    evil = tmp_path / "rng_state_rank0.pt"
    torch.save({"python": _RunsCode()}, evil)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _load_rng_file(evil)
    assert not Path("/tmp/alignx-pwned").exists()


# ----------------------------------------------------------------------------------------------------------------
# train.py --resume


def _copy_run(reference: Path, out: Path) -> Path:
    """A copy of the reference run's stage-1 checkpoints (written and signed by this test session's key)."""
    ckpts = out / "stage1" / "checkpoints"
    shutil.copytree(reference / "stage1" / "checkpoints", ckpts)
    return ckpts


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("alignx")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_refuses_a_tampered_checkpoint(reference: Path, base: Path, tmp_path: Path, capsys, no_model) -> None:
    ckpts = _copy_run(reference, tmp_path / "run")
    tag = (ckpts / "latest").read_text()
    manifest = ckpts / tag / trust.MANIFEST
    body = json.loads(manifest.read_text())
    (ckpts / tag / "rng_state_rank0.pt").write_bytes(b"swapped")
    body["files"]["rng_state_rank0.pt"] = {"size": 7, "sha256": "0" * 64}  # edited to match the swap
    manifest.write_text(json.dumps(body))
    code = train_main(tiny_args(base, tmp_path / "run", "--stage", "1", "--resume", "auto"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"refusing to resume {ckpts / tag}: its manifest was changed after it was signed" in line
    assert "--trust-checkpoint" in line


def test_resume_refuses_another_users_checkpoint_unless_trusted(
    reference: Path, base: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    ckpts = _copy_run(reference, tmp_path / "run")
    tag = (ckpts / "latest").read_text()
    monkeypatch.setenv("ALIGNX_CONFIG_DIR", str(tmp_path / "another_user"))
    trust.user_key()  # the other user's own key
    args = tiny_args(base, tmp_path / "run", "--stage", "1", "--resume", "auto")
    proc = run_train(args)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 1
    assert f"refusing to resume {ckpts / tag}: its manifest was signed with another key" in line

    proc = run_train([*args, "--trust-checkpoint"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--trust-checkpoint: resuming {ckpts / tag} unverified (its manifest was signed with another key" in (
        proc.stdout
    )
    assert f"resumed from {ckpts / tag} at step {tag.removeprefix('step_')}" in proc.stdout
    summary = json.loads((tmp_path / "run" / "stage1" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"] == int(tag.removeprefix("step_"))


def test_pickled_weights_are_never_loaded(base: Path, tmp_path: Path, capsys) -> None:
    """A model directory with only a pickled ``pytorch_model.bin`` (e.g. a foreign export): refused in one line by
    train.py before anything is read and by ``alignx eval``; ``load_causal_lm`` (stage 2) reads safetensors only."""
    from transformers import AutoModelForCausalLM

    from alignx.config import ModelConfig
    from alignx.model import load_causal_lm
    from alignx.testing import tiny_pretrained

    foreign = tmp_path / "foreign"
    model = AutoModelForCausalLM.from_pretrained(tiny_pretrained("tiny-llama"))
    model.config.save_pretrained(foreign)
    torch.save(model.state_dict(), foreign / "pytorch_model.bin")
    code = train_main(tiny_args(base, tmp_path / "out", "--stage", "1", f"--model.name_or_path={foreign}"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and f"{foreign} has no *.safetensors weights (pickled .bin weights are not loaded" in line
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        load_causal_lm(ModelConfig(name_or_path=str(foreign)))
    from alignx.eval.cli import EvalError, load_model

    with pytest.raises(EvalError, match=r"--model=.*has no \*\.safetensors weights"):
        load_model(str(foreign))
