"""GENIES' differential elicitation in the report (issue 12 item 5a), on synthetic results.json files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from reprpo_pl.eval.elicitation import elicitation_pairs
from reprpo_pl.report import ELICITATION, report
from test_report import write


def doc(method: str, seed: int, dataset: str, rows: list[tuple[str, str, float, float]], benchmark: str | None = None,
        log_ppl: float = 0.1) -> dict:
    """A results.json of ``rows`` = (target, shift, acc, acc_base); ``benchmark`` = its genies_benchmark benchmark.run."""
    targets = [{"target": t, "shift": s, "n": 24, "acc": a, "acc_base": b, "acc_delta": a - b, "log_ppl_chosen_delta": log_ppl}
               for t, s, a, b in rows]
    shifts = {s: {key: float(np.mean([t[key] for t in targets if t["shift"] == s])) for key in ("acc", "acc_base")}
              for s in dict.fromkeys(t["shift"] for t in targets)}
    config = {"seed": seed, "method": {"name": method}, **({"benchmark": {"run": benchmark}} if benchmark else {})}
    return {"label": method, "method": method, "model": "tiny_random", "dataset": dataset, "seed": seed, "n_train": 8,
            "objective": 1.0, "targets": targets, "shifts": shifts, "config": config}


def genies_row(md: str, pair: str, label: str) -> list[str]:
    line = next(line for line in md.split(f"## {ELICITATION}")[1].splitlines() if line.startswith(f"| {pair} | ") and f"| {label} |" in line)
    return [c.strip() for c in line.strip("|").split("|")]


def test_genies_table_from_benchmark_and_ordinary_runs(tmp_path: Path, capsys):
    runs = [
        # experiment=genies_benchmark: a pair and its target-tuned run, two seeds each
        doc("dpo", 1, "code_easy", [("code_easy", "in_domain", 0.9, 0.5), ("code_hard", "difficulty", 0.7, 0.5)], "code_easy__code_hard"),
        doc("dpo", 2, "code_easy", [("code_easy", "in_domain", 0.9, 0.5), ("code_hard", "difficulty", 0.6, 0.5)], "code_easy__code_hard"),
        doc("dpo", 1, "code_hard", [("code_hard", "in_domain", 0.8, 0.5)], "target_tuned__code_hard"),
        doc("dpo", 2, "code_hard", [("code_hard", "in_domain", 0.9, 0.5)], "target_tuned__code_hard"),
        # alpaca_long's reference run trains on alpaca_mmlu and is scored on alpaca_long: no generalisation pair of its own
        doc("dpo", 1, "alpaca_short", [("alpaca_short", "in_domain", 0.9, 0.5), ("alpaca_long", "safety", 0.55, 0.4)],
            "alpaca_short__alpaca_long", log_ppl=2.5),
        doc("dpo", 1, "alpaca_mmlu", [("alpaca_mmlu", "in_domain", 0.9, 0.5), ("alpaca_long", "safety", 0.6, 0.4)],
            "target_tuned__alpaca_long"),
        # ordinary runs: one trained on math, one on change_my_view (math's target); innerdpo has no target-tuned run
        doc("dpo", 1, "math", [("math", "in_domain", 0.8, 0.5), ("change_my_view", "cross_domain", 0.65, 0.5)]),
        doc("dpo", 1, "change_my_view", [("change_my_view", "in_domain", 0.75, 0.5), ("math", "cross_domain", 0.6, 0.5)]),
        doc("innerdpo", 1, "math", [("math", "in_domain", 0.8, 0.5), ("change_my_view", "cross_domain", 0.7, 0.5)]),
    ]
    for job, run in enumerate(runs):
        write(tmp_path / str(job), run)
    md = report([tmp_path]).read_text()
    de = [(0.7 - 0.5) / 0.85, (0.6 - 0.5) / 0.85]
    half = stats.t.ppf(0.975, 1) * np.std(de, ddof=1) / np.sqrt(2)
    t_half = stats.t.ppf(0.975, 1) * np.std([0.8, 0.9], ddof=1) / np.sqrt(2)
    assert genies_row(md, "code_easy → code_hard", "dpo") == [
        "code_easy → code_hard", "difficulty", "dpo", "0.500 ± 0.000 (n=2)", f"0.650 ± {half * 0.85:.3f} (n=2)",
        f"0.850 ± {t_half:.3f} (n=2)", f"{np.mean(de):.3f} ± {half:.3f} (n=2)", "0.100 ± 0.000 (n=2)"]
    long = genies_row(md, "alpaca_short → alpaca_long", "dpo")
    assert long[3:7] == ["0.400 (n=1)", "0.550 (n=1)", "0.600 (n=1)", "0.250 (n=1)"] and long[7].endswith("likely incoherent")
    assert "alpaca_mmlu → alpaca_long" not in md  # the reference run is not a generalisation run
    assert genies_row(md, "math → change_my_view", "dpo")[4:7] == ["0.650 (n=1)", "0.750 (n=1)", "0.200 (n=1)"]
    assert genies_row(md, "change_my_view → math", "dpo")[4:7] == ["0.600 (n=1)", "0.800 (n=1)", "0.125 (n=1)"]
    assert "| innerdpo |" not in md.split(f"## {ELICITATION}")[1].split("Mean differential")[0]
    assert "source → target pairs have no target-tuned run among the inputs, e.g. math → change_my_view (innerdpo)" in md
    pair_means = [np.mean(de), 0.25, 0.2, 0.125]
    mean_half = stats.t.ppf(0.975, 3) * np.std(pair_means, ddof=1) / 2
    assert f"| dpo | {np.mean(pair_means):.3f} ± {mean_half:.3f} (n=4) |" in md
    assert ELICITATION in capsys.readouterr().out


def test_no_target_tuned_run_no_table(tmp_path: Path):
    write(tmp_path / "0", doc("dpo", 1, "math", [("math", "in_domain", 0.8, 0.5), ("change_my_view", "cross_domain", 0.65, 0.5)]))
    assert ELICITATION not in report([tmp_path]).read_text()


def test_target_tuned_runs_match_model_and_adapter():
    runs = [doc("dpo", 1, "math", [("change_my_view", "cross_domain", 0.65, 0.5)]),
            doc("innerdpo", 1, "change_my_view", [("change_my_view", "in_domain", 0.75, 0.5)])]
    found, missing = elicitation_pairs(runs, lambda r: r["label"])
    assert not found and [(p.label, p.source, p.target) for p in missing] == [("dpo", "math", "change_my_view")]
    pair = elicitation_pairs([*runs, doc("dpo", 2, "change_my_view", [("change_my_view", "in_domain", 0.5, 0.5)])],
                             lambda r: r["label"])[0][0]
    assert pair.target_tuned == [0.5] and pair.differential_elicitation == [pytest.approx(0.3)]
