"""Bad inputs through the CLI contract of ``python -m reprpo_pl.train``.

For every case: a non-zero exit, a short message on stderr that names the problem (and, for our own
errors, the fix) as one ``error: …`` line, no Python traceback, and no results.json or other
leftovers (the run directory is removed, or never created). Our errors (`UserError`) exit 2; Hydra's
own errors (unknown override key, unknown config-group option) happen before our code runs and exit 1.

Most cases run in-process through Hydra's real entry point (tests/cli_runner.py); a few run as
subprocesses to prove the contract end to end.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from cli_runner import EMBEDDED_GENIES, TINY, CliResult, run_inprocess, run_subprocess

LONG_PROMPT = "Consider the following long question. " * 80


def genies_root(tmp_path: Path, train_rows: object) -> Path:
    """A GENIES dir (``<root>/<name>/{train,test}.json``): the embedded subset with math/train.json replaced."""
    root = tmp_path / "genies"
    if not root.exists():
        shutil.copytree(EMBEDDED_GENIES, root)
    path = root / "math" / "train.json"
    path.write_text(train_rows if isinstance(train_rows, str) else json.dumps(train_rows))
    return root


def rows(*responses: dict[str, float], prompt: str = "What is 2+2?\n\n### Response:\n") -> list[dict]:
    return [{"prompt": prompt, "responses": r} for r in responses]


Overrides = Callable[[Path], list[str]]

# (id, overrides given tmp_path, regex the `error:` line must match). All exit 2.
USER_ERRORS: list[tuple[str, Overrides, str]] = [
    ("malformed_json", lambda t: [f"data.root={genies_root(t, '[{not json')}"],
     r"malformed JSON in .*math/train\.json: .*line 1 column 3.* fix or re-download"),
    ("row_without_responses", lambda t: [f"data.root={genies_root(t, [{'prompt': 'p'}])}"],
     r"math/train\.json row 0 has no 'responses' dict: each row needs 'responses'"),
    ("non_numeric_score", lambda t: [f"data.root={genies_root(t, rows({'a': 'high', 'b': 0}))}"],
     r"row 0 has a non-numeric score 'high'"),
    ("all_scores_equal", lambda t: [f"data.root={genies_root(t, rows({'a': 1, 'b': 1}, {'c': 0.5, 'd': 0.5}))}"],
     r"math \(train\) has no preference pairs: every row of .*math/train\.json was skipped \(all scores equal"),
    ("empty_completion_everywhere", lambda t: [f"data.root={genies_root(t, rows({'': 1, 'b': 0}, {' ': 1, 'c': 0}))}"],
     r"math \(train\) has no preference pairs: .*an empty completion.*fix the file"),
    ("empty_file", lambda t: [f"data.root={genies_root(t, [])}"],
     r"math \(train\) has no preference pairs: .*or the file is empty"),
    ("prompt_longer_than_max_length",
     lambda t: [f"data.root={genies_root(t, rows({' The answer is four.': 1, ' The answer is five.': 0}, prompt=LONG_PROMPT))}",
                "data.max_length=21", "data.max_prompt_length=20"],
     r"math/train: no pairs left after tokenisation: .*max_prompt_length=20 in data.max_length=21.*"
     r"raise data.max_length or lower data.max_prompt_length"),
    ("max_prompt_length_ge_max_length", lambda t: ["data.max_length=128", "data.max_prompt_length=128"],
     r"data.max_prompt_length=128 must be < data.max_length=128: lower max_prompt_length or raise max_length"),
    ("max_length_zero", lambda t: ["data.max_length=0"], r"data.max_length=0 must be a positive number of tokens"),
    ("max_length_negative", lambda t: ["data.max_length=-5"], r"data.max_length=-5 must be a positive number"),
    ("max_length_not_a_number", lambda t: ["data.max_length=abc"], r"data.max_length='abc' must be a positive number"),
    ("batch_size_zero", lambda t: ["data.batch_size=0"], r"data.batch_size=0 must be a positive integer, e.g. data.batch_size=4"),
    ("batch_size_fraction", lambda t: ["data.batch_size=2.5"], r"data.batch_size=2.5 must be a positive integer"),
    ("n_train_negative", lambda t: ["data.n_train=-1"], r"data.n_train=-1 must be a positive integer"),
    ("eval_n_samples_zero", lambda t: ["eval.n_samples=0"], r"eval.n_samples=0 must be a positive integer"),
    ("eval_batch_size_negative", lambda t: ["eval.batch_size=-3"], r"eval.batch_size=-3 must be a positive integer"),
    ("unknown_target_embedded", lambda t: ["dataset.targets=[{name:math,shift:in_domain},{name:nope,shift:cross_domain}]"],
     r"nope \(test\) is not in the embedded subset, which holds .*: set data.root to the full GENIES data"),
    ("unknown_target_with_root",
     lambda t: [f"data.root={genies_root(t, rows({'a': 1, 'b': 0}))}",
                "dataset.targets=[{name:math,shift:in_domain},{name:math_fictoin,shift:cross_domain}]"],
     r"unknown GENIES distribution 'math_fictoin' \(looked in .*\): did you mean math_fiction"),
    ("unknown_shift_type", lambda t: ["dataset.targets=[{name:math,shift:in_domain},{name:math_fiction,shift:crossdomain}]"],
     r"dataset.targets\[1\] \(math_fiction\) has shift='crossdomain': did you mean cross_domain\?"),
    ("missing_data_root", lambda t: [f"data.root={t / 'no' / 'genies'}"],
     r"data.root=.*/no/genies does not exist: point data.root at a GENIES directory"),
    ("unknown_model_offline", lambda t: ["model.name_or_path=nobody/nothing"],
     r"model.name_or_path=nobody/nothing is neither a local folder nor in the HF cache.*hf download nobody/nothing"),
    ("model_folder_without_config", lambda t: [f"model.name_or_path={t}"],
     r"model.name_or_path=.* is a folder without config.json"),
    ("layer_spec_malformed", lambda t: ["collection.layers=abc"],
     r"layer spec 'abc': cannot read 'abc' as a number \(model has L=4 blocks; write e.g."),
    ("layer_spec_zero_step", lambda t: ["collection.layers=0:4:0"], r"layer spec '0:4:0': step 0 is not a non-zero integer"),
    ("layer_out_of_range", lambda t: ["collection.layers=[7]"],
     r"layer spec \[7\]: layer 7 out of range for a model with L=4 blocks"),
    ("layer_spec_empty_range", lambda t: ["collection.layers=0.5:-2"], r"selects none of the model's L=4 blocks"),
    ("unknown_collection_mode", lambda t: ["collection.mode=resid"], r"collection mode 'resid' is unknown \(use 'hs' or 'side'\)"),
    ("unknown_align_method", lambda t: ["loss.align_method=foo"], r"unknown align_method='foo': use one of pars_rat, "),
    ("unknown_loss_option", lambda t: ["+loss.not_an_option=1"],
     r"config for reprpo_pl.reprs.losses.innerdpo.InnerDPOLoss is invalid: .*not_an_option"),
    ("unknown_Htype", lambda t: ["transform.Htype=foo"], r"transform.Htype='foo' is unknown: use one of ether, etherplus"),
    ("supr_in_side_mode", lambda t: ["transform=supr", "collection.mode=side"],
     r"transform=supr needs collection.mode=hs \(got collection.mode=side\)"),
    ("negative_learning_rate", lambda t: ["method.lr=-1e-4"], r"method.lr=-0.0001 must be > 0, e.g. method.lr=5e-5"),
    ("zero_learning_rate_dpo", lambda t: ["method=dpo", "method.lr=0"], r"method.lr=0 must be > 0"),
    ("load_in_4bit_on_cpu", lambda t: ["model.load_in_4bit=true"],
     r"model.load_in_4bit/load_in_8bit need a CUDA GPU \(bitsandbytes\); set them to false on CPU"),
]

# Hydra's own errors: (id, overrides, text that must appear in stderr's first line). All exit 1.
HYDRA_ERRORS: list[tuple[str, list[str], str]] = [
    ("unknown_override_key", ["foo=1"], "Could not override 'foo'."),
    ("unknown_dataset", ["dataset=nope"], "Could not find 'dataset/nope'"),
    ("unknown_method", ["method=nope"], "Could not find 'method/nope'"),
    ("unknown_transform", ["transform=nope"], "Could not find 'transform/nope'"),
    ("unknown_loss", ["loss=nope"], "Could not find 'loss/nope'"),
    ("sweep_syntax_in_layer_spec", ["collection.layers=range(0.5,-2)"], "Sweep parameters 'collection.layers=range(0.5,-2)' requires --multirun"),
]

# Bad checkpoints: need the AtomicCheckpointIO plugin in the trainer config, which gives them a UserError.
CKPT_PLUGIN = "++trainer.plugins=[{_target_:reprpo_pl.checkpoint_io.AtomicCheckpointIO}]"
CKPT_ERRORS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("ckpt_missing", lambda t: t / "nothere" / "last.ckpt", r"ckpt_path=.*/nothere/last.ckpt does not exist"),
    ("ckpt_corrupt", lambda t: _write(t / "bad.ckpt", b"PK\x03\x04 not really a checkpoint"),
     r"ckpt_path=.*/bad.ckpt cannot be read as a checkpoint \(.*\): the file is truncated or not a Lightning .ckpt"),
    ("ckpt_is_directory", lambda t: t, r"ckpt_path=.* is a directory: point it at a checkpoint file"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_user_error(result: CliResult, pattern: str) -> None:
    assert result.code == 2, (result.code, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.error_lines) == 1, result.stderr[-3000:]
    line = result.error_lines[0]
    assert re.search(pattern, line), line
    assert result.stderr.rstrip().splitlines()[-1] == line, "the error is the last thing on stderr"
    assert result.left == [], f"run dir not cleaned up: {result.left}"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never wait on the hub (no network here anyway)


@pytest.mark.parametrize("case_id, overrides, pattern", USER_ERRORS, ids=[c[0] for c in USER_ERRORS])
def test_user_error(tmp_path, case_id, overrides, pattern):
    if case_id == "load_in_4bit_on_cpu" and torch.cuda.is_available():
        pytest.skip("4-bit loading is valid on a GPU")
    result = run_inprocess([*TINY, *overrides(tmp_path)], tmp_path / "run")
    assert_user_error(result, pattern)


@pytest.mark.parametrize("case_id, overrides, first_line", HYDRA_ERRORS, ids=[c[0] for c in HYDRA_ERRORS])
def test_hydra_error(tmp_path, case_id, overrides, first_line):
    """Hydra rejects these before our code runs: its message names the key/option (and lists the
    available options for a config group); short, no traceback, no run directory."""
    result = run_inprocess([*TINY, *overrides], tmp_path / "run")
    assert result.code == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert first_line in lines[0], lines
    assert "Traceback" not in result.stderr
    assert len(lines) <= 30, f"{len(lines)} lines on stderr"
    assert not result.run_dir.exists()


@pytest.mark.parametrize("case_id, ckpt, pattern", CKPT_ERRORS, ids=[c[0] for c in CKPT_ERRORS])
def test_bad_checkpoint_path(tmp_path, case_id, ckpt, pattern):
    result = run_inprocess([*TINY, CKPT_PLUGIN, f"ckpt_path={ckpt(tmp_path)}"], tmp_path / "run")
    assert_user_error(result, pattern)


def test_bad_checkpoint_path_with_default_trainer(tmp_path):
    result = run_inprocess([*TINY, f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path / "run")
    assert_user_error(result, r"ckpt_path=.*missing.ckpt does not exist")


def test_multirun_reraises_a_short_error(tmp_path):
    """In a multirun the job's UserError is re-raised (fresh, so Hydra logs no deep traceback) for the
    launcher/sweeper to record; the job directory holding only bookkeeping is removed."""
    from reprpo_pl.config import run_cli
    from reprpo_pl.errors import UserError

    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)

    def fail():
        raise UserError("data.batch_size=0 must be a positive integer")

    with pytest.raises(UserError, match="data.batch_size=0") as info:
        run_cli(fail, run_dir=job, multirun=True)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert len(info.traceback) <= 2  # raised in run_cli itself, not deep in the job
    assert not job.exists()


# ---- end to end: a fresh interpreter, as a user runs it -------------------------------------------


def test_cli_data_error_subprocess(tmp_path):
    """Exit 2, stderr = the error line (plus at most Lightning's one-line seed notice), nothing left."""
    result = run_subprocess([*TINY, f"data.root={genies_root(tmp_path, '[{not json')}"], tmp_path / "run")
    assert_user_error(result, r"malformed JSON in .*math/train\.json")
    other = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("error: ")]
    assert len(other) <= 1, result.stderr


def test_cli_hydra_error_subprocess(tmp_path):
    result = run_subprocess(["foo=1"], tmp_path / "run")
    assert result.code == 1
    assert result.stderr.splitlines()[0] == "Could not override 'foo'."
    assert "+foo=1" in result.stderr  # Hydra names the fix
    assert "Traceback" not in result.stderr
    assert not result.run_dir.exists()


@pytest.mark.parametrize("other", ["adapter.r=8", "transform=hra", "method=dpo"])
def test_checkpoint_of_another_config(tmp_path, other):
    """Another adapter shape would be a size-mismatch traceback, another transform a silent fresh start."""
    first = run_inprocess([*TINY, "trainer.max_steps=1", "eval.n_samples=1"], tmp_path / "first")
    assert first.code == 0, first.stderr[-3000:]
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    result = run_inprocess([*TINY, CKPT_PLUGIN, other, f"ckpt_path={ckpt}"], tmp_path / "run")
    assert_user_error(result, r"ckpt_path=.*last\.ckpt was trained with another configuration")


def test_no_logging_into_a_removed_run_dir(tmp_path):
    """After a user error removes the run dir, nothing in the process still logs into it (Hydra's
    train.log handler): a sweep or test session that goes on would fail on every log call."""
    result = run_inprocess([*TINY, "collection.layers=[7]"], tmp_path / "run")
    assert result.code == 2 and not (tmp_path / "run").exists()
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    stale = [h.baseFilename for x in loggers for h in x.handlers
             if isinstance(h, logging.FileHandler) and h.baseFilename.startswith(str(tmp_path))]
    assert stale == []
