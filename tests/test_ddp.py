"""``trainer=ddp_cpu``: two gloo processes train the tiny model; rank 0 alone evaluates and writes the
one results.json; rank 1 re-runs the command into the same run directory (no second run dir)."""

from __future__ import annotations

import json

from cli_runner import TINY, run_subprocess


def test_ddp_cpu_trains_and_writes_one_results_json(tmp_path):
    run_dir = tmp_path / "run"
    # 8 pairs, 2 per rank per step: the 2 ranks split the data, so 2 optimizer steps (1 process would take 4)
    result = run_subprocess([*TINY, "trainer=ddp_cpu", "data.n_train=8", "data.batch_size=2"], run_dir, cwd=tmp_path)
    assert result.code == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
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
