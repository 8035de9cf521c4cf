"""Run ``python -m reprpo_pl.train`` in-process or as a subprocess and report what a user would see.

In-process runs call the real Hydra entry point (`reprpo_pl.train.main`) with a patched ``sys.argv``,
so Hydra's own errors, `run_cli`'s error wrapper and the run-directory clean-up are exercised exactly
as on the command line, without paying ~10 s of imports per case. A few subprocess runs in the tests
prove the same contract end to end (exit status, stderr, no traceback).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_GENIES = REPO / "src" / "reprpo_pl" / "embedded" / "genies"
# the 4-block random Llama; the default layer spec 0.5:-2 selects nothing at L=4
TINY = ["model=tiny_random", "data.n_train=4", "data.batch_size=2", "eval.n_samples=2",
        "callbacks.generations.enabled=false"]


@dataclass
class CliResult:
    code: int | str  # exit status; "exception <Type>" if something escaped Hydra (never expected)
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]

    @property
    def left(self) -> list[str]:
        """Files left in the run dir (relative paths), or [] when it was removed / never created."""
        if not self.run_dir.exists():
            return []
        return sorted(str(p.relative_to(self.run_dir)) for p in self.run_dir.rglob("*") if p.is_file())


def run_inprocess(overrides: list[str], run_dir: Path) -> CliResult:
    """``python -m reprpo_pl.train <overrides> hydra.run.dir=<run_dir>`` in this process."""
    from reprpo_pl import train

    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["reprpo_pl.train", *overrides, f"hydra.run.dir={run_dir}"]
    code: int | str = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                train.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # noqa: BLE001 - reported, then the test fails on it
                code = f"exception {type(e).__name__}: {e}"
    finally:
        sys.argv = argv
        torch.autograd.set_detect_anomaly(False)  # train() sets it process-wide
    return CliResult(code, out.getvalue(), err.getvalue(), run_dir)


def run_subprocess(overrides: list[str], run_dir: Path, cwd: Path | None = None, timeout: float = 300) -> CliResult:
    """``python -m reprpo_pl.train <overrides> hydra.run.dir=<run_dir>`` in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "reprpo_pl.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr, run_dir)


def assert_same_results(a: dict, b: dict) -> None:
    """A resumed run's results.json against the uninterrupted run's: step and epoch equal, accuracies and
    counts exact, other per-target metrics and the objective within 5e-4 (float reduction order)."""
    import pytest

    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"])
    for ta, tb in zip(a["targets"], b["targets"], strict=True):
        assert ta["target"] == tb["target"] and ta["n"] == tb["n"]
        for key, value in ta.items():
            if key.startswith("acc"):
                assert tb[key] == value, (ta["target"], key)
            elif isinstance(value, float):
                assert tb[key] == pytest.approx(value, abs=5e-4), (ta["target"], key)
    assert b["objective"] == pytest.approx(a["objective"], abs=5e-4)
