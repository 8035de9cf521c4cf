"""The projection maths of ProjGrad/ProjBP (SPEC §3.2, §3.3), on plain tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reprpo_pl.methods.projection import (
    pair_output_difference,
    pair_row_directions,
    preference_direction,
    project_onto_direction,
    project_output_gradient,
    project_weight_gradient,
    split_parallel,
    unit,
)

torch.set_num_threads(1)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_split_is_orthogonal_and_complete():
    x, u = _randn(3, 5, 16), unit(_randn(3, 16, seed=1))
    coefficient, parallel, orthogonal = split_parallel(x, u)
    torch.testing.assert_close(parallel + orthogonal, x)
    torch.testing.assert_close((orthogonal * u[:, None]).sum(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(parallel, coefficient * u[:, None])
    torch.testing.assert_close(coefficient.squeeze(-1), torch.einsum("nth,nh->nt", x, u))


def test_neg_slope_zero_drops_anti_aligned_part():
    u = unit(torch.tensor([[1.0, -2.0, 0.5, -0.3]]))  # mixed signs: a coordinate-wise leaky_relu would differ
    orth = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    orth = orth - (orth * u).sum(-1, keepdim=True) * u
    for a, kept in ((3.0, 3.0), (-3.0, 0.0)):
        x = (a * u + orth).unsqueeze(1)  # [1, 1, 4]
        out = project_onto_direction(x, u, beta=0.5, neg_slope=0.0)
        torch.testing.assert_close(out, (kept * u + 0.5 * orth).unsqueeze(1))
    out = project_onto_direction((-3.0 * u + orth).unsqueeze(1), u, beta=0.5, neg_slope=0.1)
    torch.testing.assert_close(out, (-0.3 * u + 0.5 * orth).unsqueeze(1))


def test_identity_at_beta_one_and_slope_one():
    x, u = _randn(4, 7, 16), unit(_randn(4, 16, seed=1))
    torch.testing.assert_close(project_onto_direction(x, u, beta=1.0, neg_slope=1.0), x)
    grad, p = _randn(8, 16, seed=2), _randn(3, 16, seed=3)
    torch.testing.assert_close(project_weight_gradient(grad, p, beta=1.0, neg_slope=1.0), grad)


def test_direction_is_the_whole_batch_mean_and_reverse_flips():
    differences = _randn(6, 16)
    p = preference_direction(differences)
    torch.testing.assert_close(p, differences.mean(0, keepdim=True))
    assert not torch.allclose(p, differences[:1])  # not sample 0 (the prototype's bug)
    torch.testing.assert_close(preference_direction(differences, reverse_pref=True), -p)
    torch.testing.assert_close(preference_direction(differences, per_sample=True), differences)
    torch.testing.assert_close(preference_direction(differences, per_sample=True, reverse_pref=True), -differences)


@pytest.mark.parametrize("scale_orth", [False, True])
def test_weight_gradient_formula(scale_orth):
    """G [h, r] (torch layout of lora_B) with h on axis 0: columns split along u."""
    grad_torch, p = _randn(16, 4), _randn(1, 16, seed=1)
    out = project_weight_gradient(grad_torch.T, p, beta=0.8, neg_slope=0.0, scale_orth=scale_orth).T
    u = p[0] / p[0].norm()
    coefficient = u @ grad_torch  # [r]
    parallel = torch.outer(u, coefficient)
    orthogonal = grad_torch - parallel
    if scale_orth:
        orthogonal = orthogonal * parallel.norm() / orthogonal.norm()
        kept_orth = out - torch.outer(u, u @ out)
        assert kept_orth.norm().item() == pytest.approx(0.8 * parallel.norm().item(), rel=1e-5)
    torch.testing.assert_close(out, torch.outer(u, F.relu(coefficient)) + 0.8 * orthogonal)
    assert (u @ out >= -1e-6).all()


def test_per_sample_weight_gradient_averages_each_directions_projection():
    grad, p = _randn(4, 16), _randn(3, 16, seed=1)
    out = project_weight_gradient(grad, p, beta=0.3, neg_slope=0.05)
    each = [project_weight_gradient(grad, p[n : n + 1], beta=0.3, neg_slope=0.05) for n in range(3)]
    torch.testing.assert_close(out, torch.stack(each).mean(0))
    assert not torch.allclose(out, each[0])


def test_weight_mag_clip():
    grad, p = _randn(4, 16), _randn(1, 16, seed=1)
    c = 0.5 * (grad.norm() / p.norm()).item()  # the limit c‖p‖ is half of ‖G‖
    clipped = project_weight_gradient(grad, p, beta=1.0, neg_slope=1.0, mag_clip=c)
    torch.testing.assert_close(clipped, 0.5 * grad)
    torch.testing.assert_close(project_weight_gradient(grad, p, 1.0, 1.0, mag_clip=1e6), grad)


@pytest.mark.parametrize("mag_clip", [None, 0.6])
def test_output_gradient_keeps_each_rows_norm(mag_clip):
    g, p = _randn(4, 6, 16), 0.1 * _randn(4, 16, seed=1)  # small ‖p‖: mag_clip 0.6 is active
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, :2] = False
    out = project_output_gradient(g, p, mask, beta=0.2, neg_slope=0.01, mag_clip=mag_clip)
    assert not torch.allclose(out, g)
    target = g
    if mag_clip is not None:  # the rows' norms after clipping ‖mmean_t g_n‖ to c‖p_n‖
        token_mean = (g * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        target = g * (mag_clip * p.norm(dim=-1) / token_mean.norm(dim=-1)).clamp(max=1)[:, None, None]
        assert not torch.allclose(target, g)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), target.flatten(1).norm(dim=1))
    torch.testing.assert_close(out.norm(), target.norm())
    # direction: out ∝ leaky_relu(⟨g,u⟩)u + β g_orth per row
    u = unit(p)
    coefficient = torch.einsum("nth,nh->nt", target, u)
    raw = F.leaky_relu(coefficient, 0.01)[..., None] * u[:, None] + 0.2 * (target - coefficient[..., None] * u[:, None])
    torch.testing.assert_close(out, raw * (target.flatten(1).norm(dim=1) / raw.flatten(1).norm(dim=1))[:, None, None])


def test_zero_direction_gives_finite_output():
    grad, g = _randn(4, 16), _randn(2, 3, 16)
    zero = torch.zeros(1, 16)
    for scale_orth in (False, True):
        out = project_weight_gradient(grad, zero, beta=0.8, scale_orth=scale_orth, mag_clip=0.5)
        assert torch.isfinite(out).all()
    torch.testing.assert_close(project_weight_gradient(grad, zero, beta=0.8), 0.8 * grad)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for mag_clip in (None, 0.6):
        assert torch.isfinite(project_output_gradient(g, torch.zeros(2, 16), mask, 0.2, 0.01, mag_clip)).all()
    torch.testing.assert_close(project_output_gradient(g, torch.zeros(2, 16), mask, 0.2, 0.01, None), g)  # β·g rescaled


def test_pair_output_difference_pools_completion_tokens():
    B, P, C, h = 2, 3, 4, 8
    output = _randn(2 * B, P + C, h)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    expected = torch.stack([
        output[b, P:][mask[b]].mean(0) - output[B + b, P:][mask[B + b]].mean(0) for b in range(B)
    ])
    torch.testing.assert_close(pair_output_difference(output, mask), expected)


def test_pair_row_directions_mirror_chosen_and_rejected():
    differences = _randn(3, 8)
    rows = pair_row_directions(differences)
    torch.testing.assert_close(rows[:3], -differences)
    torch.testing.assert_close(rows[3:], differences)
    torch.testing.assert_close(pair_row_directions(differences, reverse_pref=True), -rows)
