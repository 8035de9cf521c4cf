"""``trainer=ddp_cpu``: two gloo processes train the tiny model; rank 1 re-runs the command into the same run
directory (no second run dir). Evaluation is distributed (issue 12 item 8): each rank scores a shard of every
target, the rows are gathered, and rank 0 alone writes the one results.json, per-pair records and curves, equal
to a single-process evaluation of the same weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import TINY, run_subprocess

from reprpo_pl.eval.base_cache import CACHE_ENV

# 5 pairs per target (4 where tokenisation drops one) in eval batches of 2: [0,1] [2,3] [4], rank 0 scores [0,1] [4],
# rank 1 [2,3];
# a curve point every step on all of them (n_samples_during ≥ n), so the last point equals results.json's rows
EVAL = ["eval.n_samples=5", "eval.batch_size=2", "callbacks.shift_eval.every_n_steps=1", "eval.n_samples_during=5"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str, Path]:
    """The run dir of a finished 2-process run, its console output and its own base-score cache (what rank 0
    writes there is checked below)."""
    tmp, cache = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("ddp_score_cache")
    before = os.environ[CACHE_ENV]
    os.environ[CACHE_ENV] = str(cache)
    try:
        # 8 pairs, 2 per rank per step: the 2 ranks split the data, so 2 optimizer steps (1 process would take 4)
        result = run_subprocess([*TINY, "trainer=ddp_cpu", "data.n_train=8", "data.batch_size=2", *EVAL], tmp / "run", cwd=tmp)
    finally:
        os.environ[CACHE_ENV] = before
    assert result.code == 0, result.stderr[-4000:]
    return tmp / "run", result.stdout + result.stderr, cache


def test_ddp_cpu_trains_and_writes_one_results_json(ddp_run):
    run_dir, log, _ = ddp_run
    tmp_path = run_dir.parent
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log

    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("results.json")] == [run_dir.relative_to(tmp_path) / "results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "a rank created another run directory"
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1's own log, same run dir
    assert not (run_dir / ".hydra" / "train_ddp_process_1").exists()

    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 2
    assert results["config"]["trainer"]["devices"] == 2
    assert all(t["n"] > 0 for t in results["targets"])
    assert list((run_dir / "checkpoints").glob("*.ckpt")) == [run_dir / "checkpoints" / "last.ckpt"]


def test_ddp_evaluation_is_sharded_and_equals_a_single_process(ddp_run, tmp_path):
    run_dir, _, score_cache = ddp_run
    results = json.loads((run_dir / "results.json").read_text())
    # rank 1 scored its shard of each target (2 of 4 or 5 pairs), its log's `eval <target>: <n> pairs` lines say so
    rank1 = (run_dir / "train_ddp_process_1.log").read_text()
    for target in results["targets"]:
        shard = sum(min(2, target["n"] - start) for start in range(2, target["n"], 4))  # batches 1, 3, … of 2 rows
        assert 0 < shard < target["n"], target
        assert re.search(rf"eval {re.escape(target['target'])}: {shard} pairs in", rank1), target["target"]

    # the same checkpoint scored by one process (`python -m reprpo_pl.eval`, the run's eval settings): its base scored
    # too, then its base read from the cache that the DDP run's rank 0 wrote from the gathered rows
    for cache in ("off", str(score_cache)):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", CACHE_ENV: cache}
        out = tmp_path / ("uncached" if cache == "off" else "cached")
        proc = subprocess.run([sys.executable, "-m", "reprpo_pl.eval", f"ckpt_path={run_dir}", f"out_dir={out}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        from_cache = re.findall(r"eval (\S+): base scores from cache", proc.stdout + proc.stderr)
        assert from_cache == ([] if cache == "off" else [t["target"] for t in results["targets"]])
        single = json.loads((out / "results.json").read_text())
        assert single["targets"] == results["targets"] and single["shifts"] == results["shifts"]  # exact, floats included
        for target in results["targets"]:
            name = f"{target['target']}.jsonl"
            assert (run_dir / "eval" / name).read_text() == (out / "eval" / name).read_text(), name  # every pair, same order

    points = [json.loads(line) for line in (run_dir / "curves.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [1, 2] and points[-1]["targets"] == results["targets"]  # gathered curves too
