"""Memory: log-probs never hold a [N, C, V] tensor, and gradient checkpointing changes nothing but memory.

Allocations are observed with a TorchDispatchMode that records the shape and dtype of every
tensor an ATen op returns (forward and, on CPU, backward: the autograd engine runs CPU nodes on
the calling thread, inside the mode).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import compose_train
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import reprpo_pl.models.logprobs as logprobs
from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.models.logprobs import completion_logps, linear_token_logps, token_logps
from reprpo_pl.models.pair_layouts import pack_pairs


class Allocations(TorchDispatchMode):
    """Records ``(shape, dtype, op)`` of every tensor returned by an ATen op."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[tuple[int, ...], torch.dtype, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((tuple(t.shape), t.dtype, str(func)))
        return out

    def largest(self, dtype: torch.dtype = torch.float32) -> int:
        return max((torch.Size(s).numel() for s, d, _ in self.outputs if d == dtype), default=0)


def test_token_logps_never_allocates_n_c_v_fp32():
    """From bf16 logits ``[N, C, V]`` (a model's output), fp32 work happens a few rows at a time."""
    N, C, V, chunk = 8, 5, 1000, 2
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N, C, V, generator=gen).bfloat16()
    ids = torch.randint(0, V, (N, C), generator=gen)
    mask = torch.ones(N, C, dtype=torch.bool)
    with Allocations() as seen:
        out = token_logps(logits, ids, mask, chunk=chunk)
    assert seen.largest(torch.float32) <= chunk * C * V < N * C * V
    expected = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_logps_bounded_forward_and_backward(dtype):
    """Hidden states → log-probs with at most a ``[chunk, V]`` block alive, in forward and backward,
    with the log-probs and gradient of the full log-softmax."""
    M, d, V, chunk = 40, 16, 3000, 8
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(M, d, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, d, generator=gen).to(dtype)
    ids = torch.randint(0, V, (M,), generator=gen)
    upstream = torch.randn(M, generator=gen)
    with Allocations() as seen:
        out = linear_token_logps(hidden, weight, ids, chunk=chunk)
        (grad,) = torch.autograd.grad((out * upstream).sum(), hidden)
    big = [(s, op) for s, _, op in seen.outputs if V in s and s != (V, d) and s != (d, V)]  # (the weight's views)
    assert big and all(torch.Size(s).numel() <= chunk * V for s, _ in big), big
    assert any("mul" in op and s == (M, d) for s, _, op in seen.outputs), "backward ran outside the mode"

    reference = hidden.detach().float().requires_grad_()
    expected = torch.log_softmax(reference @ weight.float().T, -1).gather(-1, ids[:, None]).squeeze(-1)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), reference)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.15, "rtol": 0.05}
    assert out.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(grad.float(), expected_grad, **tol)


def test_linear_token_logps_refuses_trainable_unembedding():
    with pytest.raises(ValueError, match="frozen"):
        linear_token_logps(torch.randn(2, 4), torch.randn(10, 4, requires_grad=True), torch.tensor([1, 2]))


@pytest.fixture
def batch(pairs, tokenizer) -> dict[str, torch.Tensor]:
    rows = list(tokenize_pairs(pairs, tokenizer, TokenizeConfig(max_length=128, max_prompt_length=64)))
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows)


def test_completion_logps_on_tiny_model_has_no_vocab_sized_activation(tiny_peft, batch, monkeypatch):
    """The whole policy forward + backward on the tiny Llama: the only vocab-sized tensors are the
    unembedding (and its views) and ``[chunk, V]`` blocks, never ``[2B, C, V]``."""
    chunk = 16
    monkeypatch.setattr(logprobs, "LOGPROB_CHUNK_TOKENS", chunk)
    V, d = tiny_peft.get_output_embeddings().weight.shape
    inputs = pack_pairs(batch)
    n_rows, width = inputs["completion_ids"].shape
    tiny_peft.train()
    with Allocations() as seen:
        loss = completion_logps(tiny_peft, inputs).sum()
        loss.backward()
    vocab_sized = [s for s, _, _ in seen.outputs if V in s and s not in ((V, d), (d, V))]
    assert vocab_sized and all(torch.Size(s).numel() <= chunk * V for s in vocab_sized), vocab_sized
    assert seen.largest(torch.float32) < n_rows * width * V


def _innerdpo(gradient_checkpointing: bool, mode: str):
    from reprpo_pl.methods.reprpo import ReprPOModule

    cfg = compose_train([
        "model=tiny_random", "method=innerdpo", "transform=ether", "adapter.r=8", "collection.layers=[1,2]",
        f"model.gradient_checkpointing={str(gradient_checkpointing).lower()}", f"collection.mode={mode}",
        "method.gradnorm_every_n_steps=null",  # its extra backward passes would recompute the block again
    ])
    module = ReprPOModule(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return module.train()


@pytest.mark.parametrize("mode", ["hs", "side"])
def test_reprpo_step_with_gradient_checkpointing_matches(batch, mode):
    """innerdpo + ETHER: the same loss and gradients with gradient checkpointing on and off, and the
    checkpointed run really recomputes the blocks in the backward."""
    results = {}
    for checkpointing in (False, True):
        module = _innerdpo(checkpointing, mode)
        base = module.model.get_base_model()
        name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
        assert getattr(base, name) == checkpointing  # transformers 5 renamed it; the old name warns
        # a pre-hook inside the block: transformers 5 recomputes the block without its own hooks, and
        # torch stops a recompute once the saved tensors are rebuilt (before late forward hooks run)
        block = module.collector._decoder.layers[1].mlp
        calls = {"n": 0}
        handle = block.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = module.training_step(batch, 0)
        loss.backward()
        handle.remove()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results[checkpointing] = (loss.detach(), grads, calls["n"])
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = results[False], results[True]
    assert calls_off == 2 and calls_on == 3  # reference + policy, and the policy block's recompute
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-6)
    assert grads_on.keys() == grads_off.keys() and any("transform" in n for n in grads_on)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5, msg=name)
