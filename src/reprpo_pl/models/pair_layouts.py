"""The two layouts of a batch of pairs as model inputs (both give chosen rows 0..B-1 then rejected rows
B..2B-1 of ``completion_ids/completion_mask [2B, C]``):

- ``concat`` (`concat_pairs`): ``[2B, P+C]``, every row ``prompt | completion``; the prompt is encoded twice.
- ``packed`` (`pack_pairs`): ``[B, P+2C]``, one row per pair ``prompt | chosen | rejected`` with a
  block-causal mask (rejected never sees chosen) and rejected positions restarting after the prompt,
  so the prompt is encoded once and shared [decided]: the SPEC's "one concatenated forward per role"
  with ~25% fewer tokens on GENIES-length prompts; every log-prob and hidden state equals the
  concat layout's up to float rounding.

`is_packed`, `completion_states` and `prediction_positions` read either layout. Which one a model can
run is `reprpo_pl.models.logprobs.pair_model_inputs`' decision.
"""

from __future__ import annotations

import torch
from torch import Tensor


def concat_pairs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stack chosen then rejected behind the shared prompt: one forward for 2B rows.

    Returns ``input_ids, attention_mask, position_ids [2B, P+C]`` and ``completion_ids,
    completion_mask [2B, C]``; rows 0..B-1 are chosen, B..2B-1 rejected."""
    prompt_ids = batch["prompt_ids"].repeat(2, 1)
    prompt_mask = batch["prompt_mask"].repeat(2, 1)
    completion_ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    completion_mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def pack_pairs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """One row per pair, ``[left-padded prompt P | chosen C | rejected C]``.

    Returns ``input_ids, position_ids [B, P+2C]``, ``attention_mask [B, 1, P+2C, P+2C]`` bool (True =
    may attend): causal within the prompt, chosen and rejected each see the real prompt tokens and
    their own earlier tokens, never each other; padding is seen by nobody and sees only itself (so
    no softmax row is empty). Rejected positions restart where the prompt ends, like chosen ones.
    Also ``completion_ids, completion_mask [2B, C]`` as `concat_pairs` gives them."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"].bool()
    cho_mask, rej_mask = batch["chosen_mask"].bool(), batch["rejected_mask"].bool()
    n_prompt, width = prompt_ids.shape[1], cho_mask.shape[1]
    prompt_len = prompt_mask.sum(1, keepdim=True)  # [B, 1]
    steps = torch.arange(width, device=prompt_ids.device)
    position_ids = torch.cat(
        [(prompt_mask.long().cumsum(1) - 1).clamp(min=0), prompt_len + steps, prompt_len + steps], dim=1
    )
    real = torch.cat([prompt_mask, cho_mask, rej_mask], dim=1)  # [B, L]
    segment = torch.cat([
        torch.zeros(n_prompt, dtype=torch.long), torch.ones(width, dtype=torch.long), torch.full((width,), 2)
    ]).to(prompt_ids.device)  # 0 prompt, 1 chosen, 2 rejected
    index = torch.arange(segment.shape[0], device=prompt_ids.device)
    causal = index[:, None] >= index[None, :]  # [L, L] query ≥ key
    same_or_prompt = (segment[None, :] == 0) | (segment[:, None] == segment[None, :])
    allowed = (causal & same_or_prompt)[None] & real[:, None, :] & real[:, :, None]
    allowed |= torch.eye(segment.shape[0], dtype=torch.bool, device=prompt_ids.device)
    return {
        "input_ids": torch.cat([prompt_ids, batch["chosen_ids"], batch["rejected_ids"]], dim=1),
        "attention_mask": allowed.unsqueeze(1),
        "position_ids": position_ids,
        "completion_ids": torch.cat([batch["chosen_ids"], batch["rejected_ids"]]),
        "completion_mask": torch.cat([cho_mask, rej_mask]),
    }


def is_packed(inputs: dict[str, Tensor]) -> bool:
    """Whether ``inputs`` come from `pack_pairs` (B model rows for 2B completions) rather than `concat_pairs`."""
    return inputs["input_ids"].shape[0] * 2 == inputs["completion_ids"].shape[0]


def completion_states(hidden: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """Per-token states of the completion tokens ``[2B, C, d]`` (chosen rows, then rejected) from states
    of the model rows of either layout (``[2B, P+C, d]`` concat, ``[B, P+2C, d]`` packed)."""
    width = inputs["completion_ids"].shape[1]
    if not is_packed(inputs):
        return hidden[:, hidden.shape[1] - width :]
    n_prompt = hidden.shape[1] - 2 * width
    return torch.cat([hidden[:, n_prompt : n_prompt + width], hidden[:, n_prompt + width :]])


def prediction_positions(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(row, position)`` ``[2B, C]`` each: where the hidden state that predicts each completion token is."""
    n_rows, length = inputs["input_ids"].shape
    n_pairs, width = inputs["completion_ids"].shape
    device = inputs["input_ids"].device
    steps = torch.arange(width, device=device)
    if not is_packed(inputs):
        first = length - width - 1  # the last prompt position predicts the first completion token
        return torch.arange(n_rows, device=device)[:, None].expand(-1, width), (first + steps).expand(n_rows, -1)
    n_prompt = length - 2 * width
    chosen = n_prompt - 1 + steps
    rejected = torch.where(steps == 0, n_prompt - 1, n_prompt + width - 1 + steps)  # token 0 follows the prompt too
    rows = torch.arange(n_rows, device=device).repeat(2)[:, None].expand(-1, width)
    return rows, torch.cat([chosen.expand(n_rows, -1), rejected.expand(n_rows, -1)])
