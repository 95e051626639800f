"""Likelihood metrics: held-out completion loss/perplexity, and multiple choice (ARC/HellaSwag style)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data.prompts import encode_prompt


def right_pad(rows: Sequence[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.inference_mode()
def token_logprobs(model, sequences: Sequence[list[int]], targets: Sequence[list[int]], batch_size: int = 16) -> list[float]:
    """Sum of log p(token) over the positions where `targets` is not -100, per sequence.

    Args:
        sequences: input ids per sequence.
        targets: same length as each sequence; the token id to score or -100 to skip.
    Returns:
        One summed log-probability per sequence (nats).
    """
    device = next(model.parameters()).device
    sums: list[float] = []
    for start in range(0, len(sequences), batch_size):
        seq = sequences[start:start + batch_size]
        ids = right_pad(seq, 0).to(device)
        mask = right_pad([[1] * len(s) for s in seq], 0).to(device)
        tgt = right_pad(targets[start:start + batch_size], -100).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
        tgt = tgt[:, 1:]  # token t is predicted at position t-1
        logp = -F.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")  # (B, T-1)
        sums.extend((logp * (tgt != -100)).sum(1).tolist())
    return sums


def completion_loss(model, encoded: Sequence[dict], batch_size: int = 16) -> dict:
    """Mean NLL per completion token (labels != -100) over held-out examples, and its perplexity."""
    seqs = [e["input_ids"] for e in encoded]
    labels = [e["labels"] for e in encoded]
    total = -sum(token_logprobs(model, seqs, labels, batch_size))
    n = sum(sum(1 for t in lab[1:] if t != -100) for lab in labels)
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def multiple_choice(model, tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]], labels: Sequence[int],
                    batch_size: int = 16) -> dict:
    """lm-eval style multiple choice: pick the choice with the highest log-likelihood.

    `acc` uses the summed log-likelihood; `acc_norm` divides it by the choice's length in bytes.
    Returns percentages and per-item predictions.
    """
    seqs, tgts, spans = [], [], []
    for ctx, opts in zip(contexts, choices):
        ctx_ids = encode_prompt(tokenizer, ctx)
        spans.append((len(seqs), len(opts)))
        for opt in opts:
            # lm-eval's split: encode context+choice, the choice is what follows the context's ids
            cont = encode_prompt(tokenizer, ctx + opt)[len(ctx_ids):] or encode_prompt(tokenizer, opt)
            seqs.append(ctx_ids + cont)
            tgts.append([-100] * len(ctx_ids) + cont)
    scores = token_logprobs(model, seqs, tgts, batch_size)
    acc, acc_norm, preds = [], [], []
    for (start, n), opts, gold in zip(spans, choices, labels):
        s = scores[start:start + n]
        pred = max(range(n), key=lambda i: s[i])
        pred_norm = max(range(n), key=lambda i: s[i] / max(len(opts[i].encode()), 1))
        acc.append(pred == gold)
        acc_norm.append(pred_norm == gold)
        preds.append(pred)
    n = max(len(labels), 1)
    return {"acc": 100.0 * sum(acc) / n, "acc_norm": 100.0 * sum(acc_norm) / n, "items": [{"pred": p} for p in preds]}
