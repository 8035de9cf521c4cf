"""Where pairs come from: a distribution name → GENIES or ETHICS reader, and the shift table.

A root of ``None`` reads the embedded subset shipped in ``reprpo_pl/embedded`` (the default
source ``math`` and the test rows of its targets; see its README).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset

from reprpo_pl.data.ethics import ethics_file, read_ethics_pairs
from reprpo_pl.data.genies import genies_file, read_genies_pairs
from reprpo_pl.errors import MissingDataError, UserError

logger = logging.getLogger(__name__)

ETHICS_PREFIX = "ethics/"
SHIFT_TYPES = ("in_domain", "cross_domain", "difficulty", "moral_transfer", "safety", "orthogonal")


@dataclass(frozen=True)
class Target:
    """An evaluation distribution (``"math"``, ``"ethics/justice"``) and its shift from the source."""

    name: str
    shift: str


def embedded_root(kind: Literal["genies", "ethics"]) -> Path:
    """The package's embedded copy of a GENIES or ETHICS directory."""
    return Path(__file__).resolve().parent.parent / "embedded" / kind


def _embedded_contents(kind: Literal["genies", "ethics"]) -> str:
    root = embedded_root(kind)
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_file())
    return ", ".join(files)


def _check_embedded(name: str, split: str) -> None:
    """A clear error when the embedded subset lacks ``name``/``split`` (it holds only a few files): a
    `MissingDataError` naming the path, the subset's contents and the data root to set."""
    kind: Literal["genies", "ethics"] = "ethics" if name.startswith(ETHICS_PREFIX) else "genies"
    key = "data.ethics_root" if kind == "ethics" else "data.root"
    try:
        if kind == "ethics":
            ethics_file(embedded_root(kind), name[len(ETHICS_PREFIX) :], split)
        else:
            genies_file(embedded_root(kind), name, split)
    except MissingDataError as err:
        raise MissingDataError(
            f"{name} ({split}) is not in the embedded subset, which holds {_embedded_contents(kind)} ({err}): "
            f"set {key} to the full {kind.upper()} data (e.g. ../shared/data/{kind})"
        ) from None


def split_target_name(name: str) -> tuple[str, str]:
    """``(distribution, split)`` of a target name: ``"ethics/justice@test_hard"`` → ``("ethics/justice", "test_hard")``;
    a name without ``@`` is the distribution's ``test`` split."""
    distribution, at, split = name.partition("@")
    return distribution, split if at else "test"


def subset_rows(n_rows: int, n: int, seed: int) -> list[int]:
    """Indices (sorted) of ``n`` of ``n_rows`` rows picked by ``seed`` alone; all of them if ``n >= n_rows``."""
    if n >= n_rows:
        return list(range(n_rows))
    return sorted(np.random.default_rng(seed).choice(n_rows, size=n, replace=False).tolist())


def _subset(pairs: Dataset, n: int, seed: int, label: str) -> Dataset:
    """``n`` rows picked by ``seed`` alone (kept in file order); all rows, with a warning, if fewer exist."""
    if n >= len(pairs):
        if n > len(pairs):
            logger.warning("%s: asked for %d pairs but only %d exist; using all of them", label, n, len(pairs))
        return pairs
    return pairs.select(subset_rows(len(pairs), n, seed))


def split_train_val(pairs: Dataset, n_train: int, n_val: int, seed: int, val_seed: int, label: str) -> tuple[Dataset, Dataset]:
    """The ``n_train`` training rows (the same rows `load_pairs` picks with ``n=n_train``) and ``n_val`` rows
    held out of the rest (picked by ``val_seed``): a validation slice of the train split no run trains on."""
    if n_train + n_val > len(pairs):
        raise UserError(f"data.n_val={n_val} pairs cannot be held out of {label}: it has {len(pairs)} pairs and "
                        f"data.n_train={n_train} of them train; lower data.n_val or data.n_train")
    train_rows = subset_rows(len(pairs), n_train, seed)
    rest = sorted(set(range(len(pairs))) - set(train_rows))
    val_rows = [rest[i] for i in subset_rows(len(rest), n_val, val_seed)]
    return pairs.select(train_rows), pairs.select(val_rows)


def load_pairs(
    name: str,
    split: str,
    *,
    genies_root: str | Path | None,
    ethics_root: str | Path | None,
    seed: int = 0,
    n: int | None = None,
) -> Dataset:
    """Pairs (``id, prompt, chosen, rejected``) of ``name`` (``"math"`` or ``"ethics/<subset>"``).

    ``seed`` picks GENIES rejected completions and the ``n``-row subset; ``n=None`` keeps all rows.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise UserError(f"n={n!r} must be a positive integer or null (all rows)")
    if name.startswith(ETHICS_PREFIX):
        if ethics_root is None:
            _check_embedded(name, split)
        root = embedded_root("ethics") if ethics_root is None else ethics_root
        pairs = read_ethics_pairs(root, name[len(ETHICS_PREFIX) :], split)
        path, why = ethics_file(root, name[len(ETHICS_PREFIX) :], split), "empty or identical completions"
    else:
        if genies_root is None:
            _check_embedded(name, split)
        root = embedded_root("genies") if genies_root is None else genies_root
        pairs = read_genies_pairs(root, name, split, seed=seed)
        path, why = genies_file(root, name, split), "all scores equal, or an empty completion"
    if len(pairs) == 0:
        raise UserError(
            f"{name} ({split}) has no preference pairs: every row of {path} was skipped ({why}; counts in the log) "
            "or the file is empty — fix the file or pick another distribution"
        )
    return pairs if n is None else _subset(pairs, n, seed, f"{name}/{split}")


def _target(entry: Any, index: int) -> Target:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry.get("name"):
        raise UserError(f"dataset.targets[{index}]={entry!r} must be a mapping like {{name: math, shift: in_domain}}")
    shift = entry.get("shift")
    if shift not in SHIFT_TYPES:
        close = difflib.get_close_matches(str(shift), SHIFT_TYPES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(
            f"dataset.targets[{index}] ({entry['name']}) has shift={shift!r}: {hint}use one of {', '.join(SHIFT_TYPES)}"
        )
    return Target(name=entry["name"], shift=shift)


def parse_shift_table(dataset_cfg: Mapping[str, Any]) -> list[Target]:
    """Validated targets of a ``conf/dataset/<source>.yaml``, the in-domain target first.

    Requires exactly one ``in_domain`` target, named like ``source``, and no repeated names.
    """
    source = dataset_cfg.get("source")
    if not isinstance(source, str) or not source:
        raise UserError(f"dataset.source={source!r} must name a training distribution, e.g. math")
    entries = dataset_cfg.get("targets")
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise UserError(f"dataset.targets={entries!r} must be a non-empty list of {{name, shift}} mappings")
    targets = [_target(entry, index) for index, entry in enumerate(entries)]
    names = [target.name for target in targets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"dataset.targets lists {', '.join(repeated)} more than once: keep one entry per target")
    if f"{source}@train" in names:
        raise UserError(f"dataset.targets lists {source}@train, the in-sample row every run scores already: drop it")
    if f"{source}@val" in names:
        raise UserError(f"dataset.targets lists {source}@val, the validation slice: set data.n_val=<pairs> instead")
    in_domain = [target for target in targets if target.shift == "in_domain"]
    if [target.name for target in in_domain] != [source]:
        raise UserError(
            f"dataset.targets has in_domain targets {[t.name for t in in_domain]}: "
            f"it needs exactly one, {{name: {source}, shift: in_domain}}"
        )
    return in_domain + [target for target in targets if target.shift != "in_domain"]
