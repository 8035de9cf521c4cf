"""Ctrl-C, SIGTERM and SIGKILL at random points of a real CLI run, each followed by ``ckpt_path=``.

The run: the tiny model, 2 epochs of 4 optimizer steps, ``last.ckpt`` every 2 steps and at each epoch
end. A point is "after the log line of step k (1 ≤ k ≤ 8), plus a random delay", drawn from a seeded
RNG (``REPRPO_KILL_SEED``, default 0; the failing point is in the assertion message), so it can land
mid-step, during a checkpoint write, in the epoch-end or final evaluation, or after the run ended.
For every point:

- no results.json ever exists without ``checkpoints/last.ckpt`` of the final step and ``adapter/``;
- once the first epoch has ended, a resumable ``last.ckpt`` exists (its step ≥ 4);
- Ctrl-C exits 130 and SIGTERM 143, each with one ``error:`` line naming the ``ckpt_path=`` to resume;
- the resume (in the same run dir) exits 0 with the uninterrupted run's results
  (`cli_runner.assert_same_results`: accuracies exact, other metrics within 5e-4) and a ``timing``
  that covers both processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import REPO, TINY, assert_same_results, run_inprocess

from reprpo_pl.config import EXIT_INTERRUPTED, EXIT_PREEMPTED

RUN = [*TINY, "data.n_train=8", "trainer.max_epochs=2", "callbacks.checkpoint.every_n_train_steps=2", "seed=7"]
STEPS = 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
RNG = random.Random(int(os.environ.get("REPRPO_KILL_SEED", "0")))
POINTS = {sig: (RNG.randint(1, STEPS), round(RNG.uniform(0.0, 1.5), 2)) for sig in ("SIGINT", "SIGTERM", "SIGKILL")}


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=False)["global_step"]


def _timing(ckpt: Path) -> dict[str, float]:
    """The evaluator's seconds so far as the checkpoint holds them (the first process's share of ``timing``)."""
    states = torch.load(ckpt, weights_only=False)["callbacks"]
    return next(v for k, v in states.items() if k.startswith("ShiftEvalCallback"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("kill_points") / "full"
    result = run_inprocess(RUN, run_dir)
    assert result.code == 0, result.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def _interrupt_at(run_dir: Path, sig: signal.Signals, step: int, delay: float) -> tuple[int | None, str]:
    """Start the run, send ``sig`` ``delay`` s after the log line of ``step``; (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "reprpo_pl.train", *RUN, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, log = time.monotonic() + 300, run_dir / "train.log"
        while not (log.exists() and re.search(rf"\] - step {step}/{STEPS}\b", log.read_text())):
            if proc.poll() is not None:
                break
            assert time.monotonic() < deadline, "the run never reached the point"
            time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr


@pytest.mark.parametrize("name", list(POINTS))
def test_interrupted_at_a_random_point_resumes_to_the_uninterrupted_results(name, uninterrupted, tmp_path):
    step, delay = POINTS[name]
    point = f"{name} {delay} s after step {step} (REPRPO_KILL_SEED={os.environ.get('REPRPO_KILL_SEED', '0')})"
    run_dir = tmp_path / "run"
    code, stderr = _interrupt_at(run_dir, getattr(signal, name), step, delay)
    last, results = run_dir / "checkpoints" / "last.ckpt", run_dir / "results.json"

    if results.exists():  # the signal came after the run had written its results: the run is complete
        # during interpreter shutdown the signal may end the process itself (-SIGINT, -SIGKILL)
        assert code in (0, -getattr(signal, name), EXIT_INTERRUPTED, EXIT_PREEMPTED), (point, code, stderr[-2000:])
        assert _step(last) == STEPS and (run_dir / "adapter" / "adapter_model.safetensors").is_file(), point
        assert_same_results(uninterrupted, json.loads(results.read_text()))
        return
    if name == "SIGKILL":
        assert code == -signal.SIGKILL, (point, code, stderr[-2000:])
    else:
        assert code == (EXIT_INTERRUPTED if name == "SIGINT" else EXIT_PREEMPTED), (point, code, stderr[-3000:])
        errors = [x for x in stderr.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in stderr, (point, stderr[-3000:])
        assert errors[0].endswith(f"ckpt_path={last}") or f"ckpt_path={last} " in errors[0], (point, errors)
    if step > STEPS // 2:  # the first epoch (4 steps) had ended
        assert last.is_file() and _step(last) >= STEPS // 2, point
    if not last.is_file():
        pytest.skip(f"{point}: killed before the first checkpoint (step 2); nothing to resume")

    before = _timing(last)
    resumed = run_inprocess([*RUN, f"ckpt_path={last}"], run_dir)
    assert resumed.code == 0, (point, resumed.stderr[-3000:])
    document = json.loads(results.read_text())
    assert_same_results(uninterrupted, document)
    assert _step(last) == STEPS, point
    assert document["timing"]["train_s"] >= round(before["train_s"], 1) and document["timing"]["eval_s"] > before["eval_s"], point
