"""Greedy generation at every rank from one draft: the same texts as one generation per rank.

Nested ranks mostly agree. So instead of decoding every prompt once per rank:

1. decode every prompt greedily once, at the largest rank of the sweep;
2. check the next rank down against those tokens (its draft) in one teacher-forced pass: a rank
   reproduces the draft exactly when the draft's every token is its argmax given the tokens before
   it (the condition `match.py` uses), up to the token that ends the generation;
3. where the rank first disagrees, at token j, its own greedy generation is the draft's first j
   tokens plus its argmax there: decode on from that point, at that rank, only for those rows.
   Its finished tokens are the draft of the rank below it, and so on down to rank 0. Where more
   than 3/4 of a rank's rows departed from their draft, the next rank is decoded directly (its
   check would likely be wasted), and the one after it is checked against it again.

Step 3 is what greedy decoding at rank k would do, so every text is the one a separate sweep gives
(up to float differences between a cached decode and a full forward, as for any change of batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from ..core.model import set_row_ranks
from .generation import decode_cut, eos_ids, generate_tokens, left_pad, stop_position

DIRECT_AFTER = 0.75  # share of a rank's rows re-decoded above which the next rank skips its check


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (most transformers causal LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.inference_mode()
def first_disagreements(model, prompt_ids: Sequence[list[int]], drafts: Sequence[list[int]], rows: Sequence[tuple[int, int]],
                        batch_size: int, progress=None) -> dict[tuple[int, int], tuple[int, int] | None]:
    """For each row (prompt i, rank k): None when rank k's argmax reproduces draft i, else
    (j, token): the first draft position it does not, and its own argmax there.

    Rows are left-padded with the position ids `generate` uses, and only the positions that
    predict a draft token go through the LM head.
    """
    device = next(model.parameters()).device
    keep = _keeps_logits(model)
    order = sorted(rows, key=lambda row: len(prompt_ids[row[0]]) + len(drafts[row[0]]))
    out: dict = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [prompt_ids[i] + drafts[i] for i, _ in chunk]
        n_keep = max(len(drafts[i]) for i, _ in chunk) + 1
        ids, mask = left_pad(seqs, 0)  # (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": n_keep} if keep else {}
        with set_row_ranks(model, [k for _, k in chunk]):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           **extra).logits[:, -n_keep:]  # (B, n_keep, V): the last n_keep positions
        pred = logits.argmax(-1).tolist()
        for b, (i, k) in enumerate(chunk):
            n = len(drafts[i])
            guesses = pred[b][n_keep - n - 1:n_keep - 1]  # draft token d is predicted one position before it
            j = next((j for j, (g, d) in enumerate(zip(guesses, drafts[i])) if g != d), None)
            out[(i, k)] = None if j is None else (j, guesses[j])
        if progress is not None:
            progress.update(len(chunk))
    return out


def generate_ranks(model, tokenizer, prompt_ids: Sequence[list[int]], ranks: Sequence[int], stop: Sequence[str],
                   max_new_tokens: int = 256, batch_size: int = 16, progress=None) -> tuple[dict[int, list[str]], dict]:
    """Greedy texts for every prompt at every rank (module docstring), each cut at the first stop string.

    Ranks go from the largest down; each is checked against the tokens of the rank just above it
    (neighbours agree most), and rank 0 against the smallest.

    Args:
        model: A matryoshka model (its rank mode is left as it was).
        prompt_ids: Token ids per prompt.
        ranks: Ranks to decode at (0 = the base model).
        stop, max_new_tokens, batch_size, progress: as in `generation.generate`; the bar counts
            draft rows, checked rows and re-decoded rows.

    Returns:
        ({k: [text of prompt 0, ...]}, {"draft_rank", "rows_checked", "rows_redecoded", "redecoded": {k: n},
        "decoded_directly": [ranks decoded without a draft]}).
    """
    order = sorted(set(ranks), reverse=True)
    eos = eos_ids(model, tokenizer)
    n = len(prompt_ids)
    tokens = {order[0]: generate_tokens(model, tokenizer, prompt_ids, stop, max_new_tokens, batch_size, progress,
                                        row_ranks=[order[0]] * n)}
    redecoded, direct, departed = {}, [], 0.0
    for above, k in zip(order, order[1:]):
        if departed > DIRECT_AFTER:  # the rank above mostly departed from its draft: decode this one directly
            tokens[k] = generate_tokens(model, tokenizer, prompt_ids, stop, max_new_tokens, batch_size, progress,
                                        row_ranks=[k] * n)
            direct.append(k)
            departed = 0.0  # and check the next rank against it
            continue
        drafts = tokens[above]
        found = first_disagreements(model, prompt_ids, drafts, [(i, k) for i in range(n)], batch_size, progress)
        tokens[k] = list(drafts)
        redo = []
        for (i, _), hit in found.items():
            if hit is not None:
                j, token = hit
                tokens[k][i] = drafts[i][:j] + [token]
                if stop_position(tokenizer, tokens[k][i], stop, eos) is None and j + 1 < max_new_tokens:
                    redo.append(i)  # not ended yet: decode on at rank k
        redecoded[k] = len(redo)
        departed = len(redo) / max(n, 1)
        if redo:
            if progress is not None:
                progress.total += len(redo)
                progress.refresh()
            budgets = [max_new_tokens - len(tokens[k][i]) for i in redo]
            more = generate_tokens(model, tokenizer, [prompt_ids[i] + tokens[k][i] for i in redo], stop, max(budgets),
                                   batch_size, progress, row_ranks=[k] * len(redo))
            for i, extra, budget in zip(redo, more, budgets):
                tokens[k][i] = tokens[k][i] + extra[:budget]
    texts = {k: [decode_cut(tokenizer, t, stop) for t in tokens[k]] for k in ranks}
    return texts, {"draft_rank": order[0], "rows_checked": n * len(redecoded),
                   "rows_redecoded": sum(redecoded.values()), "redecoded": {str(k): v for k, v in redecoded.items()},
                   "decoded_directly": direct}
