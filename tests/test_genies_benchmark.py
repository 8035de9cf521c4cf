"""experiment=genies_benchmark (issue 12 item 5b): GENIES' 15 shift pairs and their target-tuned runs as one
multirun over ``benchmark.run``; every job composes, the first pair trains on the tiny model, and a pair whose
distribution is missing fails in one line or, with ``eval.missing_targets=skip``, is skipped with a warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import TINY, run_inprocess
from conftest import compose_train
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from reprpo_pl.data.sources import parse_shift_table

FIXTURE = Path(__file__).parent / "data" / "fixtures" / "genies_benchmark"  # the first pair in miniature
EXPERIMENT = Path(__file__).parents[1] / "conf" / "experiment" / "genies_benchmark.yaml"
# GENIES' benchmark as the issue lists it: (source, target, the target-tuned run's training distribution)
PAIRS = [
    ("us_history_textbook", "us_history_fiction", "us_history_fiction"),
    ("alpaca_mmlu", "spanish_output", "spanish_output"),
    ("math", "change_my_view", "change_my_view"),
    ("raven_matrices", "us_history", "us_history"),
    ("code_easy", "code_hard", "code_hard"),
    ("alpaca_easy", "alpaca_hard", "alpaca_hard"),
    ("alpaca_mmlu", "raven_matrices", "raven_matrices"),
    ("alpaca_mmlu", "ranking_logic", "ranking_logic"),
    ("alpaca_low_quality", "alpaca_high_quality", "alpaca_high_quality"),
    ("alpaca_short", "alpaca_long", "alpaca_mmlu"),
    ("alpaca_mmlu", "wrong_arc", "wrong_arc"),
    ("alpaca_mmlu", "truthful_qa", "truthful_qa"),
    ("alpaca_mmlu", "sycophancy_mimicry", "quote_attribution"),
    ("alpaca_mmlu", "survival_influence", "survival_influence"),
    ("alpaca_mmlu", "reward_seeking", "reward_seeking"),
]
RUNS = {f"{s}__{t}": (s, t) for s, t, _ in PAIRS} | {f"target_tuned__{t}": (ref, t) for _, t, ref in PAIRS}


def test_the_sweep_lists_every_pair_and_target_tuned_run_once():
    params = OmegaConf.load(EXPERIMENT).hydra.sweeper.params
    (override,) = OverridesParser.create().parse_overrides([f"benchmark.run={params['benchmark.run']}"])
    swept = list(override.sweep_string_iterator())
    assert swept == list(RUNS)  # pairs first, in the order, then the target-tuned runs
    assert set(OmegaConf.load(EXPERIMENT).benchmark.runs) == set(RUNS)


@pytest.mark.parametrize("run", RUNS)
def test_every_job_composes(run):
    source, target = RUNS[run]
    cfg = compose_train(["experiment=genies_benchmark", f"benchmark.run={run}"])
    assert cfg.data.root == "../shared/data/genies"
    table = parse_shift_table(cfg.dataset)  # the job's dataset, resolved from benchmark.runs
    assert cfg.dataset.source == source and table[0].name == source
    assert target in [t.name for t in table]
    assert len(table) == (1 if source == target else 2)


def test_first_pair_trains_on_its_source_and_scores_its_target(tmp_path):
    result = run_inprocess([*TINY, "experiment=genies_benchmark", f"data.root={FIXTURE}", "trainer.max_steps=2"],
                           tmp_path / "run")
    assert result.code == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "us_history_textbook" and results["global_step"] == 2
    assert [(t["target"], t["shift"]) for t in results["targets"]] == [
        ("us_history_textbook@train", "train"), ("us_history_textbook", "in_domain"), ("us_history_fiction", "cross_domain")]
    assert results["config"]["benchmark"]["run"] == "us_history_textbook__us_history_fiction"


def test_a_pair_whose_target_is_missing(tmp_path):
    root = tmp_path / "genies"
    shutil.copytree(FIXTURE, root)
    shutil.rmtree(root / "us_history_fiction")
    common = [*TINY, "experiment=genies_benchmark", f"data.root={root}"]
    failed = run_inprocess(common, tmp_path / "error")
    assert failed.code == 2 and len(failed.error_lines) == 1, failed.stderr[-3000:]
    assert f"{root / 'us_history_fiction' / 'test.json'} does not exist" in failed.error_lines[0]
    assert failed.error_lines[0].endswith("or set eval.missing_targets=skip to skip it")
    skipped = run_inprocess([*common, "eval.missing_targets=skip"], tmp_path / "skip")
    assert skipped.code == 0, skipped.stderr[-3000:]
    said = skipped.stdout + skipped.stderr
    assert "skipping target us_history_fiction" in said and "run skipped: every out-of-domain target (us_history_fiction)" in said
    assert not (tmp_path / "skip" / "results.json").exists()


def test_unknown_run_is_one_line_with_a_hint(tmp_path):
    result = run_inprocess([*TINY, "experiment=genies_benchmark", "benchmark.run=code_easy__code_hrd"], tmp_path / "run")
    assert result.code == 2 and len(result.error_lines) == 1, result.stderr[-3000:]
    assert result.error_lines[0].startswith("error: benchmark.run='code_easy__code_hrd' is not one of the 30 entries "
                                            "of benchmark.runs: did you mean code_easy__code_hard?")
