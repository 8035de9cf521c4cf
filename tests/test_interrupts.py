"""No silent success: exit 0 means results.json was written, every number in it finite, with
``checkpoints/last.ckpt`` (for the final step) and ``adapter/`` beside it; any other end is a non-zero
exit and one ``error: …`` line.

- last.ckpt after every epoch (not only at the end of training, as Lightning's ModelCheckpoint with
  ``save_top_k=0`` does), so a run stopped after epoch 0 resumes to the uninterrupted run's results;
- SIGTERM (a scheduler's preemption) mid-epoch: exit 143, a checkpoint of the last finished step, and
  the ``ckpt_path=`` to resume with (a subprocess: signals);
- nothing to train (``trainer.max_steps=0``, resuming a finished run): exit 2, nothing written;
- divergence on the last optimizer step (no later loss to catch it): exit 3, no results.json; the
  writer itself refuses a non-finite number.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import REPO, TINY, assert_same_results, run_inprocess

import reprpo_pl.eval.callback as callback_module
from reprpo_pl.checkpoint_io import ResumableCheckpoint
from reprpo_pl.config import EXIT_NON_FINITE, EXIT_PREEMPTED, EXIT_USER_ERROR
from reprpo_pl.errors import NonFiniteError
from reprpo_pl.eval.results import write_results

TWO_EPOCHS = [*TINY, "trainer.max_epochs=2", "seed=42"]  # 2 steps per epoch; every_n_train_steps (50) never fires


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=False)["global_step"]


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run."""
    run_dir = tmp_path_factory.mktemp("interrupts") / "full"
    result = run_inprocess(TWO_EPOCHS, run_dir)
    assert result.code == 0, result.stderr[-3000:]
    return run_dir


def test_stopped_after_epoch_0_resumes_to_the_uninterrupted_results(finished, tmp_path, monkeypatch):
    def stop_at_epoch_1(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise Stop

    run_dir = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(ResumableCheckpoint, "on_train_epoch_start", stop_at_epoch_1, raising=False)
        stopped = run_inprocess(TWO_EPOCHS, run_dir)
    assert stopped.code == 1, stopped.code  # Hydra reports the escaped exception
    last = run_dir / "checkpoints" / "last.ckpt"
    assert _step(last) == 2 and not (run_dir / "results.json").exists()

    resumed = run_inprocess([*TWO_EPOCHS, f"ckpt_path={last}"], run_dir)
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert_same_results(json.loads((finished / "results.json").read_text()), json.loads((run_dir / "results.json").read_text()))
    assert _step(last) == 4


def test_resuming_a_finished_run_is_nothing_to_do(finished, tmp_path):
    ckpt = finished / "checkpoints" / "last.ckpt"
    result = run_inprocess([*TWO_EPOCHS, f"ckpt_path={ckpt}"], tmp_path / "again")
    assert result.code == EXIT_USER_ERROR, result.stderr[-3000:]
    assert len(result.error_lines) == 1 and result.stderr.rstrip().splitlines()[-1] == result.error_lines[0]
    assert re.match(rf"error: nothing to do: ckpt_path={re.escape(str(ckpt))} is a finished run \(step 4", result.error_lines[0])
    assert not (tmp_path / "again" / "results.json").exists()


def test_max_steps_zero_is_an_error(tmp_path):
    result = run_inprocess([*TINY, "trainer.max_steps=0"], tmp_path / "run")
    assert result.code == EXIT_USER_ERROR, result.stderr[-3000:]
    assert len(result.error_lines) == 1 and "trainer.max_steps=0" in result.error_lines[0]
    assert not (tmp_path / "run" / "results.json").exists()


def test_results_json_is_written_after_the_final_checkpoint_and_adapter(tmp_path, monkeypatch):
    """3 steps, a step checkpoint at step 2: last.ckpt must still hold step 3 when results.json is written
    (Lightning's ModelCheckpoint.on_train_end saves only if it never saved)."""
    seen = []
    write = callback_module.write_results

    def checking(run_dir, results):
        run_dir = Path(run_dir)
        seen.append((_step(run_dir / "checkpoints" / "last.ckpt"), (run_dir / "adapter" / "adapter_model.safetensors").is_file(),
                     (run_dir / "results.json").exists()))
        return write(run_dir, results)

    monkeypatch.setattr(callback_module, "write_results", checking)
    result = run_inprocess([*TINY, "data.n_train=6", "callbacks.checkpoint.every_n_train_steps=2"], tmp_path / "run")
    assert result.code == 0, result.stderr[-3000:]
    assert seen == [(3, True, False)]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 3


def test_divergence_on_the_last_step_exits_3_without_results(tmp_path):
    """lr=1e30 for one step: the loss and gradient were finite, the update is not usable; no later loss
    check sees it, the final evaluation does."""
    result = run_inprocess([*TINY, "data.n_train=2", "method=dpo", "method.lr=1e30"], tmp_path / "run")
    assert result.code == EXIT_NON_FINITE, result.stderr[-3000:]
    assert len(result.error_lines) == 1 and "Traceback" not in result.stderr
    assert re.match(r"error: diverged at step 0: non-finite (eval scores|parameter) .*lower method\.lr", result.error_lines[0])
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "results.md").exists()


def test_non_finite_parameter_after_the_last_step_is_named(tmp_path, monkeypatch):
    """A NaN written into a trainable weight after the last step (by a wrapped AdapterExport, whose
    on_train_end runs before the evaluator's) is named before any scoring."""
    from reprpo_pl.eval.adapter_export import AdapterExport

    export = AdapterExport.on_train_end

    def export_then_poison(self, trainer, pl_module):
        export(self, trainer, pl_module)
        with torch.no_grad():
            next(p for p in pl_module.parameters() if p.requires_grad).fill_(math.nan)

    monkeypatch.setattr(AdapterExport, "on_train_end", export_then_poison)
    result = run_inprocess([*TINY, "data.n_train=2", "method=dpo"], tmp_path / "run")
    assert result.code == EXIT_NON_FINITE, result.stderr[-3000:]
    assert re.match(r"error: diverged at step 0: non-finite parameter \S*lora_\S+ after the last optimizer step",
                    result.error_lines[0]), result.error_lines
    assert not (tmp_path / "run" / "results.json").exists()


def test_write_results_refuses_non_finite_numbers(tmp_path):
    with pytest.raises(NonFiniteError, match=r"targets\[0\]\.acc"):
        write_results(tmp_path, {"objective": 0.0, "targets": [{"acc": math.nan}], "shifts": {}})
    assert not list(tmp_path.iterdir())


# ---- SIGTERM (subprocess) -------------------------------------------------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def test_sigterm_mid_epoch_exits_143_with_a_checkpoint_to_resume(tmp_path):
    """No step checkpoints (every_n_train_steps=null): the checkpoint is the one written on SIGTERM."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, "data.n_train=400", "callbacks.checkpoint.every_n_train_steps=null"]
    proc = subprocess.Popen([sys.executable, "-m", "reprpo_pl.train", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        log = run_dir / "train.log"
        while not (log.exists() and re.search(r"\] - step \d+/", log.read_text())):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    line = stderr.rstrip().splitlines()[-1]
    match = re.fullmatch(rf"error: preempted \(SIGTERM\) at step (\d+); resume with ckpt_path={re.escape(str(last))}", line)
    assert match, line
    assert [x for x in stderr.splitlines() if x.startswith("error: ")] == [line] and "Traceback" not in stderr
    step = int(match.group(1))
    assert 1 <= step < 200 and _step(last) == step
    assert not (run_dir / "results.json").exists()

    resumed = run_inprocess([*overrides, f"ckpt_path={last}", f"trainer.max_steps={step + 1}"], run_dir)
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == step + 1
