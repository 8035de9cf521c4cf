"""Out-of-domain accuracy at matched in-domain accuracy (issue 12 item 6): the points each run gives, interpolation
without extrapolation, the levels every method reaches, and the plot. The report (`reprpo_pl.report`) tabulates them.

A run gives one point per step of its step-level curve (``curves.jsonl``, `CURVES_FILE`) when it has one, else its
final point (results.json): the in-domain accuracy and, per shift type, the accuracy and coherence
(``log_ppl_chosen_delta``). Curve points are scored on ``eval.n_samples_during`` pairs per target, final points on
``eval.n_samples``; a run's final point is not added to its curve, since it is scored on other rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reprpo_pl.eval.results import CURVES_FILE

NOT_COMPARED = ("train", "validation", "in_domain")  # not plotted against in-domain accuracy: the source's own rows, and the x axis itself


@dataclass(frozen=True)
class Point:
    """One evaluation of one run: ``in_domain`` accuracy, and per shift type its accuracy and chosen log-perplexity change."""

    in_domain: float
    acc: dict[str, float]
    coherence: dict[str, float]
    step: int | None  # None: the run's final point (results.json)


def _point(shifts: Mapping[str, Any], step: int | None) -> Point | None:
    """A `Point` from a results-style ``shifts`` summary, or None without an in-domain accuracy."""
    in_domain = (shifts.get("in_domain") or {}).get("acc")
    if not isinstance(in_domain, (int, float)) or not math.isfinite(in_domain):
        return None
    acc = {s: float(v["acc"]) for s, v in shifts.items() if s not in NOT_COMPARED and isinstance(v.get("acc"), (int, float))}
    coherence = {s: float(v["log_ppl_chosen_delta"]) for s, v in shifts.items()
                 if s in acc and isinstance(v.get("log_ppl_chosen_delta"), (int, float))}
    return Point(float(in_domain), acc, coherence, step)


def curve_records(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The lines of ``<run dir>/curves.jsonl`` (``_path`` = the run dir), or [] when it is missing or unreadable."""
    path = Path(run["_path"]) / CURVES_FILE
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def base_shifts(run: Mapping[str, Any]) -> Mapping[str, Any]:
    """The per-shift summaries that hold the base model's accuracy on the rows a run's points were scored on: its
    curve's (the ``eval.n_samples_during`` subsets) when it has one, else its results' (the final rows)."""
    records = curve_records(run)
    shifts = records[0].get("shifts") if records and isinstance(records[0], dict) else None
    return shifts if isinstance(shifts, dict) else run["shifts"]


def run_points(run: Mapping[str, Any]) -> tuple[list[Point], bool]:
    """The points of one loaded results document (``_path`` = its run dir) and whether they are its curve: the lines of
    ``<run dir>/curves.jsonl`` when that file exists and parses, else its final point."""
    if records := curve_records(run):
        try:
            points = [_point(r["shifts"], int(r["step"])) for r in records]
        except (ValueError, KeyError, TypeError, AttributeError):
            points = []
        if points := [p for p in points if p is not None]:
            return points, True
    final = _point(run["shifts"], None)
    return ([final] if final is not None else []), False


def interpolate(xs: Sequence[float], ys: Sequence[float], level: float) -> float | None:
    """``y`` at ``x = level``, linear between the nearest observed ``x`` on either side (points at one ``x`` are
    averaged); None outside ``[min xs, max xs]``: never extrapolated."""
    if not len(xs):
        return None
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    ux, inverse = np.unique(x, return_inverse=True)
    uy = np.bincount(inverse, weights=y) / np.bincount(inverse)
    if level < ux[0] - 1e-12 or level > ux[-1] + 1e-12:
        return None
    return float(np.interp(level, ux, uy))


def common_levels(ranges: Sequence[tuple[float, float]], n_levels: int = 3) -> list[float]:
    """``n_levels`` in-domain accuracies evenly spaced over the range every method reaches (``ranges``: each method's
    ``(lowest, highest)`` in-domain accuracy over its points), ending at the highest level every method reaches;
    [] when the ranges do not overlap."""
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if low > high:
        return []
    return sorted({round(float(v), 6) for v in np.linspace(low, high, n_levels)})


def plot_matched(panels: Sequence[tuple[str, str, Mapping[str, Sequence[list[Point]]], Sequence[float], tuple[float, Mapping[str, float]] | None]],
                 path: Path) -> None:
    """One row of panels per section, one panel per shift type: x = in-domain accuracy, y = that shift's accuracy, one
    colour per method; a run's curve is a line (in step order) with its last point filled, a final-only point a dot;
    the base model is a black star, the matched levels are dotted vertical lines.

    ``panels``: ``(section title, shift, {method: [points of each run]}, levels, base)`` with ``base`` =
    ``(in-domain accuracy, {shift: accuracy})`` of the base model or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = list(dict.fromkeys(p[0] for p in panels))
    n_cols = max(sum(1 for p in panels if p[0] == t) for t in titles)
    fig, axes = plt.subplots(len(titles), n_cols, figsize=(4.6 * n_cols, 4.2 * len(titles)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(m for p in panels for m in p[2]))
    colour = {m: colours[i % len(colours)] for i, m in enumerate(methods)}
    column = {t: 0 for t in titles}
    for title, shift, by_method, levels, base in panels:
        ax = axes[titles.index(title), column[title]]
        column[title] += 1
        ax.set_visible(True)
        for method, runs in by_method.items():
            for i, points in enumerate(runs):
                points = [p for p in points if shift in p.acc]
                if not points:
                    continue
                label = method if i == 0 else None
                if len(points) > 1:
                    ax.plot([p.in_domain for p in points], [p.acc[shift] for p in points], "-o", color=colour[method],
                            alpha=0.45, markersize=3, linewidth=1, label=label)
                    label = None
                ax.plot(points[-1].in_domain, points[-1].acc[shift], "o", color=colour[method], markersize=6, label=label)
        if base is not None and shift in base[1]:
            ax.plot(base[0], base[1][shift], "*", color="black", markersize=11, label="base")
        for level in levels:
            ax.axvline(level, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("in-domain accuracy")
        ax.set_ylabel(f"{shift} accuracy")
        ax.set_title(f"{shift}\n{title}", fontsize="small")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
