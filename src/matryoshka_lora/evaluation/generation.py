"""Generation exact match: batched greedy decoding, cut at stop strings, then one of two scorings.

- GSM8K style (every example has a gold answer and a completion ending in `#### N`: gsm8k,
  arith, wordops): lm-eval gsm8k's strict-match and flexible-extract (`exact_match_strict`,
  `exact_match_flexible`).
- Free form (any other prompt/completion data, or whenever `answer_regex` is set): lm-eval's
  `exact_match` of the generation against the gold (`exact_match`). The gold is the
  `answer_column` value when the data has one, else the gold completion. With `answer_regex`
  the answer is first extracted from the generation, and from a gold completion too (not from an
  answer column, which already holds the bare answer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..core.model import set_row_ranks
from ..data.answers import exact_match, extract_answer, extract_flexible, extract_strict, is_correct


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def stop_position(tokenizer, tokens: Sequence[int], stop: Sequence[str], eos: set[int]) -> int | None:
    """Index of the token that ends a generation: the first EOS, or the first token whose text
    completes a stop string; None when neither occurs. Everything after it is cut.

    Whether a prefix contains a stop string only turns from False to True as it grows, so a
    binary search decodes about log2(len(tokens)) prefixes.
    """
    first_eos = next((j for j, t in enumerate(tokens) if t in eos), None)
    end = len(tokens) - 1 if first_eos is None else first_eos

    def stopped(j: int) -> bool:
        text = tokenizer.decode(tokens[:j + 1], skip_special_tokens=False)
        return any(s and s in text for s in stop)

    if end < 0 or not stop or not stopped(end):
        return first_eos
    lo, hi = 0, end  # the first j with stopped(j) lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stopped(mid) else (mid + 1, hi)
    return lo


def eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def decode_cut(tokenizer, tokens: Sequence[int], stop: Sequence[str]) -> str:
    """The text of generated tokens, cut at the first stop string."""
    return cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=False), stop)


@torch.inference_mode()
def generate_tokens(model, tokenizer, prompt_ids: Sequence[list[int]], stop: Sequence[str], max_new_tokens: int = 256,
                    batch_size: int = 16, progress=None, row_ranks: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy new tokens for each prompt, in input order, up to and including the token that ends
    the generation (`stop_position`); what a longer batch made after it is dropped.

    Args:
        row_ranks: One rank per prompt: each batch runs its rows at their own ranks
            (`set_row_ranks`). None: the model's current mode.
        Others: as in `generate`.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, mask = left_pad([prompt_ids[i] for i in idx], pad_id)
        with set_row_ranks(model, [row_ranks[i] for i in idx]) if row_ranks is not None else nullcontext():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, stop_strings=list(stop) or None, tokenizer=tokenizer,
                                 pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
        new = out[:, input_ids.shape[1]:].tolist()
        for row, i in enumerate(idx):
            end = stop_position(tokenizer, new[row], stop, eos)
            tokens[i] = new[row] if end is None else new[row][:end + 1]
        if progress is not None:
            progress.update(len(idx))
    return tokens


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
    tokens = generate_tokens(model, tokenizer, prompt_ids, stop, max_new_tokens, batch_size, progress)
    return [decode_cut(tokenizer, t, stop) for t in tokens]


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


def compile_answer_regex(answer_regex: str | None) -> re.Pattern | None:
    """`answer_regex` compiled; a regex that does not compile is a ValueError naming it."""
    try:
        return re.compile(answer_regex) if answer_regex is not None else None
    except re.error as e:
        raise ValueError(f"answer_regex={answer_regex!r} is not a valid regular expression ({e}).") from None


@dataclass
class GenerationScorer:
    """Gold answers of one evaluation set and how a generation is scored against them (module docstring)."""

    golds: list[str]
    free_form: bool
    answer_regex: str | None = None
    ignore_case: bool = False
    ignore_punctuation: bool = False

    @classmethod
    def for_examples(cls, examples: Sequence, answer_regex: str | None = None, ignore_case: bool = False,
                     ignore_punctuation: bool = False) -> GenerationScorer:
        """Pick the scoring for `examples` (`data.Example`s) and their golds.

        Raises:
            ValueError: `answer_regex` does not compile, or finds nothing in a gold completion.
        """
        gsm8k = answer_regex is None and all(e.answer is not None and extract_strict(e.completion) is not None
                                             for e in examples)
        if gsm8k:
            return cls([e.answer for e in examples], free_form=False)
        pattern = compile_answer_regex(answer_regex)
        golds = []
        for i, e in enumerate(examples):
            gold = e.answer if e.answer is not None else e.completion
            if pattern is not None and e.answer is None:
                gold = extract_answer(e.completion, pattern)
                if gold is None:
                    raise ValueError(f"answer_regex={answer_regex!r} finds no answer in the gold completion of example "
                                     f"{i} ({e.completion[:80]!r}); fix the regex, or give the bare answers in a "
                                     "column (answer_column).")
            golds.append(gold)
        return cls(golds, True, answer_regex, ignore_case, ignore_punctuation)

    @property
    def metric(self) -> str:
        """The headline metric this scoring reports."""
        return "exact_match" if self.free_form else "exact_match_strict"

    def score(self, texts: Sequence[str]) -> dict:
        """Percent scores ({metric: value}) and per-item records for generations in example order."""
        if not self.free_form:
            scored = score_generations(texts, self.golds)
            return {"scores": {k: scored[k] for k in ("exact_match_strict", "exact_match_flexible")},
                    "items": scored["items"]}
        preds = [t if self.answer_regex is None else extract_answer(t, self.answer_regex) for t in texts]
        correct = [p is not None and exact_match(p, g, self.ignore_case, self.ignore_punctuation)
                   for p, g in zip(preds, self.golds)]
        return {"scores": {"exact_match": 100.0 * sum(correct) / max(len(texts), 1)},
                "items": [{"correct": c, "pred": p, "gold": g} for c, p, g in zip(correct, preds, self.golds)]}
