"""Preference metrics per target and per shift type (SPEC §5)."""

from __future__ import annotations

import math
from typing import Any

from reprpo_pl.eval.scorer import RowScores

DEFAULT_COHERENCE_LIMIT = 2.0  # conf/train.yaml's eval.coherence_limit, for results documents without one
SHIFT_ORDER = ("train", "validation", "in_domain", "cross_domain", "difficulty", "moral_transfer", "safety", "orthogonal")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def target_metrics(base: RowScores, adapter: RowScores) -> dict[str, Any]:
    """Accuracy of base and adapter on the same rows, and the adapter-vs-base gains: as a ratio
    (``acc_gain_vs_ref``) and in accuracy points (``acc_delta``, adapter − base)."""
    acc_base = base.correct.float().mean().item()
    acc = adapter.correct.float().mean().item()
    log_ppl_delta = (adapter.log_ppl_cho - base.log_ppl_cho).mean().item()
    margin_gain = ((adapter.logp_cho - adapter.logp_rej) - (base.logp_cho - base.logp_rej)).mean().item()
    return {
        "n": int(base.correct.numel()),
        "acc_base": acc_base,
        "acc": acc,
        "acc_gain_vs_ref": _ratio(acc, acc_base),
        "acc_delta": acc - acc_base,
        "perplexity_reduction_vs_ref": math.exp(-log_ppl_delta),
        "preference_logp_gain_vs_ref": margin_gain,
        "log_ppl_chosen_delta": log_ppl_delta,  # coherence proxy: 0–2 fine, > 2 likely incoherent
    }


SUMMARY_KEYS = ("acc_base", "acc", "acc_gain_vs_ref", "acc_delta", "perplexity_reduction_vs_ref",
                "preference_logp_gain_vs_ref", "log_ppl_chosen_delta")


def is_incoherent(log_ppl_chosen_delta: float | None, coherence_limit: float) -> bool:
    """Whether the chosen log-perplexity moved by more than ``coherence_limit`` nats per token (either way)."""
    return log_ppl_chosen_delta is not None and abs(log_ppl_chosen_delta) > coherence_limit


def shift_summary(targets: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean of each metric over the targets of every shift type, in SHIFT_ORDER."""
    out: dict[str, dict[str, Any]] = {}
    for shift in SHIFT_ORDER:
        rows = [t for t in targets if t["shift"] == shift]
        if not rows:
            continue
        summary: dict[str, Any] = {"n_targets": len(rows), "n": sum(r["n"] for r in rows)}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in rows if r.get(key) is not None]
            summary[key] = sum(values) / len(values) if values else None
        out[shift] = summary
    return out


NOT_OBJECTIVE_SHIFTS = ("train", "validation", "in_domain", "orthogonal")  # in-sample, held out of it, the training distribution, the control


def objective(shifts: dict[str, dict[str, Any]], targets: list[dict[str, Any]], objective_shifts: list[str] | None = None,
              coherence_limit: float = DEFAULT_COHERENCE_LIMIT, floor: float = 0.0, key: str = "acc_gain_vs_ref") -> tuple[float, str | None]:
    """The sweep objective and, when it is ``floor``, why.

    Mean ``key`` over ``objective_shifts`` (None: every shift type except `NOT_OBJECTIVE_SHIFTS`: the orthogonal
    control should stay unchanged, not be maximised). A run whose chosen log-perplexity moved by more than
    ``coherence_limit`` nats per token on any target is likely incoherent: it gets ``floor``, so a sweeper never
    prefers a broken model for its accuracy."""
    incoherent = [t["target"] for t in targets if is_incoherent(t.get("log_ppl_chosen_delta"), coherence_limit)]
    if incoherent:
        return floor, f"chosen log-perplexity moved by more than eval.coherence_limit={coherence_limit} on {', '.join(incoherent)}"
    names = [s for s in shifts if s not in NOT_OBJECTIVE_SHIFTS] if objective_shifts is None else list(objective_shifts)
    values = [shifts[s][key] for s in names if s in shifts and shifts[s].get(key) is not None]
    if not values:
        return floor, f"no {key} on eval.objective_shifts={names} (shifts of this run: {', '.join(shifts)})"
    value = sum(values) / len(values)
    return (value, None) if math.isfinite(value) else (floor, f"{key} is not finite")
