"""``<run dir>/adapter/``: the trained adapter in peft's own format (`reprpo_pl.eval.adapter_export`).

Two tiny CLI runs (in-process, through the real Hydra entry point): innerdpo + ether (a transform with
state) and dpo (none). The runs use a high learning rate so the adapter moves the log-probs well past
the 1e-5 tolerance (a missing or wrongly keyed adapter would otherwise pass as "equal").
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_runner import TINY, run_inprocess
from conftest import compose_config
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file

from reprpo_pl.config import CONF_DIR
from reprpo_pl.data.datamodule import PreferenceDataModule
from reprpo_pl.errors import UserError
from reprpo_pl.eval import adapter_export
from reprpo_pl.eval.adapter_export import (
    AdapterExport,
    export_adapter,
    load_adapter_state,
)
from reprpo_pl.eval.callback import ShiftEvalCallback
from reprpo_pl.eval.from_checkpoint import evaluate_checkpoint
from reprpo_pl.eval.scorer import score_pairs
from reprpo_pl.models.loading import load_base_model

FAST = [*TINY, "method.lr=1e-2", "trainer.precision=32-true"]  # compared with an fp32 peft load outside autocast
RUNS = {"innerdpo": ["method=innerdpo", "transform=ether"], "dpo": ["method=dpo"]}
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
COMPARED = ("method", "transform", "loss", "model", "dataset", "seed", "n_train", "global_step", "objective",
            "targets", "shifts", "config")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """``{name: (run dir, the trained LightningModule)}``; the module is caught at the end of training."""
    trained: dict[str, object] = {}
    original = AdapterExport.on_train_end

    def catch(self, trainer, pl_module):
        original(self, trainer, pl_module)
        trained[Path(trainer.default_root_dir).name] = pl_module

    tmp = tmp_path_factory.mktemp("adapter_export")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AdapterExport, "on_train_end", catch)
        for name, overrides in RUNS.items():
            result = run_inprocess([*FAST, *overrides], tmp / name)
            assert result.code == 0, result.stderr[-3000:]
            out[name] = (tmp / name, trained[name])
    return out


def test_run_writes_adapter_dir(runs):
    for name, (run_dir, module) in runs.items():
        adapter = run_dir / "adapter"
        files = {p.name for p in adapter.iterdir()}
        assert PEFT_FILES | {"config.yaml", "trainer_state.json"} <= files, files
        assert ("transform.safetensors" in files) == (name == "innerdpo"), files
        assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # no temp dir left
        # config.yaml is the run config the checkpoint stores
        assert OmegaConf.to_container(OmegaConf.load(adapter / "config.yaml")) == module.hparams["cfg"]
        assert json.loads((adapter / "trainer_state.json").read_text())["global_step"] == \
            json.loads((run_dir / "results.json").read_text())["global_step"]
        log = (run_dir / "train.log").read_text()
        assert log.index("adapter written to") < log.index("results written to")  # before results.json
        [count] = [line for line in log.splitlines() if "trainable params:" in line]
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        assert f"trainable params: {trainable:,d} || all params: " in count
        assert ("transform" in count) == (name == "innerdpo"), count
    # the transform's file holds its full state (parameters and persistent buffers), keyed as its state_dict
    _, module = runs["innerdpo"]
    state = load_file(runs["innerdpo"][0] / "adapter" / "transform.safetensors")
    assert state.keys() == module.transform.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in module.transform.state_dict().items())


def eval_batches(module):
    data = PreferenceDataModule(module.cfg.data, module.cfg.dataset, module.cfg.eval)
    data.tokenizer = module.tokenizer
    data.setup("validate")
    return data.eval_dataloader(data.targets[0].name)


@pytest.mark.parametrize("name", list(RUNS))
def test_peft_from_pretrained_matches_trained_module(runs, name):
    run_dir, module = runs[name]
    loader = eval_batches(module)
    trained = score_pairs(module.model, loader)
    base, _ = load_base_model(module.cfg.model)  # a freshly loaded base, fp32
    loaded = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    scores = score_pairs(loaded, loader, with_base=False)["adapter"]
    for key in ("logp_cho", "logp_rej"):
        moved = (getattr(trained["adapter"], key) - getattr(trained["base"], key)).abs().max()
        assert moved > 1e-3, f"the adapter barely moved the log-probs ({moved}): the comparison would be vacuous"
        torch.testing.assert_close(getattr(scores, key), getattr(trained["adapter"], key), atol=1e-5, rtol=0)


def test_load_adapter_state_restores_module(runs):
    """`load_adapter_state` (what the eval CLI uses) into a fresh module gives the trained weights, the
    transform included."""
    run_dir, module = runs["innerdpo"]
    fresh = type(module)(module.cfg)
    initial = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    load_adapter_state(fresh, run_dir / "adapter")
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    restored = dict(fresh.named_parameters())
    for part in ("model.", "transform."):  # training moved both, so equality below is not the initial state's
        assert any(not torch.equal(initial[n], p) for n, p in trained.items() if n.startswith(part)), part
    for n, p in trained.items():
        assert torch.equal(restored[n], p), n


def eval_cfg(*overrides: str):
    return compose_config("eval", overrides)


def run_eval_cli(*overrides: str) -> None:
    """``python -m reprpo_pl.eval <overrides>`` in this process."""
    from reprpo_pl.eval.from_checkpoint import main

    argv, sys.argv = sys.argv, ["reprpo_pl.eval", *overrides]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                main()
            except SystemExit as e:
                assert not e.code, err.getvalue()[-2000:]
    finally:
        sys.argv = argv


def test_eval_cli_accepts_adapter_dir(runs, tmp_path):
    run_dir, _ = runs["innerdpo"]
    run_eval_cli(f"ckpt_path={run_dir / 'adapter'}")
    [out] = [p for p in (run_dir / "eval").iterdir() if p.is_dir() and p.name[0].isdigit()]  # default out dir: <run dir>/eval/<timestamp>, also for the adapter folder
    from_adapter = json.loads((out / "results.json").read_text())
    from_run_dir = evaluate_checkpoint(eval_cfg(f"ckpt_path={run_dir}"), tmp_path)
    assert from_adapter["checkpoint"] == str((run_dir / "adapter").resolve())
    assert from_run_dir["checkpoint"] == str((run_dir / "checkpoints" / "last.ckpt").resolve())
    assert [t["acc"] for t in from_adapter["targets"]] == [t["acc"] for t in from_run_dir["targets"]]
    assert {k: from_adapter[k] for k in COMPARED} == {k: from_run_dir[k] for k in COMPARED}  # exact, floats included
    trained = json.loads((run_dir / "results.json").read_text())
    assert {k: from_adapter[k] for k in COMPARED} == {k: trained[k] for k in COMPARED}


def test_eval_refuses_foreign_or_mismatched_adapter(runs, tmp_path):
    import shutil

    run_dir, _ = runs["dpo"]
    bare = tmp_path / "bare"
    shutil.copytree(run_dir / "adapter", bare)
    (bare / "config.yaml").unlink()  # a plain peft folder
    with pytest.raises(UserError, match="peft adapter folder without config.yaml"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={bare}"), tmp_path / "out")
    wrong = tmp_path / "wrong"
    shutil.copytree(run_dir / "adapter", wrong)
    cfg = OmegaConf.load(wrong / "config.yaml")
    cfg.adapter.r = 4
    OmegaConf.save(cfg, wrong / "config.yaml")
    with pytest.raises(UserError, match=r"does not fit the dpo on tiny_random module .*adapter_config.json has r=\d+"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={wrong}"), tmp_path / "out")
    with pytest.raises(UserError, match="not method=innerdpo"):
        evaluate_checkpoint(eval_cfg(f"ckpt_path={run_dir / 'adapter'}", "method=innerdpo"), tmp_path / "out")


def test_export_is_atomic(runs, tmp_path, monkeypatch):
    _, module = runs["innerdpo"]
    target = tmp_path / "adapter"
    (tmp_path / ".adapter.stale.tmp").mkdir()  # left by a killed export
    export_adapter(module, target)
    assert not (tmp_path / ".adapter.stale.tmp").exists()
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)  # the transform's file, after peft's
    with pytest.raises(OSError, match="disk full"):
        export_adapter(module, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with pytest.raises(OSError, match="disk full"):
        export_adapter(module, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # no half-written folder
    monkeypatch.undo()
    export_adapter(module, target)  # replaces an existing export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_export_runs_before_results_whatever_the_order():
    """`setup` moves the exporter ahead of a ShiftEvalCallback listed before it (results.json marks a
    complete run, so its adapter must already be there)."""
    export, shift, other = AdapterExport(), ShiftEvalCallback(), object()
    trainer = SimpleNamespace(callbacks=[other, shift, export])
    export.setup(trainer, None, "fit")
    assert trainer.callbacks == [other, export, shift]
    export.setup(trainer, None, "fit")
    assert trainer.callbacks == [other, export, shift]
    names = list(OmegaConf.load(Path(CONF_DIR) / "callbacks" / "default.yaml"))
    assert names.index("adapter_export") < names.index("shift_eval")
    assert adapter_export.ADAPTER_DIR == "adapter"


def test_a_run_without_the_eval_callback_trains_and_exports_without_results(tmp_path):
    """`~callbacks.shift_eval` trains only: the adapter and the checkpoint are written, no results.json, and
    the log says how to evaluate (it used to end in a bare StopIteration)."""
    result = run_inprocess([*TINY, "method=dpo", "~callbacks.shift_eval"], tmp_path / "run")
    assert result.code == 0, result.stderr[-2000:]
    assert "adapter/adapter_model.safetensors" in result.left and "checkpoints/last.ckpt" in result.left
    assert "results.json" not in result.left
    assert "callbacks.shift_eval is off" in result.stdout + result.stderr
    # what the log points to: `python -m reprpo_pl.eval ckpt_path=<run dir>` scores that checkpoint
    from reprpo_pl.eval.from_checkpoint import evaluate_checkpoint

    results = evaluate_checkpoint(compose_config("eval", [f"ckpt_path={tmp_path / 'run'}"]), tmp_path / "scored")
    assert results["method"] == "dpo" and results["global_step"] == 2 and len(results["targets"]) > 1  # 4 pairs, batch 2
    assert (tmp_path / "scored" / "results.json").is_file()
