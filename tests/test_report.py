"""`python -m reprpo_pl.report` on synthetic results.json files: discovery, grouping, mean ± Student-t CI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from reprpo_pl.errors import UserError
from reprpo_pl.eval.results import INCOHERENT
from reprpo_pl.report import find_results, main, mean_ci, report

TARGETS = [("math", "in_domain"), ("change_my_view", "cross_domain"), ("math_fiction", "cross_domain"),
           ("us_history_textbook", "orthogonal")]


def fake_results(method: str, seed: int, accs: dict[str, float], acc_base: float = 0.5, lr: float = 1e-4,
                 transform: str | None = None, loss: str | None = None) -> dict:
    targets = [{"target": t, "shift": s, "n": 24, "acc_base": acc_base, "acc": accs[t],
                "acc_gain_vs_ref": accs[t] / acc_base, "perplexity_reduction_vs_ref": 1.0,
                "preference_logp_gain_vs_ref": 0.0, "log_ppl_chosen_delta": 0.0} for t, s in TARGETS]
    shifts = {}
    for shift in ("in_domain", "cross_domain", "orthogonal"):
        rows = [t for t in targets if t["shift"] == shift]
        shifts[shift] = {"n_targets": len(rows), "n": 24 * len(rows),
                         **{k: float(np.mean([r[k] for r in rows])) for k in ("acc_base", "acc", "acc_gain_vs_ref")}}
    objective = float(np.mean([shifts[s]["acc_gain_vs_ref"] for s in ("cross_domain", "orthogonal")]))
    label = "/".join([method, *([transform] if transform else []), *([loss] if loss and loss != method else [])])
    return {"label": label, "method": method, "transform": transform, "loss": loss, "model": "tiny_random", "dataset": "math",
            "seed": seed, "n_train": 8, "global_step": 2, "objective": objective, "targets": targets, "shifts": shifts,
            "timing": {"train_s": 100.0 + seed, "eval_s": 50.0},
            "config": {"seed": seed, "method": {"name": method, "lr": lr}}}


def write(run_dir: Path, doc: dict, hydra: bool = True) -> None:
    run_dir.mkdir(parents=True)
    if hydra:
        (run_dir / ".hydra").mkdir()
    (run_dir / "results.json").write_text(json.dumps(doc))


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, dict]:
    """multirun/<date>/<time>/{0..5}: dpo and innerdpo × seeds 1-3, one failed job, one eval re-run."""
    rng = np.random.default_rng(0)
    root = tmp_path / "multirun" / "2026-01-01" / "10-00-00"
    values: dict = {}
    job = 0
    for method, transform, loss in (("dpo", None, None), ("innerdpo", "ether", "innerdpo")):
        for seed in (1, 2, 3):
            accs = {t: float(rng.uniform(0.3, 0.9)) for t, _ in TARGETS}
            values.setdefault(method, []).append(accs)
            write(root / str(job), fake_results(method, seed, accs, transform=transform, loss=loss))
            job += 1
    failed = root / str(job)  # a job that died before writing results
    (failed / ".hydra").mkdir(parents=True)
    (failed / "train.log").write_text("boom")
    # a re-evaluation inside a run dir must not count as another seed
    write(root / "0" / "eval" / "2026-01-02_00-00-00", fake_results("dpo", 1, {t: 0.0 for t, _ in TARGETS}))
    (root / "multirun.yaml").write_text("{}")
    return root, values


def expected_cell(samples: list[float]) -> str:
    mean = np.mean(samples)
    low, high = stats.t.interval(0.95, len(samples) - 1, loc=mean, scale=stats.sem(samples))
    return f"{mean:.3f} ± {(high - low) / 2:.3f} (n={len(samples)})"


def test_mean_ci_matches_scipy():
    x = [0.61, 0.55, 0.72, 0.58]
    mean, half, n = mean_ci(x)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(x), scale=stats.sem(x))
    assert n == 4 and mean == pytest.approx(np.mean(x)) and half == pytest.approx((high - low) / 2)
    assert mean_ci(x, 0.9)[1] == pytest.approx(stats.t.ppf(0.95, 3) * np.std(x, ddof=1) / 2)
    assert mean_ci([0.4])[0] == 0.4 and math.isnan(mean_ci([0.4])[1])
    assert mean_ci([])[2] == 0 and mean_ci([0.5, None, float("nan")])[2] == 1


def test_find_results_skips_dirs_without_results(sweep):
    root, _ = sweep
    files, skipped = find_results([root])
    assert sorted(int(f.parent.name) for f in files) == [0, 1, 2, 3, 4, 5]  # not 0/eval/…
    assert skipped == [root / "6"]


def test_report_tables_and_ci(sweep, capsys):
    root, values = sweep
    path = report([root])
    assert path == root / "report.md"
    md = path.read_text()
    out = capsys.readouterr().out
    assert "found 6 runs in 2 groups; skipped 1 run dirs without results.json" in out
    assert "1 run dirs without results.json skipped" in md
    for method, label in (("dpo", "dpo"), ("innerdpo", "innerdpo/ether")):
        runs = values[method]
        cross = [np.mean([r["change_my_view"], r["math_fiction"]]) for r in runs]
        ortho = [r["us_history_textbook"] for r in runs]
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} | ") and "in_domain" not in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells == [label, expected_cell([r["math"] for r in runs]), expected_cell(cross), expected_cell(ortho)]
        assert row in out  # the per-shift table is printed too
        objective = [np.mean([c / 0.5, o / 0.5]) for c, o in zip(cross, ortho)]
        train_s = [101.0, 102.0, 103.0]  # fake_results: 100 + seed
        half = stats.t.ppf(0.975, 2) * np.std(train_s, ddof=1) / np.sqrt(3)
        assert f"| {label} | {expected_cell(objective)} | {np.mean(train_s):.0f} ± {half:.0f} | 50 ± 0 | 1, 2, 3 |" in md
        per_target = next(line for line in md.splitlines() if line.startswith("| math_fiction | cross_domain |"))
        assert expected_cell([r["math_fiction"] for r in runs]) in per_target
    assert "| base | 0.500 ± 0.000 (n=6) |" in md
    header = next(line for line in md.splitlines() if line.startswith("| adapter | in_domain"))
    assert header == "| adapter | in_domain | cross_domain | orthogonal |"  # SHIFT_ORDER, only shifts present
    png = root / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_report_cli_out_and_several_inputs(sweep, tmp_path):
    root, _ = sweep
    single = tmp_path / "outputs" / "one"
    other = fake_results("dpo", 7, {t: 0.5 for t, _ in TARGETS})
    other["config"]["method"]["beta"] = 0.5
    write(single, other, hydra=False)
    main([str(root / "0"), str(root / "1"), str(single), "--out", str(tmp_path / "rep"), "--metric", "acc_gain_vs_ref"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "### acc_gain_vs_ref per shift type" in md
    assert "| base |" not in md  # only acc has a base counterpart
    assert "(n=3)" in md
    # the third run has another beta: the report says the pooled configs differ
    assert "- dpo: method.beta" in md


def test_report_nothing_found(tmp_path, capsys):
    (tmp_path / "job" / ".hydra").mkdir(parents=True)
    with pytest.raises(UserError, match="no results.json found.*skipped 1 run dirs"):
        report([tmp_path])
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_results_missing_required_keys_is_one_line(tmp_path, capsys):
    """A results.json without the keys the tables read (label, targets, shifts) is not averaged as a gap:
    `python -m reprpo_pl.report` stops with one line naming the file and the keys (exit 2)."""
    doc = fake_results("dpo", 1, {t: 0.6 for t, _ in TARGETS})
    write(tmp_path / "0", doc)
    write(tmp_path / "1", {k: v for k, v in doc.items() if k not in ("shifts", "targets")})
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(r"^error: .*/1/results\.json lacks required key\(s\) targets, shifts .*not a reprpo_pl results\.json", err[0]), err
    assert not (tmp_path / "report.md").exists()
    bad_target = {**doc, "targets": [{"acc": 0.5}]}
    (tmp_path / "1" / "results.json").write_text(json.dumps(bad_target))
    with pytest.raises(UserError, match=r"1/results\.json lacks required key\(s\) targets\[0\]"):
        report([tmp_path])


def test_unreadable_results_are_a_reported_skip(tmp_path, capsys):
    """A results.json that is not JSON (or not an object) is skipped, and the report says which."""
    write(tmp_path / "0", fake_results("dpo", 1, {t: 0.6 for t, _ in TARGETS}))
    write(tmp_path / "1", {})
    (tmp_path / "1" / "results.json").write_bytes(b"\xff\xfe not json")
    write(tmp_path / "2", {})
    (tmp_path / "2" / "results.json").write_text("[1, 2]")
    report([tmp_path])
    out = capsys.readouterr().out
    assert "2 unreadable results.json" in out and "1/results.json" in out and "2/results.json" in out


def test_a_reevaluation_is_kept_apart_from_its_training_run(tmp_path):
    """`python -m reprpo_pl.eval` results (they name their checkpoint) get their own row, and one scored on
    another source's table its own section, instead of being pooled with the training runs as seeds."""
    accs = {t: 0.75 for t, _ in TARGETS}
    write(tmp_path / "0", fake_results("dpo", 1, accs))
    write(tmp_path / "1", fake_results("dpo", 2, accs))
    again = fake_results("dpo", 1, {t: 0.25 for t, _ in TARGETS}) | {"checkpoint": str(tmp_path / "0" / "last.ckpt"),
                                                                       "evaluated_on": "math"}
    write(tmp_path / "0-eval", again, hydra=False)
    elsewhere = fake_results("dpo", 1, {t: 0.5 for t, _ in TARGETS}) | {"checkpoint": "x.ckpt", "evaluated_on": "cooking"}
    write(tmp_path / "0-cooking", elsewhere, hydra=False)
    report([tmp_path], out=tmp_path / "out", metric="acc")
    text = (tmp_path / "out" / "report.md").read_text()
    math_section, cooking_section = text.split("## tiny_random, trained on math")[1:]
    assert "| dpo " in math_section and "0.750 ± 0.000 (n=2)" in math_section
    assert "| dpo (re-evaluated) " in math_section and "0.250 (n=1)" in math_section
    assert cooking_section.startswith(", evaluated on cooking's shift table") and "0.500 (n=1)" in cooking_section


def test_report_shows_coherence_beside_accuracy_and_marks_incoherent_cells(tmp_path):
    """A group whose mean chosen log-perplexity change on a shift exceeds eval.coherence_limit gets its cells marked."""
    from reprpo_pl.eval.results import INCOHERENT

    for job, (method, delta) in enumerate((("dpo", 3.0), ("dpo", 2.5), ("innerdpo", 0.5))):
        doc = fake_results(method, job, {t: 0.6 for t, _ in TARGETS})
        for t in doc["targets"]:
            t["log_ppl_chosen_delta"] = delta if t["shift"] == "cross_domain" else 0.0
        for shift, summary in doc["shifts"].items():
            summary["log_ppl_chosen_delta"] = delta if shift == "cross_domain" else 0.0
        write(tmp_path / str(job), doc)
    md = report([tmp_path]).read_text()
    assert "### log_ppl_chosen_delta per shift type" in md
    lines = md.splitlines()
    dpo = [line for line in lines if line.startswith("| dpo | ")]
    assert dpo[0].split(" | ")[2].endswith(INCOHERENT) and INCOHERENT not in dpo[0].split(" | ")[1]  # acc: cross_domain only
    assert "| dpo | 0.000 ± 0.000 (n=2) | 2.750 ± " in md  # the coherence table: in_domain, then cross_domain's mean 2.75
    assert not any(INCOHERENT in line for line in lines if line.startswith("| innerdpo | "))
    per_target = next(line for line in lines if line.startswith("| change_my_view | cross_domain |"))
    assert per_target.count(INCOHERENT) == 1  # dpo's cell, not base's or innerdpo's


def test_paired_bootstrap_interval():
    from reprpo_pl.report import paired_bootstrap

    assert paired_bootstrap([np.ones(30)]) == (1.0, 1.0, 1.0, 30)  # every pair flipped to correct: no spread
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], size=2000, p=[0.2, 0.5, 0.3])
    estimate, low, high, n = paired_bootstrap([d])
    half = stats.norm.ppf(0.975) * d.std(ddof=1) / np.sqrt(len(d))  # the normal approximation at this n
    assert n == 2000 and estimate == pytest.approx(d.mean()) and (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert paired_bootstrap([d]) == (estimate, low, high, n)  # a fixed seed: the report is reproducible
    assert paired_bootstrap([d, np.ones(10)])[0] == pytest.approx((d.mean() + 1) / 2)  # mean over run × target


def test_report_bootstraps_every_group_with_per_row_files(sweep):
    """A group with eval/<target>.jsonl files gets paired bootstrap CIs of acc_delta; groups without them get no row."""
    import torch

    from reprpo_pl.eval.results import per_row_records, write_per_row
    from reprpo_pl.eval.scorer import RowScores

    root, _ = sweep
    single = root / "solo"
    doc = fake_results("projgrad", 1, {t: 0.5 for t, _ in TARGETS})
    write(single, doc)
    ones = torch.ones(4)
    base = RowScores(torch.tensor([-1.0, -3.0, -3.0, -3.0]), torch.full((4,), -2.0), ones, ones)  # 1 of 4 correct
    adapter = RowScores(torch.tensor([-1.0, -1.0, -1.0, -3.0]), torch.full((4,), -2.0), ones, ones)  # 3 of 4
    write_per_row(single, {t: per_row_records([f"{t}/test/{i}" for i in range(4)], base, adapter) for t, _ in TARGETS})
    md = report([root]).read_text()
    table = md.split("### acc_delta per shift type: paired bootstrap 95% CI over pairs")[1].split("###")[0]
    row = next(line for line in table.splitlines() if line.startswith("| projgrad | "))
    assert row.startswith("| projgrad | 0.500 [") and "(n=8 pairs)" in row  # cross_domain: two targets of 4 pairs
    assert "| dpo |" not in table and "| innerdpo/ether |" not in table  # the sweep's runs wrote no per-row files


def test_the_bootstrap_resamples_a_pair_with_all_its_seeds(tmp_path):
    """Seeds scored the same pairs: each pair's difference is averaged over seeds before the pairs are resampled, so
    three seeds that agree give the one seed's interval (resampled apart, they would narrow it by √3), and seeds
    that disagree on a pair count it by their mean."""
    import torch

    from reprpo_pl.eval.results import per_row_records, write_per_row
    from reprpo_pl.eval.scorer import RowScores
    from reprpo_pl.report import Section, load_runs, pair_differences, seed_mean_differences, sections_of

    def run(name: str, seed: int, adapter_cho: list[float]) -> None:
        n = len(adapter_cho)
        ones = torch.ones(n)
        base = RowScores(torch.full((n,), -3.0), torch.full((n,), -2.0), ones, ones)  # every pair wrong
        adapter = RowScores(torch.tensor(adapter_cho), torch.full((n,), -2.0), ones, ones)  # right where -1
        write(tmp_path / name / str(seed), fake_results("dpo", seed, {t: 0.5 for t, _ in TARGETS}))
        write_per_row(tmp_path / name / str(seed),
                      {t: per_row_records([f"{t}/test/{i}" for i in range(n)], base, adapter) for t, _ in TARGETS})

    flips = [-1.0 if i % 3 == 0 else -3.0 for i in range(30)]  # 10 of 30 pairs flipped to correct
    run("one", 1, flips)
    for seed in (1, 2, 3):
        run("three", seed, flips)

    def interval(name: str) -> tuple:
        runs, _ = load_runs(find_results([tmp_path / name])[0])
        section: Section = sections_of(runs)[0]
        return section.bootstrap_stats(0.95)["dpo"]["in_domain"]

    assert interval("one") == interval("three") and interval("one")[2] - interval("one")[1] > 0.2
    a, b = ({("math", "test", i): v for i, v in enumerate(d)} for d in ([1.0, 0.0, 1.0], [0.0, 0.0, 1.0]))
    assert seed_mean_differences([a, b]).tolist() == [0.5, 0.0, 1.0]
    assert seed_mean_differences([a, {**b, ("math", "test", 9): 1.0}]) is None  # different pairs: not pooled
    assert seed_mean_differences([a, None]) is None
    assert pair_differences(tmp_path / "missing.jsonl") is None


def test_each_method_is_bootstrapped_against_dpo_pair_by_pair(tmp_path):
    """The acc − dpo's acc table: each pair's correctness minus dpo's on the same pair, resampled by pair; a cell is
    marked when dpo is beyond the coherence limit there; a target scored on other pairs than dpo's gets no interval."""
    import torch

    from reprpo_pl.eval.results import per_row_records, write_per_row
    from reprpo_pl.eval.scorer import RowScores

    def run(method: str, correct: list[bool], names: list[str] | None = None, log_ppl: float = 0.0) -> None:
        n = len(correct)
        ones = torch.ones(n)
        base = RowScores(torch.full((n,), -3.0), torch.full((n,), -2.0), ones, ones)  # every pair wrong
        adapter = RowScores(torch.tensor([-1.0 if c else -3.0 for c in correct]), torch.full((n,), -2.0), ones, ones)
        doc = fake_results(method, 1, {t: 0.5 for t, _ in TARGETS})
        doc["shifts"]["in_domain"]["log_ppl_chosen_delta"] = log_ppl
        write(tmp_path / method, doc)
        rows = {t: per_row_records([f"{t}/test/{i}" for i in range(n)], base, adapter) for t, _ in TARGETS}
        if names:
            rows["us_history_textbook"] = per_row_records(names, base, adapter)
        write_per_row(tmp_path / method, rows)

    dpo = [i % 2 == 0 for i in range(20)]  # 10 of 20 right
    run("dpo", dpo, log_ppl=3.0)
    run("innerdpo", [True] * 20)  # right on the 10 dpo gets wrong too: +0.5
    run("projgrad", dpo, names=[f"us_history_textbook/test/{i + 1}" for i in range(20)])  # other orthogonal pairs
    md = report([tmp_path]).read_text()
    table = md.split("### acc − dpo's acc per shift type: paired bootstrap 95% CI over pairs")[1].split("###")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line and "adapter" not in line}
    assert set(rows) == {"innerdpo", "projgrad"}  # dpo is the reference, not a row
    in_domain, cross, orthogonal = rows["innerdpo"]
    assert in_domain.startswith("0.500 [") and in_domain.endswith(INCOHERENT)  # dpo's in-domain side is incoherent
    low, high = (float(v) for v in in_domain.split("[")[1].split("]")[0].split(","))
    assert 0.2 <= low < 0.5 < high <= 0.8  # half the pairs differ by 1: a binomial spread, not a point
    assert cross.startswith("0.500 [") and cross.endswith("(n=40 pairs)")  # two targets, pooled; dpo coherent there
    assert rows["projgrad"][0].startswith("0.000 [0.000, 0.000]") and rows["projgrad"][2] == "–"


def test_runs_of_one_method_at_several_learning_rates_get_a_row_each(tmp_path):
    """An lr sweep (the study's lr selection) is not pooled as seeds: each lr is its own row; one lr keeps the plain label."""
    for job, (lr, acc) in enumerate(((3e-5, 0.5), (1e-4, 0.75), (1e-4, 0.75), (3e-4, 1.0))):
        write(tmp_path / "grid" / str(job), fake_results("dpo", job, {t: acc for t, _ in TARGETS}, lr=lr))
    write(tmp_path / "single" / "0", fake_results("innerdpo", 1, {t: 0.6 for t, _ in TARGETS}, lr=3e-4))
    md = report([tmp_path]).read_text()
    assert "| dpo lr=3e-05 | 0.500 (n=1)" in md and "| dpo lr=0.0001 | 0.750 ± 0.000 (n=2)" in md
    assert "| dpo lr=0.0003 | 1.000 (n=1)" in md and "| innerdpo | 0.600 (n=1)" in md
    assert "Pooled runs whose configs differ" not in md


def with_validation(doc: dict, acc: float, log_ppl: float, train_log_ppl: float = 0.0) -> dict:
    """``doc`` with a validation row (accuracy ``acc``) and the chosen log-perplexity changes of its own rows."""
    doc["targets"].insert(0, {"target": "math@val", "shift": "validation", "n": 90, "acc_base": 0.5, "acc": acc,
                              "acc_gain_vs_ref": acc / 0.5, "log_ppl_chosen_delta": log_ppl})
    doc["shifts"] = {"train": {"n": 100, "acc": 1.0, "log_ppl_chosen_delta": train_log_ppl},
                     "validation": {"n": 90, "acc_base": 0.5, "acc": acc, "acc_gain_vs_ref": acc / 0.5,
                                    "log_ppl_chosen_delta": log_ppl}, **doc["shifts"]}
    return doc


def test_the_learning_rate_is_picked_on_validation_among_coherent_lrs(tmp_path):
    """Highest validation accuracy among the lrs that stay coherent on the train and validation rows; the test targets'
    accuracy never enters (dpo at 3e-4 is best in-domain and on every test target, but incoherent)."""
    from reprpo_pl.eval.lr_choice import candidates, pick
    from reprpo_pl.report import learning_rate

    grid = {("dpo", 3e-5): (0.60, 0.1, 0.0, 0.6), ("dpo", 1e-4): (0.70, 0.5, 1.9, 0.7), ("dpo", 3e-4): (0.90, 0.9, 5.0, 0.99),
            ("innerdpo", 3e-5): (0.65, 0.2, 0.1, 0.6), ("innerdpo", 1e-4): (0.65, 0.1, 0.0, 0.6),
            ("innerdpo", 3e-4): (0.40, 2.5, 0.5, 0.9)}
    docs = {}
    for job, ((method, lr), (val, log_ppl, train_log_ppl, test_acc)) in enumerate(grid.items()):
        docs[method, lr] = with_validation(fake_results(method, 1, {t: test_acc for t, _ in TARGETS}, lr=lr), val, log_ppl,
                                           train_log_ppl)
        write(tmp_path / str(job), docs[method, lr])
    dpo = candidates([d for (m, _), d in docs.items() if m == "dpo"], learning_rate, 2.0)
    assert [c.coherent for c in dpo] == [True, True, False] and pick(dpo).lr == 1e-4
    innerdpo = candidates([d for (m, _), d in docs.items() if m == "innerdpo"], learning_rate, 2.0)
    assert pick(innerdpo).lr == 1e-4  # a tie on accuracy: the smaller worst log-perplexity change
    md = report([tmp_path]).read_text()
    assert "### Learning rate picked on the validation slice" in md
    assert "| dpo | 0.0001 | 0.700 (n=90, 1 run) | train +1.90, validation +0.50 | yes | **picked** |" in md
    assert "| dpo | 0.0003 | 0.900 (n=90, 1 run) | train +5.00, validation +0.90 | ⚠ likely incoherent |  |" in md
    # the validation row is a column of the shift tables, not part of the default objective
    assert "| adapter | train | validation | in_domain |" in md


def test_the_study_lr_table_is_not_a_config_difference(tmp_path):
    """The study's seeds 2-3 ran with the picked `study.lr` table and its seed-1 runs with the lr selection's: the
    same method.lr, so they pool without a note; a difference outside the table is still named."""
    for seed, table in ((1, {"dpo": 1e-4, "innerdpo": 3e-4}), (2, {"dpo": 1e-4, "innerdpo": 1e-4})):
        doc = fake_results("dpo", seed, {t: 0.6 for t, _ in TARGETS})
        doc["config"]["study"] = {"lr": table}
        write(tmp_path / "grid" / str(seed), doc)
    assert "Pooled runs whose configs differ" not in report([tmp_path]).read_text()
    doc = fake_results("dpo", 3, {t: 0.6 for t, _ in TARGETS})
    doc["config"]["method"]["beta"] = 0.2
    write(tmp_path / "grid" / "3", doc)
    md = report([tmp_path]).read_text()
    assert "- dpo: method.beta" in md and "study.lr" not in md
