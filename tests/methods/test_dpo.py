"""DPO (SPEC §3.1): losses, the log-2 start, metrics, and gradients through the LoRA adapter only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from omegaconf import OmegaConf

from reprpo_pl.config import CONF_DIR
from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.errors import UserError
from reprpo_pl.models.logprobs import aggregate, completion_logps
from reprpo_pl.models.pair_layouts import concat_pairs
from reprpo_pl.objectives.dpo import dpo_loss, dpo_metrics

BETA = 0.1


def make_module(**method):
    """The real DPOModule from the composed train config (method=dpo, default adapter) on the tiny random Llama."""
    from reprpo_pl.methods.dpo import DPOModule

    cfg = compose_train(["method=dpo", "model=tiny_random", *(f"method.{k}={v}" for k, v in method.items())])
    return DPOModule(cfg)


@pytest.fixture
def batch(pairs, tokenizer) -> dict[str, torch.Tensor]:
    rows = list(tokenize_pairs(pairs, tokenizer, TokenizeConfig(max_length=128, max_prompt_length=64)))
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows)


def _random_logps(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(-torch.rand(n, generator=gen) * 50 for _ in range(4))


# ---- the loss formulas ----------------------------------------------------------------------


def test_losses_at_zero_margin():
    x = torch.tensor([-12.5, -3.0, -40.0])
    same = (x, x + 1.0, x - 2.0, x - 1.0)  # ρ = (x - (x+1)) - ((x-2) - (x-1)) = 0
    torch.testing.assert_close(dpo_loss(*same, beta=BETA, loss_type="sigmoid"), torch.full((3,), math.log(2)))
    torch.testing.assert_close(dpo_loss(*same, beta=BETA, loss_type="ipo"), torch.full((3,), (1 / (2 * BETA)) ** 2))
    torch.testing.assert_close(dpo_loss(*same, beta=BETA, loss_type="hinge"), torch.ones(3))
    for eps in (0.1, 0.3):  # any smoothing: still log 2 at ρ = 0
        torch.testing.assert_close(dpo_loss(*same, beta=BETA, label_smoothing=eps), torch.full((3,), math.log(2)))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_formulas(beta):
    pc, pr, rc, rr = _random_logps()
    rho = (pc - pr) - (rc - rr)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, "sigmoid"), -torch.log(torch.sigmoid(beta * rho)))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, "ipo"), (rho - 1 / (2 * beta)) ** 2)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, "hinge"), torch.clamp(1 - beta * rho, min=0))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25])
def test_label_smoothing(eps):
    pc, pr, rc, rr = _random_logps(seed=1)
    z = BETA * ((pc - pr) - (rc - rr))
    expected = -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, BETA, "sigmoid", label_smoothing=eps), expected)
    if eps == 0.0:
        torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, BETA, "sigmoid", eps), -F.logsigmoid(z))


def test_reference_is_detached():
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in _random_logps(4))
    dpo_loss(pc, pr, rc, rr, BETA).sum().backward()
    assert pc.grad is not None and pr.grad is not None
    assert rc.grad is None and rr.grad is None


def test_unknown_loss_type_raises_user_error():
    x = torch.zeros(2)
    with pytest.raises(UserError, match="loss_type"):
        dpo_loss(x, x, x, x, BETA, loss_type="kto")


def test_metrics_names_and_values():
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    rc, rr = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -16.0])
    m = dpo_metrics(pc, pr, rc, rr, BETA)
    assert set(m) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected", "dpo_acc"}
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(BETA * (1.0 + 0.0) / 2))
    torch.testing.assert_close(m["rewards/rejected"], torch.tensor(BETA * (-1.0 + 1.0) / 2))
    torch.testing.assert_close(m["rewards/margins"], torch.tensor(BETA * ((1 - -1) + (0 - 1)) / 2))
    torch.testing.assert_close(m["rewards/accuracies"], torch.tensor(0.5))  # row 0: 0.1 > -0.1; row 1: 0 < 0.1
    torch.testing.assert_close(m["logps/chosen"], torch.tensor(-15.0))
    torch.testing.assert_close(m["logps/rejected"], torch.tensor(-13.5))
    torch.testing.assert_close(m["dpo_acc"], torch.tensor(0.5))  # row 0: -10 > -12; row 1: -20 < -15


# ---- on the tiny model ----------------------------------------------------------------------


@pytest.mark.parametrize("agg", ["mean", "sum"])
def test_loss_is_log2_at_init_pieces(tiny_model, batch, agg):
    """Fresh LoRA (B = 0, as peft initialises it): policy == reference, so ρ = 0 and loss = log 2."""
    from reprpo_pl.models.loading import add_lora

    model = add_lora(tiny_model, OmegaConf.load(Path(CONF_DIR) / "adapter" / "lora.yaml"))
    assert all((p == 0).all() for n, p in model.named_parameters() if "lora_B" in n)
    inputs = concat_pairs(batch)
    model.train()
    policy = completion_logps(model, inputs)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        reference = completion_logps(model, inputs)
    mask = inputs["completion_mask"]
    pi_cho, pi_rej = aggregate(policy, mask, agg).chunk(2)
    ref_cho, ref_rej = aggregate(reference, mask, agg).chunk(2)
    torch.testing.assert_close(pi_cho.detach(), ref_cho, atol=1e-6, rtol=0)
    loss = dpo_loss(pi_cho, pi_rej, ref_cho, ref_rej, BETA, "sigmoid").mean()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert dpo_loss(pi_cho, pi_rej, ref_cho, ref_rej, BETA, "ipo").mean().item() == pytest.approx(25.0, abs=1e-3)
    assert dpo_loss(pi_cho, pi_rej, ref_cho, ref_rej, BETA, "hinge").mean().item() == pytest.approx(1.0, abs=1e-6)


def test_dpo_module_at_init(batch):
    """The same through DPOModule.compute_loss, with the repo's default method and adapter configs."""
    module = make_module()
    assert all((p == 0).all() for n, p in module.model.named_parameters() if "lora_B" in n)
    loss, metrics = module.compute_loss(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name].item() == pytest.approx(0.0, abs=1e-6), name
    assert metrics["rewards/accuracies"].item() == 0.0  # ties are not counted as correct
    # the NLL of chosen: per-token mean, properly shifted — and policy == reference here
    inputs = concat_pairs(batch)
    with torch.no_grad():
        per_token = completion_logps(module.model, inputs)
    nll = -aggregate(per_token, inputs["completion_mask"], "mean").chunk(2)[0].mean()
    torch.testing.assert_close(metrics["nll/chosen"], nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["nll/chosen_ref"], nll, atol=1e-5, rtol=0)
    assert nll.item() == pytest.approx(math.log(module.model.config.vocab_size), abs=0.5)  # random model ≈ uniform

    module.method_cfg.loss_type = "hinge"
    assert module.compute_loss(batch)[0].item() == pytest.approx(1.0, abs=1e-6)
    module.method_cfg.loss_type = "ipo"
    assert module.compute_loss(batch)[0].item() == pytest.approx((1 / (2 * module.method_cfg.beta)) ** 2, abs=1e-3)
    module.method_cfg.loss_type = "nope"
    with pytest.raises(UserError):
        module.compute_loss(batch)


def test_training_steps_lower_loss_and_touch_only_lora(tiny_peft, batch):
    """A few AdamW steps on one fixed batch lower the DPO loss; the gradient reaches every lora_A
    and lora_B (B is random in `tiny_peft`, so A gets gradient too) and no frozen weight."""
    module = make_module(agg="mean", loss_type="sigmoid")
    module.model = tiny_peft
    module.train()
    trainable = {n: p for n, p in tiny_peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    frozen = [p for p in tiny_peft.parameters() if not p.requires_grad]
    assert frozen
    before = {n: p.detach().clone() for n, p in tiny_peft.named_parameters()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for step in range(5):
        opt.zero_grad()
        loss, _ = module.compute_loss(batch)
        loss.backward()
        if step == 0:
            for n, p in trainable.items():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"
            assert all(p.grad is None for p in frozen)
            assert sum("lora_A" in n for n in trainable) == sum("lora_B" in n for n in trainable) > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    for n, p in tiny_peft.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n
