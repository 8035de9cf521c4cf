"""End to end: ``python -m reprpo_pl.train`` on the real SmolLM2-135M-Instruct for a few steps, then
results.json against its schema, results.md, the table on stdout, the checkpoint and the CSV log.

Part of the default (fast) suite, so kept small: 8 math training rows at max_length 128 (5 survive
truncation: two optimiser steps, of 4 pairs and 1), once for the headline method (innerdpo + ether,
4 eval pairs per target — 2 for math, whose other rows are identical after truncation — and the default
callbacks including sample generations) and once for DPO (2 eval pairs per target, 1 for math, and no
generations: the evaluation and generation code is the same for every method, so the second run only
needs to reach it).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from reprpo_pl.config import CONF_DIR

DATASET = OmegaConf.load(Path(CONF_DIR) / "dataset" / "math.yaml")
CALLBACKS = OmegaConf.load(Path(CONF_DIR) / "callbacks" / "default.yaml")
NO_GENERATIONS = ["callbacks.generations.enabled=false"] if "generations" in CALLBACKS else []
N_TRAIN, SEED = 8, 42
FAST = [
    f"data.n_train={N_TRAIN}",
    "data.batch_size=4",
    "data.max_length=128",
    "data.max_prompt_length=64",
    f"seed={SEED}",
]
TARGET_KEYS = {"target": str, "shift": str, "n": int, "acc_base": float, "acc": float, "acc_gain_vs_ref": (float, type(None)),
               "acc_delta": float, "perplexity_reduction_vs_ref": float, "preference_logp_gain_vs_ref": float,
               "log_ppl_chosen_delta": float}
SHIFT_KEYS = {"acc_base": float, "acc": float, "acc_gain_vs_ref": (float, type(None)), "acc_delta": float,
              "log_ppl_chosen_delta": float}


def run_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "reprpo_pl.train", *FAST, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    print(f"{' '.join(overrides)}: exit {proc.returncode} in {time.monotonic() - start:.0f} s")
    return proc


def check_types(row: dict, schema: dict, where: str) -> None:
    assert not (missing := set(schema) - set(row)), f"{where}: missing keys {sorted(missing)}"
    for key, kind in schema.items():
        value = row[key]
        assert isinstance(value, kind) and not isinstance(value, bool), f"{where}.{key} = {value!r} is not {kind}"
        if isinstance(value, float):
            assert math.isfinite(value), f"{where}.{key} = {value}"


def check_accuracy(row: dict, where: str) -> None:
    for key in ("acc_base", "acc"):
        assert 0.0 <= row[key] <= 1.0, f"{where}.{key} = {row[key]} is not an accuracy"
    if row["acc_base"] > 0:
        assert row["acc_gain_vs_ref"] == pytest.approx(row["acc"] / row["acc_base"]), f"{where}: acc_gain_vs_ref is not acc/acc_base"
    else:
        assert row["acc_gain_vs_ref"] is None


@pytest.mark.parametrize(
    ("method", "transform", "loss", "n_eval", "extra"),
    [("innerdpo", "ether", "innerdpo", 4, []), ("dpo", None, None, 2, NO_GENERATIONS)],
    ids=["innerdpo", "dpo"],
)
def test_train_cli_writes_results(method: str, transform: str | None, loss: str | None, n_eval: int, extra: list[str],
                                  tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, f"method={method}", f"eval.n_samples={n_eval}", *extra)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}"

    # results.json: header fields
    results = json.loads((run_dir / "results.json").read_text())
    expected = {"method": method, "model": "smollm2_135m", "dataset": DATASET.source, "seed": SEED, "n_train": N_TRAIN}
    assert {k: results.get(k) for k in expected} == expected
    assert results.get("transform") == transform and results.get("loss") == loss
    assert isinstance(results["seed"], int) and isinstance(results["n_train"], int)
    assert results["timing"]["train_s"] > 0 and results["timing"]["eval_s"] > 0

    # the in-sample row, then one row per target of conf/dataset/math.yaml, with its shift type
    assert isinstance(results["targets"], list)
    assert [(t["target"], t["shift"]) for t in results["targets"]] == [("math@train", "train"), *((t.name, t.shift) for t in DATASET.targets)]
    for row in results["targets"]:
        where = f"targets[{row['target']}]"
        check_types(row, TARGET_KEYS, where)
        assert 1 <= row["n"] <= n_eval, f"{where}.n = {row['n']}"
        assert row["perplexity_reduction_vs_ref"] > 0
        check_accuracy(row, where)

    # one summary per shift type: the mean over its targets
    assert isinstance(results["shifts"], dict)
    assert set(results["shifts"]) == {"train", *(t.shift for t in DATASET.targets)}
    for shift, summary in results["shifts"].items():
        check_types(summary, SHIFT_KEYS, f"shifts[{shift}]")
        rows = [t for t in results["targets"] if t["shift"] == shift]
        for key in ("acc_base", "acc"):
            assert 0.0 <= summary[key] <= 1.0, f"shifts[{shift}].{key} = {summary[key]} is not an accuracy"
        # the mean of the targets' ratios (SPEC §5), not the ratio of the mean accuracies
        for key in ("acc", "acc_base", "acc_gain_vs_ref", "acc_delta", "preference_logp_gain_vs_ref", "log_ppl_chosen_delta"):
            values = [t[key] for t in rows if t[key] is not None]
            expected_mean = sum(values) / len(values) if values else None
            assert summary[key] == pytest.approx(expected_mean), f"shifts[{shift}].{key} is not the mean over its targets"

    # results.md: both tables, and the same tables printed on stdout
    markdown = (run_dir / "results.md").read_text()
    assert "## Preference accuracy per shift type" in markdown and "## Per target" in markdown
    shift_header = next(line for line in markdown.splitlines() if line.startswith("| adapter |"))
    assert all(shift in shift_header for shift in results["shifts"])
    assert any(line.startswith("| base |") for line in markdown.splitlines())
    for target in DATASET.targets:
        assert any(line.startswith(f"| {target.name} | {target.shift} |") for line in markdown.splitlines()), target.name
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert not (absent := [line for line in table_lines if line not in proc.stdout]), f"table lines not on stdout: {absent[:3]}"

    # a trainable-only checkpoint and a CSV log with the training loss
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    assert state and all(".lora_" in k or k.startswith("transform.") for k in state), sorted(state)[:5]
    assert any(k.startswith("transform.") for k in state) == (transform is not None)
    assert all(torch.isfinite(v).all() for v in state.values())
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
