"""Examples -> prompt strings and token ids, with the loss on the completion only.

Two prompt formats, as lm-eval builds them for gsm8k:

- chat (`chat_template=True` and the tokenizer has one): few-shot examples are earlier
  user/assistant turns (lm-eval's `--apply_chat_template --fewshot_as_multiturn`), then the
  user turn `example.prompt` and the generation prompt. An assistant turn holds
  `completion.strip()`: the template separates the turns, as lm-eval passes the bare target.
- plain: `shot.prompt + shot.completion + "\\n\\n"` per shot, then `example.prompt`
  (lm-eval's gsm8k fewshot delimiter); the completion is appended exactly as stored.

Tokenization never adds special tokens (`add_special_tokens=False`): a chat template writes its
own, and lm-eval's HF backend adds no BOS by default; `encode_prompt` is the one rule for the
evaluator too. Training labels are -100 on the prompt tokens; the completion tokens and the
end of the turn (the template's end-of-turn marker, or EOS) carry the loss, so the model learns
to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .examples import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
LM_EVAL_GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml generation_kwargs.until
_warned_no_template: set[str] = set()


class ExampleTooLongError(ValueError):
    """An example's prompt + completion is longer than `max_length` tokens."""


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat_template(tokenizer, chat_template: bool) -> bool:
    """Resolve the `chat_template` flag: True only if asked for and available.

    Asking for it with a tokenizer that has none falls back to the plain format, with one
    warning per tokenizer.
    """
    if chat_template and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if name not in _warned_no_template:
            _warned_no_template.add(name)
            logger.warning("Tokenizer %s has no chat template; using the plain prompt format "
                           "(pass chat_template=False to silence this).", name)
        return False
    return bool(chat_template)


def _messages(example: Example, fewshot: Sequence[Example]) -> list[dict[str, str]]:
    messages = []
    for shot in fewshot:
        messages += [{"role": "user", "content": shot.prompt}, {"role": "assistant", "content": shot.completion.strip()}]
    messages.append({"role": "user", "content": example.prompt})
    return messages


def build_prompt(tokenizer, example: Example, fewshot: Sequence[Example] = (), chat_template: bool = True) -> str:
    """The text the model continues: few-shot examples, then `example.prompt`.

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template is used in chat mode).
        example: the question; its completion is not included.
        fewshot: solved examples shown first (multi-turn in chat mode).
        chat_template: use the tokenizer's chat template if it has one.

    Returns:
        The prompt string. Plain mode for gsm8k:
        `Question: q1\\nAnswer: a1\\n\\nQuestion: q\\nAnswer:`.
    """
    if use_chat_template(tokenizer, chat_template):
        return tokenizer.apply_chat_template(_messages(example, fewshot), tokenize=False, add_generation_prompt=True)
    return "".join(shot.prompt + shot.completion + "\n\n" for shot in fewshot) + example.prompt


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt string, without added special tokens (the rule for training and generation)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _completion_text(tokenizer, example: Example, prompt: str, chat: bool) -> tuple[str, bool]:
    """The text after `prompt` that carries the loss, and whether it already ends the turn."""
    if not chat:
        return example.completion, False
    content = example.completion.strip()
    full = tokenizer.apply_chat_template(_messages(example, ()) + [{"role": "assistant", "content": content}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("The chat template renders the prompt differently once an assistant turn follows, so the "
                         "prompt/completion boundary is undefined; use chat_template=False for this tokenizer.")
    # Keep the template's end-of-turn marker; whitespace after it is not something to learn.
    completion = full[len(prompt):].rstrip()
    return completion, not completion.endswith(content)


def encode_for_training(tokenizer, example: Example, chat_template: bool = True, max_length: int | None = None,
                        index: int | None = None, truncate: bool = False) -> dict[str, list[int]]:
    """Token ids and labels for one training example; the loss covers the completion only.

    The boundary is exact: prompt and prompt+completion are tokenized, and if the prompt's ids
    are a prefix of the whole (the usual case) the whole is used; if the tokenizer merged
    tokens across the boundary, prompt and completion are tokenized separately and
    concatenated. EOS is appended unless the completion already ends with the chat template's
    end-of-turn marker (or with EOS).

    Args:
        tokenizer: a Hugging Face tokenizer.
        example: the prompt/completion pair.
        chat_template: chat format if the tokenizer has a template (see `build_prompt`).
        max_length: longest allowed sequence; longer examples raise, unless `truncate`.
        index: the example's position, named in the error.
        truncate: keep the first `max_length` tokens of a longer example instead (the end of the
            completion and its EOS are cut, as a tokenizer's right-side truncation does). An
            example whose prompt alone fills `max_length` still raises: nothing would be learnt.

    Returns:
        `input_ids`, `attention_mask`, `labels`: lists of length T; `labels` is -100 on the
        prompt tokens and equals `input_ids` elsewhere.

    Raises:
        ExampleTooLongError: the example has more than `max_length` tokens (with `truncate`: its
            prompt alone has `max_length` or more).
    """
    chat = use_chat_template(tokenizer, chat_template)
    prompt = build_prompt(tokenizer, example, (), chat)
    completion, ends_turn = _completion_text(tokenizer, example, prompt, chat)
    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = encode_prompt(tokenizer, prompt + completion)
    if ids[: len(prompt_ids)] != prompt_ids:
        ids = prompt_ids + encode_prompt(tokenizer, completion)
    eos = tokenizer.eos_token_id
    if not ends_turn and ids[-1] != eos:
        if eos is None:
            raise ValueError("The tokenizer has no eos_token, so the model could not learn to stop; set tokenizer.eos_token.")
        ids.append(eos)
    n_prompt = len(prompt_ids)
    if max_length is not None and len(ids) > max_length:
        where = f"Example {index}" if index is not None else "An example"
        if truncate and n_prompt < max_length:
            ids = ids[:max_length]
        elif truncate:
            raise ExampleTooLongError(f"{where} has a {n_prompt}-token prompt >= max_length={max_length}, so truncation "
                                      "leaves no completion token to learn; raise max_length.")
        else:
            raise ExampleTooLongError(
                f"{where} has {len(ids)} tokens ({n_prompt} prompt + {len(ids) - n_prompt} completion) > max_length="
                f"{max_length}; raise max_length, cut it with truncation=True, or drop long examples with drop_long=True.")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


class EncodedExamples(list):
    """Encoded training features plus `dropped` (examples over `max_length` left out) and
    `truncated` (examples cut to `max_length`)."""

    def __init__(self, items=(), dropped: int = 0, truncated: int = 0):
        super().__init__(items)
        self.dropped = dropped
        self.truncated = truncated


def encode_examples(tokenizer, examples: Sequence[Example], chat_template: bool = True, max_length: int | None = None,
                    drop_long: bool = False, truncate: bool = False) -> EncodedExamples:
    """`encode_for_training` over a dataset; a list the HF Trainer takes as `train_dataset`.

    Args:
        drop_long: skip (and count, in `.dropped`, and log) examples over `max_length`
            instead of raising on the first one.
        truncate: cut examples over `max_length` to their first `max_length` tokens (counted in
            `.truncated`, and logged); with `drop_long`, examples whose prompt alone fills
            `max_length` are dropped, else they raise.
    """
    out, dropped, truncated = [], 0, 0
    for i, example in enumerate(examples):
        try:
            out.append(encode_for_training(tokenizer, example, chat_template, max_length, index=i))
            continue
        except ExampleTooLongError:
            if not (truncate or drop_long):
                raise
        if truncate:
            try:
                out.append(encode_for_training(tokenizer, example, chat_template, max_length, index=i, truncate=True))
                truncated += 1
                continue
            except ExampleTooLongError:
                if not drop_long:
                    raise
        dropped += 1
    if dropped:
        logger.warning("Dropped %d of %d examples longer than max_length=%s (drop_long=True).", dropped, len(examples), max_length)
    if truncated:
        logger.warning("Truncated %d of %d examples to max_length=%s tokens (truncation=True).", truncated, len(examples),
                       max_length)
    if not out:
        raise ValueError(f"No training examples left: all {len(examples)} are longer than max_length={max_length}; raise it.")
    return EncodedExamples(out, dropped, truncated)


@dataclass
class PadCollator:
    """Right-pads `input_ids` / `attention_mask` / `labels` into (B, T) tensors for the HF Trainer.

    Not `DataCollatorForSeq2Seq`: that pads on `tokenizer.padding_side`, which generation sets
    to "left"; training here always pads on the right, with labels -100 on padding.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}  # each (B, T)


def make_collator(tokenizer, pad_to_multiple_of: int | None = None) -> PadCollator:
    """A `PadCollator` padding with the tokenizer's pad token, else its EOS (masked, so harmless)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token.")
    return PadCollator(pad, pad_to_multiple_of)


def end_of_turn(tokenizer) -> str | None:
    """The text the chat template writes after an assistant message (e.g. `<|im_end|>`), or None."""
    if not has_chat_template(tokenizer):
        return None
    marker = "\x00MLORA\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    tail = text.split(marker, 1)[1].strip() if marker in text else ""
    return tail or None


def stop_strings(chat_template: bool, tokenizer) -> list[str]:
    """Strings that end a generation: lm-eval gsm8k's `until` list, the tokenizer's EOS, and
    (in chat mode) the template's end-of-turn marker.

    Returns:
        Distinct strings, lm-eval's first: `["Question:", "</s>", "<|im_end|>", ...]`.
    """
    stops = list(LM_EVAL_GSM8K_UNTIL)
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    if use_chat_template(tokenizer, chat_template):
        stops.append(end_of_turn(tokenizer))
    return list(dict.fromkeys(s for s in stops if s))
