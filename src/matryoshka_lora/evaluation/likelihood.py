"""Likelihood metrics: held-out completion loss/perplexity, and multiple choice (ARC/HellaSwag style)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..core.model import set_row_ranks
from ..data.prompts import encode_prompt


def right_pad(rows: Sequence[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.inference_mode()
def token_logprobs(model, sequences: Sequence[list[int]], targets: Sequence[list[int]], batch_size: int = 16,
                   row_ranks: Sequence[int] | None = None) -> list[float]:
    """Sum of log p(token) over the positions where `targets` is not -100, per sequence.

    Args:
        sequences: input ids per sequence.
        targets: same length as each sequence; the token id to score or -100 to skip.
        row_ranks: One rank per sequence (`set_row_ranks`); None: the model's current mode.
    Returns:
        One summed log-probability per sequence (nats), in input order. Sequences are batched
        by length (less padding).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    sums = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seq = [sequences[i] for i in idx]
        ids = right_pad(seq, 0).to(device)
        mask = right_pad([[1] * len(s) for s in seq], 0).to(device)
        tgt = right_pad([targets[i] for i in idx], -100).to(device)
        with set_row_ranks(model, [row_ranks[i] for i in idx]) if row_ranks is not None else nullcontext():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
        tgt = tgt[:, 1:]  # token t is predicted at position t-1
        logp = -F.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")  # (B, T-1)
        for i, value in zip(idx, (logp * (tgt != -100)).sum(1).tolist()):
            sums[i] = value
    return sums


def _stacked(ranks: Sequence[int] | None, n: int) -> tuple[list[int], list[int] | None]:
    """Row i of rank block b: the index of its sequence, and its rank (None: one block, current mode)."""
    if ranks is None:
        return list(range(n)), None
    return [i for _ in ranks for i in range(n)], [k for k in ranks for _ in range(n)]


def completion_loss(model, encoded: Sequence[dict], batch_size: int = 16, ranks: Sequence[int] | None = None):
    """Mean NLL per completion token (labels != -100) over held-out examples, and its perplexity.

    With `ranks`, every rank in one pass of stacked rows x ranks: {k: {"loss", "perplexity"}}.
    """
    seqs = [e["input_ids"] for e in encoded]
    labels = [e["labels"] for e in encoded]
    rows, row_ranks = _stacked(ranks, len(seqs))
    sums = token_logprobs(model, [seqs[i] for i in rows], [labels[i] for i in rows], batch_size, row_ranks)
    n = sum(sum(1 for t in lab[1:] if t != -100) for lab in labels)
    out = {}
    for b, k in enumerate(ranks if ranks is not None else [None]):
        loss = -sum(sums[b * len(seqs):(b + 1) * len(seqs)]) / max(n, 1)
        out[k] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return out if ranks is not None else out[None]


def multiple_choice(model, tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]], labels: Sequence[int],
                    batch_size: int = 16, ranks: Sequence[int] | None = None) -> dict:
    """lm-eval style multiple choice: pick the choice with the highest log-likelihood.

    `acc` uses the summed log-likelihood; `acc_norm` divides it by the choice's length in bytes.
    Returns percentages and per-item predictions; with `ranks`, {k: that} from one stacked pass.
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
    rows, row_ranks = _stacked(ranks, len(seqs))
    all_scores = token_logprobs(model, [seqs[i] for i in rows], [tgts[i] for i in rows], batch_size, row_ranks)
    out = {}
    for b, k in enumerate(ranks if ranks is not None else [None]):
        out[k] = _choose(all_scores[b * len(seqs):(b + 1) * len(seqs)], spans, choices, labels)
    return out if ranks is not None else out[None]


def _choose(scores: Sequence[float], spans, choices, labels) -> dict:
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
