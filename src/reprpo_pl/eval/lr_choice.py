"""A learning rate per method, picked on the validation slice (``data.n_val``; docs/study/README.md's protocol).

Among a method's learning rates, the one with the highest accuracy on ``<source>@val`` (pairs held out of the training
split) among those that stay coherent on the source's own rows: the chosen log-perplexity change of the in-sample
(``train``) and validation rows within ``eval.coherence_limit`` nats per token. No test target enters the choice.
Ties go to the smaller worst log-perplexity change, then to the smaller learning rate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reprpo_pl.eval.metrics import is_incoherent

SELECTION_SHIFT = "validation"
GATE_SHIFTS = ("train", "validation")  # the source's own rows: coherence is gated there, never on a test target


@dataclass(frozen=True)
class Candidate:
    """One learning rate of one method: its mean over runs (seeds) of the validation accuracy and of the chosen
    log-perplexity change on each gate row."""

    lr: float
    n_runs: int
    acc: float
    n_pairs: int
    log_ppl: dict[str, float]  # gate shift → mean log_ppl_chosen_delta
    coherent: bool

    @property
    def worst(self) -> float:
        return max((abs(v) for v in self.log_ppl.values()), default=math.inf)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def candidates(runs: Sequence[Mapping[str, Any]], lr_of: Any, coherence_limit: float) -> list[Candidate]:
    """The `Candidate` of each learning rate (``lr_of(run)``) among ``runs`` that scored a validation row, by lr."""
    by_lr: dict[float, list[Mapping[str, Any]]] = defaultdict(list)
    for run in runs:
        if SELECTION_SHIFT in run.get("shifts", {}):
            by_lr[lr_of(run)].append(run)
    out = []
    for lr, group in sorted(by_lr.items()):
        log_ppl = {s: _mean([r["shifts"][s]["log_ppl_chosen_delta"] for r in group
                             if r["shifts"].get(s, {}).get("log_ppl_chosen_delta") is not None]) for s in GATE_SHIFTS}
        log_ppl = {s: v for s, v in log_ppl.items() if not math.isnan(v)}
        acc = _mean([r["shifts"][SELECTION_SHIFT]["acc"] for r in group])
        coherent = bool(log_ppl) and not any(is_incoherent(v, coherence_limit) for v in log_ppl.values())
        out.append(Candidate(lr, len(group), acc, int(group[0]["shifts"][SELECTION_SHIFT]["n"]), log_ppl,
                             coherent and math.isfinite(acc)))
    return out


def pick(options: Sequence[Candidate]) -> Candidate | None:
    """The highest validation accuracy among the coherent candidates (ties: smaller worst |Δ log ppl|, then smaller
    lr); None when none is coherent."""
    coherent = [c for c in options if c.coherent]
    return min(coherent, key=lambda c: (-c.acc, c.worst, c.lr)) if coherent else None
