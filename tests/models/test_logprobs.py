"""Completion log-probs (SPEC §2) against brute force: no padding, no position_ids, full logits."""

from __future__ import annotations

import pytest
import torch

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.eval.scorer import score_pairs
from reprpo_pl.models.logprobs import (
    aggregate,
    completion_logps,
    supports_packed,
    token_logps,
)
from reprpo_pl.models.pair_layouts import concat_pairs, pack_pairs


@pytest.fixture
def tiny_gpt2(tokenizer):
    """Learned absolute position embeddings: unlike RoPE (invariant to shifting all positions of a
    left-padded row), wrong position_ids change its outputs, so it checks `concat_pairs`' positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def rows(pairs, tokenizer) -> list[dict]:
    return list(tokenize_pairs(pairs, tokenizer, TokenizeConfig(max_length=128, max_prompt_length=64)))


def _brute_force(model, rows: list[dict]) -> list[torch.Tensor]:
    """For each of the 2B sequences (chosen rows, then rejected rows): run the model on the bare
    prompt+completion (batch of one, no mask, default positions), full-vocab log_softmax, pick
    the token that follows each position."""
    out = []
    for role in ("chosen", "rejected"):
        for r in rows:
            prompt, completion = r["prompt_ids"], r[f"{role}_ids"]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0]
            n = len(prompt)
            logp = torch.log_softmax(logits[n - 1 : -1].double(), -1)  # position n-1+t predicts completion[t]
            out.append(torch.stack([logp[t, tok] for t, tok in enumerate(completion)]).float())
    return out


@pytest.mark.parametrize("which", ["tiny_model", "tiny_peft", "tiny_gpt2"])
def test_completion_logps_matches_unpadded_loop(which, rows, tokenizer, request):
    """Left padding + position_ids + logits_to_keep give exactly the unpadded per-row log-probs."""
    model = request.getfixturevalue(which).eval()
    inputs = concat_pairs(PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows))
    with torch.no_grad():
        got = completion_logps(model, inputs)
    assert got.shape == inputs["completion_ids"].shape and got.dtype == torch.float32
    expected = _brute_force(model, rows)
    mask = inputs["completion_mask"]
    for i, exp in enumerate(expected):
        n = len(exp)
        assert mask[i].sum() == n
        torch.testing.assert_close(got[i, :n], exp, atol=1e-5, rtol=0)
        assert (got[i, n:] == 0).all(), "padding positions must be zero"
    # Summed (agg=sum) per-sequence log-probs. The sums are ~ -10.8 x length (near-uniform random model,
    # |V| = 49152), in [-256, -128] for the longer rows, where one fp32 ulp is 1.5e-5: atol 1e-5 plus a
    # few ulps of relative slack (rtol 2^-21 ~ 4.8e-7) for the summation order alone.
    summed = aggregate(got, mask, "sum")
    torch.testing.assert_close(summed, torch.stack([e.double().sum() for e in expected]).float(), atol=1e-5, rtol=2**-21)


def test_packed_completion_logps_match_unpadded_loop(tiny_peft, rows, tokenizer):
    """The packed layout (prompt once, both completions after it under a block mask) gives the same
    per-token log-probs as running each prompt+completion alone."""
    model = tiny_peft.eval()
    assert supports_packed(model)  # sdpa attention and a frozen lm_head
    inputs = pack_pairs(PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows))
    with torch.no_grad():
        got = completion_logps(model, inputs)
    for i, exp in enumerate(_brute_force(model, rows)):
        torch.testing.assert_close(got[i, : len(exp)], exp, atol=1e-5, rtol=0)
        assert (got[i, len(exp):] == 0).all()


def test_scorer_sums_match_unpadded_loop(tiny_peft, rows, tokenizer):
    """`score_pairs` (packed on this model) gives each row's summed log-probs and token counts, with
    the adapter and with it disabled (tiny_peft's random lora_B makes the two differ)."""
    loader = torch.utils.data.DataLoader(rows, batch_size=3, collate_fn=PreferenceCollator(pad_token_id=tokenizer.pad_token_id))
    scores = score_pairs(tiny_peft, loader)
    expected = {"adapter": _brute_force(tiny_peft.eval(), rows)}
    with tiny_peft.disable_adapter():
        expected["base"] = _brute_force(tiny_peft, rows)
    assert not torch.allclose(expected["adapter"][0].sum(), expected["base"][0].sum())
    for role, exp in expected.items():
        s = scores[role]
        torch.testing.assert_close(torch.cat([s.logp_cho, s.logp_rej]), torch.stack([e.sum() for e in exp]), atol=1e-4, rtol=0)
        assert torch.cat([s.n_cho, s.n_rej]).tolist() == [len(e) for e in exp]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_equals_log_softmax_gather(chunk, dtype):
    gen = torch.Generator().manual_seed(0)
    N, C, V = 7, 5, 50
    logits = (torch.randn(N, C, V, generator=gen) * 3).to(dtype)
    ids = torch.randint(0, V, (N, C), generator=gen)
    mask = torch.rand(N, C, generator=gen) > 0.3
    got = token_logps(logits, ids, mask, chunk=chunk)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    assert got.dtype == torch.float32 and got.shape == (N, C)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[~mask] == 0).all()


def test_token_logps_gradient_matches():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 11, generator=gen, requires_grad=True)
    ids = torch.randint(0, 11, (3, 4), generator=gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    (g1,) = torch.autograd.grad(token_logps(logits, ids, mask, chunk=2).sum(), logits)
    (g2,) = torch.autograd.grad(torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_aggregate_mean_and_sum():
    logps = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(aggregate(logps, mask, "sum"), torch.tensor([-6.0, -4.0, 0.0]))
    torch.testing.assert_close(aggregate(logps, mask, "mean"), torch.tensor([-2.0, -4.0, 0.0]))  # empty row → 0, no NaN
    torch.testing.assert_close(aggregate(logps, mask), aggregate(logps, mask, "mean"))  # default is mean
