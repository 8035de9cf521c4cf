"""``method.schedule`` (cosine | wsd) and ``method.optimizer`` (adamw | bitsandbytes' paged/8-bit AdamW):
the learning rate each optimiser step of `PreferenceModule.configure_optimizers` against direct transcriptions,
and the start-of-run refusals (one line, before any model loads)."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from cli_runner import TINY, run_inprocess
from conftest import compose_train
from omegaconf import OmegaConf

from reprpo_pl.errors import UserError
from reprpo_pl.methods.base import PreferenceModule
from reprpo_pl.validation import validate_train_config

LR = 1e-3


def lr_curve(total: int, **method: object) -> list[float]:
    """The learning rate of steps 0..total-1 from the real `configure_optimizers`, on a stand-in module
    (one parameter, ``trainer.estimated_stepping_batches = total``, CPU)."""
    param = torch.nn.Parameter(torch.zeros(3))
    cfg = OmegaConf.create({"lr": LR, "weight_decay": 0.0, "optimizer": "adamw", "schedule": "cosine",
                            "warmup_ratio": 0.1, "decay_ratio": None, **method})
    stub = SimpleNamespace(parameters=lambda: [param], method_cfg=cfg, device=torch.device("cpu"),
                           trainer=SimpleNamespace(estimated_stepping_batches=total))
    out = PreferenceModule.configure_optimizers(stub)
    optimizer, scheduler = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and out["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("total", [100, 37])
def test_wsd_matches_transcription(total):
    """15 % linear warmup ((s+1)/W, the project's convention), 70 % flat at 1, then the last 15 % of steps
    fall from 1 to 0 along a half cosine (transformers' get_wsd_schedule, decay_type='cosine')."""
    warmup, decay = int(0.15 * total), int(0.15 * total)
    stable = total - warmup - decay

    def expected(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if s < warmup + stable:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (s - warmup - stable) / decay))

    got = lr_curve(total, schedule="wsd", warmup_ratio=0.15, decay_ratio=0.15)
    assert got == pytest.approx([LR * expected(s) for s in range(total)], rel=1e-12, abs=1e-15)
    assert max(got) == pytest.approx(LR) and got.count(LR) >= stable  # the flat part is exactly the peak


def test_wsd_decay_ends_near_zero_and_matches_transformers_shape():
    """After warmup and the flat phase, transformers' cosine decay (min_lr_ratio 0) gives the same values."""
    from transformers.optimization import _get_wsd_scheduler_lambda

    total, warmup, decay = 200, 30, 30
    got = lr_curve(total, schedule="wsd", warmup_ratio=0.15, decay_ratio=0.15)
    ref = [LR * _get_wsd_scheduler_lambda(s, num_warmup_steps=warmup, num_stable_steps=total - warmup - decay,
                                          num_decay_steps=decay, warmup_type="linear", decay_type="cosine",
                                          min_lr_ratio=0.0, num_cycles=0.5) for s in range(total)]
    assert got[warmup:] == pytest.approx(ref[warmup:], rel=1e-12, abs=1e-15)
    assert got[-1] < 0.01 * LR


def test_cosine_unchanged():
    """The default schedule: linear warmup (s+1)/W over ⌊0.1·T⌋ steps, then a half cosine to 0 over the rest."""
    total = 50
    warmup = int(0.1 * total)

    def expected(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    assert lr_curve(total) == pytest.approx([LR * expected(s) for s in range(total)], rel=1e-12, abs=1e-15)


def test_defaults_are_adamw_cosine():
    for method in ("dpo", "innerdpo", "projgrad", "prefvec"):
        m = compose_train([f"method={method}"]).method
        assert (m.optimizer, m.schedule, m.decay_ratio) == ("adamw", "cosine", None)


@pytest.mark.parametrize("overrides, pattern", [
    (["method.schedule=wsd"], r"^method\.schedule=wsd needs method\.decay_ratio .*e\.g\. method\.decay_ratio=0\.15$"),
    (["method.decay_ratio=0.15"], r"^method\.decay_ratio=0\.15 applies only to method\.schedule=wsd"),
    (["method.schedule=wsd", "method.warmup_ratio=0.5", "method.decay_ratio=0.6"], r"exceed 1"),
    (["method.schedule=linear"], r"^method\.schedule='linear': use one of cosine, wsd$"),
    (["method.schedule=wsd", "method.decay_ratio=1.5"], r"^method\.decay_ratio=1\.5 must be a number in \[0, 1\]"),
    (["method.optimizer=sgd"], r"^method\.optimizer='sgd': use one of adamw, paged_adamw_32bit, adamw_8bit$"),
])
def test_bad_schedule_or_optimizer_refused(overrides, pattern):
    with pytest.raises(UserError) as e:
        validate_train_config(compose_train(overrides))
    assert re.search(pattern, str(e.value)) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["paged_adamw_32bit", "adamw_8bit"])
def test_bitsandbytes_optimizer_refused_without_cuda(name):
    """On a CPU run (trainer.accelerator=cpu, or no CUDA device) the bitsandbytes optimizers are refused at the
    start with one line naming the option and the fix; configure_optimizers refuses them the same way."""
    cfg = compose_train([f"method.optimizer={name}", "trainer.accelerator=cpu"])
    with pytest.raises(UserError, match=rf"^method\.optimizer={name} is a bitsandbytes optimizer that needs a CUDA GPU.*"
                                        r"use method\.optimizer=adamw"):
        validate_train_config(cfg)
    with pytest.raises(UserError, match=rf"^method\.optimizer={name} is a bitsandbytes optimizer"):
        lr_curve(4, optimizer=name)


def test_bitsandbytes_optimizer_refused_from_the_cli(tmp_path):
    """The CLI prints the refusal as its one error line, exit 2, before any model loads."""
    result = run_inprocess([*TINY, "method.optimizer=paged_adamw_32bit", "trainer.accelerator=cpu"], tmp_path / "run")
    assert result.code == 2, result.stderr[-2000:]
    assert len(result.error_lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "method.optimizer=paged_adamw_32bit" in result.error_lines[0] and "method.optimizer=adamw" in result.error_lines[0]
