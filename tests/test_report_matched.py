"""The report's comparison at matched in-domain accuracy (issue 12 item 6) on synthetic results.json and curves.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from reprpo_pl.eval.matched import common_levels, interpolate
from reprpo_pl.eval.results import INCOHERENT
from reprpo_pl.report import MATCHED, report
from test_report import TARGETS, fake_results, write


def test_interpolate_between_neighbours_never_beyond():
    xs, ys = [0.5, 0.9, 0.7, 0.7], [0.4, 0.2, 0.7, 0.9]  # unsorted; two points at 0.7 averaged to 0.8
    assert interpolate(xs, ys, 0.6) == pytest.approx(0.6)  # halfway from (0.5, 0.4) to (0.7, 0.8)
    assert interpolate(xs, ys, 0.85) == pytest.approx(0.35)  # a quarter from (0.9, 0.2) back to (0.7, 0.8)
    assert interpolate(xs, ys, 0.5) == pytest.approx(0.4) and interpolate(xs, ys, 0.9) == pytest.approx(0.2)
    assert interpolate(xs, ys, 0.49) is None and interpolate(xs, ys, 0.91) is None and interpolate([], [], 0.5) is None


def test_common_levels_end_at_the_highest_level_all_reach():
    assert common_levels([(0.5, 0.8), (0.6, 0.9)]) == [0.6, 0.7, 0.8]
    assert common_levels([(0.5, 0.6), (0.7, 0.9)]) == []
    assert common_levels([(0.7, 0.7), (0.6, 0.9)]) == [0.7]


def write_curve(run_dir: Path, points: list[tuple[float, float]], coherence: float = 0.1) -> None:
    """curves.jsonl of (in-domain acc, cross_domain acc) points at steps 1, 2, …"""
    lines = [json.dumps({"step": i + 1, "epoch": 0, "n_samples_during": 8, "targets": [],
                         "shifts": {"in_domain": {"acc": x, "acc_base": 0.5, "log_ppl_chosen_delta": 0.0},
                                    "cross_domain": {"acc": y, "acc_base": 0.5, "log_ppl_chosen_delta": coherence}}})
             for i, (x, y) in enumerate(points)]
    (run_dir / "curves.jsonl").write_text("\n".join(lines) + "\n")


CURVES = {  # (method, seed): (in-domain, cross_domain) accuracy points
    ("dpo", 1): [(0.5, 0.5), (0.7, 0.6), (0.9, 0.62)],
    ("dpo", 2): [(0.55, 0.5), (0.75, 0.7), (0.85, 0.72)],
    ("innerdpo", 1): [(0.6, 0.6), (0.8, 0.8)],
    ("innerdpo", 2): [(0.6, 0.62), (0.8, 0.78)],
}


def matched_rows(md: str) -> dict[tuple[str, str], list[str]]:
    table = md.split(f"### {MATCHED}")[1].split("###")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| 0.")]
    return {(r[0], r[1]): r[2:] for r in rows}


def test_matched_table_interpolates_each_seed_and_writes_the_plot(tmp_path: Path, capsys):
    for job, ((method, seed), points) in enumerate(CURVES.items()):
        run_dir = tmp_path / str(job)
        write(run_dir, fake_results(method, seed, {t: 0.6 for t, _ in TARGETS}))
        write_curve(run_dir, points, coherence=3.0 if method == "dpo" else 0.1)
    md = report([tmp_path]).read_text()
    rows = matched_rows(md)
    assert sorted({level for level, _ in rows}) == ["0.600", "0.700", "0.800"]  # dpo 0.5–0.9, innerdpo 0.6–0.8
    # at 0.8: dpo seed 1 between (0.7, 0.6) and (0.9, 0.62) → 0.61; seed 2 between (0.75, 0.7) and (0.85, 0.72) → 0.71
    half = stats.t.ppf(0.975, 1) * np.std([0.61, 0.71], ddof=1) / np.sqrt(2)
    seeds, cross, *rest = rows[("0.800", "dpo")]
    assert seeds == "2, 6" and not rest  # the curves hold no orthogonal accuracy: no column
    assert cross == f"0.660 ± {half:.3f} (n=2); Δlog-ppl +3.00 {INCOHERENT}"  # coherence beside accuracy, marked
    assert rows[("0.800", "innerdpo")][1] == f"0.790 ± {stats.t.ppf(0.975, 1) * np.std([0.8, 0.78], ddof=1) / np.sqrt(2):.3f} (n=2); Δlog-ppl +0.10"
    assert rows[("0.600", "dpo")][1].startswith("0.550 ± 0.000 (n=2)")  # seed 1: (0.5, 0.5)–(0.7, 0.6); seed 2: (0.55, 0.5)–(0.75, 0.7)
    assert "4 of 4 runs gave a step-level curve" in md and MATCHED in capsys.readouterr().out
    png = tmp_path / "matched_in_domain.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_without_curves_each_run_gives_its_final_point(tmp_path: Path):
    """A sweep over the learning rate without curves: each seed's runs give one point each; a seed whose points do
    not span a level is left out of its mean (n counts the seeds that do)."""
    finals = {("dpo", 1): [(0.6, 0.5), (0.8, 0.7)], ("dpo", 2): [(0.7, 0.6), (0.8, 0.6)], ("innerdpo", 1): [(0.6, 0.6), (0.8, 0.9)]}
    job = 0
    for (method, seed), points in finals.items():
        for lr, (x, y) in zip((1e-4, 3e-4), points):
            accs = {"math": x, "change_my_view": y, "math_fiction": y, "us_history_textbook": 0.5}
            write(tmp_path / str(job), fake_results(method, seed, accs, lr=lr))
            job += 1
    md = report([tmp_path]).read_text()
    rows = matched_rows(md)
    assert "0 of 6 runs gave a step-level curve" in md
    assert rows[("0.600", "dpo")][1] == "0.500 (n=1)"  # seed 2 starts at 0.7: no extrapolation
    assert rows[("0.700", "dpo")][1] == "0.600 ± 0.000 (n=2)" and rows[("0.700", "dpo")][0] == "2, 4"
    assert rows[("0.700", "innerdpo")][1] == "0.750 (n=1)"


def test_no_common_level_says_so(tmp_path: Path):
    write(tmp_path / "0", fake_results("dpo", 1, {t: 0.6 for t, _ in TARGETS}))
    write_curve(tmp_path / "0", [(0.5, 0.5), (0.6, 0.6)])
    write(tmp_path / "1", fake_results("innerdpo", 1, {t: 0.6 for t, _ in TARGETS}))
    write_curve(tmp_path / "1", [(0.7, 0.5), (0.8, 0.6)])
    md = report([tmp_path]).read_text()
    assert "No in-domain accuracy is reached by every adapter (ranges: dpo 0.500–0.600, innerdpo 0.700–0.800)" in md


def test_an_adapter_apart_leaves_each_matched_with_dpo_alone(tmp_path: Path):
    """One adapter below every other's range (prefvec 0.1–0.3) leaves no level common to all; the others are then
    matched with dpo on the levels each shares with it, and the one apart is named."""
    curves = {**CURVES, ("prefvec", 1): [(0.1, 0.5), (0.3, 0.6)]}
    for job, ((method, seed), points) in enumerate(curves.items()):
        write(tmp_path / str(job), fake_results(method, seed, {t: 0.6 for t, _ in TARGETS}))
        write_curve(tmp_path / str(job), points)
    md = report([tmp_path]).read_text()
    assert "No in-domain accuracy is reached by every adapter (ranges: dpo 0.500–0.900, innerdpo 0.600–0.800, " \
           "prefvec 0.100–0.300), so each adapter is matched with dpo alone, at levels the two both reach (none with prefvec)" in md
    rows = matched_rows(md)
    assert sorted(rows) == [(level, label) for level in ("0.600", "0.700", "0.800") for label in ("dpo", "innerdpo")]
    # at 0.7: dpo seed 1 at its point (0.7, 0.6), seed 2 between (0.55, 0.5) and (0.75, 0.7) → 0.65
    assert rows[("0.700", "dpo")][1].startswith(f"0.625 ± {stats.t.ppf(0.975, 1) * np.std([0.6, 0.65], ddof=1) / np.sqrt(2):.3f} (n=2)")
    assert rows[("0.700", "innerdpo")][1].startswith("0.700 ± 0.000 (n=2)")


def test_unreadable_curve_falls_back_to_the_final_point(tmp_path: Path):
    write(tmp_path / "0", fake_results("dpo", 1, {t: 0.6 for t, _ in TARGETS}))
    (tmp_path / "0" / "curves.jsonl").write_text("{not json\n")
    md = report([tmp_path]).read_text()
    assert "0 of 1 runs gave a step-level curve" in md and matched_rows(md)[("0.600", "dpo")][1] == "0.600 (n=1)"


def test_the_base_star_is_scored_on_the_rows_of_the_points(tmp_path: Path):
    """A run with a curve is plotted on its eval.n_samples_during subsets: the base model's point comes from the
    curve's acc_base, not from the final rows', else the star and the curves would be scored on different pairs."""
    from reprpo_pl.report import Matched, find_results, load_runs, sections_of

    def base(root: Path) -> tuple[float, dict[str, float]]:
        [section] = sections_of(load_runs(find_results([root])[0])[0])
        return Matched(section, 0.95).base()

    write(tmp_path / "0", fake_results("dpo", 1, {t: 0.6 for t, _ in TARGETS}))
    write_curve(tmp_path / "0", [(0.6, 0.6), (0.8, 0.7)])
    curve = tmp_path / "0" / "curves.jsonl"  # the subsets' base: 0.25, the final rows' (fake_results): 0.5
    curve.write_text(curve.read_text().replace('"acc_base": 0.5', '"acc_base": 0.25'))
    in_domain, per_shift = base(tmp_path)
    assert (in_domain, per_shift["cross_domain"]) == (0.25, 0.25)
    write(tmp_path / "1", fake_results("dpo", 2, {t: 0.6 for t, _ in TARGETS}))  # no curve: its final rows
    final = json.loads((tmp_path / "1" / "results.json").read_text())["shifts"]["in_domain"]["acc_base"]
    assert final == 0.5 and base(tmp_path)[0] == pytest.approx((0.25 + final) / 2)
