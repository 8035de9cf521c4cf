"""Per-token completion log-probs of a batch of pairs (SPEC §2), and the two forward layouts.

Layouts (both give chosen rows 0..B-1 then rejected rows B..2B-1 of ``completion_ids/completion_mask [2B, C]``):

- ``concat`` (`reprpo_pl.data.collator.concat_pairs`): ``[2B, P+C]``, every row ``prompt | completion``;
  the prompt is encoded twice.
- ``packed`` (`pack_pairs`): ``[B, P+2C]``, one row per pair ``prompt | chosen | rejected`` with a
  block-causal mask (rejected never sees chosen) and rejected positions restarting after the prompt,
  so the prompt is encoded once and shared [decided]: the SPEC's "one concatenated forward per role"
  with ~25% fewer tokens on GENIES-length prompts; every log-prob and hidden state equals the
  concat layout's up to float rounding.

`completion_logps` runs the model's backbone and projects only the real completion positions to the
vocabulary with `linear_token_logps`, which never holds a ``[N, C, V]`` tensor (forward or backward).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from reprpo_pl.data.collator import concat_pairs

Agg = Literal["mean", "sum"]
AGGS = ("mean", "sum")
PACKED_ATTENTION = ("sdpa", "eager")  # attention implementations that honour a custom 4D mask
LOGPROB_CHUNK_TOKENS = 256  # rows of the [chunk, V] logits block of `linear_token_logps` (256·49152·4 B ≈ 50 MB)


def token_logps(logits: Tensor, ids: Tensor, mask: Tensor, chunk: int = 4) -> Tensor:
    """log p(ids_t | prefix) in fp32 as gather − logsumexp, a few rows at a time so no full
    ``[N, C, V]`` fp32 log-softmax is materialised.

    logits: ``[N, C, V]`` (any dtype), already aligned so ``logits[:, t]`` predicts ``ids[:, t]``;
    ids, mask: ``[N, C]``. Returns ``[N, C]``, zero where mask is False."""
    out = []
    for rows in range(0, logits.shape[0], chunk):
        lg = logits[rows : rows + chunk].float()
        picked = lg.gather(-1, ids[rows : rows + chunk].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(lg, dim=-1))
    return torch.where(mask, torch.cat(out), 0.0)


class _LinearLogps(torch.autograd.Function):
    """``log softmax(h Wᵀ)[y]`` per row with the gradient w.r.t. h computed in the forward.

    ∂ log p(y)/∂h = W[y] − softmax(h Wᵀ) W depends on h alone, and the upstream gradient of each row
    is a scalar, so the forward stores ``G [M, d]`` and the backward is ``grad[:, None] · G``: no
    ``[M, V]`` tensor is kept for (or rebuilt in) the backward. W must be frozen (no gradient)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, ids: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        logps, grads = _linear_logps_chunks(hidden, weight, ids, chunk, with_grad=True)
        ctx.save_for_backward(grads)
        return logps

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grads,) = ctx.saved_tensors
        return (grad_out.unsqueeze(-1) * grads).to(grads.dtype), None, None, None


def _linear_logps_chunks(hidden: Tensor, weight: Tensor, ids: Tensor, chunk: int, with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[M]`` fp32 (and, with_grad, ∂/∂hidden ``[M, d]`` in hidden's dtype), ``chunk`` rows at a time."""
    logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grads = torch.empty_like(hidden) if with_grad else None
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = (hidden[rows].to(weight.dtype) @ weight.T).float()  # [m, V]
        target = ids[rows]
        lse = torch.logsumexp(logits, dim=-1)
        logps[rows] = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse
        if grads is not None:
            probs = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of the logits
            grads[rows] = (weight[target] - probs.to(weight.dtype) @ weight).to(hidden.dtype)
    return logps, grads


def linear_token_logps(hidden: Tensor, weight: Tensor, ids: Tensor, chunk: int = LOGPROB_CHUNK_TOKENS) -> Tensor:
    """``log softmax(hidden Wᵀ)[ids]`` in fp32 without materialising the logits of all rows.

    hidden: ``[M, d]`` final hidden states (after the final norm); weight: the unembedding ``[V, d]``
    (frozen); ids: ``[M]`` target tokens. Returns ``[M]`` fp32. At most a ``[chunk, V]`` block of
    logits exists at a time, in the forward and (via `_LinearLogps`) in the backward."""
    if weight.requires_grad:
        raise ValueError("linear_token_logps needs a frozen unembedding: its backward returns no weight gradient")
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _LinearLogps.apply(hidden, weight, ids, chunk)
    return _linear_logps_chunks(hidden, weight, ids, chunk, with_grad=False)[0]


def aggregate(logps: Tensor, mask: Tensor, agg: Agg = "mean") -> Tensor:
    """``[N, C]`` per-token log-probs → ``[N]``: masked mean (default, per-token) or sum."""
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if agg == "mean" else total


# ---- layouts ------------------------------------------------------------------------------------


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


def _prediction_positions(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
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


# ---- the forward ---------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` under a peft wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def frozen_unembedding(model: nn.Module) -> Tensor | None:
    """The lm_head weight ``[V, d]`` when logits are exactly ``h Wᵀ`` with W frozen (no bias, LoRA,
    logit scale or soft-capping), else None (then `completion_logps` uses the model's own logits)."""
    hf = unwrap(model)
    head = hf.get_output_embeddings()
    text = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    scaled = any(getattr(text, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad or scaled:
        return None
    return head.weight


def supports_packed(model: nn.Module) -> bool:
    """Whether `pack_pairs` inputs can run on ``model``: a custom 4D mask is honoured (sdpa/eager
    attention) and the log-probs come from the backbone + frozen unembedding."""
    hf = unwrap(model)
    return getattr(hf.config, "_attn_implementation", None) in PACKED_ATTENTION and frozen_unembedding(model) is not None


def pair_model_inputs(model: nn.Module, batch: dict[str, Tensor], packed: bool = True) -> dict[str, Tensor]:
    """The inputs for running ``model`` on a collated batch of pairs: `pack_pairs` when ``packed`` and the
    model `supports_packed`, else `concat_pairs`. `completion_logps` accepts either."""
    return pack_pairs(batch) if packed and supports_packed(model) else concat_pairs(batch)


def completion_logps(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Run ``model`` on `concat_pairs` or `pack_pairs` inputs; return per-token completion log-probs ``[2B, C]``
    fp32, zero at padding.

    The backbone gives the final hidden states; only the positions that predict a real completion
    token go through the unembedding (`linear_token_logps`). Models whose logits are not a plain
    frozen ``h Wᵀ`` take the model's own logits for the last C+1 positions (concat layout only)."""
    mask = inputs["completion_mask"].bool()
    weight = frozen_unembedding(model)
    if weight is None:
        if is_packed(inputs):
            raise ValueError("packed pair inputs need a plain frozen unembedding; use concat_pairs for this model")
        width = inputs["completion_ids"].shape[1]
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"].long(),
                    position_ids=inputs["position_ids"], logits_to_keep=width + 1, use_cache=False)
        return token_logps(out.logits[:, :-1], inputs["completion_ids"], mask)
    attention = inputs["attention_mask"]
    if attention.dim() == 4 and unwrap(model).config._attn_implementation == "eager":
        attention = torch.zeros(attention.shape, dtype=weight.dtype, device=attention.device).masked_fill(
            ~attention, torch.finfo(weight.dtype).min
        )
    elif attention.dim() == 2:
        attention = attention.long()
    hidden = unwrap(model).base_model(
        input_ids=inputs["input_ids"], attention_mask=attention, position_ids=inputs["position_ids"], use_cache=False
    ).last_hidden_state
    rows, positions = _prediction_positions(inputs)
    picked = linear_token_logps(hidden[rows[mask], positions[mask]], weight, inputs["completion_ids"][mask], LOGPROB_CHUNK_TOKENS)
    return torch.zeros(mask.shape, dtype=torch.float32, device=picked.device).masked_scatter(mask, picked)
