"""Generation exact match: batched greedy decoding, cut at stop strings, lm-eval gsm8k extraction."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .extract import extract_flexible, extract_strict, is_correct


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    return input_ids, mask


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


@torch.inference_mode()
def generate(model, tokenizer, prompt_ids: Sequence[list[int]], stop: Sequence[str], max_new_tokens: int = 256,
             batch_size: int = 16, progress=None) -> list[str]:
    """Greedy continuations for each prompt, in input order, each cut at the first stop string.

    Args:
        model: A causal LM (a matryoshka model at its current rank).
        tokenizer: Its tokenizer (decodes the new tokens).
        prompt_ids: Token ids per prompt (`prompts.encode_prompt`), tokenized once per sweep.
        stop: Stop strings; decoding of a row ends when one appears.
        max_new_tokens: Length cap per continuation.
        batch_size: Prompts per `generate` call (left-padded, longest first).
        progress: Optional tqdm bar, advanced by rows done.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    texts: list[str] = [""] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, mask = _left_pad([prompt_ids[i] for i in idx], pad_id)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, stop_strings=list(stop) or None, tokenizer=tokenizer,
                             pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
        new = out[:, input_ids.shape[1]:]
        for row, i in enumerate(idx):
            texts[i] = cut_at_stop(tokenizer.decode(new[row], skip_special_tokens=False), stop)
        if progress is not None:
            progress.update(len(idx))
    return texts


def score_generations(texts: Sequence[str], golds: Sequence[str]) -> dict:
    """Exact match in percent under lm-eval's strict-match and flexible-extract, plus per-item flags."""
    strict = [is_correct(t, g, "strict") for t, g in zip(texts, golds)]
    flexible = [is_correct(t, g, "flexible") for t, g in zip(texts, golds)]
    n = max(len(texts), 1)
    return {
        "exact_match_strict": 100.0 * sum(strict) / n,
        "exact_match_flexible": 100.0 * sum(flexible) / n,
        "items": [{"strict": s, "flexible": f, "pred_strict": extract_strict(t), "pred_flexible": extract_flexible(t)}
                  for s, f, t in zip(strict, flexible, texts)],
    }
