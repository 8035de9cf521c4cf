"""Independent check against TRL's DPOTrainer (SPEC §2, §3.1): same tiny LoRA model, same pairs,
same token ids → same summed log-probs, sigmoid DPO loss and TRL-named metrics.

What TRL 1.16 does (``trl/trainer/dpo_trainer.py``), and how our side is aligned with it:

* Tokenisation (``_prepare_dataset``): for plain-text (non-conversational) rows TRL appends the eos
  *text* to chosen/rejected, tokenises ``prompt`` and ``prompt + completion`` with
  ``add_special_tokens=True`` and splits at their common prefix. We run `tokenize_pairs` on the
  original rows with ``chat_template=False`` (TRL applies no template to plain text) and
  ``add_eos=True`` (one eos id per completion, the id TRL's eos text encodes to); SmolLM2's tokenizer
  adds no BOS either way. The fixture prompts end on a token boundary and completions start with a
  space, so tokenising prompt and completion apart (ours) or jointly (TRL) gives the same ids; the
  test asserts the ids are equal. ``max_length`` is large enough that neither side truncates.
* Batching (``DataCollatorForPreference``, taken from TRL's own sequential eval dataloader): TRL
  right-pads whole ``prompt+completion`` rows, chosen rows then rejected rows, and passes no
  ``position_ids`` (default 0..L-1, right for right padding). We left-pad the prompt and right-pad
  completions with explicit ``position_ids`` — a different layout, so agreement checks our
  padding/positions rather than copying TRL's.
* Log-probs: TRL patches the base model with ``add_fused_lm_head`` and calls
  ``model(..., labels=input_ids masked by completion_mask, fused_lm_head=True).log_probs``, then
  sums over the sequence (``ld_alpha=None``): textbook summed log-probs, our ``agg="sum"``.
* Reference: given a bare model plus ``peft_config``, TRL wraps it in a fresh adapter and gets the
  reference with the adapter disabled (``use_adapter(model, None)`` → ``disable_adapter()``), as we
  do. (Given an already wrapped PeftModel, TRL would copy its adapter into a "ref" adapter, making
  reference == policy; so TRL gets the bare tiny model + the fixture's LoraConfig, and then the
  fixture's adapter weights, including the randomised LoRA B, are loaded into it: policy ≠ reference.)
* Loss: ``loss_type=["sigmoid"]``: ``mean(-logsigmoid(β·ρ))``, β=0.1. TRL's sigmoid ignores
  ``label_smoothing``, so ε=0 on both sides.
* Precision: fp32 on CPU with ``bf16=False`` (TRL defaults bf16 to True) and no gradient
  checkpointing (TRL defaults it on). LoRA dropout is 0 and TRL disables dropout, so train/eval mode
  does not change the numbers.

Our side runs on the ``tiny_peft`` fixture itself (a separate object with the same weights), so it
never goes through TRL's patched forward.

Tolerance: atol 1e-5, rtol 0 for the per-token log-probs, for fp64 sums of them, for the loss and
for the rewards. TRL's own *fp32* sums (and the ``logps/*`` means of them) reach ~ -225 (near-uniform
random model: ~ -10.8 per token), where adjacent fp32 numbers are 1.5e-5 apart, so atol 1e-5 would
demand bit-identical summation order (TRL reduces over the whole padded row, we over the completion
block). For those values only, the textbook bound on fp32 summation error is added as rtol: summing n
same-sign terms is off by at most (n-1)·2^-24 relative, on each side, so rtol = 2·(n-1)·2^-24 with n
the longest completion (~2e-6 here). The fp64 sums of the same per-token values match at atol 1e-5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import compose_train

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.models.logprobs import aggregate, completion_logps
from reprpo_pl.models.pair_layouts import concat_pairs
from reprpo_pl.models.tiny import tiny_llama
from reprpo_pl.objectives.dpo import dpo_loss, dpo_metrics

trl = pytest.importorskip("trl")
from trl.trainer.utils import use_adapter  # noqa: E402

BETA = 0.1
MAX_LENGTH = 128
ATOL = 1e-5


def fp32_sum_rtol(n_terms: int) -> float:
    """Worst-case relative gap between two fp32 sums of the same n same-sign terms (module docstring)."""
    return 2 * (n_terms - 1) * 2.0**-24


@pytest.fixture
def trl_run(pairs, tokenizer, tiny_peft, tmp_path):
    """TRL's DPOTrainer on the same model/rows; returns its batch, loss and logged metrics from
    ``compute_loss``, per-row summed log-probs (policy, reference) and per-token log-probs, all
    computed by TRL's code. (``compute_loss(..., return_outputs=True)`` is deprecated in TRL 1.16 and
    only adds an extra forward for logits, so it is called without.)"""
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        per_device_train_batch_size=len(pairs),
        per_device_eval_batch_size=len(pairs),
        max_length=MAX_LENGTH,
        beta=BETA,
        loss_type="sigmoid",
        label_smoothing=0.0,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)),  # same deterministic init as the fixture's base model
        args=args,
        processing_class=copy.deepcopy(tokenizer),  # TRL sets pad_token on it: keep the session tokenizer untouched
        train_dataset=pairs,
        peft_config=copy.deepcopy(tiny_peft.peft_config["default"]),
    )
    model = trainer.model
    model.load_state_dict(tiny_peft.state_dict())  # strict: same parameter names, adapter included
    for (name, a), (_, b) in zip(model.state_dict().items(), tiny_peft.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert "ref" not in model.peft_config, "TRL must use the disabled adapter as reference"
    assert next(model.parameters()).dtype == torch.float32

    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader(trainer.train_dataset))))
    assert batch["input_ids"].shape[0] == 2 * len(pairs)

    model.train()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, batch)  # TRL's _compute_loss: policy + reference forward, sigmoid loss
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    with torch.no_grad():
        # per-row reference sums through TRL's own method
        ref_cho, ref_rej = trainer.compute_ref_log_probs(model, batch)
        # per-token log-probs: the call _compute_loss makes (it only exposes their sums, as metric means);
        # the reference one under TRL's own adapter switch
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                      fused_lm_head=True, use_cache=False)
        policy = model(**kwargs).log_probs
        with use_adapter(model, None):
            reference = model(**kwargs).log_probs
    real = labels[:, 1:] != -100
    pi_cho, pi_rej = policy.sum(1).chunk(2)  # fp32, as _compute_loss sums them
    return {
        "trainer": trainer, "batch": batch, "loss": loss.detach(), "metrics": metrics,
        "pi_tokens": [policy[i][real[i]] for i in range(len(real))],
        "ref_tokens": [reference[i][real[i]] for i in range(len(real))],
        "pi_cho": pi_cho, "pi_rej": pi_rej, "ref_cho": ref_cho, "ref_rej": ref_rej,
    }


@pytest.fixture
def our_rows(pairs, tokenizer) -> list[dict]:
    cfg = TokenizeConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH // 2, chat_template=False, add_eos=True)
    rows = list(tokenize_pairs(pairs, tokenizer, cfg))
    assert len(rows) == len(pairs)
    return rows


def _our_logps(model, rows, pad_id) -> tuple[torch.Tensor, torch.Tensor, dict]:
    inputs = concat_pairs(PreferenceCollator(pad_token_id=pad_id)(rows))
    model.eval()
    with torch.no_grad():
        policy = completion_logps(model, inputs)
        with model.disable_adapter():
            reference = completion_logps(model, inputs)
    return policy, reference, inputs


def test_matches_trl(trl_run, our_rows, pairs, tiny_peft, tokenizer):
    """One test, because building the TRL run is the slow part."""
    # 1. identical token ids, and TRL's collated rows are exactly prompt + completion, untruncated
    ds, batch, B = trl_run["trainer"].train_dataset, trl_run["batch"], len(our_rows)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert [r[key] for r in our_rows] == ds[key], key
    for i in range(2 * B):
        r = our_rows[i % B]
        seq = r["prompt_ids"] + r["chosen_ids" if i < B else "rejected_ids"]
        assert batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist() == seq
        assert batch["completion_mask"][i].sum() == len(seq) - len(r["prompt_ids"])

    # 2. per-token log-probs, policy and reference: TRL's fused LM head vs our gather − logsumexp
    policy, reference, inputs = _our_logps(tiny_peft, our_rows, tokenizer.pad_token_id)
    mask = inputs["completion_mask"]
    for i in range(2 * B):
        torch.testing.assert_close(policy[i][mask[i]], trl_run["pi_tokens"][i], atol=ATOL, rtol=0)
        torch.testing.assert_close(reference[i][mask[i]], trl_run["ref_tokens"][i], atol=ATOL, rtol=0)
        torch.testing.assert_close(policy[i][mask[i]].double().sum(), trl_run["pi_tokens"][i].double().sum(), atol=ATOL, rtol=0)
        torch.testing.assert_close(reference[i][mask[i]].double().sum(), trl_run["ref_tokens"][i].double().sum(), atol=ATOL, rtol=0)

    # 3. summed log-probs (agg=sum, fp32) vs TRL's own sums from _compute_loss's call and compute_ref_log_probs
    pi_cho, pi_rej = aggregate(policy, mask, "sum").chunk(2)
    ref_cho, ref_rej = aggregate(reference, mask, "sum").chunk(2)
    rtol = fp32_sum_rtol(int(mask.sum(-1).max()))
    for ours, key in ((pi_cho, "pi_cho"), (pi_rej, "pi_rej"), (ref_cho, "ref_cho"), (ref_rej, "ref_rej")):
        torch.testing.assert_close(ours, trl_run[key], atol=ATOL, rtol=rtol, msg=lambda m, k=key: f"{k}: {m}")
    assert not torch.allclose(pi_cho, ref_cho, atol=1e-3), "policy must differ from reference"

    # 4. the sigmoid DPO loss and TRL's logged metrics
    loss = dpo_loss(pi_cho, pi_rej, ref_cho, ref_rej, beta=BETA, loss_type="sigmoid").mean()
    torch.testing.assert_close(loss, trl_run["loss"], atol=ATOL, rtol=0)
    assert abs(loss.item() - math.log(2)) > 1e-3, "loss should not be the trivial log 2"
    ours = dpo_metrics(pi_cho, pi_rej, ref_cho, ref_rej, BETA)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[name].item() == pytest.approx(trl_run["metrics"][name], abs=ATOL, rel=0), name
    for name in ("logps/chosen", "logps/rejected"):
        assert ours[name].item() == pytest.approx(trl_run["metrics"][name], abs=ATOL, rel=rtol), name

    # 5. the same through DPOModule.compute_loss
    _check_dpo_module(trl_run, pairs, tokenizer, tiny_peft)


def _check_dpo_module(trl_run, pairs, tokenizer, tiny_peft) -> None:
    """The real DPOModule.compute_loss (reference() context, pair_logps, agg=sum) on the same model."""
    from reprpo_pl.methods.dpo import DPOModule

    cfg = compose_train(["method=dpo", "model=tiny_random", "adapter.r=4", "method.agg=sum", f"method.beta={BETA}",
                         "method.loss_type=sigmoid", "method.label_smoothing=0.0"])
    module = DPOModule(cfg)
    module.model = tiny_peft  # swap in the fixture's adapter (the module built its own fresh one)
    module.train()
    cfg_tok = TokenizeConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH // 2, chat_template=False)
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(list(tokenize_pairs(pairs, tokenizer, cfg_tok)))
    loss, metrics = module.compute_loss(batch)
    torch.testing.assert_close(loss.detach(), trl_run["loss"], atol=ATOL, rtol=0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name].item() == pytest.approx(trl_run["metrics"][name], abs=ATOL, rel=0), name
    rtol = fp32_sum_rtol(int(torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).sum(-1).max()))
    for name in ("logps/chosen", "logps/rejected"):
        assert metrics[name].item() == pytest.approx(trl_run["metrics"][name], abs=ATOL, rel=rtol), name
