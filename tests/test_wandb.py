"""`logger=wandb`: offline by default, one wandb run per multirun job (finished even when the job fails),
results and generations logged as wandb tables, CSV alongside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")

FAST = ["model=tiny_random", "data.n_train=8", "data.max_length=128", "data.max_prompt_length=64",
        "eval.n_samples=3", "eval.batch_size=4", "callbacks.generations.max_new_tokens=4",
        "dataset.targets=[{name:math,shift:in_domain},{name:us_history_textbook,shift:orthogonal}]"]


def test_wandb_offline_one_run_per_job_even_when_a_job_fails(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the default must be offline by itself
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_SILENT="true")
    # job 0 diverges (lr 1e30 → non-finite loss at step 2) after its wandb run started; job 1 succeeds
    proc = subprocess.run([sys.executable, "-m", "reprpo_pl.train", "-m", "method=dpo", "method.lr=1e30,6e-5", "logger=wandb",
                           *FAST, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    # the grid goes on past the failed job, then names it with the exit code of its NonFiniteError
    assert proc.returncode == 3 and "error: job 0 failed (method.lr=1e+30): non-finite loss" in proc.stderr, proc.stderr[-3000:]
    runs = {}
    for job, exit_code in (("0", 1), ("1", 0)):
        job_dir = tmp_path / "sweep" / job
        assert (job_dir / "csv" / "version_0" / "metrics.csv").is_file()  # CSV is always on
        [run] = list((job_dir / "wandb").glob("offline-run-*"))  # offline by default, exactly one run per job
        run_id = run.name.rsplit("-", 1)[1]
        runs[job] = run_id
        debug = (run / "logs" / "debug.log").read_text()
        assert f"finishing run reprpo_pl/{run_id}" in debug  # wandb.finish() ran for this job…
        assert f"got exitcode: {exit_code}" in debug  # …marking the failed job failed
    assert runs["0"] != runs["1"]
    [targets] = list((tmp_path / "sweep" / "1" / "wandb").glob("offline-run-*/files/media/table/results/targets_*.table.json"))
    table = json.loads(targets.read_text())
    assert table["columns"][:5] == ["target", "shift", "n", "acc_base", "acc"]
    assert [row[0] for row in table["data"]] == ["math@train", "math", "us_history_textbook"]  # the in-sample row first
    assert list((tmp_path / "sweep" / "1" / "wandb").glob("offline-run-*/files/media/table/results/shifts_*.table.json"))
    [generations] = list((tmp_path / "sweep" / "1" / "wandb").glob("offline-run-*/files/media/table/generations_*.table.json"))
    assert json.loads(generations.read_text())["columns"] == ["step", "prompt", "base", "adapter"]
    assert (tmp_path / "sweep" / "1" / "generations.md").is_file()
