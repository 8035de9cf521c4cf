"""Per-token completion log-probs of a batch of pairs (SPEC §2) in either pair layout
(`reprpo_pl.models.pair_layouts`), and which layout a model can run (`pair_model_inputs`).

`completion_logps` runs the model's backbone and projects only the real completion positions to the
vocabulary with `linear_token_logps`, which never holds a ``[N, C, V]`` tensor (forward or backward).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from reprpo_pl.models.pair_layouts import (
    concat_pairs,
    is_packed,
    pack_pairs,
    prediction_positions,
)

Agg = Literal["mean", "sum"]
AGGS = ("mean", "sum")
PACKED_ATTENTION = ("sdpa", "eager")  # attention implementations that honour a custom 4D mask
LOGPROB_CHUNK_TOKENS = 256  # rows of the [chunk, V] logits block of `linear_token_logps` (256·49152·4 B ≈ 50 MB)


def token_logps(logits: Tensor, ids: Tensor, mask: Tensor, chunk: int = 4, log_sum_sq: list[Tensor] | None = None) -> Tensor:
    """log p(ids_t | prefix) in fp32 as gather − logsumexp, a few rows at a time so no full
    ``[N, C, V]`` fp32 log-softmax is materialised.

    logits: ``[N, C, V]`` (any dtype), already aligned so ``logits[:, t]`` predicts ``ids[:, t]``;
    ids, mask: ``[N, C]``. Returns ``[N, C]``, zero where mask is False. ``log_sum_sq``: a list that gets
    ``log Σ_v p(v)²`` ``[N, C]`` (no gradient) appended."""
    out, sq = [], []
    for rows in range(0, logits.shape[0], chunk):
        lg = logits[rows : rows + chunk].float()
        picked = lg.gather(-1, ids[rows : rows + chunk].unsqueeze(-1)).squeeze(-1)
        lse = torch.logsumexp(lg, dim=-1)
        out.append(picked - lse)
        if log_sum_sq is not None:
            with torch.no_grad():
                sq.append(torch.logsumexp(2 * lg, dim=-1) - 2 * lse)
    if log_sum_sq is not None:
        log_sum_sq.append(torch.where(mask, torch.cat(sq), 0.0))
    return torch.where(mask, torch.cat(out), 0.0)


class _LinearLogps(torch.autograd.Function):
    """``log softmax(h Wᵀ)[y]`` per row with the gradient w.r.t. h computed in the forward.

    ∂ log p(y)/∂h = W[y] − softmax(h Wᵀ) W depends on h alone, and the upstream gradient of each row
    is a scalar, so the forward stores ``G [M, d]`` and the backward is ``grad[:, None] · G``: no
    ``[M, V]`` tensor is kept for (or rebuilt in) the backward. W must be frozen (no gradient)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, ids: Tensor, chunk: int, log_sum_sq: Tensor | None) -> Tensor:  # type: ignore[override]
        logps, grads = _linear_logps_chunks(hidden, weight, ids, chunk, with_grad=True, log_sum_sq=log_sum_sq)
        ctx.save_for_backward(grads)
        return logps

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grads,) = ctx.saved_tensors
        return (grad_out.unsqueeze(-1) * grads).to(grads.dtype), None, None, None, None


def _linear_logps_chunks(hidden: Tensor, weight: Tensor, ids: Tensor, chunk: int, with_grad: bool,
                         log_sum_sq: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[M]`` fp32 (and, with_grad, ∂/∂hidden ``[M, d]`` in hidden's dtype), ``chunk`` rows at a time.
    ``log_sum_sq`` (``[M]`` fp32, filled in place when given): ``log Σ_v p(v)²`` of each row (WPO's alignment term)."""
    logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grads = torch.empty_like(hidden) if with_grad else None
    # the matmuls' weight, cast once: autocast does not cache casts of frozen weights and would cast [V, d] per chunk
    device_type = hidden.device.type
    mm_weight = weight.to(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else weight
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = (hidden[rows].to(mm_weight.dtype) @ mm_weight.T).float()  # [m, V]
        target = ids[rows]
        lse = torch.logsumexp(logits, dim=-1)
        logps[rows] = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse
        if log_sum_sq is not None:
            log_sum_sq[rows] = torch.logsumexp(2 * logits, dim=-1) - 2 * lse
        if grads is not None:
            probs = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of the logits
            grads[rows] = (weight[target] - probs.to(mm_weight.dtype) @ mm_weight).to(hidden.dtype)
    return logps, grads


def linear_token_logps(hidden: Tensor, weight: Tensor, ids: Tensor, chunk: int = LOGPROB_CHUNK_TOKENS,
                       log_sum_sq: Tensor | None = None) -> Tensor:
    """``log softmax(hidden Wᵀ)[ids]`` in fp32 without materialising the logits of all rows.

    hidden: ``[M, d]`` final hidden states (after the final norm); weight: the unembedding ``[V, d]``
    (frozen); ids: ``[M]`` target tokens. Returns ``[M]`` fp32. At most a ``[chunk, V]`` block of
    logits exists at a time, in the forward and (via `_LinearLogps`) in the backward. ``log_sum_sq`` (``[M]``
    fp32, no gradient) is filled in place with ``log Σ_v p(v)²`` per row when given."""
    if weight.requires_grad:
        raise ValueError("linear_token_logps needs a frozen unembedding: its backward returns no weight gradient")
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _LinearLogps.apply(hidden, weight, ids, chunk, log_sum_sq)
    return _linear_logps_chunks(hidden, weight, ids, chunk, with_grad=False, log_sum_sq=log_sum_sq)[0]


def aggregate(logps: Tensor, mask: Tensor, agg: Agg = "mean") -> Tensor:
    """``[N, C]`` per-token log-probs → ``[N]``: masked mean (default, per-token) or sum."""
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if agg == "mean" else total


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
    fp32, zero at padding (see `completion_logps_and_log_sum_sq`)."""
    return _completion_logps(model, inputs, with_log_sum_sq=False)[0]


def completion_logps_and_log_sum_sq(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """`completion_logps` and, per completion token, ``log Σ_v p(v)²`` ``[2B, C]`` fp32 without gradient (zero at
    padding), from the same logits: what WPO's weights need (`reprpo_pl.objectives.wpo`)."""
    logps, log_sum_sq = _completion_logps(model, inputs, with_log_sum_sq=True)
    assert log_sum_sq is not None
    return logps, log_sum_sq


def _completion_logps(model: nn.Module, inputs: dict[str, Tensor], with_log_sum_sq: bool) -> tuple[Tensor, Tensor | None]:
    """Per-token completion log-probs ``[2B, C]`` (and ``log Σ_v p(v)²`` with ``with_log_sum_sq``).

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
        sq: list[Tensor] | None = [] if with_log_sum_sq else None
        logps = token_logps(out.logits[:, :-1], inputs["completion_ids"], mask, log_sum_sq=sq)
        return logps, sq[0] if sq else None
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
    rows, positions = prediction_positions(inputs)
    n_real = int(mask.sum())
    sq = torch.empty(n_real, dtype=torch.float32, device=hidden.device) if with_log_sum_sq else None
    picked = linear_token_logps(hidden[rows[mask], positions[mask]], weight, inputs["completion_ids"][mask],
                                LOGPROB_CHUNK_TOKENS, log_sum_sq=sq)
    scatter = lambda v: torch.zeros(mask.shape, dtype=torch.float32, device=v.device).masked_scatter(mask, v)  # noqa: E731
    return scatter(picked), None if sq is None else scatter(sq)
