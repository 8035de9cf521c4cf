"""`share_input_casts`: under bf16 autocast each layer input is rounded once, not once per consuming layer.

Forward outputs are the same bits as plain autocast (the rounding is the one autocast computes); gradients
differ only in where the consumers' bf16 gradients are summed, which stays within bf16's own error against
fp32; outside autocast the model still runs in fp32. Speed is measured by the bench, not here: these tests
count the casts."""

from __future__ import annotations

import torch
from conftest import TINY_LORA
from torch.utils._python_dispatch import TorchDispatchMode

from reprpo_pl.models.loading import _LastCast, add_lora, cast_frozen_linears, share_input_casts
from reprpo_pl.models.tiny import tiny_llama

HIDDEN, INTERMEDIATE, LAYERS = 64, 128, 4  # tiny_llama's defaults
B, T, VOCAB = 2, 17, 1000


class ActivationCasts(TorchDispatchMode):
    """Counts dtype casts of activation-shaped tensors ``[B, T, hidden]`` / ``[B, T, intermediate]``."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy and tuple(args[0].shape) in {(B, T, HIDDEN), (B, T, INTERMEDIATE)}:
            self.n += 1
        return func(*args, **(kwargs or {}))


def lora_model(bf16_base: bool, share: bool) -> torch.nn.Module:
    model = tiny_llama(vocab_size=VOCAB, seed=0)
    if bf16_base:
        cast_frozen_linears(model, torch.bfloat16)
    model = add_lora(model, TINY_LORA)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0, which would hide the adapter path
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    if share:
        share_input_casts(model)
    return model


def forward_backward(model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict, int]:
    """Logits ``[B, T, V]``, the adapter's gradients and the activation casts of the forward."""
    counter = ActivationCasts()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        with counter:
            logits = model(input_ids=ids).logits
        loss = logits.float().log_softmax(-1)[..., 0].mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, counter.n


def relative_error(grads: dict, reference: dict) -> float:
    num = sum(float((grads[k] - reference[k]).double().norm() ** 2) for k in reference)
    den = sum(float(reference[k].double().norm() ** 2) for k in reference)
    return (num / den) ** 0.5


def test_one_rounding_per_norm_output_and_the_same_forward_bits():
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    plain_logits, plain_grads, plain_casts = forward_backward(lora_model(True, share=False), ids, autocast=True)
    shared_logits, shared_grads, shared_casts = forward_backward(lora_model(True, share=True), ids, autocast=True)
    _, fp32_grads, _ = forward_backward(lora_model(False, share=False), ids, autocast=False)

    # per block before: q, k, v, gate, up and their 5 LoRA A's each rounded a norm output, and o/down's LoRA A
    # saw peft cast the bf16 input up and autocast round it down again; after: the two norm outputs, once each
    # (+ 1: the final norm's output, rounded by autocast for the untouched output embeddings)
    assert plain_casts >= 10 * LAYERS
    assert shared_casts == 2 * LAYERS + 1
    assert torch.equal(shared_logits, plain_logits)
    assert plain_grads.keys() == shared_grads.keys() == fp32_grads.keys() and len(plain_grads) == 2 * 7 * LAYERS
    assert all(g.abs().sum() > 0 for g in shared_grads.values())
    # summing the consumers' gradients in bf16 stays within bf16 autocast's own distance from fp32
    plain_error = relative_error(plain_grads, fp32_grads)
    assert 0 < plain_error < 0.05
    assert relative_error(shared_grads, fp32_grads) <= 1.25 * plain_error


def test_outside_autocast_the_model_runs_as_before():
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    plain_logits, plain_grads, _ = forward_backward(lora_model(True, share=False), ids, autocast=False)
    shared_logits, shared_grads, _ = forward_backward(lora_model(True, share=True), ids, autocast=False)
    assert shared_logits.dtype == torch.float32
    assert torch.equal(shared_logits, plain_logits)
    assert all(torch.equal(shared_grads[k], plain_grads[k]) for k in plain_grads)


def test_a_rounding_is_reused_only_for_the_same_unchanged_tensor_in_the_same_grad_mode():
    last = _LastCast()
    x = torch.randn(3, 4, requires_grad=True)
    first = last(x, torch.bfloat16)
    assert last(x, torch.bfloat16) is first
    assert last(x.detach().clone(), torch.bfloat16) is not first  # another tensor with the same values
    with torch.no_grad():
        without_grad = last(x, torch.bfloat16)
    assert without_grad.grad_fn is None
    with_grad = last(x, torch.bfloat16)
    assert with_grad is not without_grad and with_grad.grad_fn is not None  # never a no-grad rounding under grad
    y = torch.randn(3, 4)
    before = last(y, torch.bfloat16)
    y.add_(1)
    after = last(y, torch.bfloat16)
    assert after is not before and torch.equal(after, y.bfloat16())  # the version counter caught the in-place add


def test_quantized_layers_are_left_to_cast_for_themselves():
    """A linear layer with integer weights (bitsandbytes' 4/8-bit layers subclass `nn.Linear`) gets no hook: its
    input must not be cast to its weight's dtype."""
    model = lora_model(True, share=False)
    hooked = share_input_casts(model)
    quantized = lora_model(True, share=False)
    layer = quantized.get_base_model().model.layers[0].mlp.down_proj.base_layer
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.uint8), requires_grad=False)
    assert share_input_casts(quantized) == hooked - 1
    assert not layer._forward_pre_hooks or all("round_input_once" not in repr(h) for h in layer._forward_pre_hooks.values())
