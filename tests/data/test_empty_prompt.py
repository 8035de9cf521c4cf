"""An empty prompt (ETHICS utilitarianism pairs without a shared prefix, with the chat template off or a
tokenizer without one) gets a one-token context, the tokenizer's BOS (EOS where it has none): else the
first completion token is "predicted" from a padding column and its score depends on the batch."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.eval.scorer import score_pairs

RAW = TokenizeConfig(max_length=128, max_prompt_length=64, chat_template=False)
EMPTY = {"prompt": "", "chosen": "I baked bread.", "rejected": "My car broke down."}


def _tokenize(rows: list[dict], tokenizer) -> list[dict]:
    return list(tokenize_pairs(Dataset.from_list(rows), tokenizer, RAW))


def test_empty_prompt_gets_bos_else_eos(tokenizer):
    context = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    (row,) = _tokenize([EMPTY], tokenizer)
    assert row["prompt_ids"] == [context]
    assert row["chosen_ids"][: 3] == tokenizer("I baked bread.", add_special_tokens=False)["input_ids"][:3]
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    (row,) = _tokenize([EMPTY], no_bos)
    assert row["prompt_ids"] == [no_bos.eos_token_id]
    (row,) = _tokenize([{**EMPTY, "prompt": "What happened?"}], tokenizer)  # a non-empty prompt is left as it is
    assert row["prompt_ids"] == tokenizer("What happened?")["input_ids"]


def test_empty_prompt_scores_do_not_depend_on_the_batch(tiny_peft, pairs, tokenizer):
    """The same pair scored alone and after rows with longer prompts (left padding before its context)
    gives the same summed log-probs, with the adapter and without; and they match a bare forward."""
    empty = _tokenize([EMPTY], tokenizer)
    longer = _tokenize(pairs.to_list(), tokenizer)
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    alone = score_pairs(tiny_peft, torch.utils.data.DataLoader(empty, batch_size=1, collate_fn=collate))
    batched = score_pairs(tiny_peft, torch.utils.data.DataLoader([*longer, *empty], batch_size=len(longer) + 1,
                                                                  collate_fn=collate))
    for role in ("adapter", "base"):
        for key in ("logp_cho", "logp_rej"):
            torch.testing.assert_close(getattr(batched[role], key)[-1], getattr(alone[role], key)[0], atol=1e-4, rtol=0)
    ids = torch.tensor([empty[0]["prompt_ids"] + empty[0]["chosen_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_peft.eval()(input_ids=ids).logits[0, :-1].double(), -1)
    expected = sum(logp[t, tok] for t, tok in enumerate(ids[0, 1:].tolist())).float()
    torch.testing.assert_close(alone["adapter"].logp_cho[0], expected, atol=1e-4, rtol=0)
