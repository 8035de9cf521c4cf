"""The non-finite guard: a NaN/inf loss, gradient or hidden state stops training with one line naming
the step, the term and the layer, exit 3 through the CLI, and no results.json.

Divergence is forced by a huge learning rate, or in-process by patching one piece of the computation
(a loss term, a collected hidden state, a gradient) so each check is hit on its own.
"""

from __future__ import annotations

import math
import re

import torch
from cli_runner import TINY, CliResult, run_inprocess, run_subprocess

import reprpo_pl.reprs.collection as collection
import reprpo_pl.reprs.losses.innerdpo as innerdpo
from reprpo_pl.config import EXIT_NON_FINITE

# 2 optimizer steps: step 0 is finite, a huge update makes step 1 blow up
TWO_STEPS = [*TINY, "data.n_train=4", "data.batch_size=2"]


def assert_non_finite(result: CliResult, pattern: str) -> str:
    assert result.code == EXIT_NON_FINITE, (result.code, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.error_lines) == 1, result.stderr[-3000:]
    line = result.error_lines[0]
    assert re.search(pattern, line), line
    assert result.stderr.rstrip().splitlines()[-1] == line
    assert not (result.run_dir / "results.json").exists() and not (result.run_dir / "results.md").exists()
    return line


def test_huge_learning_rate_stops_with_the_step_and_layer(tmp_path):
    """lr=1e30: the first update is finite, the second forward overflows; the first collected layer
    whose state is non-finite is named."""
    result = run_inprocess([*TWO_STEPS, "method.lr=1e30"], tmp_path / "run")
    assert_non_finite(result, r"non-finite hidden state at 'hs\.2' at global step 1 .*lower method\.lr")


def test_huge_learning_rate_dpo_names_the_loss(tmp_path):
    result = run_inprocess([*TWO_STEPS, "method=dpo", "method.lr=1e30"], tmp_path / "run")
    assert_non_finite(result, r"non-finite loss term 'loss' at global step 1")


def test_inf_hidden_state_names_the_layer(tmp_path, monkeypatch):
    """inf injected into the policy's collected state of block 3 only (the reference pass runs without grad)."""
    store = collection._store

    def poisoned(states, key, take_input, module, args, output):
        store(states, key, take_input, module, args, output)
        if key == "hs.3" and torch.is_grad_enabled():
            states[key] = states[key] * math.inf

    monkeypatch.setattr(collection, "_store", poisoned)
    result = run_inprocess(TWO_STEPS, tmp_path / "run")
    assert_non_finite(result, r"non-finite hidden state at 'hs\.3' at global step 0")


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.nan)


def test_nan_gradient_names_the_parameter_and_layer(tmp_path, monkeypatch):
    call = innerdpo.InnerDPOLoss.__call__

    def nan_gradient(self, batch):
        loss, metrics = call(self, batch)
        return _NaNGradient.apply(loss), metrics

    monkeypatch.setattr(innerdpo.InnerDPOLoss, "__call__", nan_gradient)
    result = run_inprocess(TWO_STEPS, tmp_path / "run")
    assert_non_finite(result, r"non-finite gradient of \S*layers\.\d+\.\S+ at global step 0")


def _nan_hidden_term(monkeypatch):
    margin_loss = innerdpo.margin_loss
    monkeypatch.setattr(innerdpo, "margin_loss", lambda margin, beta, loss_type: margin_loss(margin, beta, loss_type) * math.nan)


def test_nan_loss_term_stops_at_the_step(tmp_path, monkeypatch):
    _nan_hidden_term(monkeypatch)
    result = run_inprocess(TWO_STEPS, tmp_path / "run")
    assert_non_finite(result, r"non-finite loss term '[^']+' at global step 0 \(epoch 0\)")


def test_nan_loss_term_names_the_culprit_term(tmp_path, monkeypatch):
    _nan_hidden_term(monkeypatch)
    result = run_inprocess(TWO_STEPS, tmp_path / "run")
    assert_non_finite(result, r"'loss/in'")


def test_detect_anomaly_is_on_during_training_steps(tmp_path, monkeypatch):
    from reprpo_pl.methods.base import PreferenceModule

    seen: list[bool] = []
    step = PreferenceModule.training_step

    def recording(self, batch, batch_idx):
        seen.append(torch.is_anomaly_enabled())
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PreferenceModule, "training_step", recording)
    result = run_inprocess([*TINY, "method=dpo", "data.n_train=2", "debug.detect_anomaly=true"], tmp_path / "run")
    assert result.code == 0, result.stderr[-3000:]
    assert seen and all(seen), seen


def test_cli_non_finite_exit_code_subprocess(tmp_path):
    """End to end: exit 3, the error as the last stderr line, no traceback, no results.json."""
    result = run_subprocess([*TWO_STEPS, "method=dpo", "method.lr=1e30"], tmp_path / "run")
    assert_non_finite(result, r"non-finite loss term 'loss' at global step 1")
