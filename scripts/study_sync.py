"""Copy the study's finished jobs into docs/study/runs (issue 15): what the report and a rerun need, none of the weights.

    python scripts/study_sync.py [study]            # study/<source>/<job>/ → docs/study/runs/<source>/<job>/

Per finished job (one with results.json): results.json, curves.jsonl, the per-pair rows eval/<target>.jsonl,
generations.md and Hydra's .hydra/{config,overrides}.yaml (the exact settings, to rerun it). Jobs still running or
killed (no results.json) are left out; a job already copied is copied again (its files are small).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

KEEP = ("results.json", "curves.jsonl", "generations.md", ".hydra/config.yaml", ".hydra/overrides.yaml")


def sync(study: Path, dest: Path) -> list[Path]:
    copied = []
    for results in sorted(study.glob("*/*/results.json")):
        job = results.parent
        out = dest / job.parent.name / job.name
        for name in KEEP:
            if (job / name).is_file():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(job / name, out / name)
        for rows in sorted((job / "eval").rglob("*.jsonl")):  # per-pair rows (ETHICS' in eval/ethics/)
            if any((job / d / "results.json").is_file() for d in rows.relative_to(job).parents if d != Path(".")):
                continue  # eval/<timestamp>/: a re-evaluation, not this run's rows
            (out / rows.relative_to(job)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(rows, out / rows.relative_to(job))
        copied.append(out)
    return copied


if __name__ == "__main__":
    study = Path(sys.argv[1] if len(sys.argv) > 1 else "study")
    done = sync(study, Path(__file__).resolve().parents[1] / "docs" / "study" / "runs")
    print(f"copied {len(done)} finished jobs: {', '.join(f'{p.parent.name}/{p.name}' for p in done)}")
