"""Teacher-forced completion match: every rank of a sweep in one stacked pass.

A row counts as right at rank k when every completion token (EOS included) is the argmax of the
model at rank k given the gold prefix. That is exactly the condition for greedy decoding from
the prompt to reproduce the completion, so it equals generation exact match of the whole
completion, at the cost of one forward pass instead of one per generated token.

Rows x ranks are stacked into the same batches with `set_row_ranks` (row b runs at its own
rank), so the sweep over |S| ranks plus the base model is one loop over (|S| + 1) x N rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.model import set_row_ranks
from .likelihood import right_pad


@torch.inference_mode()
def completion_match(model, encoded: Sequence[dict], ranks: Sequence[int], batch_size: int = 16,
                     progress=None) -> dict[int, list[bool]]:
    """Per rank, per example: does greedy decoding at that rank reproduce the gold completion?

    Args:
        model: A matryoshka model (any mode; rows run at the given ranks, the mode is restored).
        encoded: `prompts.encode_for_training` dicts: input_ids (T,) and labels (T,), -100 on the prompt.
        ranks: Ranks to score (0 = base model).
        batch_size: Rows per forward pass (a row is one example at one rank).
        progress: Optional tqdm bar, advanced by rows done.

    Returns:
        {k: [hit of example 0, hit of example 1, ...]} for every k in `ranks`.
    """
    device = next(model.parameters()).device
    rows = [(i, k) for i in range(len(encoded)) for k in ranks]
    rows.sort(key=lambda row: len(encoded[row[0]]["input_ids"]))  # similar lengths together: less padding
    hits = {k: [False] * len(encoded) for k in ranks}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seqs = [encoded[i]["input_ids"] for i, _ in chunk]
        ids = right_pad(seqs, 0).to(device)  # (B, T)
        mask = right_pad([[1] * len(s) for s in seqs], 0).to(device)
        labels = right_pad([encoded[i]["labels"] for i, _ in chunk], -100).to(device)
        with set_row_ranks(model, [k for _, k in chunk]):
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]  # token t+1 is predicted at position t
        ok = ((pred == target) | (target == -100)).all(1)  # (B,)
        for (i, k), hit in zip(chunk, ok.tolist()):
            hits[k][i] = hit
        if progress is not None:
            progress.update(len(chunk))
    return hits
