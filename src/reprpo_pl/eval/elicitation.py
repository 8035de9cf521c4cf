"""GENIES' differential elicitation (Clymer et al. 2023; issue 12 item 5a) from a set of results documents.

``differential_elicitation = (acc − acc_base) / acc_target_tuned``: ``acc`` is a run's accuracy on a target it was not
trained on (its generalisation accuracy), ``acc_base`` the base model's on the same pairs, and ``acc_target_tuned`` the
accuracy on that target of a run of the same adapter and model trained on the target itself. A target-tuned run is a
job ``target_tuned__<target>`` of ``experiment=genies_benchmark`` (its ``config.benchmark.run``; for alpaca_long and
sycophancy_mimicry it trains on GENIES' reference distribution and is scored on the target), or any other run whose
source is the target (its in-domain row). A run's generalisation rows are its targets other than its source and its
in-sample ``train`` row; benchmark target-tuned jobs are not generalisation runs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TARGET_TUNED = "target_tuned__"  # conf/experiment/genies_benchmark.yaml: benchmark.run of a target's reference run


@dataclass
class ElicitationPair:
    """One (model, adapter, source → target) pair: per generalisation run its ``acc``, ``acc_base`` and coherence
    (``log_ppl_chosen_delta``) on the target, and the target-tuned runs' accuracies on it."""

    model: str
    label: str
    source: str
    target: str
    shift: str
    acc: list[float] = field(default_factory=list)
    acc_base: list[float] = field(default_factory=list)
    coherence: list[float | None] = field(default_factory=list)
    target_tuned: list[float] = field(default_factory=list)

    @property
    def differential_elicitation(self) -> list[float]:
        """Per generalisation run, ``(acc − acc_base) / mean(target_tuned)`` (NaN when that mean is not positive)."""
        tuned = sum(self.target_tuned) / len(self.target_tuned)
        return [(a - b) / tuned if tuned > 0 else math.nan for a, b in zip(self.acc, self.acc_base)]


def _benchmark_run(run: Mapping[str, Any]) -> str | None:
    benchmark = (run.get("config") or {}).get("benchmark")
    return benchmark.get("run") if isinstance(benchmark, dict) else None


def elicitation_pairs(runs: Sequence[Mapping[str, Any]], label_of: Callable[[Mapping[str, Any]], str]) -> tuple[list[ElicitationPair], list[ElicitationPair]]:
    """``(pairs with a target-tuned run, pairs without one)`` among ``runs`` (results documents; ``label_of`` gives a run's
    adapter, e.g. the report's group label), in the order first seen."""
    tuned: dict[tuple[str, str, str], list[float]] = defaultdict(list)  # (model, label, target) → target-tuned accuracies
    pairs: dict[tuple[str, str, str, str], ElicitationPair] = {}
    for run in runs:
        model, label, source = str(run.get("model")), label_of(run), str(run.get("dataset"))
        name = _benchmark_run(run)
        if name is None:
            tuned_on = source  # an ordinary run is the target-tuned run of its own source
        elif name.startswith(TARGET_TUNED):
            tuned_on = name[len(TARGET_TUNED):]
        else:
            tuned_on = None  # a benchmark pair: a generalisation run only
        for row in run["targets"]:
            if row["target"] == tuned_on and isinstance(row.get("acc"), (int, float)):
                tuned[(model, label, tuned_on)].append(float(row["acc"]))
        if name is not None and tuned_on is not None:
            continue
        for row in run["targets"]:
            if row["shift"] in ("train", "validation") or row["target"] == source or not isinstance(row.get("acc"), (int, float)):
                continue  # in-sample, or the run's own source: not generalisation
            pair = pairs.setdefault((model, label, source, row["target"]),
                                    ElicitationPair(model, label, source, row["target"], row["shift"]))
            pair.acc.append(float(row["acc"]))
            pair.acc_base.append(float(row["acc_base"]))
            pair.coherence.append(row.get("log_ppl_chosen_delta"))
    for (model, label, _, target), pair in pairs.items():
        pair.target_tuned = tuned.get((model, label, target), [])
    found = [p for p in pairs.values() if p.target_tuned]
    return found, [p for p in pairs.values() if not p.target_tuned]
