"""Greedy generation at every rank from one draft: the same texts as one generation per rank.

Nested ranks mostly agree. So instead of decoding every prompt once per rank:

1. decode every prompt greedily once, at the largest rank of the sweep (the draft);
2. check every other rank against it in one teacher-forced pass of rows x ranks (`set_row_ranks`):
   a rank reproduces the draft exactly when the draft's every token is its argmax given the tokens
   before it (the condition `match.py` uses), up to the token that ends the generation;
3. where rank k first disagrees, at token j, its own greedy generation is the draft's first j
   tokens plus its argmax there: decode on from that point, at rank k, only for those rows.

Step 3 is what greedy decoding at rank k would do, so every text is the one a separate sweep gives
(up to float differences between a cached decode and a full forward, as for any change of batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.model import set_row_ranks
from .generation import decode_cut, eos_ids, generate_tokens, stop_position
from .likelihood import right_pad


@torch.inference_mode()
def first_disagreements(model, prompt_ids: Sequence[list[int]], drafts: Sequence[list[int]], rows: Sequence[tuple[int, int]],
                        batch_size: int, progress=None) -> dict[tuple[int, int], tuple[int, int] | None]:
    """For each row (prompt i, rank k): None when rank k's argmax reproduces draft i, else
    (j, token): the first draft position it does not, and its own argmax there."""
    device = next(model.parameters()).device
    order = sorted(rows, key=lambda row: len(prompt_ids[row[0]]) + len(drafts[row[0]]))
    out: dict = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [prompt_ids[i] + drafts[i] for i, _ in chunk]
        ids = right_pad(seqs, 0).to(device)  # (B, T)
        mask = right_pad([[1] * len(s) for s in seqs], 0).to(device)
        with set_row_ranks(model, [k for _, k in chunk]):
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        pred = logits.argmax(-1).tolist()  # token t + 1 is predicted at position t
        for b, (i, k) in enumerate(chunk):
            p = len(prompt_ids[i])
            guesses = pred[b][p - 1:p - 1 + len(drafts[i])]
            j = next((j for j, (g, d) in enumerate(zip(guesses, drafts[i])) if g != d), None)
            out[(i, k)] = None if j is None else (j, guesses[j])
        if progress is not None:
            progress.update(len(chunk))
    return out


def generate_ranks(model, tokenizer, prompt_ids: Sequence[list[int]], ranks: Sequence[int], stop: Sequence[str],
                   max_new_tokens: int = 256, batch_size: int = 16, progress=None) -> tuple[dict[int, list[str]], dict]:
    """Greedy texts for every prompt at every rank (module docstring), each cut at the first stop string.

    Args:
        model: A matryoshka model (its rank mode is left as it was).
        prompt_ids: Token ids per prompt.
        ranks: Ranks to decode at (0 = the base model).
        stop, max_new_tokens, batch_size, progress: as in `generation.generate`; the bar counts
            draft rows, checked rows and re-decoded rows.

    Returns:
        ({k: [text of prompt 0, ...]}, {"draft_rank", "rows_checked", "rows_redecoded"}).
    """
    top = max(ranks)
    drafts = generate_tokens(model, tokenizer, prompt_ids, stop, max_new_tokens, batch_size, progress,
                             row_ranks=[top] * len(prompt_ids))
    tokens = {top: drafts}
    rows = [(i, k) for k in ranks if k != top for i in range(len(prompt_ids))]
    found = first_disagreements(model, prompt_ids, drafts, rows, batch_size, progress)
    eos = eos_ids(model, tokenizer)
    redo, redo_rows = [], []
    for k in ranks:
        if k != top:
            tokens[k] = list(drafts)
    for (i, k), hit in found.items():
        if hit is None:
            continue
        j, token = hit
        prefix = drafts[i][:j] + [token]
        tokens[k][i] = prefix
        if stop_position(tokenizer, prefix, stop, eos) is None and len(prefix) < max_new_tokens:
            redo.append(prompt_ids[i] + prefix)  # not ended yet: decode on at rank k
            redo_rows.append((i, k))
    if redo:
        if progress is not None:
            progress.total += len(redo)
            progress.refresh()
        budgets = [max_new_tokens - len(tokens[k][i]) for i, k in redo_rows]
        more = generate_tokens(model, tokenizer, redo, stop, max(budgets), batch_size, progress,
                               row_ranks=[k for _, k in redo_rows])
        for (i, k), extra, budget in zip(redo_rows, more, budgets):
            tokens[k][i] = tokens[k][i] + extra[:budget]
    texts = {k: [decode_cut(tokenizer, t, stop) for t in tokens[k]] for k in ranks}
    return texts, {"draft_rank": top, "rows_checked": len(rows), "rows_redecoded": len(redo)}
