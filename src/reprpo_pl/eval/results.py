"""results.json and results.md: written atomically, so a killed run never leaves one that looks complete."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from reprpo_pl.errors import NonFiniteError
from reprpo_pl.eval.metrics import DEFAULT_COHERENCE_LIMIT, SHIFT_ORDER, is_incoherent
from reprpo_pl.eval.scorer import RowScores

ROWS_DIR = "eval"  # per-row results: <dir of results.json>/eval/<target>.jsonl
CURVES_FILE = "curves.jsonl"  # step-level evaluation on a subset (callbacks.shift_eval.every_n_steps), beside results.json


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_label(cfg: Any) -> str:
    """How tables name a run: ``method[/transform][/loss]``, with the transform and loss only for methods
    that compose them, and the loss only when it is not the method's own (``innerdpo/ether``,
    ``reprpo/ether/mse``, ``innerdpo/ether/mse`` after ``loss=mse``, ``dpo``)."""
    parts = [cfg.method.name]
    if cfg.get("transform") is not None:
        parts.append(cfg.transform.name)
    if cfg.get("loss") is not None and cfg.loss.name != cfg.method.name:
        parts.append(cfg.loss.name)
    return "/".join(parts)


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table of preformatted cells (tabulate): no number parsing, and cells are not padded to
    the column width (``| base | 0.500 (n=6) |``), so each row reads the same whatever the other rows hold."""
    return tabulate(list(rows), headers=list(headers), tablefmt="github", disable_numparse=True, stralign=None, numalign=None)


TARGET_TABLE = ("acc_base", "acc", "acc_delta", "acc_gain_vs_ref", "log_ppl_chosen_delta", "perplexity_reduction_vs_ref",
                "preference_logp_gain_vs_ref")
INCOHERENT = "⚠ likely incoherent"


def coherence_limit_of(results: dict[str, Any]) -> float:
    """The run's ``eval.coherence_limit`` (its stored config), else the default."""
    limit = ((results.get("config") or {}).get("eval") or {}).get("coherence_limit")
    return DEFAULT_COHERENCE_LIMIT if limit is None else float(limit)


def _marked(cell: str, log_ppl_chosen_delta: float | None, limit: float) -> str:
    """``cell``, followed by `INCOHERENT` when the chosen log-perplexity moved by more than ``limit``."""
    return f"{cell} {INCOHERENT}" if is_incoherent(log_ppl_chosen_delta, limit) else cell


def render_markdown(results: dict[str, Any]) -> str:
    """SPEC §5's two tables: accuracy per shift type (base, adapter, acc_delta, and the coherence figure
    ``log_ppl_chosen_delta``), then per target (the same beside the other gains); base first, n per cell.
    An accuracy whose chosen log-perplexity moved by more than ``eval.coherence_limit`` is marked `INCOHERENT`."""
    label = results["label"]
    limit = coherence_limit_of(results)
    shifts = [s for s in SHIFT_ORDER if s in results["shifts"]]
    summaries = [results["shifts"][s] for s in shifts]
    by_shift = [["base", *(f"{_fmt(c['acc_base'])} (n={c['n']})" for c in summaries)],
                [label, *(_marked(f"{_fmt(c['acc'])} (n={c['n']})", c.get("log_ppl_chosen_delta"), limit) for c in summaries)],
                *([key, *(_fmt(c.get(key)) for c in summaries)] for key in ("acc_delta", "log_ppl_chosen_delta"))]
    by_target = [[t["target"], t["shift"], str(t["n"]),
                  *(_marked(_fmt(t.get(k)), t.get("log_ppl_chosen_delta"), limit) if k == "acc" else _fmt(t.get(k))
                    for k in TARGET_TABLE)] for t in results["targets"]]
    lines = [f"# {label} on {results['model']}, trained on {results['dataset']} (seed {results['seed']}, "
             f"n_train {results['n_train']}, step {results.get('global_step', '?')})", "",
             "## Preference accuracy per shift type", "", markdown_table(["adapter", *shifts], by_shift),
             "", f"## Per target ({results['dataset']})", "",
             markdown_table(["target", "shift", "n", *TARGET_TABLE], by_target), "",
             f"`train` = {results['dataset']}'s training pairs (in-sample); acc_delta = acc − acc_base; "
             f"{INCOHERENT} = |log_ppl_chosen_delta| > eval.coherence_limit={limit:g} nats/token."]
    return "\n".join(lines) + "\n"


def non_finite(doc: Any, path: str = "") -> list[str]:
    """The paths (``targets[0].acc``, ``shifts.ood.acc``) of the NaN/inf numbers in a JSON-like ``doc``."""
    if isinstance(doc, float):
        return [] if math.isfinite(doc) else [path or "<value>"]
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(doc, (list, tuple)):
        return [p for i, v in enumerate(doc) for p in non_finite(v, f"{path}[{i}]")]
    return []


def write_results(run_dir: str | Path, results: dict[str, Any]) -> str:
    """Write results.json and results.md into ``run_dir``; returns the markdown. A document holding a
    NaN/inf number is never written (`NonFiniteError`): a results.json's numbers are all finite."""
    if bad := non_finite(results):
        raise NonFiniteError(f"results for {run_dir} hold non-finite numbers ({', '.join(bad[:3])}"
                             f"{', …' if len(bad) > 3 else ''}); results.json not written")
    markdown = render_markdown(results)
    atomic_write_text(Path(run_dir) / "results.md", markdown)
    # results.json last: its presence marks a complete run
    atomic_write_text(Path(run_dir) / "results.json", json.dumps(results, indent=2))
    return markdown


def per_row_records(ids: Sequence[str], base: RowScores, adapter: RowScores) -> list[dict[str, Any]]:
    """One record per pair, in ``ids`` order (``ids[i]`` = ``"<distribution>/<split>/<index>"``, the row's
    identity in its file, e.g. ``ethics/justice/test/17``): ``distribution``, ``split``, ``index``, and for
    ``base`` and ``adapter`` the summed completion log-probs (``*_logp_chosen``, ``*_logp_rejected``) and
    token counts (``*_n_chosen``, ``*_n_rejected``). ``base`` and ``adapter`` hold ``[N]`` tensors, N = len(ids)."""
    columns = {}
    for role, scores in (("base", base), ("adapter", adapter)):
        columns.update({f"{role}_logp_chosen": scores.logp_cho.tolist(), f"{role}_logp_rejected": scores.logp_rej.tolist(),
                        f"{role}_n_chosen": [int(n) for n in scores.n_cho.tolist()],
                        f"{role}_n_rejected": [int(n) for n in scores.n_rej.tolist()]})
    records = []
    for i, row_id in enumerate(ids):
        distribution, split, index = row_id.rsplit("/", 2)
        records.append({"distribution": distribution, "split": split, "index": int(index),
                        **{key: values[i] for key, values in columns.items()}})
    return records


def write_per_row(run_dir: str | Path, per_row: dict[str, list[dict[str, Any]]]) -> None:
    """Write each target's records as JSON lines to ``<run_dir>/eval/<target>.jsonl``, atomically (a target
    named ``ethics/justice`` gets ``eval/ethics/justice.jsonl``). A non-finite number is refused (`NonFiniteError`)."""
    for target, records in per_row.items():
        try:
            text = "".join(json.dumps(record, allow_nan=False) + "\n" for record in records)
        except ValueError:
            raise NonFiniteError(f"per-row scores of {target} hold non-finite numbers; {ROWS_DIR}/{target}.jsonl not written") from None
        atomic_write_text(Path(run_dir) / ROWS_DIR / f"{target}.jsonl", text)


def write_curves(run_dir: str | Path, curve: Sequence[dict[str, Any]]) -> None:
    """Write the step-level evaluation points to ``<run_dir>/curves.jsonl``, atomically: one JSON object per line
    and step, ``{step, epoch, n_samples_during, targets, shifts}`` (``targets`` and ``shifts`` as in results.json,
    on ``n_samples_during`` pairs per target). A non-finite number is refused (`NonFiniteError`)."""
    try:
        text = "".join(json.dumps(point, allow_nan=False) + "\n" for point in curve)
    except ValueError:
        raise NonFiniteError(f"step-level scores hold non-finite numbers; {CURVES_FILE} not written") from None
    atomic_write_text(Path(run_dir) / CURVES_FILE, text)
