"""The default precision (bf16-mixed only where bf16 matmuls are native) and evaluation under the run's precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runner import TINY, run_inprocess
from conftest import compose_train

import reprpo_pl.eval.callback as eval_callback
from reprpo_pl.eval.from_checkpoint import evaluate_checkpoint
from reprpo_pl.models import precision
from reprpo_pl.models.precision import cpu_flags, default_precision, precision_context

NATIVE_BF16 = any(flag in cpu_flags() for flag in precision.BF16_CPU_FLAGS)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert {"avx2", "avx512_bf16"} <= cpu_flags(str(info))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize(("flags", "cuda", "expected"), [
    ({"avx2"}, False, "32-true"),               # e.g. this CI machine's AMD EPYC: bf16 emulated, ~40x slower than fp32
    ({"avx2", "avx512_bf16"}, False, "bf16-mixed"),
    ({"amx_bf16"}, False, "bf16-mixed"),
    ({"avx2"}, True, "bf16-mixed"),
])
def test_default_precision_follows_the_hardware(monkeypatch, flags, cuda, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert default_precision() == expected


def test_the_resolver_is_the_default_and_an_override_wins():
    assert compose_train([], precision=None).trainer.precision == default_precision()
    assert compose_train(["trainer.precision=32-true"]).trainer.precision == "32-true"


@pytest.mark.parametrize(("name", "autocast"), [("bf16-mixed", True), ("32-true", False)])
def test_precision_context_autocasts_mixed_precisions_only(name, autocast):
    with precision_context(name, "cpu"):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert torch.is_autocast_enabled("cpu") is False  # restored
    assert (out.dtype == torch.bfloat16) is autocast


def test_evaluation_runs_under_the_training_precision(monkeypatch, tmp_path: Path):
    """The shift evaluation at train end and `reprpo_pl.eval` from the checkpoint both score under the run's
    precision (bf16 autocast for bf16-mixed), not in fp32 outside Lightning's precision context."""
    seen: list[tuple[bool, torch.dtype]] = []
    real = eval_callback.score_pairs

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_callback, "score_pairs", spy)
    run_dir = tmp_path / "run"
    result = run_inprocess([*TINY, "method=dpo", "trainer.precision=bf16-mixed", "data.max_length=96",
                            "data.max_prompt_length=48", "trainer.max_steps=1"], run_dir)
    assert result.code == 0, result.stderr[-2000:]
    n_targets = len(seen)
    assert n_targets and all(s == (True, torch.bfloat16) for s in seen), seen
    from omegaconf import OmegaConf

    evaluate_checkpoint(OmegaConf.create({"ckpt_path": str(run_dir), "eval": {"n_samples": None, "batch_size": None, "seed": None},
                                          "data": {"root": None, "ethics_root": None}, "targets": None,
                                          "dataset": None, "method": None, "model": None}), tmp_path / "eval")
    assert len(seen) == 2 * n_targets and all(s == (True, torch.bfloat16) for s in seen[n_targets:]), seen


@pytest.mark.slow
@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no AVX512-BF16/AMX: bf16 is emulated (~40x slower), so the default is fp32 here")
def test_bf16_scores_match_fp32_on_the_real_model(tmp_path: Path):
    """On the real SmolLM2: per-pair mean log-probs under bf16 autocast vs fp32 (max and mean |Δ| printed), and the
    same preference verdict on ≥ 95% of the default eval pairs."""
    from reprpo_pl.data.datamodule import PreferenceDataModule
    from reprpo_pl.eval.scorer import score_pairs
    from reprpo_pl.models.loading import add_lora, load_base_model

    cfg = compose_train(["trainer.precision=32-true"])
    base, tokenizer = load_base_model(cfg.model)
    model = add_lora(base, cfg.adapter)
    datamodule = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)
    datamodule.tokenizer = tokenizer
    datamodule.setup("validate")
    diffs, same, total = [], 0, 0
    for target in datamodule.targets:
        loader = datamodule.eval_dataloader(target.name)
        fp32 = score_pairs(model, loader, with_base=False)["adapter"]
        with precision_context("bf16-mixed", "cpu"):
            bf16 = score_pairs(model, loader, with_base=False)["adapter"]
        for a, b in ((fp32.logp_cho / fp32.n_cho, bf16.logp_cho / bf16.n_cho), (fp32.logp_rej / fp32.n_rej, bf16.logp_rej / bf16.n_rej)):
            diffs.append((a - b).abs())
        verdict_a = fp32.logp_cho / fp32.n_cho > fp32.logp_rej / fp32.n_rej
        verdict_b = bf16.logp_cho / bf16.n_cho > bf16.logp_rej / bf16.n_rej
        same += int((verdict_a == verdict_b).sum())
        total += verdict_a.numel()
    d = torch.cat(diffs)
    print(f"bf16 vs fp32 per-token-mean log-prob |Δ|: max {d.max():.4f}, mean {d.mean():.4f}; same verdict {same}/{total}")
    assert same / total >= 0.95
