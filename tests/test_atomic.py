"""Outputs are never half-written: checkpoints (AtomicCheckpointIO) and results.json/results.md
(eval/results.py) are written beside their target and renamed into place; a killed run leaves no
results.json."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from cli_runner import REPO, TINY
from lightning.fabric.plugins import TorchCheckpointIO

import reprpo_pl.checkpoint_io as checkpoint_io
from reprpo_pl.checkpoint_io import AtomicCheckpointIO
from reprpo_pl.errors import UserError
from reprpo_pl.eval import results as results_module

CHECKPOINT = {"state_dict": {"w": torch.arange(1000.0)}, "global_step": 1}


def test_save_then_load(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(CHECKPOINT, path)
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], CHECKPOINT["state_dict"]["w"])
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary left
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(CHECKPOINT, path)
    before = path.read_bytes()

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # like a signal arriving during the write

    monkeypatch.setattr(checkpoint_io.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {}, "global_step": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_stale_temporary_of_a_killed_run_is_removed(tmp_path):
    """SIGKILL during a write leaves `.last.ckpt.<random>.tmp` (never a bad last.ckpt); the next save removes it."""
    stale = tmp_path / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint(CHECKPOINT, tmp_path / "last.ckpt")
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def _cross_device(monkeypatch):
    """Make the system temp dir another filesystem (as /tmp on local disk or tmpfs and runs on NFS
    are), and make the copy that shutil.move then falls back to die halfway."""
    rename = os.rename
    system_tmp = os.path.realpath(tempfile.gettempdir())

    def rename_across(src, dst, *args, **kwargs):
        if os.path.realpath(os.path.dirname(src)) == system_tmp and os.path.dirname(os.path.realpath(dst)) != system_tmp:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst, *args, **kwargs)

    def copy_dies_halfway(src, dst, *args, **kwargs):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError("killed during the copy")

    monkeypatch.setattr(os, "rename", rename_across)
    monkeypatch.setattr(shutil, "copyfile", copy_dies_halfway)  # what shutil.move's copy2 fallback calls


def test_lightning_default_is_not_atomic_across_filesystems(tmp_path, monkeypatch):
    """Why AtomicCheckpointIO exists: Lightning's TorchCheckpointIO stages the file in the system temp
    dir; across filesystems its move is a copy into last.ckpt, and a crash during it leaves the
    checkpoint truncated."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / "last.ckpt"
    TorchCheckpointIO().save_checkpoint(CHECKPOINT, path)
    _cross_device(monkeypatch)
    with pytest.raises(OSError):
        TorchCheckpointIO().save_checkpoint(CHECKPOINT, path)
    monkeypatch.undo()
    with pytest.raises(UserError, match="cannot be read as a checkpoint"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_atomic_checkpoint_io_is_unaffected_by_the_temp_dir(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "last.ckpt"
    _cross_device(monkeypatch)
    AtomicCheckpointIO().save_checkpoint(CHECKPOINT, path)
    AtomicCheckpointIO().save_checkpoint({**CHECKPOINT, "global_step": 2}, path)
    monkeypatch.undo()
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 2


def test_results_json_is_all_or_nothing(tmp_path, monkeypatch):
    """A failure while writing results.json leaves neither a partial results.json nor a temporary."""
    replace = os.replace

    def fails_for_json(src, dst):
        if str(dst).endswith("results.json"):
            raise OSError("disk full")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", fails_for_json)
    with pytest.raises(OSError, match="disk full"):
        results_module.atomic_write_text(tmp_path / "results.json", json.dumps({"objective": 1.0}))
    assert os.listdir(tmp_path) == []


def test_killed_run_leaves_no_results_and_readable_checkpoints(tmp_path):
    """SIGKILL a training run once it has checkpointed: no results.json/results.md, and every .ckpt loads."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, "data.n_train=12", "data.batch_size=2", "trainer.max_epochs=3",
                 "callbacks.checkpoint.every_n_train_steps=1",
                 "++trainer.plugins=[{_target_:reprpo_pl.checkpoint_io.AtomicCheckpointIO}]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reprpo_pl.train", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # let it get into the next step (or the next write)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "results.json").exists() and not (run_dir / "results.md").exists()
    checkpoints = list((run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints
    for path in checkpoints:
        assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] >= 1
