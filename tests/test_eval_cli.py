"""`python -m reprpo_pl.eval ckpt_path=…`: trainable-only checkpoints, exact reproduction of the training
run's results, evaluation overrides, and one-line errors for wrong, missing or corrupt checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from reprpo_pl.errors import UserError
from reprpo_pl.eval.from_checkpoint import (
    build_module,
    evaluate_checkpoint,
    load_checkpoint,
)

# a tiny, short run: 1 training step, 3 targets of 3 pairs each
FAST = ["model=tiny_random", "data.n_train=4", "data.max_length=128", "data.max_prompt_length=64",
        "eval.n_samples=3", "eval.batch_size=4", "callbacks.generations.max_new_tokens=4",
        "dataset.targets=[{name:math,shift:in_domain},{name:change_my_view,shift:cross_domain},"
        "{name:us_history_textbook,shift:orthogonal}]"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
COMPARED = ("method", "transform", "loss", "model", "dataset", "seed", "n_train", "global_step", "objective",
            "targets", "shifts", "config")


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished innerdpo run on the tiny model, trained through the CLI."""
    tmp = tmp_path_factory.mktemp("eval_cli")
    proc = cli("reprpo_pl.train", *FAST, f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def eval_cfg(*overrides: str):
    return compose_config("eval", overrides)


def test_checkpoint_holds_trainable_state_and_config(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    state = ckpt["state_dict"]
    assert ckpt["hyper_parameters"]["cfg"]["method"]["_target_"] == "reprpo_pl.methods.reprpo.ReprPOModule"
    assert ckpt["hyper_parameters"]["cfg"]["model"]["name"] == "tiny_random"
    assert all(".lora_A." in k or ".lora_B." in k or k.startswith("transform.") for k in state)
    assert any(k.startswith("transform.") for k in state)
    module = build_module(OmegaConf.create(ckpt["hyper_parameters"]["cfg"]), state, run_dir)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    frozen = set(state) - trainable  # the transform's fixed parts (ETHER's W0), not the base model's
    assert trainable <= set(state) and all(k.startswith("transform.") for k in frozen), sorted(frozen)[:3]
    # weights + AdamW's two moments, nothing of the frozen base (its embedding alone is 12.6 MB)
    trainable_bytes = sum(v.numel() * v.element_size() for v in state.values())
    size = (run_dir / "checkpoints" / "last.ckpt").stat().st_size
    assert size < 3 * trainable_bytes + 200_000, (size, trainable_bytes)


def test_eval_cli_reproduces_training_results(run_dir):
    proc = cli("reprpo_pl.eval", f"ckpt_path={run_dir}", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [out] = [p for p in (run_dir / "eval").iterdir() if p.is_dir() and p.name[0].isdigit()]  # default out dir: <run dir>/eval/<timestamp>
    assert (out / "results.md").is_file()
    trained = json.loads((run_dir / "results.json").read_text())
    evaluated = json.loads((out / "results.json").read_text())
    assert {k: evaluated[k] for k in COMPARED} == {k: trained[k] for k in COMPARED}  # exact, floats included
    assert (trained["targets"][0]["target"], trained["targets"][0]["shift"]) == ("math@train", "train")  # in-sample row
    for target in trained["targets"]:  # per-pair records, the same from the checkpoint as from training
        rows = [json.loads(line) for line in (run_dir / "eval" / f"{target['target']}.jsonl").read_text().splitlines()]
        assert rows == [json.loads(line) for line in (out / "eval" / f"{target['target']}.jsonl").read_text().splitlines()]
        assert len(rows) == target["n"] and {r["distribution"] for r in rows} == {target["target"].split("@")[0]}
        assert {r["split"] for r in rows} == {"train" if target["shift"] == "train" else "test"}
        for role, key in (("base", "acc_base"), ("adapter", "acc")):
            correct = [r[f"{role}_logp_chosen"] / r[f"{role}_n_chosen"] > r[f"{role}_logp_rejected"] / r[f"{role}_n_rejected"]
                       for r in rows]
            assert sum(correct) / len(rows) == pytest.approx(target[key])  # users can recompute the table
    assert evaluated["evaluated_on"] == "math"
    assert evaluated["checkpoint"] == str((run_dir / "checkpoints" / "last.ckpt").resolve())
    assert "| us_history_textbook | orthogonal | " in proc.stdout


def test_eval_overrides_targets_and_samples(run_dir, tmp_path):
    cfg = eval_cfg(f"ckpt_path={run_dir}/checkpoints/last.ckpt", "targets=[us_history_textbook]", "eval.n_samples=2")
    results = evaluate_checkpoint(cfg, tmp_path)
    assert [(t["target"], t["n"]) for t in results["targets"]] == [("us_history_textbook", 2)]
    assert results["config"]["eval"]["n_samples"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["targets"] == results["targets"]
    with pytest.raises(UserError, match="targets: code is not in math's shift table.*shift:cross_domain"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={run_dir}", "targets=[code]"), tmp_path)


@pytest.mark.skipif(not Path("/work/shared/data/genies/code").is_dir(), reason="needs the full GENIES data")
def test_eval_on_another_source(run_dir, tmp_path):
    cfg = eval_cfg(f"ckpt_path={run_dir}", "dataset=code", "data.root=/work/shared/data/genies",
                   "targets=[code,{name:us_history_textbook,shift:orthogonal}]", "eval.n_samples=2")
    results = evaluate_checkpoint(cfg, tmp_path)
    assert [(t["target"], t["shift"]) for t in results["targets"]] == [("code", "in_domain"), ("us_history_textbook", "orthogonal")]
    assert results["dataset"] == "math" and results["evaluated_on"] == "code"  # trained on math, scored on code's table


@pytest.mark.skipif(not Path("/work/shared/data/genies/code").is_dir(), reason="needs the full GENIES data")
def test_eval_on_another_source_has_no_in_sample_row(run_dir, tmp_path):
    """code's training pairs are not in-sample for an adapter trained on math: the whole table, without `train`."""
    cfg = eval_cfg(f"ckpt_path={run_dir}", "dataset=code", "data.root=/work/shared/data/genies", "eval.n_samples=2")
    results = evaluate_checkpoint(cfg, tmp_path)
    assert [t["target"] for t in results["targets"]] == [t["name"] for t in OmegaConf.load(
        Path(__file__).resolve().parents[1] / "conf" / "dataset" / "code.yaml").targets]
    assert "train" not in results["shifts"]


def test_checkpoint_of_another_method_or_model(run_dir, tmp_path):
    with pytest.raises(UserError, match="trained with method=innerdpo model=tiny_random, not method=dpo"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={run_dir}", "method=dpo"), tmp_path)
    with pytest.raises(UserError, match="not model=smollm2_135m"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={run_dir}", "model=smollm2_135m"), tmp_path)
    # a checkpoint whose weights do not fit the module its config describes
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["cfg"]["adapter"]["r"] = 4
    torch.save(ckpt, tmp_path / "wrong.ckpt")
    with pytest.raises(UserError, match="does not fit the innerdpo on tiny_random module"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={tmp_path / 'wrong.ckpt'}"), tmp_path / "out")


def test_corrupt_or_foreign_checkpoint(run_dir, tmp_path):
    data = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read the checkpoint.*corrupt or incomplete"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={tmp_path / 'truncated.ckpt'}"), tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(UserError, match="not a reprpo_pl checkpoint"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={tmp_path / 'foreign.ckpt'}"), tmp_path)
    with pytest.raises(UserError, match="has no checkpoints/last.ckpt"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={tmp_path}"), tmp_path)
    with pytest.raises(UserError, match="ckpt_path is required"):
        evaluate_checkpoint(eval_cfg(), tmp_path)


def test_eval_cli_missing_checkpoint_is_one_line(tmp_path):
    proc = cli("reprpo_pl.eval", f"ckpt_path={tmp_path / 'nope'}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: ckpt_path={tmp_path / 'nope'} does not exist"]
    assert list(tmp_path.iterdir()) == []  # no empty output dir left behind
