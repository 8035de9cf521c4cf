"""The learning rate picked per method from the study's lr selection (issue 15), as Hydra overrides.

    python scripts/study_pick_lr.py study/math      # → study.lr.dpo=0.0001 study.lr.projgrad=3e-05 ...
    python scripts/study_pick_lr.py study/math --set-aside study/lr_selection

The rule is `reprpo_pl.eval.lr_choice` (the report's "Learning rate picked on the validation slice" table): the
highest validation accuracy among the lrs whose chosen log-perplexity change on the train and validation rows stays
within eval.coherence_limit. Exits 2 naming the method when a method has fewer than its 3 lrs finished, or none
coherent. Paste the result into conf/experiment/_study.yaml's study.lr, or pass it to the grids' commands.

``--set-aside DIR`` (once every method is picked) moves the jobs at the lrs not picked out of the grid's folder into
DIR, so that the folder holds the grid alone (the report then pools no other lr into a method's seeds) and
``python -m reprpo_pl.report DIR <grid>/*_s1`` still shows the whole selection.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from reprpo_pl.eval.lr_choice import candidates, pick
from reprpo_pl.eval.results import coherence_limit_of
from reprpo_pl.report import find_results, learning_rate, load_runs

LRS = 3  # {3e-5, 1e-4, 3e-4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", default="study/math", help="the lr selection's sweep dir")
    parser.add_argument("--set-aside", type=Path, help="move the jobs at the lrs not picked here")
    args = parser.parse_args(argv)
    runs, _ = load_runs(find_results([args.grid])[0])
    by_method = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    picked, problems = {}, []
    for method, group in by_method.items():
        options = candidates(group, learning_rate, min(coherence_limit_of(r) for r in group))
        chosen = pick(options)
        if len(options) < LRS or chosen is None:
            problems.append(f"{method}: {len(options)} of {LRS} lrs finished, "
                            f"{'none' if chosen is None else 'one'} coherent so far")
        else:
            picked[method] = chosen.lr
    print(" ".join(f"study.lr.{method}={lr:g}" for method, lr in picked.items()))
    if problems:
        print("not ready: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.set_aside:
        args.set_aside.mkdir(parents=True, exist_ok=True)
        for run in runs:
            if learning_rate(run) != picked[run["method"]]:
                job = Path(run["_path"])
                shutil.move(job, args.set_aside / job.name)
                print(f"set aside: {job.name} → {args.set_aside}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
