"""Evaluate one loaded model at every rank: set_rank, score, repeat. The model is never reloaded.

Prompts and targets are tokenized once; each rank only switches the cached P vector
(`set_rank`) and runs the same batches. Rank 0 is the base model ("PT" in the paper's tables).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..core.model import get_controller, set_rank
from ..core.ranks import check_sweep_ranks
from ..data.prompts import build_prompt, encode_examples, encode_prompt, stop_strings
from .generation import (
    GenerationScorer,
    compile_answer_regex,
    decode_cut,
    eos_ids,
    generate,
    stop_position,
)
from .likelihood import completion_loss, multiple_choice
from .match import completion_match
from .rank_generation import generate_ranks

METRICS = ("generate", "match", "loss", "mc")


@dataclass
class EvalConfig:
    """What to measure at each rank."""

    eval_ranks: list[int] | None = field(default=None, metadata={"help": "Ranks to evaluate (default: the adapter's rank set). Rank 0 (base) is added."})
    metrics: list[str] = field(default_factory=lambda: ["generate", "loss"],
                               metadata={"help": "generate (exact match) | match (teacher-forced: greedy decoding would reproduce the "
                                                 "whole completion; all ranks in one pass) | loss (held-out NLL) | "
                                                 "mc (multiple choice log-likelihood)."})
    num_fewshot: int = field(default=0, metadata={"help": "Few-shot examples from the train split in each generation prompt."})
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts per batch when evaluating."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length cap."})
    include_base: bool = field(default=True, metadata={"help": "Also evaluate rank 0, the base model."})
    one_pass: bool = field(
        default=True,
        metadata={"help": "Score every rank together: loss and mc stack rows x ranks into the same batches (match "
                          "always does). The same numbers as rank by rank; False scores one rank after another."})
    draft_generation: bool = field(
        default=False,
        metadata={"help": "generate, with one_pass: decode once at the largest rank, check each rank against the rank "
                          "above it in one teacher-forced pass, and decode on only where it departs (the same texts). "
                          "It pays where neighbouring ranks agree: 0.75x rank by rank on an SVD-ordered adapter on "
                          "CPU, but 0.91-1.10x on adapters whose low ranks disagree (README, Performance)."})
    decode_misses: bool = field(
        default=False,
        metadata={"help": "generate + match: decode only the rows teacher-forced match missed at each rank. A matched "
                          "row is one greedy decoding reproduces, so it is scored on its gold completion (cut as a "
                          "generation would be): the same scores with fewer decodes. Needs num_fewshot 0."})
    answer_regex: str | None = field(
        default=None,
        metadata={"help": "generate, free-form data: a regex whose first match (its first group, if any) is the answer, "
                          "taken from the generation and from the gold completion, as lm-eval's regex filter "
                          "(e.g. 'answer is (\\S+)'). Default: the whole generation against the whole gold."})
    ignore_case: bool = field(default=False, metadata={"help": "generate, free-form data: compare answers case-insensitively (lm-eval's exact_match ignore_case)."})
    ignore_punctuation: bool = field(default=False, metadata={"help": "generate, free-form data: drop punctuation before comparing (lm-eval's exact_match ignore_punctuation)."})

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"Unknown metrics {unknown}. Available: {', '.join(METRICS)}")
        if self.num_fewshot < 0 or self.eval_batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("num_fewshot must be >= 0; eval_batch_size and max_new_tokens >= 1.")
        if self.answer_regex is not None:
            compile_answer_regex(self.answer_regex)
        if self.decode_misses and not {"generate", "match"} <= set(self.metrics):
            raise ValueError("decode_misses skips the rows match already scored: use it with metrics generate and "
                             "match, or turn it off.")
        if self.decode_misses and (self.num_fewshot or self.draft_generation):
            raise ValueError("decode_misses needs num_fewshot 0 (match scores zero-shot prompts) and "
                             "draft_generation off; turn it off or change those.")


def headline_metric(metrics: Sequence[str], scorer: GenerationScorer | None = None) -> str:
    if "generate" in metrics:
        return scorer.metric if scorer is not None else "exact_match_strict"
    if "match" in metrics:
        return "match"
    if "mc" in metrics:
        return "acc"
    return "loss"


class _Prepared:
    """Everything tokenized once for the whole sweep."""

    def __init__(self, tokenizer, examples, fewshot, config: EvalConfig, chat_template: bool, max_length: int,
                 truncate: bool = False):
        self.gen = self.loss = self.mc = self.match = None
        if "generate" in config.metrics:  # (prompt ids, scorer): GSM8K-style or free-form exact match
            scorer = GenerationScorer.for_examples(examples, config.answer_regex, config.ignore_case,
                                                   config.ignore_punctuation)
            prompts = [build_prompt(tokenizer, e, fewshot, chat_template) for e in examples]
            self.gen = ([encode_prompt(tokenizer, p) for p in prompts], scorer)
        if "loss" in config.metrics or "match" in config.metrics:
            encoded = encode_examples(tokenizer, examples, chat_template, max_length, drop_long=truncate,
                                      truncate=truncate)
            self.loss = encoded if "loss" in config.metrics else None
            self.match = encoded if "match" in config.metrics else None
        if "mc" in config.metrics:
            usable = [e for e in examples if getattr(e, "choices", None)]
            if not usable:
                raise ValueError("metric 'mc' needs examples with choices and a label; set --choices-column/--label-column.")
            self.mc = ([build_prompt(tokenizer, e, fewshot, chat_template) for e in usable],
                       [e.choices for e in usable], [e.label for e in usable])


def _score_texts(prep: _Prepared, texts: list[str]) -> dict:
    scored = prep.gen[1].score(texts)
    return {**scored["scores"], "_items": [dict(item, text=t) for item, t in zip(scored["items"], texts)]}


def _score_generation(model, tokenizer, prep: _Prepared, config: EvalConfig, stop, bar,
                      known: dict[int, str] | None = None) -> dict:
    """Generation scores at the model's current rank; rows in `known` (row -> text) are not decoded."""
    known = known or {}
    rows = [i for i in range(len(prep.gen[0])) if i not in known]
    if bar is not None and known:
        bar.update(len(known))
    texts = dict(known)
    texts.update(zip(rows, generate(model, tokenizer, [prep.gen[0][i] for i in rows], stop, config.max_new_tokens,
                                    config.eval_batch_size, bar)))
    return {**_score_texts(prep, [texts[i] for i in range(len(prep.gen[0]))]), "_decoded": len(rows)}


def matched_texts(model, tokenizer, prep: _Prepared, hits: dict[int, list[bool]], stop, max_new_tokens: int
                  ) -> dict[int, dict[int, str]]:
    """{rank: {row: text}} for the rows teacher-forced match scored right. Greedy decoding there writes
    the gold completion's tokens, so its text is theirs, cut where `generate` cuts (length cap, EOS,
    stop string). A row is left to decode when its match prompt is not the generation prompt token
    for token, or when decoding would run on past the gold tokens (a truncated completion)."""
    eos, golds = eos_ids(model, tokenizer), {}
    for i, row in enumerate(prep.match):
        n_prompt = sum(label == -100 for label in row["labels"])
        if row["input_ids"][:n_prompt] != list(prep.gen[0][i]):
            continue
        gold = row["input_ids"][n_prompt:][:max_new_tokens]
        end = stop_position(tokenizer, gold, stop, eos)
        if end is not None or len(gold) == max_new_tokens:
            golds[i] = decode_cut(tokenizer, gold if end is None else gold[:end + 1], stop)
    return {k: {i: golds[i] for i, hit in enumerate(h) if hit and i in golds} for k, h in hits.items()}


def _score_once(model, tokenizer, prep: _Prepared, config: EvalConfig, stop, bar, known=None) -> dict:
    """Every metric at the model's current rank."""
    out: dict = {}
    if prep.gen is not None:
        out.update(_score_generation(model, tokenizer, prep, config, stop, bar, known))
    if prep.loss is not None:
        out.update(completion_loss(model, prep.loss, config.eval_batch_size))
    if prep.mc is not None:
        mc = multiple_choice(model, tokenizer, *prep.mc, batch_size=config.eval_batch_size)
        out.update(acc=mc["acc"], acc_norm=mc["acc_norm"])
    return out


def _score_all(model, tokenizer, prep: _Prepared, config: EvalConfig, stop, ranks, bar,
               known: dict[int, dict[int, str]] | None = None) -> tuple[dict, dict | None]:
    """Every metric at every rank together (`EvalConfig.one_pass`): ({k: scores}, draft generation stats)."""
    out: dict = {k: {} for k in ranks}
    known = known or {}
    stats = None
    if prep.gen is not None and config.draft_generation:
        texts, stats = generate_ranks(model, tokenizer, prep.gen[0], ranks, stop, config.max_new_tokens,
                                      config.eval_batch_size, bar)
        for k in ranks:
            out[k].update(_score_texts(prep, texts[k]))
    elif prep.gen is not None:
        for k in ranks:
            with set_rank(model, k):
                out[k].update(_score_generation(model, tokenizer, prep, config, stop, bar, known.get(k)))
    if prep.loss is not None:
        for k, scores in completion_loss(model, prep.loss, config.eval_batch_size, ranks=ranks).items():
            out[k].update(scores)
    if prep.mc is not None:
        for k, mc in multiple_choice(model, tokenizer, *prep.mc, batch_size=config.eval_batch_size, ranks=ranks).items():
            out[k].update(acc=mc["acc"], acc_norm=mc["acc_norm"])
    return out, stats


def each_rank(model, ranks: Sequence[int], score, bar=None) -> tuple[dict[int, dict], dict[str, float]]:
    """The rank-sweep loop of every scorer (built-in and lm-eval): `score(k)` with the model at rank k.

    Args:
        model: A matryoshka model; its rank mode is restored after each rank.
        ranks: Ranks in order (0 = the base model).
        score: k -> {metric: value}.
        bar: Optional tqdm bar that shows the current rank.

    Returns:
        ({k: scores}, {str(k): seconds}).
    """
    per_rank, seconds = {}, {}
    for k in ranks:
        if bar is not None:
            bar.set_postfix(rank=k)
        start = time.perf_counter()
        with set_rank(model, k):
            per_rank[k] = score(k)
        seconds[str(k)] = time.perf_counter() - start
    return per_rank, seconds


def evaluate_ranks(model, tokenizer, examples, config: EvalConfig, fewshot=(), chat_template: bool = True,
                   max_length: int = 1024, keep_items: bool = False, truncate: bool = False) -> dict:
    """Score a matryoshka model at each rank (and rank 0) on the same examples.

    Args:
        model: A model from get_matryoshka_model / load_matryoshka_model.
        tokenizer: Its tokenizer.
        examples: `data.Example` list (held-out split).
        config: Ranks and metrics.
        fewshot: Examples shown before each prompt.
        chat_template: Format prompts with the tokenizer's chat template when it has one.
        max_length: Token cap for the loss metric's encodings.
        truncate: Loss and match metrics: cut longer examples to max_length (and leave out those whose
            prompt alone fills it) instead of raising, as training with `truncation` does.
        keep_items: Keep per-item generations under "items" (and per-example match flags under "match_hits").

    Returns:
        {"metric", "ranks", "base", "per_rank": {k: {metric: value}}, "timings", ["items"]}.
    """
    controller = get_controller(model)
    ranks = check_sweep_ranks(controller.config.r, controller.config.ranks, config.eval_ranks or None)
    prep = _Prepared(tokenizer, examples, fewshot, config, chat_template, max_length, truncate)
    stop = stop_strings(chat_template, tokenizer)
    todo = ([0] if config.include_base else []) + ranks
    per_rank, items, match_hits, match_seconds = {k: {} for k in todo}, {}, {}, None
    model.eval()
    if prep.match is not None:  # every rank in one stacked pass
        start = time.perf_counter()
        with tqdm(total=len(prep.match) * len(todo), desc="eval (match rows)") as bar:
            hits = completion_match(model, prep.match, todo, config.eval_batch_size, bar)
        for k in todo:
            per_rank[k]["match"] = 100.0 * sum(hits[k]) / max(len(hits[k]), 1)
            if keep_items:
                match_hits[str(k)] = hits[k]
        match_seconds = time.perf_counter() - start
    n_gen = len(prep.gen[0]) if prep.gen else 0
    known: dict[int, dict[int, str]] = {}
    if config.decode_misses:  # EvalConfig checked that metrics has generate and match
        if len(prep.match) != n_gen:
            raise ValueError("decode_misses: match left out examples too long for max_length; raise max_length or "
                             "turn decode_misses off.")
        known = matched_texts(model, tokenizer, prep, hits, stop, config.max_new_tokens)
    draft_stats = None
    with tqdm(total=n_gen * len(todo), desc="eval (generation rows)", disable=n_gen == 0) as bar:
        if config.one_pass and len(todo) > 1:
            start = time.perf_counter()
            scored, draft_stats = _score_all(model, tokenizer, prep, config, stop, todo, bar, known)
            timings = {"seconds_all_ranks": time.perf_counter() - start}
        else:
            scored, per_rank_seconds = each_rank(model, todo, lambda k: _score_once(model, tokenizer, prep, config,
                                                                                   stop, bar, known.get(k)), bar)
            timings = {"seconds_per_rank": per_rank_seconds}
    decoded = {str(k): scored[k].pop("_decoded") for k in todo if "_decoded" in scored[k]}
    for k in todo:
        item_list = scored[k].pop("_items", None)
        if keep_items and item_list is not None:
            items[str(k)] = item_list
        per_rank[k].update(scored[k])
    result = {
        "metric": headline_metric(config.metrics, prep.gen and prep.gen[1]),
        "ranks": ranks,
        "base": per_rank.pop(0) if config.include_base else None,
        "per_rank": per_rank,
        "timings": {**timings, "n_examples": len(examples),
                    **({"match_seconds_all_ranks": match_seconds} if match_seconds is not None else {}),
                    **({"generation_draft": draft_stats} if draft_stats is not None else {}),
                    **({"decoded_rows": decoded} if config.decode_misses else {})},
    }
    if keep_items:
        result["items"] = items
        if match_hits:
            result["match_hits"] = match_hits
    return result
