"""Write the embedded data subset (src/reprpo_pl/embedded) from the full GENIES and ETHICS data.

Contents: the default source's first train/test rows, and the leading test rows of each of its
targets (conf/dataset/<source>.yaml), in the same file formats as the full data so the same
readers read both. GENIES rows keep only ``prompt`` and ``responses``.

    python scripts/make_embedded.py [--genies-root DIR] [--ethics-root DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from reprpo_pl.data.ethics import SUBSETS, ethics_file, read_ethics_pairs
from reprpo_pl.data.genies import genies_file, read_genies_pairs
from reprpo_pl.data.sources import ETHICS_PREFIX, parse_shift_table

REPO = Path(__file__).resolve().parents[1]
SOURCE = "math"
SOURCE_ROWS = {"train": 128, "test": 64}
TARGET_ROWS = 64  # GENIES target test rows
TARGET_MIN_PAIRS = 64  # ETHICS targets: leading CSV rows until this many pairs

README = """\
# Embedded data subset

A small slice of the data so that reprpo_pl trains and evaluates with no data directory
(`data.root` / `data.ethics_root` left null). Regenerate it from the full data with

    python scripts/make_embedded.py --genies-root ../shared/data/genies --ethics-root ../shared/data/ethics

## Sources and licences
- `genies/`: GENIES — Clymer et al., "Generalization Analogies: A Testbed for Generalizing AI
  Oversight to Hard-To-Measure Domains" (2023), https://github.com/Joshuaclymer/GENIES.
  Rows keep only `prompt` and `responses`. Licence: that of the upstream repository (GENIES builds
  on public datasets such as MATH; see its `metadata.json` files for each distribution's origins).
- `ethics/`: ETHICS — Hendrycks et al., "Aligning AI With Shared Human Values" (ICLR 2021),
  https://github.com/hendrycks/ethics, MIT licence. Leading rows of the test CSVs (re-written with Python's csv module).

## Contents (source `{source}` and its targets from conf/dataset/{source}.yaml)
| file | rows | pairs |
|---|---|---|
{table}
"""


def _write_genies(root: Path, name: str, split: str, n_rows: int, out: Path) -> tuple[str, int, int]:
    rows = json.loads(genies_file(root, name, split).read_text(encoding="utf-8"))[:n_rows]
    path = out / "genies" / name / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [{"prompt": row["prompt"], "responses": row["responses"]} for row in rows]
    path.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return f"genies/{name}/{split}.json", len(kept), len(read_genies_pairs(out / "genies", name, split))


def _write_ethics(root: Path, subset: str, split: str, min_pairs: int, out: Path) -> tuple[str, int, int]:
    """The fewest leading rows of the CSV that give ``min_pairs`` pairs (or the whole file)."""
    source = ethics_file(root, subset, split)
    with source.open(newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    header, records = (records[:1], records[1:]) if SUBSETS[subset][1] else ([], records)
    path = out / "ethics" / subset / source.name
    path.parent.mkdir(parents=True, exist_ok=True)
    for n_rows in range(min(min_pairs, len(records)), len(records) + 1):
        with path.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(header + records[:n_rows])
        n_pairs = len(read_ethics_pairs(out / "ethics", subset, split))
        if n_pairs >= min_pairs:
            break
    return f"ethics/{subset}/{source.name}", n_rows, n_pairs


def make_embedded(genies_root: Path, ethics_root: Path, out: Path) -> list[tuple[str, int, int]]:
    """Rewrite ``out/genies`` and ``out/ethics`` and ``out/README.md``; returns (file, rows, pairs)."""
    targets = parse_shift_table(OmegaConf.load(REPO / "conf" / "dataset" / f"{SOURCE}.yaml"))
    for kind in ("genies", "ethics"):
        shutil.rmtree(out / kind, ignore_errors=True)
    written = [_write_genies(genies_root, SOURCE, split, n, out) for split, n in SOURCE_ROWS.items()]
    for target in targets:
        if target.name == SOURCE:
            continue
        if target.name.startswith(ETHICS_PREFIX):
            written.append(_write_ethics(ethics_root, target.name[len(ETHICS_PREFIX) :], "test", TARGET_MIN_PAIRS, out))
        else:
            written.append(_write_genies(genies_root, target.name, "test", TARGET_ROWS, out))
    table = "\n".join(f"| `{name}` | {rows} | {pairs} |" for name, rows, pairs in written)
    (out / "README.md").write_text(README.format(source=SOURCE, table=table), encoding="utf-8")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genies-root", type=Path, default=REPO.parent / "shared" / "data" / "genies")
    parser.add_argument("--ethics-root", type=Path, default=REPO.parent / "shared" / "data" / "ethics")
    parser.add_argument("--out", type=Path, default=REPO / "src" / "reprpo_pl" / "embedded")
    args = parser.parse_args()
    for name, rows, pairs in make_embedded(args.genies_root, args.ethics_root, args.out):
        print(f"{name}: {rows} rows, {pairs} pairs")


if __name__ == "__main__":
    main()
