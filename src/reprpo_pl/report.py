"""Aggregate the results.json of many runs: mean ± 95% CI over seeds, per method and shift type.

    python -m reprpo_pl.report multirun/<date>/<time> [more dirs or results.json files…] [--out DIR] [--metric acc]

Writes report.md (per-shift table with the coherence table beside it, objective, per-target table, the
"matched in-domain accuracy" table, GENIES' differential elicitation where target-tuned runs are among the inputs),
report.png (bar chart with CI error bars) and matched_in_domain.png (out-of-domain vs in-domain accuracy, a colour
per method) into --out (default: the first input dir) and prints the per-shift, matched and GENIES tables. A cell
whose runs' chosen log-perplexity moved by more than eval.coherence_limit is marked likely incoherent. Every group
with per-pair files (eval/<target>.jsonl) also gets paired bootstrap CIs of acc_delta over its pairs: the seeds' CIs
measure training variance on fixed pairs, the bootstrap which pairs were drawn; and, beside a dpo group, each other
group's accuracy minus dpo's on the same pairs, bootstrapped alike.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from reprpo_pl.config import run_cli
from reprpo_pl.errors import UserError
from reprpo_pl.eval.elicitation import elicitation_pairs
from reprpo_pl.eval.lr_choice import GATE_SHIFTS, candidates, pick
from reprpo_pl.eval.matched import Point, base_shifts, common_levels, interpolate, plot_matched, run_points
from reprpo_pl.eval.metrics import SHIFT_ORDER, is_incoherent
from reprpo_pl.eval.results import INCOHERENT, ROWS_DIR, atomic_write_text, coherence_limit_of, markdown_table

COHERENCE = "log_ppl_chosen_delta"  # shown beside every accuracy table; a cell over eval.coherence_limit is marked
METRICS = ("acc", "acc_delta", "acc_gain_vs_ref", COHERENCE, "perplexity_reduction_vs_ref", "preference_logp_gain_vs_ref")
BASE_KEY = {"acc": "acc_base"}  # metrics with a base-model counterpart get a `base` row
IGNORED_CONFIG_KEYS = {"seed", "ckpt_path"}  # differences that are expected within a group
# the study experiments' lr table (conf/experiment/_study.yaml): a run trains at its own method's entry, which is
# method.lr (compared); the other entries, set per part of the study, change nothing in it
IGNORED_CONFIG_PREFIXES = ("study.lr.",)


# ---- finding runs ---------------------------------------------------------------------------
def find_results(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """results.json files below ``inputs``, and the Hydra job dirs (holding ``.hydra/``) without one.

    A dir with results.json is a run: its subfolders (e.g. ``eval/<time>`` re-evaluations) are not
    searched, so each run counts once; pass such a folder itself to include it."""
    found: list[Path] = []
    skipped: list[Path] = []

    def walk(d: Path) -> None:
        if (d / "results.json").is_file():
            found.append(d / "results.json")
            return
        is_job = (d / ".hydra").is_dir()
        if is_job:
            skipped.append(d)  # failed, killed, or still running
        for child in sorted(p for p in d.iterdir() if p.is_dir()):
            if child.name.startswith(".") or child.name in ("checkpoints", "wandb") or (is_job and child.name == "eval"):
                continue
            walk(child)

    for item in inputs:
        path = Path(item)
        if path.is_file() and path.name == "results.json":
            found.append(path)
        elif path.is_dir():
            walk(path)
        else:
            raise UserError(f"{item} is neither a directory nor a results.json file")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique, skipped


REQUIRED_KEYS = {"label": str, "targets": list, "shifts": dict}  # what the tables read from every results.json


def load_runs(files: Iterable[Path]) -> tuple[list[dict[str, Any]], list[Path]]:
    """Parsed results documents (with ``_path`` added), and the unreadable files (not JSON, or not a
    JSON object), which the report lists as skipped. A JSON object that lacks a key the tables need
    (`REQUIRED_KEYS`: another program's results.json, or an older format) is a `UserError` naming the
    file and the keys, rather than a silent gap in the averages."""
    runs, bad = [], []
    for f in files:
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            bad.append(f)
            continue
        if not isinstance(doc, dict):
            bad.append(f)
            continue
        wrong = [k for k, kind in REQUIRED_KEYS.items() if not isinstance(doc.get(k), kind)]
        if not wrong:
            wrong = [f"targets[{i}]" for i, t in enumerate(doc["targets"])
                     if not (isinstance(t, dict) and isinstance(t.get("target"), str) and isinstance(t.get("shift"), str))][:1]
        if wrong:
            raise UserError(f"{f} lacks required key(s) {', '.join(wrong)} ({', '.join(REQUIRED_KEYS)} with each target's "
                            "target and shift): not a reprpo_pl results.json; remove it, or rerun "
                            "python -m reprpo_pl.eval on that run")
        doc["_path"] = str(f.parent)
        runs.append(doc)
    return runs, bad


# ---- statistics -----------------------------------------------------------------------------
def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half-width, n)``: Student-t interval ``mean ± t_{(1+c)/2, n−1}·s/√n`` with the sample
    standard deviation s (ddof=1). The half-width is NaN for n < 2; the mean is NaN for n = 0."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(half), n


N_RESAMPLES = 2000
REFERENCE = "dpo"  # the method the study compares every other with (its question is ReprPO against DPO)


def pair_differences(path: Path) -> dict[tuple[str, str, int], float] | None:
    """Adapter − base correctness (−1, 0 or 1) of each pair of a per-row file (``eval/<target>.jsonl``: correct = the
    per-token mean log-prob of chosen beats rejected's), keyed by the pair's ``(distribution, split, index)``; None
    when the file is missing, unreadable or empty."""
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out = {}
        for r in records:
            correct = [r[f"{role}_logp_chosen"] / r[f"{role}_n_chosen"] > r[f"{role}_logp_rejected"] / r[f"{role}_n_rejected"]
                       for role in ("adapter", "base")]
            out[(r["distribution"], r["split"], r["index"])] = float(correct[0]) - float(correct[1])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    return out or None


def seed_mean_differences(per_run: Sequence[dict[tuple[str, str, int], float] | None]) -> np.ndarray | None:
    """``[N]``: each pair's `pair_differences` averaged over a group's runs (its seeds), which scored the same pairs of
    one target; None when a run lacks its file or the runs' pairs differ."""
    if not per_run or any(d is None for d in per_run) or len({frozenset(d) for d in per_run}) > 1:
        return None
    keys = sorted(per_run[0])
    return np.mean([[d[k] for k in keys] for d in per_run], axis=0)


def paired_bootstrap(differences: Sequence[np.ndarray], confidence: float = 0.95, n_resamples: int = N_RESAMPLES,
                     seed: int = 0) -> tuple[float, float, float, int]:
    """``(estimate, low, high, n pairs)``: the mean over ``differences`` (one ``[N_i]`` array per target of each pair's
    adapter − base correctness, averaged over seeds by `seed_mean_differences`) of their means, and its percentile
    interval from ``n_resamples`` resamples of each array's pairs with replacement. A pair is resampled with all its
    seeds, so the interval measures the spread due to which pairs were drawn, not seed variance."""
    rng = np.random.default_rng(seed)
    estimate = float(np.mean([d.mean() for d in differences]))
    resampled = np.mean([d[rng.integers(0, len(d), (n_resamples, len(d)))].mean(axis=1) for d in differences], axis=0)
    low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
    return estimate, float(low), float(high), sum(len(d) for d in differences)


def fmt_interval(estimate: float, low: float, high: float, n: int) -> str:
    return f"{estimate:.3f} [{low:.3f}, {high:.3f}] (n={n} pairs)"


def fmt_cell(mean: float, half: float, n: int) -> str:
    if n == 0:
        return "–"
    if math.isnan(half):
        return f"{mean:.3f} (n={n})"
    return f"{mean:.3f} ± {half:.3f} (n={n})"


def fmt_seconds(mean: float, half: float, n: int) -> str:
    """Like `fmt_cell` for wall seconds (runs without a timing, e.g. re-evaluations, are left out of n)."""
    if n == 0:
        return "–"
    return f"{mean:.0f}" if math.isnan(half) else f"{mean:.0f} ± {half:.0f}"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: json.dumps(d, sort_keys=True)}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Config keys (other than the seed) whose values differ between ``runs``: these runs are pooled
    as if they were seeds of one setting, which they are not (e.g. the trials of an Optuna sweep)."""
    flat = [_flatten(r.get("config") or {}) for r in runs]
    keys = set().union(*flat) if flat else set()
    return sorted(k for k in keys if k not in IGNORED_CONFIG_KEYS and not k.startswith(IGNORED_CONFIG_PREFIXES)
                  and len({f.get(k) for f in flat}) > 1)


# ---- tables -----------------------------------------------------------------------------------


def group_label(run: Mapping[str, Any]) -> str:
    """A run's row in the tables: its label, and for a re-evaluation (`python -m reprpo_pl.eval`, whose
    results.json names its ``checkpoint``) ``<label> (re-evaluated)``, so that it is never pooled with
    training runs as another seed."""
    return f"{run['label']} (re-evaluated)" if run.get("checkpoint") else run["label"]


def learning_rate(run: Mapping[str, Any]) -> float:
    """The run's ``method.lr`` (NaN when its config has none)."""
    lr = ((run.get("config") or {}).get("method") or {}).get("lr")
    return float(lr) if isinstance(lr, (int, float)) else math.nan


class Section:
    """The runs of one model trained on one source and scored on one source's shift table, grouped by
    `group_label` (insertion order kept)."""

    def __init__(self, model: str, dataset: str, runs: list[dict[str, Any]], evaluated_on: str | None = None):
        self.model, self.dataset, self.evaluated_on = model, dataset, evaluated_on or dataset
        self.methods: dict[str, list[dict[str, Any]]] = defaultdict(list)  # by `group_label`: the matched comparison's lines
        for run in runs:
            self.methods[group_label(run)].append(run)
        self.groups: dict[str, list[dict[str, Any]]] = defaultdict(list)  # the tables' rows
        for label, members in self.methods.items():  # runs of one method at several learning rates are not seeds of one setting
            lrs = {learning_rate(r) for r in members}
            for run in members:
                self.groups[f"{label} lr={learning_rate(run):g}" if len(lrs) > 1 else label].append(run)
        self.runs = runs
        self.shifts = [s for s in SHIFT_ORDER if any(s in r["shifts"] for r in runs)]
        targets: dict[str, str] = {}
        for run in runs:
            for t in run["targets"]:
                targets.setdefault(t["target"], t["shift"])
        order = {s: i for i, s in enumerate(SHIFT_ORDER)}
        self.targets = sorted(targets.items(), key=lambda kv: order.get(kv[1], len(order)))
        self.coherence_limit = min(coherence_limit_of(r) for r in runs)  # the strictest of the runs' eval.coherence_limit
        self._differences: dict[tuple[str, str], tuple[tuple, np.ndarray] | None] = {}  # `target_differences`' cache

    @property
    def title(self) -> str:
        scored = "" if self.evaluated_on == self.dataset else f", evaluated on {self.evaluated_on}'s shift table"
        return f"{self.model}, trained on {self.dataset}{scored}"

    def shift_stats(self, metric: str, confidence: float) -> dict[str, dict[str, tuple[float, float, int]]]:
        """``{row label: {shift: (mean, half, n)}}``, ``base`` first when the metric has one."""
        rows: dict[str, list[dict[str, Any]]] = {}
        table: dict[str, dict[str, tuple[float, float, int]]] = {}
        if metric in BASE_KEY:
            rows["base"] = self.runs
        rows.update(self.groups)
        for label, runs in rows.items():
            key = BASE_KEY[metric] if label == "base" else metric
            table[label] = {s: mean_ci([r["shifts"][s].get(key) for r in runs if s in r["shifts"]], confidence)
                            for s in self.shifts}
        return table

    def target_stats(self, metric: str, confidence: float) -> dict[str, dict[str, tuple[float, float, int]]]:
        """``{target: {row label: (mean, half, n)}}``."""
        rows = ({"base": self.runs} if metric in BASE_KEY else {}) | dict(self.groups)
        out: dict[str, dict[str, tuple[float, float, int]]] = {}
        for target, _ in self.targets:
            out[target] = {}
            for label, runs in rows.items():
                key = BASE_KEY[metric] if label == "base" else metric
                values = [t.get(key) for r in runs for t in r["targets"] if t["target"] == target]
                out[target][label] = mean_ci(values, confidence)
        return out


    def bootstrap_stats(self, confidence: float, against: str | None = None
                        ) -> dict[str, dict[str, tuple[float, float, float, int] | None]]:
        """``{row label: {shift: paired_bootstrap(...) or None}}`` of ``acc_delta`` per group, from its runs' per-row
        files (None where a run lacks one or the runs scored different pairs). With ``against`` (a group label): of
        each other group's accuracy minus that group's, pair by pair (None where the two scored different pairs)."""
        if against is not None and against not in self.groups:
            return {}
        out: dict[str, dict[str, tuple[float, float, float, int] | None]] = {}
        for label, runs in self.groups.items():
            if label == against:
                continue
            out[label] = {}
            for shift in self.shifts:
                targets = sorted({t["target"] for r in runs for t in r["targets"] if t["shift"] == shift})
                found = [self.target_differences(label, target) for target in targets]
                if against is not None:
                    reference = [self.target_differences(against, target) for target in targets]
                    found = [None if own is None or ref is None or own[0] != ref[0] else (own[0], own[1] - ref[1])
                             for own, ref in zip(found, reference)]
                ok = bool(found) and all(d is not None for d in found)
                out[label][shift] = paired_bootstrap([d[1] for d in found], confidence) if ok else None
        return out

    def target_differences(self, label: str, target: str) -> tuple[tuple, np.ndarray] | None:
        """``(pair keys, [N] differences)``: `seed_mean_differences` of group ``label``'s runs on ``target``, with the
        sorted keys of the pairs they scored; None as there. Read once per section (both bootstrap tables use it)."""
        if (label, target) not in self._differences:
            per_run = [pair_differences(Path(r["_path"]) / ROWS_DIR / f"{target}.jsonl") for r in self.groups[label]]
            differences = seed_mean_differences(per_run)
            self._differences[label, target] = None if differences is None else (tuple(sorted(per_run[0])), differences)
        return self._differences[label, target]


def sections_of(runs: Sequence[dict[str, Any]]) -> list[Section]:
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        dataset = str(run.get("dataset"))
        by[(str(run.get("model")), dataset, str(run.get("evaluated_on") or dataset))].append(run)
    return [Section(model, dataset, rs, scored) for (model, dataset, scored), rs in by.items()]


def shift_table(section: Section, metric: str, confidence: float) -> str:
    """``metric`` per shift type, a row per adapter; a cell whose mean `COHERENCE` over the same runs exceeds
    the section's coherence limit is marked `INCOHERENT`."""
    coherence = section.shift_stats(COHERENCE, confidence)
    rows = [[label, *(_marked(fmt_cell(*cells[s]), coherence.get(label, {}).get(s), section.coherence_limit) for s in section.shifts)]
            for label, cells in section.shift_stats(metric, confidence).items()]
    return markdown_table(["adapter", *section.shifts], rows)


def _flagged(coherence: tuple[float, float, int] | None, limit: float) -> bool:
    """Whether a mean chosen log-perplexity change (a `mean_ci` triple, or None) exceeds ``limit``."""
    return coherence is not None and bool(coherence[2]) and is_incoherent(coherence[0], limit)


def _marked(cell: str, coherence: tuple[float, float, int] | None, limit: float) -> str:
    """``cell`` followed by `INCOHERENT` when the mean chosen log-perplexity change of its runs exceeds ``limit``."""
    return f"{cell} {INCOHERENT}" if _flagged(coherence, limit) else cell


def shift_tables(section: Section, metric: str, confidence: float) -> list[str]:
    """Markdown lines: ``metric`` per shift type, and beside it (unless it is the metric) the coherence table."""
    lines = [f"### {metric} per shift type", "", shift_table(section, metric, confidence), ""]
    if metric != COHERENCE:
        lines += [f"### {COHERENCE} per shift type (coherence: chosen log-perplexity change, nats/token; "
                  f"{INCOHERENT} = beyond ±{section.coherence_limit:g})", "", shift_table(section, COHERENCE, confidence), ""]
    return lines


def bootstrap_table(section: Section, confidence: float, against: str | None = None) -> list[str]:
    """Markdown lines: `Section.bootstrap_stats` as a table (the groups with per-row files), or nothing without any;
    with ``against``, each group's accuracy minus that group's. A cell is marked `INCOHERENT` when the row's group,
    or the ``against`` group, is beyond the coherence limit on that shift."""
    stats_ = {label: cells for label, cells in section.bootstrap_stats(confidence, against).items()
              if any(cell is not None for cell in cells.values())}
    if not stats_:
        return []
    coherence, limit = section.shift_stats(COHERENCE, confidence), section.coherence_limit

    def cell(label: str, shift: str) -> str:
        if stats_[label][shift] is None:
            return "–"
        flagged = any(_flagged(coherence.get(group, {}).get(shift), limit) for group in (label, against) if group)
        text = fmt_interval(*stats_[label][shift])
        return f"{text} {INCOHERENT}" if flagged else text

    rows = [[label, *(cell(label, s) for s in section.shifts)] for label in stats_]
    what = (f"acc − {against}'s acc per shift type: paired bootstrap {confidence:.0%} CI over pairs (each pair's "
            f"correctness minus {against}'s on the same pair, each averaged over its group's seeds"
            if against else f"acc_delta per shift type: paired bootstrap {confidence:.0%} CI over pairs (each pair's "
            "adapter − base correctness averaged over the group's seeds")
    return [f"### {what}, pairs resampled {N_RESAMPLES} times from eval/<target>.jsonl: which pairs were drawn, not "
            f"seed variance; {INCOHERENT} = beyond ±{limit:g} nats of chosen log-perplexity change"
            + (f", either side's" if against else "") + ")", "",
            markdown_table(["adapter", *section.shifts], rows), ""]


MATCHED = "matched in-domain accuracy"
MATCHED_PNG = "matched_in_domain.png"


class Matched:
    """A section's comparison at matched in-domain accuracy (`reprpo_pl.eval.matched`): each group's points (per run:
    its curve, or its final point), the levels every group reaches, and the per-seed interpolations there."""

    def __init__(self, section: Section, confidence: float):
        self.section, self.confidence = section, confidence
        self.points: dict[str, list[list[Point]]] = {}  # group label → points of each run
        self.seed_points: dict[str, dict[Any, list[Point]]] = {}  # group label → seed → its runs' points, pooled
        self.n_curves = 0
        for label, runs in section.methods.items():  # an lr sweep without curves: each lr's run is a point of its seed's line
            for run in runs:
                points, is_curve = run_points(run)
                self.n_curves += is_curve
                if points:
                    self.points.setdefault(label, []).append(points)
                    self.seed_points.setdefault(label, {}).setdefault(run.get("seed"), []).extend(points)
        self.shifts = [s for s in section.shifts if any(s in p.acc for runs in self.points.values() for rp in runs for p in rp)]
        self.ranges = {label: (min(p.in_domain for rp in runs for p in rp), max(p.in_domain for rp in runs for p in rp))
                       for label, runs in self.points.items()}
        self.levels = common_levels(list(self.ranges.values())) if self.ranges and self.shifts else []
        # one adapter that never reaches the others' levels would leave nothing to compare; the study's question is
        # each method against DPO, so then each adapter is matched with DPO alone, on the levels the two share
        self.pairwise = {label: common_levels([self.ranges[REFERENCE], span])
                         for label, span in self.ranges.items() if label != REFERENCE} \
            if not self.levels and self.shifts and REFERENCE in self.ranges else {}

    def cell(self, label: str, shift: str, level: float, key: str) -> tuple[float, float, int]:
        """Mean ± CI over the group's seeds of ``key`` (``acc`` or ``coherence``) on ``shift`` interpolated at ``level``
        (`interpolate`: seeds whose points do not span the level are left out)."""
        values = []
        for points in self.seed_points[label].values():
            having = [p for p in points if shift in getattr(p, key)]
            value = interpolate([p.in_domain for p in having], [getattr(p, key)[shift] for p in having], level)
            if value is not None:
                values.append(value)
        return mean_ci(values, self.confidence)

    def base(self) -> tuple[float, dict[str, float]] | None:
        """The base model's mean in-domain accuracy and per-shift accuracy over the section's runs, or None; on the
        rows the plotted points were scored on (`base_shifts`: a curve's subsets, else the final rows), so the star
        sits where an unchanged adapter's points would."""
        shifts = [base_shifts(r) for r in self.section.runs]
        shifts = [sh for sh in shifts if "acc_base" in (sh.get("in_domain") or {})]
        if not shifts:
            return None
        per_shift = {s: mean_ci([sh[s].get("acc_base") for sh in shifts if s in sh])[0] for s in self.shifts}
        return mean_ci([sh["in_domain"]["acc_base"] for sh in shifts])[0], {s: v for s, v in per_shift.items() if math.isfinite(v)}

    def table(self) -> list[str]:
        """Markdown lines: the table headed `MATCHED`, or a line saying why there is none; nothing without points."""
        if not self.points or not self.shifts:
            return []
        pct = f"{self.confidence:.0%}"
        n_runs = sum(len(runs) for runs in self.points.values())
        lines = [f"### {MATCHED}", "",
                 f"Out-of-domain accuracy per shift type at in-domain accuracy levels every adapter reaches (the top one: the "
                 f"highest they all reach). Each seed's points ({self.n_curves} of {n_runs} runs gave a step-level curve, "
                 f"curves.jsonl on eval.n_samples_during pairs per target; the others their final point) are interpolated "
                 f"linearly between the nearest points on either side of the level; a seed whose points do not span it is "
                 f"left out (no extrapolation). Cells: mean ± {pct} CI over seeds (Student t), n = seeds; Δlog-ppl = "
                 f"chosen log-perplexity change (coherence) interpolated alike. Plot: {MATCHED_PNG}.", ""]
        if not self.levels:
            spans = ", ".join(f"{label} {low:.3f}–{high:.3f}" for label, (low, high) in self.ranges.items())
            rows = [row for level in self.pairwise_levels() for row in self._rows(
                level, [REFERENCE, *(label for label, own in self.pairwise.items() if level in own)])]
            if not rows:
                return [*lines, f"No in-domain accuracy is reached by every adapter (ranges: {spans}): nothing to "
                                "compare; sweep further (lr, steps) or add callbacks.shift_eval.every_n_steps for curves.", ""]
            apart = [label for label, levels in self.pairwise.items() if not levels]
            return [*lines, f"No in-domain accuracy is reached by every adapter (ranges: {spans}), so each adapter is "
                            f"matched with {REFERENCE} alone, at levels the two both reach"
                            + (f" (none with {', '.join(apart)})" if apart else "") + ":", "",
                    markdown_table(self._header(), rows), ""]
        rows = [row for level in self.levels for row in self._rows(level, list(self.seed_points))]
        return [*lines, markdown_table(self._header(), rows), ""]

    def pairwise_levels(self) -> list[float]:
        """The in-domain levels of the matches with `REFERENCE` alone, all adapters' together."""
        return sorted({level for levels in self.pairwise.values() for level in levels})

    def _header(self) -> list[str]:
        return ["in-domain acc", "adapter", "seeds, points", *self.shifts]

    def _rows(self, level: float, labels: Sequence[str]) -> list[list[str]]:
        """Table rows at one in-domain ``level``, one per group in ``labels``: its seeds and points, then per shift the
        interpolated accuracy with the chosen log-perplexity change beside it."""
        rows = []
        for label in labels:
            cells = []
            for shift in self.shifts:
                acc, coherence = self.cell(label, shift, level, "acc"), self.cell(label, shift, level, "coherence")
                text = fmt_cell(*acc) + ("" if coherence[2] == 0 else f"; Δlog-ppl {coherence[0]:+.2f}")
                cells.append(_marked(text, coherence, self.section.coherence_limit))
            by_seed = self.seed_points[label]
            rows.append([f"{level:.3f}", label, f"{len(by_seed)}, {sum(len(p) for p in by_seed.values())}", *cells])
        return rows

    def panels(self) -> list[tuple[str, str, dict[str, list[list[Point]]], list[float], tuple[float, dict[str, float]] | None]]:
        """`plot_matched`'s panels of this section: one per compared shift type."""
        base = self.base()
        levels = self.levels or self.pairwise_levels()
        return [(self.section.title, shift, self.points, levels, base) for shift in self.shifts] if self.points else []


ELICITATION = "GENIES' differential elicitation"


def elicitation_tables(runs: Sequence[dict[str, Any]], confidence: float) -> list[str]:
    """Markdown lines: GENIES' table per model (`reprpo_pl.eval.elicitation`): per pair and adapter the base,
    generalisation and target-tuned accuracies and the differential elicitation, coherence beside them, then each
    adapter's mean over its pairs; nothing when no run among ``runs`` is target-tuned for another's target."""
    found, missing = elicitation_pairs(runs, group_label)
    if not found:
        return []
    pct = f"{confidence:.0%}"
    limit = min(coherence_limit_of(r) for r in runs)
    lines = [f"## {ELICITATION}", "",
             f"differential elicitation = (acc − acc_base) / acc_target_tuned (GENIES, Clymer et al. 2023): acc = the "
             f"generalisation accuracy on the target of runs trained on the source, acc_base = the base model's on the same "
             f"pairs, acc_target_tuned = the accuracy on the target of runs of the same adapter trained on the target "
             f"(genies_benchmark's target_tuned__<target> jobs, or runs whose source is the target). Cells: mean ± {pct} CI "
             f"(Student t), n = runs; the elicitation's CI is over the source runs, each divided by the target-tuned runs' "
             f"mean accuracy. log_ppl_chosen_delta: the generalisation runs' coherence on the target ({INCOHERENT} = beyond "
             f"±{limit:g}).", ""]
    for model in dict.fromkeys(p.model for p in found):
        pairs = [p for p in found if p.model == model]
        rows = []
        for p in pairs:
            coherence = mean_ci(p.coherence, confidence)
            rows.append([f"{p.source} → {p.target}", p.shift, p.label, fmt_cell(*mean_ci(p.acc_base, confidence)),
                         fmt_cell(*mean_ci(p.acc, confidence)), fmt_cell(*mean_ci(p.target_tuned, confidence)),
                         fmt_cell(*mean_ci(p.differential_elicitation, confidence)), _marked(fmt_cell(*coherence), coherence, limit)])
        lines += [f"### {model}", "", markdown_table(["pair (source → target)", "shift", "adapter", "base acc", "generalisation acc",
                                                      "target-tuned acc", "differential elicitation", "log_ppl_chosen_delta"], rows), ""]
        means = [[label, fmt_cell(*mean_ci([mean_ci(p.differential_elicitation)[0] for p in pairs if p.label == label], confidence))]
                 for label in dict.fromkeys(p.label for p in pairs)]
        lines += [f"Mean differential elicitation over each adapter's pairs (± {pct} CI over pairs, n = pairs):", "",
                  markdown_table(["adapter", "differential elicitation"], means), ""]
    if missing:
        lines += [f"{len(missing)} source → target pairs have no target-tuned run among the inputs, e.g. "
                  f"{', '.join(f'{p.source} → {p.target} ({p.label})' for p in missing[:3])}.", ""]
    return lines


def lr_choice_table(section: Section) -> list[str]:
    """The learning rate each method of ``section`` would train at (`reprpo_pl.eval.lr_choice`), when its runs scored a
    validation slice at more than one lr; else no lines."""
    rows = []
    for label, runs in section.methods.items():
        options = candidates(runs, learning_rate, section.coherence_limit)
        if len(options) < 2:
            continue
        chosen = pick(options)
        for c in options:
            gate = ", ".join(f"{s} {c.log_ppl[s]:+.2f}" for s in GATE_SHIFTS if s in c.log_ppl)
            rows.append([label, f"{c.lr:g}", f"{c.acc:.3f} (n={c.n_pairs}, {c.n_runs} run{'s' * (c.n_runs > 1)})", gate,
                         "yes" if c.coherent else INCOHERENT, "**picked**" if c is chosen else ""])
        if chosen is None:
            rows.append([label, "–", "no learning rate stays coherent", "", "", ""])
    if not rows:
        return []
    return [f"### Learning rate picked on the validation slice (highest validation accuracy among the lrs whose chosen "
            f"log-perplexity change on the train and validation rows stays within ±{section.coherence_limit:g}; "
            "no test target enters the choice)", "",
            markdown_table(["adapter", "lr", "validation acc", "log_ppl_chosen_delta", "coherent", ""], rows), ""]


def render_report(sections: Sequence[Section], matched: Sequence[Matched], elicitation: Sequence[str], metric: str,
                  confidence: float, n_skipped: int) -> str:
    """report.md: per section (``matched``: its `Matched`, in the same order) the shift, coherence, bootstrap, objective,
    per-target and matched tables, then the ``elicitation`` lines (`elicitation_tables`)."""
    pct = f"{confidence:.0%}"
    n_runs = sum(len(s.runs) for s in sections)
    lines = ["# Report", "",
             f"{n_runs} runs; cells are mean ± {pct} CI half-width (Student t over seeds), n = runs. "
             f"{n_skipped} run dirs without results.json skipped.", ""]
    for section, section_matched in zip(sections, matched):
        lines += [f"## {section.title}", "", *lr_choice_table(section), *shift_tables(section, metric, confidence),
                  *bootstrap_table(section, confidence), *bootstrap_table(section, confidence, REFERENCE)]
        rows = []
        for label, runs in section.groups.items():
            seeds = ", ".join(str(s) for s in sorted({r.get("seed") for r in runs}, key=str))
            times = [fmt_seconds(*mean_ci([(r.get("timing") or {}).get(k) for r in runs], confidence)) for k in ("train_s", "eval_s")]
            rows.append([label, fmt_cell(*mean_ci([r.get("objective") for r in runs], confidence)), *times, seeds])
        lines += ["### Objective (mean acc_gain_vs_ref over eval.objective_shifts: by default all but train, in_domain and "
                  "orthogonal) and wall time per run", "",
                  markdown_table(["adapter", "objective", "train s", "eval s", "seeds"], rows), ""]
        notes = [(label, config_differences(runs)) for label, runs in section.groups.items()]
        notes = [(label, keys) for label, keys in notes if keys]
        if notes:
            lines += ["Pooled runs whose configs differ in more than the seed:", ""]
            lines += [f"- {label}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}" for label, keys in notes]
            lines.append("")
        target_stats = section.target_stats(metric, confidence)
        coherence = section.target_stats(COHERENCE, confidence)
        labels = list(next(iter(target_stats.values())).keys()) if target_stats else []
        shift_of = dict(section.targets)
        rows = [[target, shift_of[target], *(_marked(fmt_cell(*cells[lb]), coherence[target].get(lb), section.coherence_limit)
                                             for lb in labels)] for target, cells in target_stats.items()]
        lines += [f"### {metric} per target", "", markdown_table(["target", "shift", *labels], rows), "", *section_matched.table()]
    lines += elicitation
    return "\n".join(lines)


def plot_report(sections: Sequence[Section], metric: str, confidence: float, path: Path) -> None:
    """One grouped bar chart per section: x = shift type, a bar per adapter, CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sections), 1, figsize=(max(6.0, 1.6 * max(len(s.shifts) for s in sections) + 2), 4.5 * len(sections)),
                             squeeze=False)
    for ax, section in zip(axes[:, 0], sections):
        table = section.shift_stats(metric, confidence)
        width = 0.8 / max(1, len(table))
        x = np.arange(len(section.shifts))
        for i, (label, cells) in enumerate(table.items()):
            means = [cells[s][0] for s in section.shifts]
            errs = [0.0 if math.isnan(cells[s][1]) else cells[s][1] for s in section.shifts]
            ax.bar(x + (i - (len(table) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=label)
        ax.set_xticks(x, section.shifts)
        ax.set_ylabel(metric)
        ax.set_title(f"{section.title} ({confidence:.0%} CI over seeds)")
        if metric == "acc":
            ax.set_ylim(0, 1)
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, len(table)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(inputs: Sequence[str | Path], out: str | Path | None = None, metric: str = "acc",
           confidence: float = 0.95) -> Path:
    """Write report.md and report.png for the runs below ``inputs``; returns the report.md path."""
    if metric not in METRICS:
        raise UserError(f"--metric {metric}: use one of {', '.join(METRICS)}")
    if not 0 < confidence < 1:
        raise UserError(f"--confidence {confidence} must be between 0 and 1, e.g. 0.95")
    files, skipped = find_results(inputs)
    runs, bad = load_runs(files)
    skipped_msg = f"skipped {len(skipped)} run dirs without results.json" + (
        f" ({', '.join(str(p) for p in skipped[:5])}{' …' if len(skipped) > 5 else ''})" if skipped else "")
    if bad:
        skipped_msg += f"; {len(bad)} unreadable results.json ({', '.join(str(p) for p in bad[:5])})"
    if not runs:
        raise UserError(f"no results.json found below {', '.join(str(i) for i in inputs)}; {skipped_msg}")
    first = Path(inputs[0])
    out_dir = Path(out) if out is not None else (first if first.is_dir() else first.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = sections_of(runs)
    matched = [Matched(section, confidence) for section in sections]
    elicitation = elicitation_tables(runs, confidence)
    markdown = render_report(sections, matched, elicitation, metric, confidence, len(skipped) + len(bad))
    atomic_write_text(out_dir / "report.md", markdown)
    plot_report(sections, metric, confidence, out_dir / "report.png")
    written = [out_dir / "report.md", out_dir / "report.png"]
    if panels := [panel for m in matched for panel in m.panels()]:
        plot_matched(panels, out_dir / MATCHED_PNG)
        written.append(out_dir / MATCHED_PNG)
    print(f"found {len(runs)} runs in {sum(len(s.groups) for s in sections)} groups; {skipped_msg}")
    for section, section_matched in zip(sections, matched):
        if choice := lr_choice_table(section):
            print(f"\n{section.title}: learning rate per method on the validation slice\n{choice[2]}")
        print(f"\n{section.title}: {metric}, mean ± {confidence:.0%} CI (n)\n{shift_table(section, metric, confidence)}")
        if metric != COHERENCE:
            print(f"{COHERENCE} (coherence; {INCOHERENT} = beyond ±{section.coherence_limit:g})\n"
                  f"{shift_table(section, COHERENCE, confidence)}")
        if table := section_matched.table():
            print(f"\n{MATCHED}: out-of-domain accuracy interpolated per seed, mean ± {confidence:.0%} CI (n seeds)\n"
                  + "\n".join(line for line in table[3:] if line))  # after the heading and the explanation
    if elicitation:
        print("\n" + "\n".join(line for line in elicitation if line and not line.startswith("differential elicitation =")))
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return out_dir / "report.md"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reprpo_pl.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="multirun dirs, run dirs or results.json files (searched recursively)")
    parser.add_argument("--out", default=None, help="where to write report.md/.png (default: the first input dir)")
    parser.add_argument("--metric", default="acc", choices=METRICS, help="per-shift metric to tabulate (default: acc)")
    parser.add_argument("--confidence", type=float, default=0.95, help="CI level (default: 0.95)")
    args = parser.parse_args(argv)
    run_cli(lambda: report(args.inputs, args.out, args.metric, args.confidence))


if __name__ == "__main__":
    main(sys.argv[1:])
