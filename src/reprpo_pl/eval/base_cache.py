"""Base-model scores kept on disk, so a sweep or a rerun scores the base model once.

The base model's scores on an eval set are a pure function of its weights, the token ids of the rows
(which fix the tokenizer, chat template, rows and max lengths), how the rows are batched and padded,
the precision, and the code that scores them. `BaseScoreCache` keys a file by a hash of all of those:

    $REPRPO_SCORE_CACHE/<key>.json      (default <model cache>/base_scores, ~/.cache/reprpo_pl/base_scores)

``REPRPO_SCORE_CACHE=off`` turns the cache off. A file is trusted only if it parses, names its own key
and its payload matches the checksum stored with it; anything else is ignored (with a warning) and
rewritten after the base pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from reprpo_pl.eval.results import atomic_write_text
from reprpo_pl.eval.scorer import RowScores
from reprpo_pl.models.loading import cache_dir

log = logging.getLogger(__name__)

CACHE_ENV = "REPRPO_SCORE_CACHE"
FORMAT = 2  # bump when scoring changes what a base score is (score_pairs, completion_logps, the collator, eval_batches)
FIELDS = ("logp_cho", "logp_rej", "n_cho", "n_rej")


def score_cache_dir() -> Path | None:
    """``$REPRPO_SCORE_CACHE`` (``off``: no cache), else ``<model cache dir>/base_scores``."""
    value = os.environ.get(CACHE_ENV)
    if value is None or value == "":
        return cache_dir() / "base_scores"
    return None if value.lower() == "off" else Path(value).expanduser()


def weights_digest(model: nn.Module) -> str:
    """sha256 over the base model's parameters and buffers (name, dtype, shape, bytes), leaving out those of
    peft adapters (any name with a segment that is an adapter name, e.g. ``lora_A.default.weight``)."""
    adapters = set(getattr(model, "peft_config", {}) or {})
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if adapters & set(name.split(".")):
            continue
        flat = tensor.detach().reshape(-1).contiguous()
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def rows_digest(rows: Dataset) -> str:
    """sha256 over the token ids of every pair (``prompt_ids, chosen_ids, rejected_ids``), in order."""
    ids = rows.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
    return hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()


def _payload_digest(scores: dict[str, list[float]]) -> str:
    return hashlib.sha256(json.dumps(scores, sort_keys=True).encode()).hexdigest()


class BaseScoreCache:
    """Base scores of ``model`` (a peft model, scored with its adapter disabled) in ``directory``.

    ``context`` holds what else the scores depend on (precision, eval batch size, pad id, device type);
    the weights are hashed once, at the first `key`."""

    def __init__(self, directory: Path, model: nn.Module, context: dict[str, Any]):
        self.directory = directory
        self.model = model
        self.context = {**context, "format": FORMAT, "torch": torch.__version__, "model_class": type(model).__name__,
                        "base_class": type(getattr(model, "get_base_model", lambda: model)()).__name__}
        self._weights: str | None = None

    def key(self, rows: Dataset) -> str:
        """The cache key of the base scores of ``rows`` (a tokenised eval set)."""
        if self._weights is None:
            self._weights = weights_digest(self.model)
        parts = {**self.context, "weights": self._weights, "rows": rows_digest(rows)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str, n_rows: int) -> RowScores | None:
        """The cached scores (``[n_rows]`` each), or None when there is no file or it cannot be trusted."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            scores = doc["scores"]
            if doc.get("key") != key or doc.get("sha256") != _payload_digest(scores):
                raise ValueError("its key or checksum does not match")
            values = [scores[f] for f in FIELDS]
            if any(len(v) != n_rows or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v) for v in values):
                raise ValueError(f"it does not hold {n_rows} finite scores per field")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring the base-score cache file %s (%s: %s); scoring the base model again",
                        path, type(e).__name__, e)
            return None
        return RowScores(*(torch.tensor(v, dtype=torch.float32) for v in values))

    def save(self, key: str, scores: RowScores) -> None:
        """Write ``scores`` under ``key``, atomically; a cache that cannot be written is logged and skipped."""
        payload = {f: getattr(scores, f).tolist() for f in FIELDS}
        doc = {"format": FORMAT, "key": key, "sha256": _payload_digest(payload), "scores": payload}
        try:
            atomic_write_text(self.path(key), json.dumps(doc))
        except OSError as e:
            log.warning("cannot write the base-score cache %s (%s); the next run scores the base model again",
                        self.path(key), e)


def open_base_cache(model: nn.Module, precision: str, batch_size: int, pad_token_id: int) -> BaseScoreCache | None:
    """The cache for scoring ``model``'s base under ``precision`` in batches of ``batch_size`` padded with
    ``pad_token_id``, or None when ``$REPRPO_SCORE_CACHE`` is ``off``."""
    directory = score_cache_dir()
    if directory is None:
        return None
    device = next(model.parameters()).device.type
    return BaseScoreCache(directory, model, {"precision": str(precision), "batch_size": int(batch_size),
                                             "pad_token_id": int(pad_token_id), "device": device})
