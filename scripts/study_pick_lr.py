"""The learning rate picked per method from the study's lr selection (issue 15), as Hydra overrides.

    python scripts/study_pick_lr.py study/math      # → study.lr.dpo=0.0001 study.lr.projgrad=3e-05 ...

The rule is `reprpo_pl.eval.lr_choice` (the report's "Learning rate picked on the validation slice" table): the
highest validation accuracy among the lrs whose chosen log-perplexity change on the train and validation rows stays
within eval.coherence_limit. Exits 2 naming the method when a method has fewer than its 3 lrs finished, or none
coherent. Paste the result into conf/experiment/_study.yaml's study.lr, or pass it to the grids' commands.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from reprpo_pl.eval.lr_choice import candidates, pick
from reprpo_pl.report import find_results, learning_rate, load_runs
from reprpo_pl.eval.results import coherence_limit_of

LRS = 3  # {3e-5, 1e-4, 3e-4}

if __name__ == "__main__":
    runs, _ = load_runs(find_results(sys.argv[1:] or ["study/math"])[0])
    by_method = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    picked, problems = [], []
    for method, group in by_method.items():
        options = candidates(group, learning_rate, min(coherence_limit_of(r) for r in group))
        chosen = pick(options)
        if len(options) < LRS or chosen is None:
            problems.append(f"{method}: {len(options)} of {LRS} lrs finished, "
                            f"{'none' if chosen is None else 'one'} coherent so far")
        else:
            picked.append(f"study.lr.{method}={chosen.lr:g}")
    print(" ".join(picked))
    if problems:
        print("not ready: " + "; ".join(problems), file=sys.stderr)
        sys.exit(2)
