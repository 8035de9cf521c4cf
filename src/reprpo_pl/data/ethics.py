"""ETHICS (Hendrycks et al. 2021) CSVs → "expression" preference pairs (SPEC §1.2).

Per subset (texts are stripped of surrounding whitespace first):
- deontology: per scenario, zip its label-1 (reasonable) excuses with its label-0 excuses.
- utilitarianism (no header; col 0 more pleasant): prompt = common word prefix, completions = remainders
  (with their leading space: prompt + completion is the sentence as written).
- commonsense (label 1 = wrong) and justice (label 1 = reasonable): consecutive rows with different
  labels and a long enough shared word prefix; chosen = the acceptable / reasonable remainder.
  Justice is the right way round here [decided]; the prototype had it inverted.
- virtue is not converted.
``id`` is ``"ethics/<subset>/<split>/<data row>"`` (0-based after the header; for deontology the
chosen row, for consecutive pairs the first row of the two).
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset

from reprpo_pl.data.genies import check_split, pairs_to_dataset
from reprpo_pl.errors import MissingDataError, UserError

logger = logging.getLogger(__name__)

# subset -> (CSV file stem, expected leading header columns; None = headerless)
SUBSETS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "commonsense": ("cm", ("label", "input")),
    "deontology": ("deontology", ("label", "scenario", "excuse")),
    "justice": ("justice", ("label", "scenario")),
    "utilitarianism": ("util", None),
}
SPLITS = ("train", "test", "test_hard")  # test_hard: the paper's adversarially filtered test set, same columns
MIN_PREFIX_CHARS = 4  # the shared prompt must be longer than this
MIN_OVERLAP = 0.25  # 2|prefix| / (|a| + |b|) must exceed this
MIN_REMAINDER_CHARS = 2

Pair = dict[str, str]


def ethics_file(root: str | Path, subset: str, split: str) -> Path:
    """Path of the CSV holding ``subset``'s ``split``; a `MissingDataError` naming that path when it is absent
    (a UserError for an unknown subset or a missing ``root``)."""
    check_split(split, SPLITS)
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"data.ethics_root={root} does not exist: point data.ethics_root at an ETHICS directory "
            "(…/ethics) or leave it null for the embedded subset"
        )
    if subset == "virtue":
        raise UserError(
            f"ethics/virtue is not converted to preference pairs (SPEC §1.2): use one of ethics/{', ethics/'.join(SUBSETS)}"
        )
    if subset not in SUBSETS:
        close = difflib.get_close_matches(subset, list(SUBSETS), n=2, cutoff=0.4)
        hint = f"did you mean ethics/{', ethics/'.join(close)}?" if close else f"use one of ethics/{', ethics/'.join(SUBSETS)}"
        raise UserError(f"unknown ETHICS subset {subset!r} (looked in {root}): {hint}")
    path = root / subset / f"{SUBSETS[subset][0]}_{split}.csv"
    if not path.is_file():
        raise MissingDataError(f"ethics/{subset} has no {split} split: {path} does not exist")
    return path


def _records(path: Path, subset: str) -> list[list[str]]:
    """Data records of a CSV after checking its header and every row's column count and label."""
    header = SUBSETS[subset][1]
    try:
        with path.open(newline="", encoding="utf-8") as f:
            records = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path} is not a readable UTF-8 CSV: {err} — re-save the file as UTF-8 or re-download it") from None
    if header is not None:
        found = records[0] if records else []
        if tuple(found[: len(header)]) != header:
            raise UserError(f"{path} header row is {found}: ethics/{subset} needs columns {','.join(header)}")
        width, records = len(found), records[1:]
    else:
        width = 2
    for index, record in enumerate(records):
        if len(record) != width:
            what = ",".join(header) if header else "more pleasant,less pleasant (no header)"
            raise UserError(f"{path} data row {index} has {len(record)} columns, expected {width}: {what}")
        if header is not None and record[0] not in ("0", "1"):
            raise UserError(f"{path} data row {index} has label {record[0]!r}: labels must be 0 or 1")
    return records


def common_word_prefix(a: str, b: str) -> str:
    """Longest common prefix of ``a`` and ``b`` cut back to end just after its last whitespace.

    "I went to the park." / "I went to the parking lot." → "I went to the ".
    """
    prefix = os.path.commonprefix([a, b])
    cut = max((i for i, char in enumerate(prefix) if char.isspace()), default=-1) + 1
    return prefix[:cut]


def _split_pair(a: str, b: str) -> tuple[str, str, str]:
    """``(prompt, remainder of a, remainder of b)``: the prompt drops the prefix's trailing space and the
    remainders keep it as their leading space, so ``prompt + remainder`` is the sentence as written (the
    completion is tokenised on its own: without the space "I went to the" + "park" reads "thepark")."""
    prompt = common_word_prefix(a, b).rstrip()
    return prompt, a[len(prompt) :], b[len(prompt) :]


def _deontology(records: list[list[str]]) -> Iterator[tuple[int, str, str, str]]:
    by_scenario: dict[str, tuple[list[tuple[int, str]], list[tuple[int, str]]]] = {}
    for index, (label, scenario, excuse) in enumerate(records):
        bad, good = by_scenario.setdefault(scenario.strip(), ([], []))
        (good if label == "1" else bad).append((index, excuse.strip()))
    for scenario, (bad, good) in by_scenario.items():
        for (index, chosen), (_, rejected) in zip(good, bad):
            yield index, scenario, chosen, rejected


def _utilitarianism(records: list[list[str]]) -> Iterator[tuple[int, str, str, str]]:
    for index, (pleasant, unpleasant) in enumerate(records):
        yield index, *_split_pair(pleasant.strip(), unpleasant.strip())


def _consecutive(records: list[list[str]], good_label: str) -> Iterator[tuple[int, str, str, str]]:
    """Rows (i−1, i) with different labels, a shared word prefix longer than 4 chars, overlap
    2|prefix|/(|a|+|b|) > 0.25 and distinct remainders of ≥ 2 chars; chosen = the ``good_label`` one."""
    rows = [(record[0], record[1].strip()) for record in records]
    for index in range(1, len(rows)):
        (label_a, a), (label_b, b) = rows[index - 1], rows[index]
        if label_a == label_b:
            continue
        prompt, rest_a, rest_b = _split_pair(a, b)
        if (
            len(prompt) > MIN_PREFIX_CHARS
            and 2 * len(prompt) / (len(a) + len(b)) > MIN_OVERLAP
            and rest_a != rest_b
            and min(len(rest_a.strip()), len(rest_b.strip())) >= MIN_REMAINDER_CHARS  # the leading space not counted
        ):
            yield (index - 1, prompt, rest_a, rest_b) if label_a == good_label else (index - 1, prompt, rest_b, rest_a)


def _candidates(subset: str, records: list[list[str]]) -> Iterator[tuple[int, str, str, str]]:
    if subset == "deontology":
        return _deontology(records)
    if subset == "utilitarianism":
        return _utilitarianism(records)
    return _consecutive(records, good_label="0" if subset == "commonsense" else "1")


def read_ethics_pairs(root: str | Path, subset: str, split: str) -> Dataset:
    """Preference pairs of ETHICS ``subset`` (commonsense, deontology, justice, utilitarianism).

    Candidates whose chosen or rejected text is empty, or whose two completions are identical,
    are skipped with a count in the log.
    """
    path = ethics_file(root, subset, split)
    records = _records(path, subset)
    pairs: list[Pair] = []
    n_skipped = 0
    for index, prompt, chosen, rejected in _candidates(subset, records):
        if not chosen.strip() or not rejected.strip() or chosen == rejected:
            n_skipped += 1
            continue
        pairs.append({"id": f"ethics/{subset}/{split}/{index}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    if n_skipped:
        logger.info("ethics/%s/%s: skipped %d candidate pairs with an empty or identical completion", subset, split, n_skipped)
    logger.info("ethics/%s/%s: %d pairs from %d rows of %s", subset, split, len(pairs), len(records), path)
    return pairs_to_dataset(pairs)
