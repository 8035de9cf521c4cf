"""The sweep objective: out-of-domain shifts only (not in_domain, not the orthogonal control), and the floor for a
run that is likely incoherent."""

from __future__ import annotations

import pytest

from reprpo_pl.eval.metrics import objective, shift_summary


def target(name: str, shift: str, acc: float, log_ppl_delta: float = 0.1) -> dict:
    return {"target": name, "shift": shift, "n": 10, "acc_base": 0.5, "acc": acc, "acc_gain_vs_ref": acc / 0.5,
            "perplexity_reduction_vs_ref": 1.0, "preference_logp_gain_vs_ref": 0.0, "log_ppl_chosen_delta": log_ppl_delta}


TARGETS = [target("math", "in_domain", 0.9), target("cmv", "cross_domain", 0.6), target("justice", "moral_transfer", 0.4),
           target("history", "orthogonal", 0.5)]


def test_objective_averages_the_out_of_domain_shifts_only():
    value, why = objective(shift_summary(TARGETS), TARGETS)
    assert why is None and value == pytest.approx((1.2 + 0.8) / 2)  # cross_domain and moral_transfer; not 1.8, not 1.0


def test_objective_shifts_choose_the_shifts():
    value, why = objective(shift_summary(TARGETS), TARGETS, objective_shifts=["cross_domain"])
    assert why is None and value == pytest.approx(1.2)


@pytest.mark.parametrize("delta", [2.5, -3.0])
def test_an_incoherent_target_floors_the_objective_and_says_why(delta: float):
    targets = [*TARGETS[:-1], target("history", "orthogonal", 0.5, log_ppl_delta=delta)]
    value, why = objective(shift_summary(targets), targets, coherence_limit=2.0, floor=-1.0)
    assert value == -1.0 and "history" in why and "eval.coherence_limit=2.0" in why


def test_no_objective_shift_gives_the_floor_with_a_reason():
    only = TARGETS[:1]
    value, why = objective(shift_summary(only), only, floor=0.0)
    assert value == 0.0 and "in_domain" in why
