"""Property tests of the hidden-state transforms (SPEC §3.4) on small widths and the tiny Llama."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import peft
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from reprpo_pl.errors import UserError
from reprpo_pl.models.tiny import tiny_llama
from reprpo_pl.reprs.transforms import (
    TransformTraits,
    build_transform,
    transform_names,
    transform_traits,
)
from reprpo_pl.reprs.transforms.ether import ETHER, HTYPES
from reprpo_pl.reprs.transforms.hra import HRA
from reprpo_pl.reprs.transforms.none import NoTransform
from reprpo_pl.reprs.transforms.ortho import ORTHOGONAL_MAPS, Ortho

CONF = Path(__file__).parents[2] / "conf" / "transform"
KEYS = ["hs.0", "hs.1", "hs.2"]  # block outputs of the tiny model before the final norm
D, V = 64, 49152


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def batch(model: nn.Module) -> tuple[dict[str, Tensor], Tensor]:
    """Real hidden states ``{key: [3, 10, 64]}`` and a right-padded completion mask ``[3, 10]``."""
    torch.manual_seed(0)
    with torch.no_grad():
        hidden = model(torch.randint(0, 1000, (3, 10)), output_hidden_states=True).hidden_states
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 9:] = False
    return {key: hidden[int(key.split(".")[1]) + 1] for key in KEYS}, mask


def cfg(name: str, **overrides: object) -> dict:
    return {**OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")), **overrides}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def assert_grads_reach_every_parameter(module: nn.Module, x: Tensor) -> None:
    torch.manual_seed(1)
    (module(x) * torch.randn_like(x)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def perturb(module: nn.Module) -> None:
    """Move every parameter off its init (stands in for training in round-trip tests)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


def train_steps(module: nn.Module, x: Tensor, steps: int = 3) -> None:
    """A few large SGD steps on a random objective, so properties are checked away from the init."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        (module(x) * torch.randn_like(x)).sum().backward()
        optimizer.step()


# --- builder ---------------------------------------------------------------------------------


def test_every_yaml_is_a_transform_module() -> None:
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == transform_names()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_yaml_builds_keeps_shapes_and_saves_no_vocab_matrix(name: str, model: nn.Module, batch: tuple) -> None:
    hs, mask = batch
    transform = build_transform(OmegaConf.load(CONF / f"{name}.yaml"), KEYS, {k: D for k in KEYS}, model, "hs")
    out = transform(hs, mask)
    assert list(out) == KEYS and all(out[k].shape == hs[k].shape for k in KEYS)
    assert all(V not in t.shape for t in transform.state_dict().values())
    again = pickle.loads(pickle.dumps(transform))
    assert all(torch.equal(again(hs, mask)[k], out[k]) for k in KEYS)


@pytest.mark.parametrize("config", [{"name": "bogus"}, {"_target_": "reprpo_pl.reprs.transforms.none.NoTransform"}])
def test_a_config_that_names_no_buildable_class_is_refused(config: dict, model: nn.Module) -> None:
    with pytest.raises(UserError, match="needs `_target_: <class>` and `_partial_: true`.*ether, hra, none, ortho, supr, svd"):
        build_transform(config, KEYS, {k: D for k in KEYS}, model, "hs")


def test_a_transform_class_outside_the_package_works_through_target(model: nn.Module, batch: tuple) -> None:
    """Any importable per-key module class (here torch's Identity, which takes any arguments) is a transform;
    declaring no traits, it gets none (per-token path, no reference cache)."""
    hs, mask = batch
    transform = build_transform({"name": "mine", "_target_": "torch.nn.Identity", "_partial_": True}, KEYS,
                                {k: D for k in KEYS}, model, "hs")
    assert all(torch.equal(transform(hs, mask)[k], hs[k]) for k in KEYS)
    assert transform_traits(transform) == TransformTraits()


def test_a_config_without_target_is_refused(model: nn.Module) -> None:
    with pytest.raises(UserError, match="needs `_target_: <class>` and `_partial_: true`"):
        build_transform({"name": "hra", "r": 4}, KEYS, {k: D for k in KEYS}, model, "hs")


@pytest.mark.parametrize(
    "config",
    [cfg("ether"), cfg("ether", Htype="oft", reduction=8), cfg("hra", apply_GS=True), cfg("ortho", orthogonal_map="cayley")],
)
def test_state_dict_round_trip(config: dict, model: nn.Module, batch: tuple) -> None:
    hs, mask = batch
    dims = {k: D for k in KEYS}
    trained = build_transform(config, KEYS, dims, model, "hs")
    perturb(trained)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    torch.manual_seed(123)
    fresh = build_transform({**config, "seed": 7} if "seed" in config else config, KEYS, dims, model, "hs")
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert all(torch.allclose(fresh(hs, mask)[k], trained(hs, mask)[k], atol=1e-6) for k in KEYS)


def test_per_key_transforms_have_their_own_parameters(model: nn.Module) -> None:
    keys = ["side.1.self_attn.o_proj", "side.1.mlp.down_proj"]
    transform = build_transform(cfg("hra"), keys, {keys[0]: 64, keys[1]: 128}, model, "side")
    assert [m.U.shape[0] for m in transform.per_key.values()] == [64, 128]


# --- none ------------------------------------------------------------------------------------


def test_none_is_the_identity() -> None:
    x = torch.randn(2, 5, D)
    assert NoTransform(D)(x) is x and n_params(NoTransform(D)) == 0


# --- ether -----------------------------------------------------------------------------------


def ether_param_count(htype: str, d: int, nb: int, f: int) -> int:
    """The formulas of the `ETHER` docstring."""
    return {"ether": d + d * f, "etherplus": 2 * d + d * f, "oft": d * d // nb + d * f, "etherplusHH": 2 * d + 2 * f + d * f}[htype]


@pytest.mark.parametrize("htype", HTYPES)
@pytest.mark.parametrize(("d", "nb", "reduction"), [(64, 2, 8), (60, 3, 10)])
def test_ether_shapes_counts_and_gradients(htype: str, d: int, nb: int, reduction: int) -> None:
    module = ETHER(d, Htype=htype, nb=nb, reduction=reduction)
    x = torch.randn(2, 5, d)
    assert module(x).shape == x.shape
    assert n_params(module) == ether_param_count(htype, d, nb, d // reduction)
    assert_grads_reach_every_parameter(module, x)


@pytest.mark.parametrize("htype", ["etherplus", "oft", "etherplusHH"])
def test_ether_inner_map_is_identity_at_init(htype: str) -> None:
    module = ETHER(D, Htype=htype, nb=2, reduction=8)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(module(x), x @ module.W0.T @ module.W_up.T)
    torch.testing.assert_close(module.W_up.detach() @ module.W0, module.W0.T @ module.W0)  # W_up = W0ᵀ


@pytest.mark.parametrize("htype", ["ether", "oft"])  # etherplus blocks are not orthogonal once r2 ≠ ±r1
def test_ether_blocks_are_orthogonal_after_training_steps(htype: str) -> None:
    module = ETHER(D, Htype=htype, nb=4, reduction=8)
    train_steps(module, torch.randn(2, 5, D))
    blocks = module.H.blocks()
    torch.testing.assert_close(blocks @ blocks.transpose(-1, -2), torch.eye(D // 4).expand_as(blocks), atol=1e-5, rtol=0)


def test_ether_default_on_the_tiny_model_is_rank_one(model: nn.Module) -> None:
    transform = build_transform(cfg("ether"), KEYS, {k: D for k in KEYS}, model, "hs")
    assert n_params(transform) == len(KEYS) * ether_param_count("ether", D, 2, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"Htype": "householder"}, "Htype='householder' is unknown: use one of ether, etherplus, oft, etherplusHH"),
        ({"nb": 3}, "nb=3 blocks must divide the state width d=64"),
        ({"Htype": "etherplusHH"}, "nb=2 to divide f = .*= 1"),
        ({"reduction": 100}, "reduction=100 leaves f"),
    ],
)
def test_ether_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        ETHER(D, **kwargs)


# --- hra and ortho ---------------------------------------------------------------------------


@pytest.mark.parametrize("apply_gs", [False, True])
def test_hra_is_orthogonal_with_documented_count_and_gradients(apply_gs: bool) -> None:
    module = HRA(D, r=8, apply_GS=apply_gs)
    x = torch.randn(2, 5, D)
    assert n_params(module) == D * 8
    assert_grads_reach_every_parameter(module, x)
    train_steps(module, x)
    torch.testing.assert_close(module(x).norm(dim=-1), x.norm(dim=-1))


def test_hra_init_has_distinct_columns_and_both_forms_agree() -> None:
    torch.manual_seed(0)
    product, gram_schmidt = HRA(D, r=8), HRA(D, r=8, apply_GS=True)
    gram_schmidt.load_state_dict(product.state_dict())
    u = product.U.detach()
    torch.testing.assert_close(u.T @ u, torch.eye(8), atol=1e-5, rtol=0)  # distinct: orthonormal columns
    x = torch.randn(4, D)
    torch.testing.assert_close(product(x), gram_schmidt(x))
    with pytest.raises(UserError, match="r=65"):
        HRA(D, r=65)


@pytest.mark.parametrize("orthogonal_map", ORTHOGONAL_MAPS)
def test_ortho_is_orthogonal_with_documented_count_and_gradients(orthogonal_map: str) -> None:
    module = Ortho(D, orthogonal_map=orthogonal_map)
    x = torch.randn(2, 5, D)
    assert n_params(module) == D * D
    assert_grads_reach_every_parameter(module, x)
    train_steps(module, x)
    torch.testing.assert_close(module(x).norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="orthogonal_map='qr' is unknown: use one of householder, cayley, matrix_exp"):
        Ortho(D, orthogonal_map="qr")


# --- svd -------------------------------------------------------------------------------------


def test_svd_matches_a_direct_svd_of_the_unembedding(model: nn.Module, batch: tuple) -> None:
    hs, mask = batch
    transform = build_transform(cfg("svd"), KEYS, {k: D for k in KEYS}, model, "hs")
    assert n_params(transform) == 0 and transform.state_dict() == {}
    s, vh = torch.linalg.svd(model.lm_head.weight.detach(), full_matrices=False)[1:]
    gains = (s - torch.quantile(s, 0.3)).clamp(min=0) / s
    expected = hs["hs.1"] - hs["hs.1"] @ (vh.T * gains @ vh)
    torch.testing.assert_close(transform(hs, mask)["hs.1"], expected, atol=1e-4, rtol=1e-4)
    hard = build_transform(cfg("svd", soft=False), KEYS, {k: D for k in KEYS}, model, "hs")
    torch.testing.assert_close(hard.projection @ hard.projection, hard.projection, atol=1e-5, rtol=0)  # a projection


def test_svd_passes_gradient_and_dual_svd_builds(model: nn.Module, batch: tuple) -> None:
    hs, mask = batch
    h = hs["hs.1"].clone().requires_grad_(True)
    transform = build_transform(cfg("svd", dual_svd=True), ["hs.1"], {"hs.1": D}, model, "hs")
    transform({"hs.1": h}, mask)["hs.1"].pow(2).sum().backward()
    assert h.grad.abs().sum() > 0


def test_svd_degenerate_and_wrong_width_configurations_are_refused(model: nn.Module) -> None:
    with pytest.raises(UserError, match="soft=false and quantile=0.*z = h − P\\(h\\) = 0; use transform.soft=true or a quantile > 0"):
        build_transform(cfg("svd", soft=False, quantile=0.0), KEYS, {k: D for k in KEYS}, model, "hs")
    keys = ["side.1.self_attn.o_proj", "side.1.mlp.down_proj"]
    with pytest.raises(UserError, match="side.1.mlp.down_proj"):
        build_transform(cfg("svd"), keys, {keys[0]: 64, keys[1]: 128}, model, "side")


# --- supr ------------------------------------------------------------------------------------


def test_supr_matches_its_docstring(model: nn.Module, batch: tuple) -> None:
    hs, mask = batch
    transform = build_transform(cfg("supr"), list(reversed(KEYS)), {k: D for k in KEYS}, model, "hs")
    assert transform.keys == KEYS and n_params(transform) == 0 and transform.state_dict() == {}
    weight = model.lm_head.weight.detach()
    last = torch.tensor([5, 8, 9])  # last True of each mask row
    logits = [model.model.norm(hs[k][torch.arange(3), last]) @ weight.T for k in KEYS]
    keep = [(torch.relu(a - b) @ torch.linalg.pinv(weight).T) > 0.1 for a, b in zip(logits, logits[1:])]
    assert all(0 < m.float().mean() < 1 for m in keep)  # the threshold selects some features
    out = transform(hs, mask)
    for key, m in zip(KEYS, [keep[0], *keep]):
        torch.testing.assert_close(out[key], hs[key] * m[:, None, :])


def test_supr_reads_the_last_real_completion_token(model: nn.Module, batch: tuple) -> None:
    hs, mask = batch
    transform = build_transform(cfg("supr"), KEYS, {k: D for k in KEYS}, model, "hs")
    out = transform(hs, mask)
    torch.manual_seed(2)
    noisy_padding = {k: torch.where(mask[..., None], h, 10 * torch.randn_like(h)) for k, h in hs.items()}
    out_noisy = transform(noisy_padding, mask)
    assert all(torch.equal(out_noisy[k][mask], out[k][mask]) for k in KEYS)
    noisy_last = {k: h.clone() for k, h in hs.items()}
    noisy_last["hs.1"][0, 5] += 10 * torch.randn(D)  # row 0's last real token
    assert not torch.equal(transform(noisy_last, mask)["hs.1"][0], out["hs.1"][0])


def test_supr_passes_gradient_to_kept_features(model: nn.Module, batch: tuple) -> None:
    hs, mask = batch
    h = {k: v.clone().requires_grad_(True) for k, v in hs.items()}
    transform = build_transform(cfg("supr"), KEYS, {k: D for k in KEYS}, model, "hs")
    sum(z.sum() for z in transform(h, mask).values()).backward()
    assert all(h[k].grad.abs().sum() > 0 for k in KEYS)


def test_supr_side_mode_and_a_single_layer_are_refused(model: nn.Module) -> None:
    with pytest.raises(UserError, match="transform=supr needs collection.mode=hs"):
        build_transform(cfg("supr"), ["side.1.mlp.down_proj"], {"side.1.mlp.down_proj": 128}, model, "side")
    with pytest.raises(UserError, match="needs ≥ 2"):
        build_transform(cfg("supr"), ["hs.1"], {"hs.1": D}, model, "hs")


@pytest.mark.parametrize("name", ["svd", "supr"])
def test_model_tensors_are_found_through_peft(name: str, model: nn.Module, batch: tuple) -> None:
    hs, mask = batch
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))  # same weights
    outs = [build_transform(cfg(name), KEYS, {k: D for k in KEYS}, m, "hs")(hs, mask) for m in (model, wrapped)]
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in KEYS)
