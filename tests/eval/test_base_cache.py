"""Base scores cached on disk (issue 12 item 4): a rerun skips the base pass, results are identical with and
without the cache, and a damaged cache file is ignored and rewritten, never trusted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from cli_runner import TINY, run_inprocess
from conftest import TINY_TRAIN, compose_train

from reprpo_pl.data.datamodule import PreferenceDataModule
from reprpo_pl.eval import callback as callback_module
from reprpo_pl.eval.base_cache import CACHE_ENV, open_base_cache, score_cache_dir, weights_digest
from reprpo_pl.eval.callback import evaluate_targets


@pytest.fixture
def datamodule(tokenizer) -> PreferenceDataModule:
    """The tiny config's targets (the in-sample row and math's table), 2 pairs each, tokenised."""
    cfg = compose_train(TINY_TRAIN)
    data = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)
    data.tokenizer = tokenizer
    data.setup("validate")
    return data


@pytest.fixture
def base_passes(monkeypatch) -> list[bool]:
    """``with_base`` of every `score_pairs` call that evaluate_targets makes."""
    seen: list[bool] = []
    score = callback_module.score_pairs

    def recording(model, loader, with_adapter=True, with_base=True, desc="score"):
        seen.append(with_base)
        return score(model, loader, with_adapter=with_adapter, with_base=with_base, desc=desc)

    monkeypatch.setattr(callback_module, "score_pairs", recording)
    return seen


def cache_for(model, datamodule, directory: Path, monkeypatch, batch_size: int | None = None):
    monkeypatch.setenv(CACHE_ENV, str(directory))
    return open_base_cache(model, "32-true", batch_size or datamodule.eval_batch_size, datamodule.tokenizer.pad_token_id)


def test_second_evaluation_skips_the_base_pass_with_identical_results(tiny_peft, datamodule, base_passes, tmp_path,
                                                                       monkeypatch, caplog):
    uncached, uncached_rows = evaluate_targets(tiny_peft, datamodule)
    first, first_rows = evaluate_targets(tiny_peft, datamodule, disk_cache=cache_for(tiny_peft, datamodule, tmp_path, monkeypatch))
    assert len(list(tmp_path.glob("*.json"))) == len(datamodule.targets)  # one file per target
    base_passes.clear()
    with caplog.at_level(logging.INFO, logger="reprpo_pl.eval.callback"):
        second, second_rows = evaluate_targets(tiny_peft, datamodule, disk_cache=cache_for(tiny_peft, datamodule, tmp_path, monkeypatch))
    assert base_passes == [False] * len(datamodule.targets)  # every base pass skipped
    assert sum("base scores from cache" in r.getMessage() for r in caplog.records) == len(datamodule.targets)
    assert uncached == first == second and uncached_rows == first_rows == second_rows  # exact, floats included


@pytest.mark.parametrize("damage", ["truncate", "edit_a_score", "not_json", "wrong_length"])
def test_damaged_cache_file_is_ignored_and_rewritten(tiny_peft, datamodule, base_passes, tmp_path, monkeypatch, caplog,
                                                     damage: str):
    expected, _ = evaluate_targets(tiny_peft, datamodule, disk_cache=cache_for(tiny_peft, datamodule, tmp_path, monkeypatch))
    path = sorted(tmp_path.glob("*.json"))[0]
    good = path.read_text()
    doc = json.loads(good)
    if damage == "truncate":
        path.write_text(good[: len(good) // 2])
    elif damage == "edit_a_score":  # still valid JSON with the right key: only the checksum tells
        doc["scores"]["logp_cho"][0] += 1.0
        path.write_text(json.dumps(doc))
    elif damage == "not_json":
        path.write_bytes(b"\x00\xff garbage")
    else:
        doc["scores"] = {k: v[:-1] for k, v in doc["scores"].items()}
        path.write_text(json.dumps(doc))
    base_passes.clear()
    with caplog.at_level(logging.WARNING, logger="reprpo_pl.eval.base_cache"):
        again, _ = evaluate_targets(tiny_peft, datamodule, disk_cache=cache_for(tiny_peft, datamodule, tmp_path, monkeypatch))
    assert again == expected
    assert base_passes.count(True) == 1  # the damaged target's base scored again, the others read
    assert any("ignoring the base-score cache file" in r.getMessage() and path.name in r.getMessage() for r in caplog.records)
    assert path.read_text() == good  # rewritten


def test_key_follows_weights_rows_and_batching(tiny_peft, datamodule, tmp_path, monkeypatch):
    cache = cache_for(tiny_peft, datamodule, tmp_path, monkeypatch)
    rows = datamodule.eval_sets["math"]
    key = cache.key(rows)
    assert key != cache.key(datamodule.eval_sets["change_my_view"])
    assert key != cache_for(tiny_peft, datamodule, tmp_path, monkeypatch, batch_size=1).key(rows)  # padding differs
    digest = weights_digest(tiny_peft)
    with torch.no_grad():
        next(p for n, p in tiny_peft.named_parameters() if "lora_B" in n).add_(1.0)
    assert weights_digest(tiny_peft) == digest  # the adapter is not the base
    with torch.no_grad():
        next(p for n, p in tiny_peft.named_parameters() if "lora" not in n).add_(1.0)
    assert weights_digest(tiny_peft) != digest
    assert cache_for(tiny_peft, datamodule, tmp_path, monkeypatch).key(rows) != key


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, "off")
    assert score_cache_dir() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path))  # the model cache's root (models/loading.py)
    assert score_cache_dir() == tmp_path / "base_scores"


def test_rerun_takes_base_scores_from_cache(tmp_path, monkeypatch):
    """Two identical training runs: the second reads every base score, says so, and writes the same results."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = run_inprocess([*TINY, "method=dpo"], tmp_path / "first")
    second = run_inprocess([*TINY, "method=dpo"], tmp_path / "second")
    assert first.code == 0 and second.code == 0, second.stderr[-3000:]
    logs = [(run.run_dir / "train.log").read_text() for run in (first, second)]
    assert "base scores from cache" not in logs[0] and "base scores from cache" in logs[1]
    results = [json.loads((run.run_dir / "results.json").read_text()) for run in (first, second)]
    assert results[0]["targets"] == results[1]["targets"] and results[1]["timing"]["eval_s"] > 0
