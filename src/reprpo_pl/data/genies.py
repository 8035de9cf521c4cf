"""GENIES (Clymer et al. 2023) rows → preference pairs (SPEC §1.1).

A file ``<root>/<name>/<split>.json`` is a JSON list of rows; each row has a formatted ``prompt``
and ``responses: {completion text: score}``. Chosen = the highest-scored completion, rejected =
one strictly lower-scored completion picked by an RNG seeded from (seed, name, split, row index),
so a row's pair does not depend on which other rows are read.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Value

from reprpo_pl.errors import MissingDataError, UserError

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
PAIR_FEATURES = Features({key: Value("string") for key in ("id", "prompt", "chosen", "rejected")})


def pairs_to_dataset(pairs: list[dict[str, str]]) -> Dataset:
    """Columns ``id, prompt, chosen, rejected`` (all str), kept even when there are no pairs."""
    return Dataset.from_dict({key: [pair[key] for pair in pairs] for key in PAIR_FEATURES}, features=PAIR_FEATURES)


def check_split(split: str, splits: tuple[str, ...] = SPLITS) -> None:
    """A UserError unless ``split`` is one of ``splits`` (GENIES' by default)."""
    if split not in splits:
        raise UserError(f"split={split!r} is not a data split: use one of {', '.join(splits)}")


def genies_file(root: str | Path, name: str, split: str) -> Path:
    """Path of ``<root>/<name>/<split>.json``; a `MissingDataError` naming that path when the distribution or
    its split is absent (a UserError when ``root`` itself is)."""
    check_split(split)
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"data.root={root} does not exist: point data.root at a GENIES directory (…/genies) "
            "or leave it null for the embedded subset"
        )
    path = root / name / f"{split}.json"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"{root} holds {len(names)} distributions"
        raise MissingDataError(f"unknown GENIES distribution {name!r}: {path} does not exist ({hint})")
    if not path.is_file():
        raise MissingDataError(f"GENIES distribution {name!r} has no {split} split: {path} does not exist")
    return path


def _load_rows(path: Path) -> list[Any]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"malformed JSON in {path}: {err} — fix or re-download the file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset {err.start} "
                        f"({err.reason}) — re-save the file as UTF-8 or re-download it") from None
    if not isinstance(rows, list):
        raise UserError(f"{path} must hold a JSON list of rows, found a {type(rows).__name__}")
    return rows


def _is_score(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _responses(row: Any, path: Path, index: int) -> tuple[str, dict[str, float]]:
    """Validated ``(prompt, responses)`` of one row; a UserError names the file and row index."""
    where = f"{path} row {index}"
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UserError(f"{where} has no 'prompt' string: each row needs 'prompt' and 'responses'")
    responses = row.get("responses")
    if not isinstance(responses, dict) or not responses:
        raise UserError(f"{where} has no 'responses' dict: each row needs 'responses': {{completion: score}}")
    bad = [score for score in responses.values() if not _is_score(score)]
    if bad:
        raise UserError(f"{where} has a non-numeric score {bad[0]!r}: scores must be finite numbers")
    return row["prompt"], responses


def _row_rng(seed: int, name: str, split: str, index: int) -> random.Random:
    """An RNG that depends only on (seed, name, split, row index), stable across processes."""
    digest = hashlib.sha256(f"{seed}|{name}|{split}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def read_genies_pairs(root: str | Path, name: str, split: str, seed: int = 0) -> Dataset:
    """One pair per row of ``<root>/<name>/<split>.json``; ``id`` is ``"<name>/<split>/<row index>"``.

    Rows whose scores are all equal, or with an empty completion text, are skipped (counted in the log).
    """
    path = genies_file(root, name, split)
    pairs: list[dict[str, str]] = []
    n_equal = n_empty = 0
    rows = _load_rows(path)
    for index, row in enumerate(rows):
        prompt, responses = _responses(row, path, index)
        if any(not text.strip() for text in responses):
            n_empty += 1
            continue
        best = max(responses.values())
        chosen = next(text for text, score in responses.items() if score == best)
        lower = [text for text, score in responses.items() if score < best]
        if not lower:
            n_equal += 1
            continue
        rejected = _row_rng(seed, name, split, index).choice(lower)
        pairs.append({"id": f"{name}/{split}/{index}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    if n_equal:
        logger.info("%s/%s: skipped %d of %d rows whose scores are all equal", name, split, n_equal, len(rows))
    if n_empty:
        logger.info("%s/%s: skipped %d of %d rows with an empty completion", name, split, n_empty, len(rows))
    return pairs_to_dataset(pairs)
