"""What ``python -m reprpo_pl.train`` prints when its console is a file (CI, a SLURM log): no warnings,
no Lightning tips, no progress-bar frames, but a log line per few optimiser steps and the results table."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import REPO, TINY

from reprpo_pl.progress import Bar, StepLog, _duration, console_progress

STEP_LINE = re.compile(r"\[reprpo_pl\.progress\]\[INFO\] - step (\d+)/(\d+) loss \S+ [\d.]+ s/step ETA \d+:\d\d$")
# Lightning prints its own warnings as "<file>.py:<line>: <message>", without the category name
WARNING_LOCATION = re.compile(r"\.py:\d+: ")


def test_console_written_to_a_file_is_quiet_and_shows_progress(tmp_path: Path, tiny_model, tokenizer):
    run_dir, log_file, model_dir = tmp_path / "run", tmp_path / "console.log", tmp_path / "tiny_hf"
    # the tiny Llama as a saved HF folder, so the run loads it with from_pretrained like a real model
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    overrides = [o for o in TINY if not o.startswith("callbacks.generations")]  # keep generate()'s noise in view
    overrides += [f"model.name_or_path={model_dir}", "data.n_train=12", "callbacks.generations.max_new_tokens=4",
                  "callbacks.progress.every_n_steps=2"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the interpreter's default filters
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    with log_file.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "reprpo_pl.train", *overrides, f"hydra.run.dir={run_dir}"],
                              cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    text = log_file.read_bytes().decode()  # not read_text(): universal newlines would hide \r
    assert proc.returncode == 0, text[-4000:]
    lines = text.splitlines()

    noisy = [line for line in lines if "Warning" in line or "Tip" in line or WARNING_LOCATION.search(line)]
    assert not noisy, "\n".join(noisy)
    assert "\r" not in text, "progress-bar frames (carriage returns) in a file: " + repr(text[text.find("\r") - 80:][:160])

    steps = [(int(m[1]), int(m[2])) for line in lines if (m := STEP_LINE.search(line))]
    assert steps, f"no step lines in\n{text[-3000:]}"
    total = steps[0][1]
    assert total >= 3 and all(t == total for _, t in steps)
    # every_n_steps=2: the first step, every second one, and the last
    assert [s for s, _ in steps] == sorted({1, total, *range(2, total + 1, 2)})

    assert "## Preference accuracy per shift type" in text
    assert text.index("## Preference accuracy per shift type") > text.index(f"step {total}/{total}")
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()


def test_progress_callback_follows_the_console(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert isinstance(console_progress(), StepLog)
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stdout", tty)
    bar = console_progress(refresh_rate=3)
    assert isinstance(bar, Bar) and bar.refresh_rate == 3
    with pytest.raises(ValueError, match="every_n_steps"):
        StepLog(every_n_steps=0)


def test_durations():
    assert [_duration(s) for s in (0, 7.4, 75, 3723)] == ["0:00", "0:07", "1:15", "1:02:03"]
