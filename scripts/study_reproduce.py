"""Rerun one committed study job from its own Hydra overrides and compare its accuracies (issue 15's reproduction).

    python scripts/study_reproduce.py docs/study/runs/math/dpo_lr0.0001_s2 [--out study/reproduce/<job>]

Trains ``python -m reprpo_pl.train <the job's .hydra/overrides.yaml> hydra.run.dir=<out>`` (from the repo root, where
the overrides' relative data roots point; a finished ``<out>`` is compared, not retrained), then prints per target
the committed and the rerun accuracy beside the seed-to-seed spread: the range (max − min) of that target's accuracy
over the committed runs of the same method and lr in the job's folder. Exits 0 when every target's difference is
within its spread, 1 when one is not (the table says which).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def accuracies(results: dict[str, Any]) -> dict[str, float]:
    return {t["target"]: float(t["acc"]) for t in results["targets"]}


def seed_spread(job: Path, results: dict[str, Any]) -> dict[str, float]:
    """Per target, max − min accuracy over the runs in ``job``'s folder with the same method and lr (its seeds)."""
    lr = results["config"]["method"]["lr"]
    by_target: dict[str, list[float]] = {}
    for path in sorted(job.parent.glob("*/results.json")):
        other = json.loads(path.read_text())
        if other["method"] == results["method"] and other["config"]["method"]["lr"] == lr:
            for target, acc in accuracies(other).items():
                by_target.setdefault(target, []).append(acc)
    return {target: max(accs) - min(accs) for target, accs in by_target.items()}


def compare(committed: dict[str, Any], rerun: dict[str, Any], spread: dict[str, float]) -> tuple[list[str], bool]:
    """Markdown table lines (target, committed acc, rerun acc, |Δ|, spread, within) and whether every target is within."""
    lines = ["| target | committed | rerun | abs diff | seed spread | within |", "|---|---|---|---|---|---|"]
    ok = True
    rerun_acc = accuracies(rerun)
    for target, acc in accuracies(committed).items():
        if target not in rerun_acc:
            lines.append(f"| {target} | {acc:.3f} | missing | | {spread[target]:.3f} | no |")
            ok = False
            continue
        diff = abs(rerun_acc[target] - acc)
        within = diff <= spread[target] + 1e-9
        ok &= within
        lines.append(f"| {target} | {acc:.3f} | {rerun_acc[target]:.3f} | {diff:.3f} | {spread[target]:.3f} | "
                     f"{'yes' if within else 'no'} |")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="a committed job dir (results.json and .hydra/overrides.yaml)")
    parser.add_argument("--out", type=Path, help="where the rerun writes (default: study/reproduce/<job name>)")
    args = parser.parse_args(argv)
    job = args.job.resolve()
    for name in ("results.json", ".hydra/overrides.yaml"):
        if not (job / name).is_file():
            sys.exit(f"error: {job / name} not found; pass a job dir that scripts/study_sync.py copied")
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    out = (args.out or ROOT / "study" / "reproduce" / job.name).resolve()
    if not (out / "results.json").is_file():
        cmd = [sys.executable, "-m", "reprpo_pl.train", *overrides, f"hydra.run.dir={out}"]
        print("rerun:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    committed = json.loads((job / "results.json").read_text())
    lines, ok = compare(committed, json.loads((out / "results.json").read_text()), seed_spread(job, committed))
    print("\n".join(lines))
    print(f"{'reproduced' if ok else 'NOT reproduced'}: {job.name} rerun in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
