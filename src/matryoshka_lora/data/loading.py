"""Data sources: every dataset becomes prompt/completion `Example`s; the loss is on the completion.

Sources (`DataConfig.dataset`):

- `arith`, `wordops`: built-in synthetic tasks (`synthetic.py`), GSM8K answer format.
- `gsm8k`: GSM8K `question`/`answer` JSONL (a directory with train.jsonl/test.jsonl, or one
  file) or `hub:openai/gsm8k` through `datasets`; found and formatted by `gsm8k.py`, exactly
  like lm-eval's gsm8k task: prompt `Question: {question}\\nAnswer:`, completion `" " + answer`.
- a `.jsonl` / `.json` (list of objects) / `.csv` file, or `hub:<name>[:<config>]`, with the
  columns named in the config. `prompt_format="platypus"` builds the prompt as the official
  MatryoshkaLoRA code does for Open-Platypus (`platypus_prompt`):
  `### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n`, the Input
  block only when the input is non-empty.

Boundary rule: the completion is used exactly as stored (a leading space is neither added nor
removed for your own files) and `prompt + completion` is the training text in plain mode.

Splits: `test` is the source's test data (gsm8k test.jsonl; `test_file` or the file itself
for your own files). `validation` is carved out of the training data and `train` is the
rest, so training never sees a validation prompt (`carve_validation`). Nothing is silently
dropped: a bad row stops loading with `file:line: what is wrong`, unless `skip_invalid=True`,
which skips it and reports the count (`Examples.skipped`, plus a logged warning); `rows.py`
reads the files and checks the rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.checks import is_int
from .examples import Example, Examples
from .gsm8k import GSM8K_ENV, GSM8K_HUB, find_gsm8k, gsm8k_example, gsm8k_missing
from .rows import RowError, column_choices, column_text, parse_rows, read_file, read_hub
from .synthetic import generate_arith, generate_wordops

logger = logging.getLogger(__name__)

SYNTHETIC = ("arith", "wordops")
SOURCES = (*SYNTHETIC, "gsm8k")
SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".jsonl", ".json", ".csv")
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 1000, 500  # sizes used when num_train / num_eval is None
PROMPT_FORMATS = ("column", "platypus")


def _is_file_source(dataset: str) -> bool:
    return dataset.lower().endswith(FILE_SUFFIXES)


@dataclass
class DataConfig:
    """Where examples come from, which columns hold what, and how many to use."""

    dataset: str = field(
        default="arith",
        metadata={"help": "arith | wordops | gsm8k | a path to a .jsonl/.json/.csv file | hub:<name>[:<config>] "
                          "(a Hugging Face dataset, downloaded with `datasets`)."},
    )
    data_path: str | None = field(
        default=None,
        metadata={"help": "dataset=gsm8k only: a directory with train.jsonl and test.jsonl, one .jsonl file, "
                          f"or {GSM8K_HUB}. Default: ${GSM8K_ENV}, else the nearest shared/data/gsm8k above the working directory."},
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "A .jsonl/.json/.csv file read for split='test'. Default: gsm8k's test.jsonl (or hub test split); "
                          "for your own data, the dataset itself (right for evaluation-only files such as ARC; "
                          "set it when you also train on the dataset)."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Your own files: column with the prompt, used as-is (e.g. 'instruction')."})
    completion_column: str = field(
        default="completion",
        metadata={"help": "Your own files: column with the completion, used as-is: no space is added between prompt "
                          "and completion (e.g. 'output'). Multiple-choice rows without it train on ' ' + the right choice."},
    )
    prompt_format: str = field(
        default="column",
        metadata={"help": "Your own files: column (the prompt column as-is) | platypus (the official MatryoshkaLoRA "
                          "code's Open-Platypus prompt: '### Instruction:\\n{prompt column}\\n\\n### Input:\\n"
                          "{input column}\\n\\n### Response:\\n', the Input block only when the input is non-empty)."},
    )
    input_column: str = field(default="input", metadata={"help": "prompt_format=platypus: column with the optional input (may be empty or missing per row)."})
    answer_column: str | None = field(default=None, metadata={"help": "Your own files: column with the gold final answer for exact match (optional)."})
    choices_column: str | None = field(
        default=None,
        metadata={"help": "Multiple choice: column with the list of choices (a JSON list in CSV cells, or "
                          "{'text': [...], 'label': [...]} as in ARC). Needs label_column."},
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "Multiple choice: column with the right choice: an index, or one of the choice labels (e.g. 'B')."},
    )
    num_train: int | None = field(
        default=None,
        metadata={"help": f"Training examples to use, a seeded subset (None: the whole train split; arith/wordops: {SYNTHETIC_TRAIN})."},
    )
    num_eval: int | None = field(
        default=None,
        metadata={"help": "At most this many validation/test examples, the first ones (test in file order, like lm-eval's --limit). "
                          f"None: all (arith/wordops test: {SYNTHETIC_TEST})."},
    )
    validation_size: int = field(
        default=200,
        metadata={"help": "Examples held out of the training data as the validation split (never trained on)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Data seed: which arith/wordops problems are drawn and which rows num_train keeps. "
                          "The validation carve does not depend on it; keep it fixed across training seeds."},
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Skip malformed rows (counted in Examples.skipped and logged) instead of stopping at the first one."},
    )
    arith_max_digits: int = field(default=3, metadata={"help": "arith: operands have 1 to this many digits."})
    arith_operations: list[str] = field(
        default_factory=lambda: ["+", "-", "*"], metadata={"help": "arith: operations used, a subset of + - *."}
    )
    arith_two_step: float = field(default=0.3, metadata={"help": "arith: fraction of problems that chain two operations."})

    def __post_init__(self):
        problems = []
        d = self.dataset
        if not isinstance(d, str) or not d.strip():
            problems.append(f"dataset={d!r} must be a non-empty string.")
        elif d not in SOURCES and not d.startswith("hub:") and not _is_file_source(d):
            problems.append(f"Unknown dataset {d!r}. Available: {', '.join(SOURCES)}, a path to a "
                            f"{'/'.join(FILE_SUFFIXES)} file, or hub:<name>[:<config>].")
        if self.data_path is not None and d != "gsm8k":
            problems.append(f"data_path is only read for dataset='gsm8k'; for your own data set dataset={self.data_path!r}.")
        if self.test_file is not None and not (isinstance(self.test_file, str) and _is_file_source(self.test_file)):
            problems.append(f"test_file={self.test_file!r} must be a {'/'.join(FILE_SUFFIXES)} file.")
        if self.prompt_format not in PROMPT_FORMATS:
            problems.append(f"Unknown prompt_format {self.prompt_format!r}. Available: {', '.join(PROMPT_FORMATS)}.")
        elif self.prompt_format != "column" and d in SOURCES:
            problems.append(f"prompt_format={self.prompt_format!r} is for your own files and hub datasets; "
                            f"dataset={d!r} has its own prompt format. Remove prompt_format.")
        for name in ("prompt_column", "completion_column", "input_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                problems.append(f"{name}={getattr(self, name)!r} must be a column name.")
        for name in ("answer_column", "choices_column", "label_column"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                problems.append(f"{name}={v!r} must be a column name or None.")
        if (self.choices_column is None) != (self.label_column is None):
            problems.append("choices_column and label_column go together: set both for multiple choice, or neither.")
        for name in ("num_train", "num_eval"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                problems.append(f"{name}={v!r} must be a positive integer, or None for all.")
        if not is_int(self.validation_size) or self.validation_size < 0:
            problems.append(f"validation_size={self.validation_size!r} must be an integer >= 0.")
        if not is_int(self.seed):
            problems.append(f"seed={self.seed!r} must be an integer.")
        if not isinstance(self.skip_invalid, bool):
            problems.append(f"skip_invalid={self.skip_invalid!r} must be true or false.")
        if not is_int(self.arith_max_digits) or not 1 <= self.arith_max_digits <= 6:
            problems.append(f"arith_max_digits={self.arith_max_digits!r} must be an integer from 1 to 6.")
        ops = self.arith_operations
        if not isinstance(ops, (list, tuple)) or not ops or any(o not in ("+", "-", "*") for o in ops):
            problems.append(f"arith_operations={ops!r} must be a non-empty subset of ['+', '-', '*'].")
        if not isinstance(self.arith_two_step, (int, float)) or not 0.0 <= self.arith_two_step <= 1.0:
            problems.append(f"arith_two_step={self.arith_two_step!r} must be in [0, 1].")
        if problems:
            raise ValueError("Invalid DataConfig:\n" + "\n".join(f"  - {p}" for p in problems))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a plain dict (YAML section); unknown keys are an error that lists the valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown DataConfig keys {unknown}. Valid keys: {', '.join(sorted(known))}.")
        return cls(**d)


# -- your own files: row -> example ----------------------------------------------------------
def platypus_prompt(instruction: str, input: str | None = None) -> str:
    """The official MatryoshkaLoRA code's Open-Platypus prompt; the Input block only for a non-empty input."""
    if input is not None and input.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _file_example(row: dict, config: DataConfig) -> Example:
    prompt = column_text(row, config.prompt_column)
    if config.prompt_format == "platypus":
        extra = row.get(config.input_column)
        if extra is not None and not isinstance(extra, str):
            raise RowError(f"column {config.input_column!r} must be a string, got {type(extra).__name__} ({extra!r})")
        prompt = platypus_prompt(prompt, extra)
    choices = label = None
    if config.choices_column is not None:
        choices, label = column_choices(row, config.choices_column, config.label_column)
    if choices is not None and config.completion_column not in row:
        completion = " " + choices[label]  # lm-eval's default target_delimiter
    else:
        completion = column_text(row, config.completion_column)
    answer = None
    if config.answer_column is not None:
        if config.answer_column not in row:
            column_text(row, config.answer_column)
        v = row[config.answer_column]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or not str(v).strip():
            raise RowError(f"column {config.answer_column!r} must be a non-empty string or number, got {v!r}")
        answer = str(v).strip()
    return Example(prompt=prompt, completion=completion, answer=answer, choices=choices, label=label)


def _source_examples(config: DataConfig, part: str) -> Examples:
    """All examples of the source's `train` or `test` data, in source order."""
    to_example = gsm8k_example if config.dataset == "gsm8k" else functools.partial(_file_example, config=config)
    if part == "test" and config.test_file:
        loc = config.test_file
    elif config.dataset == "gsm8k":
        loc = find_gsm8k(config.data_path)
        if loc is None:
            raise ValueError(gsm8k_missing(f"dataset='gsm8k' found no GSM8K files: data_path and ${GSM8K_ENV} are "
                                             "unset and no shared/data/gsm8k is above the working directory"))
        if not loc.startswith("hub:") and Path(loc).expanduser().is_dir():
            loc = str(Path(loc).expanduser() / f"{part}.jsonl")
    else:
        loc = config.dataset
    if loc.startswith("hub:"):
        default_config = "main" if config.dataset == "gsm8k" else None
        return parse_rows(read_hub(loc, part, default_config), to_example, config.skip_invalid, f"{loc}[{part}]")
    path = Path(loc).expanduser()
    return parse_rows(read_file(path), to_example, config.skip_invalid, str(path))


def _stable_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def carve_validation(examples: list[Example], size: int) -> tuple[list[Example], list[Example]]:
    """Split training data into (train, validation), independent of any seed.

    Validation is the `size` examples whose prompts have the smallest SHA-1 hashes (so a larger
    `size` extends a smaller one); train is every example whose prompt is not among them, in
    source order, so a prompt that appears twice never sits on both sides.

    Returns:
        (train, validation); validation is in hash order.
    """
    order = sorted(range(len(examples)), key=lambda i: (_stable_key(examples[i].prompt), i))
    validation = [examples[i] for i in order[:size]]
    held_out = {e.prompt for e in validation}
    return [e for e in examples if e.prompt not in held_out], validation


def _take(examples: list[Example], n: int | None, name: str, source: str) -> list[Example]:
    if n is not None and n > len(examples):
        logger.warning("%s=%d but %s has %d examples; using all of them.", name, n, source, len(examples))
    return examples if n is None else examples[:n]


def load_examples(config: DataConfig, split: str) -> Examples:
    """Load one split as prompt/completion examples.

    Args:
        config: the data source and sizes.
        split: `train` | `validation` | `test`. `validation` is carved from the training data
            (`carve_validation`) and `train` excludes it; `num_train` keeps a seeded subset of
            train, `num_eval` the first examples of validation/test.

    Returns:
        `Examples` (a list) with `.skipped` = rows dropped by `skip_invalid=True`.

    Raises:
        FileNotFoundError: a data file is missing.
        ValueError: an unknown split, a malformed row (`file:line: problem`), or no examples.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}. Available: {', '.join(SPLITS)}")
    if config.dataset in SYNTHETIC:
        n = {"train": config.num_train or SYNTHETIC_TRAIN, "test": config.num_eval or SYNTHETIC_TEST,
             "validation": min(config.num_eval or config.validation_size, config.validation_size)}[split]
        if n == 0:
            raise ValueError("The validation split is empty: set validation_size > 0.")
        if config.dataset == "arith":
            items = generate_arith(split, n, config.seed, config.arith_max_digits, config.arith_operations, config.arith_two_step)
        else:
            items = generate_wordops(split, n, config.seed)
        return Examples(items, source=f"{config.dataset}[{split}] seed {config.seed}")

    if split == "test":
        data = _source_examples(config, "test")
        return Examples(_take(data, config.num_eval, "num_eval", data.source), data.skipped, data.source)
    data = _source_examples(config, "train")
    train, validation = carve_validation(data, config.validation_size)
    if split == "validation":
        if not validation:
            raise ValueError(f"The validation split of {data.source} is empty: set validation_size > 0.")
        return Examples(_take(validation, config.num_eval, "num_eval", data.source), data.skipped, data.source)
    if not train:
        raise ValueError(f"validation_size={config.validation_size} holds out all {len(data)} examples of "
                         f"{data.source}; lower validation_size so some are left to train on.")
    order = list(range(len(train)))
    random.Random(f"num_train:{config.seed}").shuffle(order)  # a larger num_train extends a smaller one
    picked = [train[i] for i in order] if config.num_train is not None else train
    return Examples(_take(picked, config.num_train, "num_train", data.source), data.skipped, data.source)


def fewshot_examples(config: DataConfig, k: int, seed: int = 1234) -> list[Example]:
    """`k` few-shot examples drawn from the whole train split (never from validation or test).

    The same `k` shots serve every evaluated question, like lm-eval's fixed fewshot split
    (lm-eval's default fewshot seed is 1234). `num_train` does not change the pool.

    Raises:
        ValueError: `k` is negative or larger than the train split.
    """
    if not is_int(k) or k < 0:
        raise ValueError(f"k={k!r} few-shot examples must be an integer >= 0.")
    if k == 0:
        return []
    pool = load_examples(dataclasses.replace(config, num_train=None), "train")
    if k > len(pool):
        raise ValueError(f"k={k} few-shot examples, but the train split of {pool.source} has only {len(pool)}.")
    return random.Random(f"fewshot:{seed}").sample(list(pool), k)
