"""Hidden-state collection hooks on the tiny Llama: values, peft, reference pass, gradients, checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from reprpo_pl.errors import UserError
from reprpo_pl.models.loading import enable_activation_checkpointing
from reprpo_pl.models.tiny import tiny_llama
from reprpo_pl.reprs.collection import HiddenStateCollector

VOCAB = 256
L = 4


def _ids(batch: int = 2, length: int = 6, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _peft(init_lora_weights: bool = False) -> PeftModel:
    """Tiny Llama with LoRA on all linear layers; ``init_lora_weights=False`` makes B non-zero."""
    torch.manual_seed(0)
    config = LoraConfig(target_modules="all-linear", r=8, init_lora_weights=init_lora_weights)
    return get_peft_model(tiny_llama(vocab_size=VOCAB), config)


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_base_model().model.layers if isinstance(model, PeftModel) else model.model.layers


def _n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def plain() -> LlamaForCausalLM:
    return tiny_llama(vocab_size=VOCAB).eval()


def test_hs_equals_output_hidden_states(plain: LlamaForCausalLM) -> None:
    collector = HiddenStateCollector(plain, "hs", [0, 1, 2, 3])
    assert collector.keys == ["hs.0", "hs.1", "hs.2", "hs.3"]
    assert collector.dims == dict.fromkeys(collector.keys, 64)
    assert collector.n_layers == L
    with torch.no_grad(), collector as states:
        reference = plain(input_ids=_ids(), output_hidden_states=True).hidden_states
    assert len(reference) == L + 1
    for k in range(L - 1):
        assert states[f"hs.{k}"].shape == (2, 6, 64)
        torch.testing.assert_close(states[f"hs.{k}"], reference[k + 1])
    # HF reports the last entry after the final norm; the collector keeps the block's raw output.
    torch.testing.assert_close(plain.model.norm(states[f"hs.{L - 1}"]), reference[L])


def test_side_inputs_and_outputs_equal_manual_hooks(plain: LlamaForCausalLM) -> None:
    manual: dict[str, Tensor] = {}
    handles = []
    for k in (1, 3):
        attn, mlp = plain.model.layers[k].self_attn, plain.model.layers[k].mlp
        for path, module in [("self_attn.o_proj", attn.o_proj), ("mlp.down_proj", mlp.down_proj)]:
            save_input = lambda m, a, o, key=f"in.{k}.{path}": manual.update({key: a[0]})  # noqa: E731
            handles.append(module.register_forward_hook(save_input))
        handles.append(attn.k_proj.register_forward_hook(lambda m, a, o, key=f"out.{k}": manual.update({key: o})))
    inputs = HiddenStateCollector(plain, "side", [3, 1, -1])  # unsorted, duplicate (-1 = 3)
    outputs = HiddenStateCollector(plain, "side", [1, 3], collect_input=False, modules=[r"self_attn\.k_proj$"])
    with torch.no_grad(), inputs as side_in, outputs as side_out:
        plain(input_ids=_ids())
    for handle in handles:
        handle.remove()

    assert inputs.layers == [1, 3]
    assert inputs.keys == [
        "side.1.self_attn.o_proj", "side.1.mlp.down_proj", "side.3.self_attn.o_proj", "side.3.mlp.down_proj"
    ]
    assert inputs.dims == {**dict.fromkeys(inputs.keys[::2], 64), **dict.fromkeys(inputs.keys[1::2], 128)}
    for k in (1, 3):
        torch.testing.assert_close(side_in[f"side.{k}.self_attn.o_proj"], manual[f"in.{k}.self_attn.o_proj"])
        torch.testing.assert_close(side_in[f"side.{k}.mlp.down_proj"], manual[f"in.{k}.mlp.down_proj"])
        torch.testing.assert_close(side_out[f"side.{k}.self_attn.k_proj"], manual[f"out.{k}"])
    assert outputs.dims == {"side.1.self_attn.k_proj": 32, "side.3.self_attn.k_proj": 32}  # 2 kv heads × 16


@pytest.mark.parametrize(("mode", "per_block"), [("hs", 1), ("side", 2)])
def test_only_listed_layers_are_hooked_and_hooks_removed(plain: LlamaForCausalLM, mode: str, per_block: int) -> None:
    # Counted relative to `before`: transformers 5 leaves its own hooks after `output_hidden_states=True`.
    before, blocks_before = _n_hooks(plain), [_n_hooks(block) for block in plain.model.layers]
    with HiddenStateCollector(plain, mode, [2]):
        added = [_n_hooks(block) - n for block, n in zip(plain.model.layers, blocks_before)]
        assert added == [0, 0, per_block, 0]
        assert _n_hooks(plain) == before + per_block + 1  # + the pre-hook marking each forward
    assert _n_hooks(plain) == before


def test_hooks_removed_when_forward_raises(plain: LlamaForCausalLM) -> None:
    before = _n_hooks(plain)
    with pytest.raises(IndexError), HiddenStateCollector(plain, "side", [1]):
        plain(input_ids=torch.full((1, 3), VOCAB + 5))  # token id outside the vocabulary
    assert _n_hooks(plain) == before


def test_each_forward_refills_a_fresh_dict(plain: LlamaForCausalLM) -> None:
    collector = HiddenStateCollector(plain, "hs", [1])
    with torch.no_grad():
        with collector as first:
            assert first == {}
            plain(input_ids=_ids(seed=1))
            kept = first["hs.1"]
            plain(input_ids=_ids(seed=2))  # a second forward replaces the contents
            assert first["hs.1"] is not kept
        with collector as second:
            assert second == {} and second is not first


def test_concatenated_forward_stacks_rows(plain: LlamaForCausalLM) -> None:
    chosen, rejected = _ids(seed=1), _ids(seed=2)
    collector = HiddenStateCollector(plain, "side", [0, 2])
    with torch.no_grad():
        with collector as both:
            plain(input_ids=torch.cat([chosen, rejected]))
        with collector as only_chosen:
            plain(input_ids=chosen)
    for key in collector.keys:
        assert both[key].shape[0] == 4
        torch.testing.assert_close(both[key][:2], only_chosen[key])


def test_peft_hooks_the_lora_wrapper_not_its_internals() -> None:
    model = _peft()
    collector = HiddenStateCollector(model, "side", [1], modules=["o_proj", r"mlp\.(up|down)_proj$"])
    assert collector.keys == ["side.1.self_attn.o_proj", "side.1.mlp.up_proj", "side.1.mlp.down_proj"]
    assert collector.dims == {"side.1.self_attn.o_proj": 64, "side.1.mlp.up_proj": 64, "side.1.mlp.down_proj": 128}
    assert collector._targets["side.1.self_attn.o_proj"][0] is _blocks(model)[1].self_attn.o_proj


@pytest.mark.parametrize("mode", ["hs", "side"])
def test_reference_pass_under_disable_adapter(mode: str, plain: LlamaForCausalLM) -> None:
    model = _peft().eval()
    collector = HiddenStateCollector(model, mode, [0, 3])
    with torch.no_grad():
        with collector as policy:
            model(input_ids=_ids())
        with model.disable_adapter(), collector as reference:
            model(input_ids=_ids())
        with HiddenStateCollector(plain, mode, [0, 3]) as base:
            plain(input_ids=_ids())
    assert policy.keys() == reference.keys() == base.keys()
    for key in collector.keys:
        assert not torch.allclose(policy[key], reference[key]), key
        torch.testing.assert_close(reference[key], base[key])  # adapter off == the base model


@pytest.mark.parametrize(("mode", "init_lora_weights"), [("hs", False), ("side", False), ("hs", True)])
def test_gradient_reaches_lora(mode: str, init_lora_weights: bool) -> None:
    model = _peft(init_lora_weights).train()
    with HiddenStateCollector(model, mode, [1]) as states:
        model(input_ids=_ids())
    assert all(state.requires_grad for state in states.values())
    sum(state.pow(2).mean() for state in states.values()).backward()
    blocks = _blocks(model)
    for k, expect_grad in [(0, True), (2, False)]:  # block 0 feeds block 1; block 2 doesn't
        for name, param in blocks[k].named_parameters():
            if "lora_B" in name or ("lora_A" in name and not init_lora_weights):  # A gets no grad while B = 0
                has_grad = param.grad is not None and param.grad.abs().sum() > 0
                assert has_grad == expect_grad, (k, name)


def _states_and_lora_grads(model: PeftModel, mode: str, check_recompute: bool) -> tuple[dict, dict]:
    """One train-mode forward + backward (inside the collector); return detached states and LoRA grads."""
    model.zero_grad(set_to_none=True)
    o_proj = _blocks(model)[1].self_attn.o_proj
    calls: list[None] = []
    counter = o_proj.register_forward_hook(lambda *_: calls.append(None))
    with HiddenStateCollector(model, mode, [1, 3]) as states:
        model(input_ids=_ids(batch=4))
        snapshot = dict(states)
        loss = sum(state.pow(2).mean() + state.sum() for state in states.values())
        loss.backward()
        # Recompute under checkpointing re-fires o_proj's hooks during backward; the dict is untouched.
        assert len(calls) == (2 if check_recompute else 1)
        assert states.keys() == snapshot.keys() and all(states[k] is snapshot[k] for k in states)
    counter.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    return {k: v.detach() for k, v in states.items()}, grads


@pytest.mark.parametrize("mode", ["hs", "side"])
@pytest.mark.parametrize("input_require_grads", [True, False])
def test_gradient_checkpointing_gives_same_states_and_grads(mode: str, input_require_grads: bool) -> None:
    model = _peft().train()
    states_off, grads_off = _states_and_lora_grads(model, mode, check_recompute=False)
    enable_activation_checkpointing(model)
    if input_require_grads:
        model.enable_input_require_grads()
    else:
        model.disable_input_require_grads()  # transformers 5 enables it in activation_checkpointing_enable
    states_on, grads_on = _states_and_lora_grads(model, mode, check_recompute=True)
    assert states_on.keys() == states_off.keys()
    for key in states_off:
        torch.testing.assert_close(states_on[key], states_off[key])
    assert grads_on.keys() == grads_off.keys() and len(grads_off) > 0
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name])


def test_side_refuses_reentrant_checkpointing() -> None:
    model = _peft().train()
    enable_activation_checkpointing(model, use_reentrant=True)
    with pytest.raises(UserError, match="use_reentrant"), HiddenStateCollector(model, "side", [1]):
        pass
    with torch.no_grad(), HiddenStateCollector(model, "side", [1]):  # no backward: nothing to refuse
        pass


def test_layer_spec_and_errors(plain: LlamaForCausalLM) -> None:
    assert HiddenStateCollector(plain, "hs", "0.5:").keys == ["hs.2", "hs.3"]
    with pytest.raises(UserError, match=r"layer 4 out of range for a model with L=4"):
        HiddenStateCollector(plain, "hs", [1, 4])
    with pytest.raises(UserError, match="selects none"):
        HiddenStateCollector(plain, "hs", [])
    with pytest.raises(UserError) as info:
        HiddenStateCollector(plain, "side", [2], modules=[r"mlp\.down_proj$", r"attn\.out_proj$"])
    message = str(info.value)
    assert r"attn\\.out_proj$" in message and "block 2" in message and "self_attn.o_proj" in message
    assert "down_proj$'" not in message  # only the regex that matched nothing is named
    with pytest.raises(UserError, match="invalid regex"):
        HiddenStateCollector(plain, "side", [2], modules=["("])
    with pytest.raises(UserError, match="not linear-like"):
        HiddenStateCollector(plain, "side", [2], modules=[r"^mlp$"])
    with pytest.raises(UserError, match="unknown"):
        HiddenStateCollector(plain, "resid", [2])  # type: ignore[arg-type]
    collector = HiddenStateCollector(plain, "hs", [2])
    with collector, pytest.raises(RuntimeError, match="already active"):
        collector.__enter__()


def test_gpt2_blocks_and_conv1d_widths() -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    hs = HiddenStateCollector(model, "hs", [0, 1])
    side = HiddenStateCollector(model, "side", [-1], modules=[r"attn\.c_proj$", r"mlp\.c_proj$"])
    assert hs.n_layers == 3
    assert side.dims == {"side.2.attn.c_proj": 32, "side.2.mlp.c_proj": 128}
    with torch.no_grad(), hs as states, side as side_states:
        reference = model(input_ids=_ids(), output_hidden_states=True).hidden_states
    for k in (0, 1):
        torch.testing.assert_close(states[f"hs.{k}"], reference[k + 1])
    assert side_states["side.2.mlp.c_proj"].shape == (2, 6, 128)
