"""Pad tokenised pairs into a batch: prompt left-padded, completions right-padded (SPEC §1.4).

The prompt/completion boundary is at the same column in every row, so chosen and rejected can be
concatenated behind one shared prompt block. Masks come from lengths, never from pad ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PreferenceCollator:
    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, Tensor]:
        """Returns ``prompt_ids/prompt_mask [B, P]`` (left-padded) and ``chosen_ids/chosen_mask``,
        ``rejected_ids/rejected_mask [B, C]`` (right-padded to one common C), plus ``index [B]``."""
        prompt_ids, prompt_mask = _pad([r["prompt_ids"] for r in rows], self.pad_token_id, left=True)
        width = max(len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids"))
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}
        for role in ("chosen", "rejected"):
            batch[f"{role}_ids"], batch[f"{role}_mask"] = _pad([r[f"{role}_ids"] for r in rows], self.pad_token_id, width=width)
        if "index" in rows[0]:
            batch["index"] = torch.tensor([r["index"] for r in rows])
        return batch


def _pad(seqs: list[list[int]], pad_id: int, left: bool = False, width: int | None = None) -> tuple[Tensor, Tensor]:
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = True
    return ids, mask
