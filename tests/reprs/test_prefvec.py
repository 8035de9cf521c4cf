"""PrefVec's final form and its prototype-compatible modes (SPEC §3.4, SPEC-recipes §1).

The v2/v3 transcriptions below are written from SPEC-recipes §1.2/§1.3's text, not from the implementation.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_losses import leaf_policy, make_batch, make_loss, separate

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.errors import UserError
from reprpo_pl.reprs.types import ReprBatch

EPS = 1e-6
V3_DEFAULTS = dict(prototype_compat="v3", use_proj_loss=True, use_proj_abs_loss=True, use_orth_loss=False,
                   use_angle_loss=False, beta=1.0)
V2_WINNER = dict(prototype_compat="v2", orth_on="q", beta=5.0, use_angle_loss=False)  # J 05-11 hs-supr-prefvec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generic_batch(seed: int = 0, b: int = 3, d: int = 8, keys: tuple[str, ...] = ("hs.1", "hs.2"), offset: float = 0.0,
                  noise: float = 0.5, tokens: int = 5) -> ReprBatch:
    """Random states whose r has a non-zero component mean (m(û) ≠ 0, unlike `make_batch`), policy = reference +
    ``noise``, r shifted by ``offset``·𝟙; per-token chosen log-probs ``[B, tokens]`` with a ragged mask."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    pi_cho, pi_rej, ref_cho, ref_rej = {}, {}, {}, {}
    for k in keys:
        common, direction = randn(b, d), randn(b, d) + offset
        ref_cho[k], ref_rej[k] = common + direction / 2, common - direction / 2
        pi_cho[k], pi_rej[k] = ref_cho[k] + noise * randn(b, d), ref_rej[k] + noise * randn(b, d)
    ref_cho_lp, ref_rej_lp = -1 - torch.rand(2, b, generator=gen, dtype=torch.float64)
    ref_tok = -torch.rand(b, tokens, generator=gen, dtype=torch.float64)
    mask = torch.arange(tokens).expand(b, tokens) < torch.tensor([tokens, tokens - 2, 1, 3])[:b, None]
    return ReprBatch(pi_cho, pi_rej, ref_cho, ref_rej, ref_cho_lp + 0.3 * randn(b), ref_rej_lp + 0.3 * randn(b),
                     ref_cho_lp, ref_rej_lp, pi_nll_cho=-ref_cho_lp, ref_nll_cho=-ref_cho_lp,
                     token_dev_cho=torch.rand(b, dtype=torch.float64), token_dev_rej=torch.rand(b, dtype=torch.float64),
                     pi_token_logp_cho=ref_tok + 0.3 * randn(b, tokens), ref_token_logp_cho=ref_tok,
                     completion_mask_cho=mask)


# ---- transcriptions (SPEC-recipes §1 text) ------------------------------------------------------------------


def _m(x):  # m(x) = ⟨x,𝟙⟩/d
    return x.sum(-1) / x.shape[-1]


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(EPS)


def _rho(bt):
    return (bt.pi_logp_cho - bt.pi_logp_rej) - (bt.ref_logp_cho - bt.ref_logp_rej)


def _nll(bt):  # mean_T relu(NLL_π,t − NLL_ref,t) over the chosen completion tokens
    inc = torch.relu(-bt.pi_token_logp_cho + bt.ref_token_logp_cho) * bt.completion_mask_cho
    return inc.sum(-1) / bt.completion_mask_cho.sum(-1)


def transcribe_v2(bt, beta, alpha=1.0, use_pref_ref=True, use_proj_rel=True, orth=True, angle=True, dpo=True, nll=False):
    proj_k, orth_k, angle_k = [], [], []
    for k in bt.pi_cho:
        c, j = bt.pi_cho[k] - bt.ref_cho[k], bt.pi_rej[k] - bt.ref_rej[k]
        q, r = bt.pi_cho[k] - bt.pi_rej[k], bt.ref_cho[k] - bt.ref_rej[k]
        e = r if use_pref_ref else q
        e = e / (e.norm(dim=-1, keepdim=True) + EPS)
        perp = lambda x: x - (x * e).sum(-1, keepdim=True) * e  # noqa: E731
        if use_proj_rel:
            proj_k.append(-(q * e).sum(-1) * _m(e))  # proj_rel = −s·m(ê)
            orth_k.append(_m(perp(q)).abs())  # rel_orth = |m(q_⊥)|
        else:
            proj_k.append(-((c * e).sum(-1) - (j * e).sum(-1)) * _m(e))
            orth_k.append(_m(perp(c)).abs() + _m(perp(j)).abs())
        angle_k.append(3 - _cos(c, e) + _cos(j, e) - _cos(q, e))
    mk = lambda xs: torch.stack(xs).mean(0)  # noqa: E731
    R = 1 + 1e5 * mk(proj_k) + (beta * 1e5 * mk(orth_k) if orth else 0) + (beta * mk(angle_k) if angle else 0)
    retain = (F.logsigmoid(-_rho(bt)) if dpo else 0) + (100 * _nll(bt) if nll else 0)
    return R.mean() + alpha * (retain.mean() if torch.is_tensor(retain) else retain)


def transcribe_v3(bt, beta=1.0, alpha=1.0, proj=True, abs_=True, orth=False, angle=False, dpo=True):
    proj_k, orth_k, angle_k = [], [], []
    for k in bt.pi_cho:
        q, r = bt.pi_cho[k] - bt.pi_rej[k], bt.ref_cho[k] - bt.ref_rej[k]
        u = r / (r.norm(dim=-1, keepdim=True) + EPS)
        s = (q * u).sum(-1)
        proj_k.append(-s * _m(u))
        orth_k.append(_m(q - s[:, None] * u).abs())
        angle_k.append(-_cos(q, r).abs())
    mk = lambda xs: torch.stack(xs).mean(0)  # noqa: E731
    inner = 1e5 * mk(proj_k) if proj else torch.zeros(bt.pi_logp_cho.shape, dtype=torch.float64)
    if abs_:
        inner = inner.abs()
    if orth:
        inner = inner + beta * 1e6 * mk(orth_k)
    if angle:
        inner = inner + beta * 1e5 * mk(angle_k)
    return inner.mean() + alpha * (F.logsigmoid(-_rho(bt)).mean() if dpo else 0)


def transcribe_signed(bt, beta, alpha, dpo_beta, orth_on="cj", orth=True, angle=True, dpo=True, nll=False,
                      nll_weight=100.0, norm_by_ref=False):
    """SPEC §3.4's PrefVec, optionally with norms over ‖r‖+eps (SPEC-recipes §1.6), and the NLL term."""
    per_key = []
    for k in bt.pi_cho:
        c, j = bt.pi_cho[k] - bt.ref_cho[k], bt.pi_rej[k] - bt.ref_rej[k]
        q, r = bt.pi_cho[k] - bt.pi_rej[k], bt.ref_cho[k] - bt.ref_rej[k]
        u, n = r / (r.norm(dim=-1, keepdim=True) + EPS), (r.norm(dim=-1) + EPS) if norm_by_ref else 1.0
        perp = lambda x: x - (x * u).sum(-1, keepdim=True) * u  # noqa: E731
        o = perp(q).norm(dim=-1) if orth_on == "q" else perp(c).norm(dim=-1) + perp(j).norm(dim=-1)
        per_key.append(-((c * u).sum(-1) - (j * u).sum(-1)) / n
                       + beta * ((o / n if orth else 0) + ((2 - _cos(c, r) - _cos(j, -r)) if angle else 0)))
    hidden = torch.stack(per_key).mean(0)
    retain = (-F.logsigmoid(dpo_beta * _rho(bt)) if dpo else 0) + (nll_weight * _nll(bt) if nll else 0)
    return (hidden + alpha * retain).mean()


# ---- the final form -----------------------------------------------------------------------------------------

SIGNED_VARIANTS = {
    "default": {},
    "orth_on_q": dict(orth_on="q"),
    "norm_by_ref": dict(norm_by_ref=True, orth_on="q"),
    "policy_direction": dict(use_pref_ref=False),
    "nll": dict(use_nll_loss=True),
}


@pytest.mark.parametrize("variant", list(SIGNED_VARIANTS))
def test_signed_form_lowers_along_reference_direction_and_rises_against(variant):
    loss_fn = make_loss("prefvec", **SIGNED_VARIANTS[variant])
    bt = replace(make_batch(), **{f: getattr(generic_batch(b=4), f) for f in
                                  ("pi_token_logp_cho", "ref_token_logp_cho", "completion_mask_cho")}) \
        if variant == "nll" else make_batch()
    here = loss_fn(bt)[0]
    assert loss_fn(separate(bt, 0.5))[0] < here < loss_fn(separate(bt, -0.5))[0]


@pytest.mark.parametrize("norm_by_ref", [False, True])
@pytest.mark.parametrize("orth_on", ["cj", "q"])
def test_signed_form_equals_transcription(orth_on, norm_by_ref):
    bt = generic_batch(offset=0.3)
    loss_fn = make_loss("prefvec", orth_on=orth_on, norm_by_ref=norm_by_ref, use_nll_loss=True, alpha=0.7, beta=0.3)
    expected = transcribe_signed(bt, beta=0.3, alpha=0.7, dpo_beta=0.1, orth_on=orth_on, nll=True, norm_by_ref=norm_by_ref)
    torch.testing.assert_close(loss_fn(bt)[0], expected)


@pytest.mark.parametrize("norm_by_ref", [False, True])
def test_norm_by_ref_makes_the_hidden_terms_scale_free(norm_by_ref):
    bt = generic_batch(offset=0.3)
    hidden_only = make_loss("prefvec", norm_by_ref=norm_by_ref, use_dpo_loss=False, use_angle_loss=False)
    scaled = replace(bt, **{f: {k: 10 * v for k, v in getattr(bt, f).items()}
                            for f in ("pi_cho", "pi_rej", "ref_cho", "ref_rej")})
    ratio = hidden_only(scaled)[0] / hidden_only(bt)[0]  # proj + orth: degree 1 in the states, 0 over ‖r‖
    assert ratio.item() == pytest.approx(1.0 if norm_by_ref else 10.0, rel=1e-6)


def test_policy_direction_is_detached_and_ignores_the_reference():
    """use_pref_ref=false: ê = sg(q/‖q‖); the projection's gradient on h^π_cho is −ê (grows ‖q‖ where it points)."""
    bt = leaf_policy(generic_batch(keys=("hs.1",)))
    loss_fn = make_loss("prefvec", use_pref_ref=False, use_orth_loss=False, use_angle_loss=False, use_dpo_loss=False)
    loss_fn(bt)[0].backward()
    q = bt.pi_cho["hs.1"] - bt.pi_rej["hs.1"]
    e = (q / (q.norm(dim=-1, keepdim=True) + EPS)).detach()
    expected = -e / q.shape[0]  # mean over the batch; r never enters
    torch.testing.assert_close(bt.pi_cho["hs.1"].grad, expected)


def test_nll_term_is_the_mean_per_token_increase_and_needs_per_token_logps():
    bt = leaf_policy(generic_batch())
    bt = replace(bt, pi_token_logp_cho=bt.pi_token_logp_cho.detach().clone().requires_grad_(True))
    with_nll, without = make_loss("prefvec", use_nll_loss=True, nll_weight=3.0), make_loss("prefvec")
    torch.testing.assert_close(with_nll(bt)[0] - without(bt)[0], 3.0 * _nll(bt).mean())
    with_nll(bt)[0].backward()
    grad = bt.pi_token_logp_cho.grad
    worse = (bt.pi_token_logp_cho < bt.ref_token_logp_cho) & bt.completion_mask_cho
    assert (grad[worse] < 0).all() and (grad[~worse] == 0).all()  # only tokens worse than the reference, raised
    with pytest.raises(UserError, match=r"^loss\.use_nll_loss=true needs the chosen completion's per-token"):
        with_nll(make_batch())


# ---- prototype compatibility --------------------------------------------------------------------------------

V2_CASES = {
    "winner": (V2_WINNER, dict(beta=5.0, use_proj_rel=True, angle=False)),
    "9d18ee7-defaults-cj": (dict(prototype_compat="v2", beta=0.5), dict(beta=0.5, use_proj_rel=False)),
    "angle-q": (dict(prototype_compat="v2", beta=0.5, orth_on="q"), dict(beta=0.5)),
    "policy-direction": (dict(prototype_compat="v2", beta=2.0, use_pref_ref=False), dict(beta=2.0, use_pref_ref=False,
                                                                                          use_proj_rel=False)),
    "nll-alpha": (dict(prototype_compat="v2", beta=0.5, orth_on="q", use_nll_loss=True, alpha=0.3),
                  dict(beta=0.5, nll=True, alpha=0.3)),
    "no-dpo-no-orth": (dict(prototype_compat="v2", beta=0.5, use_dpo_loss=False, use_orth_loss=False),
                       dict(beta=0.5, use_proj_rel=False, dpo=False, orth=False)),
}
V3_CASES = {
    "defaults": (V3_DEFAULTS, {}),
    "orth": ({**V3_DEFAULTS, "use_orth_loss": True, "orth_on": "q"}, dict(orth=True)),
    "angle-beta": ({**V3_DEFAULTS, "use_angle_loss": True, "beta": 0.2}, dict(angle=True, beta=0.2)),
    "signed-proj": ({**V3_DEFAULTS, "use_proj_abs_loss": False, "alpha": 0.5}, dict(abs_=False, alpha=0.5)),
    "no-proj": ({**V3_DEFAULTS, "use_proj_loss": False, "use_angle_loss": True}, dict(proj=False, angle=True)),
}


@pytest.mark.parametrize("case", list(V2_CASES))
def test_compat_v2_equals_transcription(case):
    options, spec = V2_CASES[case]
    for seed in (0, 1):
        bt = generic_batch(seed=seed, offset=0.4)
        torch.testing.assert_close(make_loss("prefvec", **options)(bt)[0], transcribe_v2(bt, **spec))


@pytest.mark.parametrize("case", list(V3_CASES))
def test_compat_v3_equals_transcription(case):
    options, spec = V3_CASES[case]
    for seed in (0, 1):
        bt = generic_batch(seed=seed, offset=0.4)
        torch.testing.assert_close(make_loss("prefvec", **options)(bt)[0], transcribe_v3(bt, **spec))


def test_v3_abs_proj_loss_penalises_separation_along_reference_direction():
    """Documented behaviour, not a wish: v3's |10⁵·mean_K(−s·m(û))| grows with |s|, so once the policy separates
    along û (s > 0) further separation RAISES the loss (SPEC-recipes §1.4 "rev"); the signed form lowers."""
    bt = generic_batch(offset=1.0, noise=0.01)  # m(û) > 0 and s ≈ ‖r‖ > 0 in every row
    v3 = make_loss("prefvec", **{**V3_DEFAULTS, "use_dpo_loss": False})
    signed = make_loss("prefvec", use_dpo_loss=False)
    losses = [v3(separate(bt, step))[0] for step in (0.0, 0.2, 0.4)]
    assert losses[0] < losses[1] < losses[2]
    assert signed(separate(bt, 0.4))[0] < signed(bt)[0]
    no_abs = make_loss("prefvec", **{**V3_DEFAULTS, "use_dpo_loss": False, "use_proj_abs_loss": False})
    assert no_abs(separate(bt, 0.4))[0] < no_abs(bt)[0]  # without abs the (tiny, m(û)-scaled) term does reward it


@pytest.mark.parametrize(("options", "message"), [
    (dict(use_proj_abs_loss=True), r"^loss\.use_proj_abs_loss=True is a flag of loss\.prototype_compat=v3 only"),
    (dict(prototype_compat="v2", use_proj_loss=True), r"^loss\.use_proj_loss=True is a flag of loss\.prototype_compat=v3"),
    (dict(prototype_compat="v3"), r"^loss\.prototype_compat=v3 needs loss\.use_proj_loss and loss\.use_proj_abs_loss"),
    ({**V3_DEFAULTS, "use_pref_ref": False}, r"^loss\.use_pref_ref=false with loss\.prototype_compat=v3"),
    ({**V3_DEFAULTS, "use_nll_loss": True}, r"^loss\.use_nll_loss=true with loss\.prototype_compat=v3"),
    ({**V3_DEFAULTS, "use_orth_loss": True}, r"^loss\.orth_on=cj with loss\.prototype_compat=v3"),
    (dict(prototype_compat="v4"), r"^loss\.prototype_compat='v4': use null"),
    (dict(orth_on="c"), r"^loss\.orth_on='c': use q"),
    (dict(orth_on="q", use_pref_ref=False), r"^loss\.orth_on=q with loss\.use_pref_ref=false"),
    ({**V3_DEFAULTS, "norm_by_ref": True}, r"^loss\.norm_by_ref=true with loss\.prototype_compat=v3"),
])
def test_inconsistent_flags_are_refused_in_one_line(options, message):
    with pytest.raises(UserError, match=message) as info:
        make_loss("prefvec", **options)
    assert "\n" not in str(info.value)


# ---- the module: gradients, and the CLI ---------------------------------------------------------------------


@pytest.fixture
def text_batch(tokenizer, pairs):
    cfg = TokenizeConfig(max_length=48, max_prompt_length=24, chat_template=False)
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(list(tokenize_pairs(pairs, tokenizer, cfg))[:3])


@pytest.mark.parametrize("loss", ["loss.orth_on=q", "loss.use_pref_ref=false",
                                  "loss.prototype_compat=v2 loss.orth_on=q loss.beta=5",
                                  "loss.prototype_compat=v3 loss.use_proj_loss=true loss.use_proj_abs_loss=true "
                                  "loss.use_dpo_loss=false loss.use_orth_loss=false loss.use_angle_loss=true"])
def test_lora_and_transform_parameters_get_gradients(loss, text_batch):
    from tiny_modules import tiny_method_module

    module = tiny_method_module("prefvec", "transform=ether", "collection.layers=[1,2]", *loss.split())
    loss_value, _ = module.compute_loss(text_batch)
    loss_value.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    lora = [n for n in grads if ".lora_" in n and ".layers.1." in n]
    transform = [n for n in grads if n.startswith("transform.")]
    assert lora and transform
    for n in lora + transform:
        assert grads[n] is not None and torch.isfinite(grads[n]).all() and grads[n].abs().sum() > 0, n


CLI_OPTIONS = {
    "policy_direction_weight_tokens": ["loss.use_pref_ref=false", "loss.norm_by_ref=true", "loss.weight_tokens=true", "collection.pooling=exp_decay"],
    "orth_on_q_v2": ["loss.orth_on=q", "loss.prototype_compat=v2", "loss.beta=5"],
    "nll": ["loss.use_nll_loss=true"],
    "v2_nll": ["loss.prototype_compat=v2", "loss.use_nll_loss=true"],
    "v3": ["loss.prototype_compat=v3", "loss.use_proj_loss=true", "loss.use_proj_abs_loss=true",
           "loss.use_orth_loss=false", "loss.use_angle_loss=false"],
}


@pytest.mark.parametrize("name", list(CLI_OPTIONS))
def test_new_options_train_two_steps_from_the_cli(name, tmp_path: Path):
    from cli_runner import TINY, run_inprocess

    overrides = [*TINY, "method=prefvec", "collection.layers=[1,2]", "trainer.max_steps=2", *CLI_OPTIONS[name]]
    result = run_inprocess(overrides, tmp_path / "run")
    assert result.code == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 2


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.weight_tokens=true"], r"^error: loss\.weight_tokens=true is the prototype's exponential token weighting"),
    (["loss.nll_weight=-1"], r"^error: loss\.nll_weight=-1 must be a finite number >= 0"),
])
def test_cli_refuses_options_it_cannot_honour(overrides, message, tmp_path: Path):
    from cli_runner import TINY, run_inprocess

    result = run_inprocess([*TINY, "method=prefvec", "collection.layers=[1,2]", *overrides], tmp_path / "run")
    assert result.code != 0 and len(result.error_lines) == 1, result.stderr[-3000:]
    assert __import__("re").match(message, result.error_lines[0]), result.error_lines[0]
