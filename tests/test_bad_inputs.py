"""Bad inputs through the CLI contract of ``python -m reprpo_pl.train``.

For every case: a non-zero exit, a short message on stderr that names the problem (and, for our own
errors, the fix) as one ``error: …`` line, no Python traceback, and no results.json or other
leftovers (the run directory is removed, or never created). Our errors (`UserError`) exit 2; Hydra's
own errors (unknown override key, unknown config-group option) happen before our code runs and exit 1.

Most cases run in-process through Hydra's real entry point (tests/cli_runner.py); a few run as
subprocesses to prove the contract end to end.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import sys
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
    if isinstance(train_rows, bytes):
        path.write_bytes(train_rows)
    else:
        path.write_text(train_rows if isinstance(train_rows, str) else json.dumps(train_rows))
    return root


def ethics_root(tmp_path: Path, justice_test: bytes) -> Path:
    """An ETHICS dir: the embedded subset with justice/justice_test.csv replaced by ``justice_test``."""
    root = tmp_path / "ethics"
    shutil.copytree(EMBEDDED_GENIES.parent / "ethics", root)
    (root / "justice" / "justice_test.csv").write_bytes(justice_test)
    return root


def rows(*responses: dict[str, float], prompt: str = "What is 2+2?\n\n### Response:\n") -> list[dict]:
    return [{"prompt": prompt, "responses": r} for r in responses]


Overrides = Callable[[Path], list[str]]
NON_UTF8_JSON = b'[{"prompt": "caf\xe9"}]'  # Latin-1 é, as a file saved in the wrong encoding has
NON_UTF8_CSV = b"label,scenario\n1,caf\xe9\n"

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
     r"unknown GENIES distribution 'math_fictoin': .*/math_fictoin/test.json does not exist \(did you mean math_fiction"),
    ("missing_targets_unknown", lambda t: ["eval.missing_targets=maybe"],
     r"eval.missing_targets='maybe' must be one of error, skip"),
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
    # ---- reliability round 2: unreadable input bytes, numeric options (src/reprpo_pl/validation.py), optional groups
    ("genies_not_utf8", lambda t: [f"data.root={genies_root(t, NON_UTF8_JSON)}"],
     r"math/train\.json is not UTF-8 text: byte 0xe9 at offset 16 .*re-save the file as UTF-8"),
    ("ethics_not_utf8", lambda t: [f"data.ethics_root={ethics_root(t, NON_UTF8_CSV)}"],
     r"justice_test\.csv is not a readable UTF-8 CSV: .*byte 0xe9.*re-save the file as UTF-8"),
    ("lr_nan", lambda t: ["method.lr=nan"], r"method.lr=nan must be > 0, e.g. method.lr=5e-5 \(a finite number\)"),
    ("lr_inf", lambda t: ["method=dpo", "method.lr=inf"], r"method.lr=inf must be > 0, e.g. method.lr=5e-5 \(a finite number\)"),
    ("lr_not_a_number", lambda t: ["method.lr=fast"], r"method.lr='fast' must be > 0"),
    ("seed_negative", lambda t: ["seed=-1"], r"seed=-1 must be an integer in \[0, 2\*\*32\), e.g. seed=42"),
    ("seed_fraction", lambda t: ["seed=1.5"], r"seed=1.5 must be an integer in \[0, 2\*\*32\)"),
    ("data_seed_too_large", lambda t: [f"data.seed={2**32}"], r"data.seed=4294967296 must be an integer in \[0, 2\*\*32\)"),
    ("accumulate_grad_batches_zero", lambda t: ["trainer.accumulate_grad_batches=0"],
     r"trainer.accumulate_grad_batches=0 must be a positive integer, e.g. trainer.accumulate_grad_batches=1"),
    ("max_steps_zero", lambda t: ["trainer.max_steps=0"], r"trainer.max_steps=0 must be a positive integer or -1 \(no limit\)"),
    ("gradient_clip_negative", lambda t: ["trainer.gradient_clip_val=-1"], r"trainer.gradient_clip_val=-1 must be a finite number >= 0 or null"),
    ("warmup_ratio_above_one", lambda t: ["method.warmup_ratio=2"], r"method.warmup_ratio=2 must be a number in \[0, 1\]"),
    ("weight_decay_negative", lambda t: ["method.weight_decay=-0.1"], r"method.weight_decay=-0.1 must be a finite number >= 0"),
    ("beta_zero_ipo", lambda t: ["method=dpo", "method.loss_type=ipo", "method.beta=0"],
     r"method.beta=0 must be > 0 and finite \(ipo's target margin is 1/\(2·beta\).*e.g. method.beta=0.1"),
    ("beta_negative_sigmoid", lambda t: ["method=dpo", "method.beta=-0.1"], r"method.beta=-0.1 must be > 0 and finite"),
    ("label_smoothing_with_ipo", lambda t: ["method=dpo", "method.loss_type=ipo", "method.label_smoothing=0.1"],
     r"method.label_smoothing=0.1 applies only to method.loss_type=sigmoid, and loss_type=ipo would ignore it: "
     r"drop it or use method.loss_type=sigmoid"),
    ("label_smoothing_with_hinge", lambda t: ["method=dpo", "method.loss_type=hinge", "method.label_smoothing=0.2"],
     r"method.label_smoothing=0.2 applies only to method.loss_type=sigmoid, and loss_type=hinge would ignore it"),
    ("label_smoothing_half", lambda t: ["method=dpo", "method.label_smoothing=0.5"], r"method.label_smoothing=0.5 must be a number in \[0, 0.5\)"),
    ("inner_ipo_beta_zero", lambda t: ["loss.inner_loss_type=ipo", "loss.beta=0"],
     r"loss.beta=0 with loss.inner_loss_type=ipo divides by zero .*set loss.beta > 0"),
    ("lora_rank_zero", lambda t: ["adapter.r=0"], r"adapter.r=0 must be a positive integer, e.g. adapter.r=64"),
    ("lora_dropout_one", lambda t: ["adapter.lora_dropout=1.0"], r"adapter.lora_dropout=1.0 must be a number in \[0, 1\)"),
    ("experiment_typo", lambda t: ["experiment=no-such-experiment"],
     r"experiment=no-such-experiment matches no config file of the experiment group: use one of cpu_comparison, dpo, "
     r"genies_benchmark, hs-ether-innerdpo, .*side-none-prefvec, study_math, study_math_easy, study_math_hard, study_unhelpful_alpaca$"),
    ("experiment_close_match", lambda t: ["experiment=projgard"],
     r"experiment=projgard matches no config file of the experiment group: did you mean projgrad\? use one of "),
    ("hparams_search_typo", lambda t: ["hparams_search=inerdpo"],
     r"hparams_search=inerdpo matches no config file .*did you mean innerdpo\? use one of dpo, innerdpo, innerpo, mse, prefvec, projbp, "
     r"projgrad, rank, topk$"),
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
    ("ckpt_plain_state_dict", lambda t: _state_dict_file(t / "weights.pt"),
     r"ckpt_path=.*/weights.pt holds no Lightning checkpoint \(no 'state_dict'\): point it at a run's checkpoints/last.ckpt"),
]


def _state_dict_file(path: Path) -> Path:
    """``torch.save(model.state_dict())``: a flat dict of tensors, not a Lightning checkpoint."""
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    return path


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


def test_eval_of_a_plain_state_dict(tmp_path):
    """``python -m reprpo_pl.eval ckpt_path=<torch.save(model.state_dict())>``: one line, exit 2, no output dir."""
    from reprpo_pl.eval import from_checkpoint

    ckpt = _state_dict_file(tmp_path / "weights.pt")
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["reprpo_pl.eval", f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'run'}"]
    code: int | str = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            from_checkpoint.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    assert_user_error(CliResult(code, out.getvalue(), err.getvalue(), tmp_path / "run"),
                      r"ckpt_path=.*/weights.pt is not a reprpo_pl checkpoint .*plain torch.save\(model.state_dict\(\)\).*"
                      r"pass the run dir, its checkpoints/last.ckpt or its adapter folder")


def test_eval_rejects_bad_numbers(tmp_path):
    from reprpo_pl.errors import UserError
    from reprpo_pl.validation import validate_eval_request
    from omegaconf import OmegaConf

    validate_eval_request(OmegaConf.create({"eval": {"n_samples": None, "batch_size": None, "seed": None}}))
    with pytest.raises(UserError, match=r"eval.n_samples=0 must be a positive integer"):
        validate_eval_request(OmegaConf.create({"eval": {"n_samples": 0, "batch_size": None, "seed": None}}))
    with pytest.raises(UserError, match=r"eval.seed=-2 must be an integer in \[0, 2\*\*32\)"):
        validate_eval_request(OmegaConf.create({"eval": {"n_samples": None, "batch_size": 2, "seed": -2}}))


def test_optional_group_on_a_user_searchpath(tmp_path):
    """An experiment from a user's ``hydra.searchpath`` is a valid choice (the run goes on to the next
    check, here a bad batch size), and a typo of it is suggested."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text("# @package _global_\nseed: 7\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    result = run_inprocess([*TINY, searchpath, "experiment=mine", "data.batch_size=0"], tmp_path / "run")
    assert_user_error(result, r"data.batch_size=0 must be a positive integer")
    result = run_inprocess([*TINY, searchpath, "experiment=mime"], tmp_path / "run")
    assert_user_error(result, r"experiment=mime matches no config file of the experiment group: did you mean mine\? .*, mine, ")


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


@pytest.mark.parametrize(("other", "named"), [("data.n_train=6", "data.n_train=4 in the checkpoint, 6 here"),
                                              ("method.lr=1e-3", "method.lr="), ("seed=7", "seed=42 in the checkpoint, 7 here")])
def test_resume_with_changed_training_settings_is_refused(tmp_path, other, named):
    """Same trainable shapes, other data/schedule/seed: resuming would silently mix two runs."""
    first = run_inprocess([*TINY, "trainer.max_steps=1", "eval.n_samples=1"], tmp_path / "first")
    assert first.code == 0, first.stderr[-3000:]
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    result = run_inprocess([*TINY, CKPT_PLUGIN, "trainer.max_steps=2", other, f"ckpt_path={ckpt}"], tmp_path / "run")
    assert_user_error(result, r"ckpt_path=.*last\.ckpt was trained with another configuration \(" + re.escape(named))


def test_no_logging_into_a_removed_run_dir(tmp_path):
    """After a user error removes the run dir, nothing in the process still logs into it (Hydra's
    train.log handler): a sweep or test session that goes on would fail on every log call."""
    result = run_inprocess([*TINY, "collection.layers=[7]"], tmp_path / "run")
    assert result.code == 2 and not (tmp_path / "run").exists()
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    stale = [h.baseFilename for x in loggers for h in x.handlers
             if isinstance(h, logging.FileHandler) and h.baseFilename.startswith(str(tmp_path))]
    assert stale == []
