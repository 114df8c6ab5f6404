"""Bad input gets one clear line and loses nothing (``train.py`` end to end; tiny model, generated records).

One class per test, each checking the exit code, that stderr holds exactly one ``alignx:`` line and no traceback, and
— where good records share the file with bad ones — that they still train with finite losses:

* data: an empty or blank-only file; every bad line of every input file reported in one pass (malformed JSON with
  the right column, not UTF-8, not an object) before training, then one line, or skipped and counted with
  ``data.on_bad_lines=skip``; a byte-order mark accepted; records that would bias the objective (control
  characters, same-language and identical-text pairs, exact duplicates) dropped or deduplicated and counted in the
  console report, ``metrics.jsonl`` and ``summary.json``;
* config and environment: out-of-range settings at load time; the batch split before any data work; an unknown model
  name at once (no hub retries); an output directory on a read-only file system, one without room for the run, and a
  disk that fills up during a checkpoint (real tmpfs mounts in a private mount namespace; skipped without the
  privilege).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, by_step, clean_env, process_group_scope, run_train, shared_data, tiny_args

from alignx.cli import train_main


@pytest.fixture(scope="module", autouse=True)
def _own_process_group():
    with process_group_scope():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture
def nothing_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a tokenizer or a model is loaded (the checks come first)."""
    import alignx.model

    monkeypatch.setattr(alignx.model, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(alignx.model, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was loaded"))


def one_line(err: str) -> str:
    """The only ``alignx`` line of stderr (progress bars of datasets may share it; a traceback may not)."""
    lines = [line for line in err.splitlines() if line.startswith("alignx")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _lines(path: Path, lines: list[str | bytes | dict]) -> Path:
    with path.open("wb") as f:
        for x in lines:
            raw = x if isinstance(x, bytes) else (json.dumps(x) if isinstance(x, dict) else x).encode()
            f.write(raw + b"\n")
    return path


def _finite_losses(metrics: Path) -> dict[int, dict]:
    rows = by_step(metrics)
    losses = [r["train/loss"] for r in rows.values() if "train/loss" in r]
    assert losses and all(v is not None and math.isfinite(v) for v in losses), losses
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Data


def test_empty_and_blank_files_are_one_line(base: Path, tmp_path: Path, capsys, nothing_loaded) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = _lines(tmp_path / "blank.jsonl", ["", "   ", "\t", ""])
    args = tiny_args(base, tmp_path / "out", "--stage", "all", f"--data.train_file={empty}")
    code = train_main([*args, f"--stage2.train_file={blank}"])
    line = one_line(capsys.readouterr().err)
    assert code == 1
    assert f"{empty}: no records (the file is empty or holds only blank lines)" in line
    assert f"{blank}: no records" in line  # both files in the same line: one pass over every input


def test_every_bad_line_of_every_file_is_reported_then_one_line(
    base: Path, tmp_path: Path, capsys, nothing_loaded
) -> None:
    pairs, instructions = shared_data(base)
    good = pairs.read_text().splitlines()
    cut = '{"src_text": "Hello", "tgt_text": '  # 34 characters: the error is at column 35
    train = _lines(
        tmp_path / "pairs.jsonl",
        [*good[:2], cut, *good[2:8], b'{"src_text": "caf\xe9"}', '["a", "list"]', '{"a": 1,, "b": 2}', *good[8:]],
    )
    stage2 = _lines(tmp_path / "ins.jsonl", [*instructions.read_text().splitlines()[:5], "{oops"])
    out = tmp_path / "out"
    args = tiny_args(base, out, "--stage", "all", f"--data.train_file={train}")
    code = train_main([*args, f"--stage2.train_file={stage2}"])
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert code == 1
    assert f"{train}:3: malformed JSON: Expecting value (column 35) (4 bad lines in all:" in line
    assert f"{stage2}:6: malformed JSON" in line and "data.on_bad_lines=skip" in line
    # The report on stdout: every file, counts per reason, examples with line and detail; the full list on disk.
    assert f"[data] {train}: 4 bad lines (malformed_json 2, not_utf8 1, not_an_object 1)" in captured.out
    assert "line 12: Expecting property name enclosed in double quotes (column 9)" in captured.out
    assert "line 10: invalid continuation byte at byte 18" in captured.out
    listed = [json.loads(x) for x in (out / "bad_lines.jsonl").read_text().splitlines()]
    assert [(Path(r["file"]).name, r["line"], r["reason"]) for r in listed] == [
        ("pairs.jsonl", 3, "malformed_json"),
        ("pairs.jsonl", 10, "not_utf8"),
        ("pairs.jsonl", 11, "not_an_object"),
        ("pairs.jsonl", 12, "malformed_json"),
        ("ins.jsonl", 6, "malformed_json"),
    ]


POISON = {
    "bad_characters": [
        {"src_text": "Hello\u0000 world", "tgt_text": "Habari dunia yote", "src_lang": "en", "tgt_lang": "sw"},
        {"src_text": "Good \u001b[31mmorning", "tgt_text": "Habari za asubuhi", "src_lang": "en", "tgt_lang": "sw"},
        '{"src_text": "Broken \\ud800 surrogate", "tgt_text": "Imevunjika", "src_lang": "en", "tgt_lang": "sw"}',
    ],
    "same_language": [{"src_text": "The cat sleeps.", "tgt_text": "The cat naps.", "src_lang": "en", "tgt_lang": "en"}],
    "identical_text": [{"src_text": "Amen.", "tgt_text": "Amen.", "src_lang": "en", "tgt_lang": "sw"}],
}


def test_bad_lines_skipped_and_poison_dropped_good_records_train(base: Path, tmp_path: Path) -> None:
    pairs, _ = shared_data(base)
    good = pairs.read_text().splitlines()
    poison = [x for reason in POISON.values() for x in reason]
    rows: list = ["\ufeff" + good[0], *good[1:10], "{not json", good[3], good[3], *poison, b"\xff\xfe", *good[10:]]
    train = _lines(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    proc = run_train(tiny_args(base, out, "--stage", "1", f"--data.train_file={train}", "--data.on_bad_lines=skip"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {"malformed_json": 1, "not_utf8": 1, "duplicate": 2, "bad_characters": 3}
    expected.update(same_language=1, identical_text=1)
    # Console: every reason with its count, what was done and why, and examples.
    for reason, count in expected.items():
        assert f"dropped {count:>7} {reason}" in proc.stdout, reason
    assert "line 12: same as line 4" in proc.stdout and "U+0000 in src_text at character 6" in proc.stdout
    assert "false negative of the contrastive term" in proc.stdout
    # The byte-order mark did not cost the first record: all 56 good records kept (8 held out), as in the clean run.
    assert "48 training records, 8 held out" in proc.stdout
    # Metrics file and run summary.
    rows_by_step = _finite_losses(out / "stage1" / "metrics.jsonl")
    assert {k.removeprefix("data/dropped/"): int(v) for k, v in rows_by_step[0].items() if v and "dropped/" in k} == (
        expected
    )
    summary = json.loads((out / "stage1" / "summary.json").read_text())
    assert summary["dropped_records"] == expected and summary["status"] == "completed"


# ----------------------------------------------------------------------------------------------------------------
# Config and environment


@pytest.mark.parametrize(
    "override, message",
    [
        ("--optim.lr=-0.001", "optim.lr must be >= 0, got -0.001"),
        ("--optim.lr=.nan", "optim.lr must be a finite number, got nan"),
        ("--train.log_every=0", "train.log_every must be >= 1, got 0"),
        ("--objective.similarity_shrinkage=1.5", "objective.similarity_shrinkage must be in (0, 1], got 1.5"),
        ("--optim.betas=[0.9, 1.2]", "optim.betas must be two numbers in [0, 1)"),
        ("--train.micro_batch_size=3", "train.global_batch_size=4 is not a multiple of train.micro_batch_size=3"),
    ],
    ids=["negative-lr", "nan-lr", "log-every-0", "shrinkage", "betas", "batch-split"],
)
def test_out_of_range_settings_fail_at_load(base, tmp_path, capsys, nothing_loaded, monkeypatch, override, message):
    import alignx.data.tokenize

    monkeypatch.setattr(alignx.data.tokenize, "_load_raw", lambda *a, **k: pytest.fail("data read"))
    code = train_main(tiny_args(base, tmp_path / "out", "--stage", "1", override))
    assert code == 2 and message in one_line(capsys.readouterr().err)


def test_batch_split_over_the_ranks_fails_before_any_data(base, tmp_path, capsys, nothing_loaded, monkeypatch):
    import alignx.data.tokenize

    monkeypatch.setattr(alignx.data.tokenize, "_load_raw", lambda *a, **k: pytest.fail("data read"))
    monkeypatch.setenv("WORLD_SIZE", "3")  # as the launcher sets it for 3 processes, before the script starts
    code = train_main(tiny_args(base, tmp_path / "out", "--stage", "1"))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "global_batch_size=4 is not a multiple of train.micro_batch_size=2 x world size 3" in line


@pytest.mark.parametrize("name", ["no-such-model", "some-org/no-such-model", "/nonexistent/model dir", "./a//b"])
def test_unknown_model_is_one_line_at_once(base, tmp_path, capsys, nothing_loaded, monkeypatch, name) -> None:
    # No offline switch: the hub is only unreachable (a closed local port), as on a machine without internet.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    t0 = time.time()
    code = train_main(tiny_args(base, tmp_path / "out", "--stage", "1", f"--model.name_or_path={name}"))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and time.time() - t0 < 10
    assert f"model.name_or_path='{name}' is not a packaged model (gemma3-270m, smollm2-135m, tiny-llama" in line
    assert "a local model directory must hold config.json" in line
    (tmp_path / "not_a_model").mkdir()
    code = train_main(tiny_args(base, tmp_path / "out", "--stage", "1", f"--model.name_or_path={tmp_path}/not_a_model"))
    assert code == 2 and "not_a_model has no config.json" in one_line(capsys.readouterr().err)


# -- storage: real file systems in a private mount namespace (root, util-linux unshare) ---------------------------


def _can_mount(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "mount_probe"
    probe.mkdir()
    cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def run_on_tmpfs(mount: Path, options: str, args: list[str], keep: Path) -> subprocess.CompletedProcess:
    """``train.py args`` with a tmpfs (``options``) mounted at ``mount`` in a private mount namespace; what the run
    wrote there is copied to ``keep`` before the namespace (and the mount) goes away."""
    mount.mkdir(parents=True, exist_ok=True)
    train = shlex.join([sys.executable, str(REPO / "train.py"), *args])
    copy = shlex.join(["cp", "-r", f"{mount}/.", str(keep)])
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} && {{ {train}; rc=$?; {copy}; exit $rc; }}"
    keep.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def tmpfs(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not _can_mount(tmp_path):
        pytest.skip("needs root and mount namespaces (unshare -m) to mount a tmpfs")


def test_read_only_output_dir_is_one_line(base: Path, tmp_path: Path, tmpfs) -> None:
    out = tmp_path / "ro"
    proc = run_on_tmpfs(out, "ro,size=1m", tiny_args(base, out, "--stage", "1"), tmp_path / "kept")
    assert proc.returncode == 1
    assert f"train.output_dir={out} cannot be written: read-only file system" in one_line(proc.stderr)


def test_output_dir_without_room_is_one_line(base: Path, tmp_path: Path, tmpfs) -> None:
    from alignx.testing import tiny_pretrained

    out = tmp_path / "small"
    args = tiny_args(base, out, "--stage", "1", f"--model.name_or_path={tiny_pretrained('tiny-llama')}")
    proc = run_on_tmpfs(out, "size=2m", args, tmp_path / "kept")
    line = one_line(proc.stderr)
    assert proc.returncode == 1
    assert f"train.output_dir={out} has " in line and "bytes free, the run needs about" in line
    assert "3 checkpoints of" in line  # keep_checkpoints 2 + the one being written


def test_disk_full_during_a_checkpoint_names_the_last_good_one(base: Path, tmp_path: Path, tmpfs) -> None:
    # tiny-llama by name: its size is not known up front, so the run starts; one checkpoint is ~3.5 MB.
    out, kept = tmp_path / "full", tmp_path / "kept"
    proc = run_on_tmpfs(out, "size=6m", tiny_args(base, out, "--stage", "1"), kept)
    line = one_line(proc.stderr)
    assert proc.returncode == 1
    assert "no space left on device" in line
    assert f"last good checkpoint: {out}/stage1/checkpoints/step_4 (continue with --resume auto)" in line
    assert (kept / "stage1" / "checkpoints" / "latest").read_text() == "step_4"
    _finite_losses(kept / "stage1" / "metrics.jsonl")
