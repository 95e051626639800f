"""Data sources: every dataset becomes prompt/completion `Example`s; the loss is on the completion.

Sources (`DataConfig.dataset`):

- `arith`, `wordops`: built-in synthetic tasks (`synthetic.py`), GSM8K answer format.
- `gsm8k`: GSM8K `question`/`answer` JSONL (a directory with train.jsonl/test.jsonl, or one
  file) or `hub:openai/gsm8k` through `datasets`. Formatted exactly like lm-eval's gsm8k task:
  prompt `Question: {question}\\nAnswer:`, completion `" " + answer`.
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
which skips it and reports the count (`Examples.skipped`, plus a logged warning).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SYNTHETIC = ("arith", "wordops")
SOURCES = (*SYNTHETIC, "gsm8k")
SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".jsonl", ".json", ".csv")
GSM8K_ENV = "MLORA_GSM8K_DIR"
GSM8K_HUB = "hub:openai/gsm8k"
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 1000, 500  # sizes used when num_train / num_eval is None
PROMPT_FORMATS = ("column", "platypus")


@dataclass
class Example:
    """One prompt/completion pair; the training loss covers `completion` only."""

    prompt: str
    completion: str
    answer: str | None = None  # gold final answer for exact match ("42"); None otherwise
    choices: list[str] | None = None  # multiple choice: candidate continuations
    label: int | None = None  # multiple choice: index of the right one in `choices`


class Examples(list):
    """A list of `Example`s that also says where they came from and how many rows were skipped."""

    def __init__(self, items: Iterable[Example] = (), skipped: int = 0, source: str = ""):
        super().__init__(items)
        self.skipped = skipped  # invalid rows dropped because skip_invalid=True
        self.source = source


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
                          f"or {GSM8K_HUB}. Default: ${GSM8K_ENV}."},
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
            if v is not None and (not _is_int(v) or v < 1):
                problems.append(f"{name}={v!r} must be a positive integer, or None for all.")
        if not _is_int(self.validation_size) or self.validation_size < 0:
            problems.append(f"validation_size={self.validation_size!r} must be an integer >= 0.")
        if not _is_int(self.seed):
            problems.append(f"seed={self.seed!r} must be an integer.")
        if not isinstance(self.skip_invalid, bool):
            problems.append(f"skip_invalid={self.skip_invalid!r} must be true or false.")
        if not _is_int(self.arith_max_digits) or not 1 <= self.arith_max_digits <= 6:
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


# -- reading rows -------------------------------------------------------------------------------
Row = tuple[str, Any, str | None]  # (location "file:line", row dict, problem or None)


def _open_text(path: Path, binary: bool = False):
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"Data file {path} {what}; check the path (dataset / data_path / test_file).")
    return path.open("rb") if binary else path.open(encoding="utf-8-sig", newline="")


def _read_jsonl(path: Path) -> Iterator[Row]:
    with _open_text(path, binary=True) as f:  # decoded line by line: a line that is not UTF-8 is one bad row
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", None, f"not UTF-8 text (byte {e.start + 1} of the line); re-save the file as UTF-8"
                continue
            if not line.strip():
                continue  # blank lines hold no row (trailing newlines are common)
            try:
                yield f"{path}:{lineno}", json.loads(line), None
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", None, f"invalid JSON ({e.msg} at column {e.colno})"
            except RecursionError:
                yield f"{path}:{lineno}", None, "invalid JSON (nested too deeply)"


def _read_json(path: Path) -> Iterator[Row]:
    with _open_text(path) as f:
        text = f.read()
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); a .json file must hold one list of objects "
                         "(use .jsonl for one object per line).") from e
    except RecursionError:
        raise ValueError(f"{path}:1: invalid JSON (nested too deeply); a .json file must hold one list of objects.") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json data file must hold a list of objects, got {type(data).__name__}.")
    for i, row in enumerate(data):
        yield f"{path}: item {i}", row, None


def _read_csv(path: Path) -> Iterator[Row]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                loc = f"{path}:{reader.line_num}"
                if None in row:  # DictReader files extra cells under the key None
                    yield loc, None, f"{len(reader.fieldnames) + len(row[None])} cells but the header has {len(reader.fieldnames)}"
                else:
                    yield loc, row, None
        except csv.Error as e:  # a NUL byte, a field over the size limit: the reader cannot go on
            raise ValueError(f"{path}:{reader.line_num + 1}: unreadable CSV ({e}); fix the file (quote cells that "
                             "hold commas, quotes or line breaks).") from None


def _read_file(path: Path) -> Iterator[Row]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    try:
        yield from readers[path.suffix.lower()](path)
    except UnicodeDecodeError:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:  # decoded whole, the position counts from the start of the file
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start + 1}); re-save the file "
                             "as UTF-8.") from None
        raise


def _read_hub(spec: str, split: str, default_config: str | None = None) -> Iterator[Row]:
    import datasets  # only on request: this downloads

    name, _, config = spec[len("hub:"):].partition(":")
    ds = datasets.load_dataset(name, config or default_config, split=split)
    for i, row in enumerate(ds):
        yield f"{spec}[{split}] row {i}", row, None


# -- rows -> examples ---------------------------------------------------------------------------
class _RowError(ValueError):
    pass


def _text(row: dict, column: str) -> str:
    if column not in row:
        raise _RowError(f"missing column {column!r}; available columns: {', '.join(map(str, row))}. "
                        f"Set the matching *_column option to one of them.")
    v = row[column]
    if v is None or (isinstance(v, str) and not v.strip()):
        raise _RowError(f"column {column!r} is empty")
    if not isinstance(v, str):
        raise _RowError(f"column {column!r} must be a string, got {type(v).__name__} ({v!r})")
    return v


def _choices(row: dict, config: DataConfig) -> tuple[list[str], int]:
    if config.choices_column not in row:
        _text(row, config.choices_column)  # raises the missing-column error
    raw = row[config.choices_column]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)  # CSV cells hold a JSON list
        except json.JSONDecodeError:
            raise _RowError(f"column {config.choices_column!r} must be a list of strings (JSON in CSV cells), got {raw!r}") from None
    labels = None
    if isinstance(raw, dict):  # ARC / HF style: {"text": [...], "label": ["A", "B", ...]}
        labels, raw = raw.get("label"), raw.get("text")
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) and c.strip() for c in raw):
        raise _RowError(f"column {config.choices_column!r} must hold 2+ non-empty strings, got {raw!r}")
    if config.label_column not in row:
        _text(row, config.label_column)
    label = row[config.label_column]
    if labels is not None and label in labels:
        index = labels.index(label)
    elif _is_int(label) or (isinstance(label, str) and label.strip().isdigit()):
        index = int(label)
    elif isinstance(label, str) and len(label.strip()) == 1 and label.strip().isalpha():
        index = ord(label.strip().upper()) - ord("A")
    else:
        raise _RowError(f"column {config.label_column!r} must be a choice index or letter, got {label!r}")
    if not 0 <= index < len(raw):
        raise _RowError(f"label {label!r} is out of range for {len(raw)} choices")
    return raw, index


def _gsm8k_example(row: dict, config: DataConfig) -> Example:
    # Imported here: evaluation/ may import this module, so a top-level import could be circular.
    from .evaluation.extract import extract_strict, normalize

    question, answer = _text(row, "question"), _text(row, "answer")
    if extract_strict(answer) is None:
        raise _RowError("column 'answer' has no final '#### N' line")
    # Exactly lm-eval's gsm8k: doc_to_text "Question: {{question}}\nAnswer:", target_delimiter " ".
    return Example(prompt=f"Question: {question}\nAnswer:", completion=" " + answer, answer=normalize(answer))


def platypus_prompt(instruction: str, input: str | None = None) -> str:
    """The official MatryoshkaLoRA code's Open-Platypus prompt; the Input block only for a non-empty input."""
    if input is not None and input.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _file_example(row: dict, config: DataConfig) -> Example:
    prompt = _text(row, config.prompt_column)
    if config.prompt_format == "platypus":
        extra = row.get(config.input_column)
        if extra is not None and not isinstance(extra, str):
            raise _RowError(f"column {config.input_column!r} must be a string, got {type(extra).__name__} ({extra!r})")
        prompt = platypus_prompt(prompt, extra)
    choices = label = None
    if config.choices_column is not None:
        choices, label = _choices(row, config)
    if choices is not None and config.completion_column not in row:
        completion = " " + choices[label]  # lm-eval's default target_delimiter
    else:
        completion = _text(row, config.completion_column)
    answer = None
    if config.answer_column is not None:
        if config.answer_column not in row:
            _text(row, config.answer_column)
        v = row[config.answer_column]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or not str(v).strip():
            raise _RowError(f"column {config.answer_column!r} must be a non-empty string or number, got {v!r}")
        answer = str(v).strip()
    return Example(prompt=prompt, completion=completion, answer=answer, choices=choices, label=label)


def _parse(rows: Iterable[Row], config: DataConfig, to_example, source: str) -> Examples:
    out, bad = [], []
    for loc, row, problem in rows:
        try:
            if problem is not None:
                raise _RowError(problem)
            if not isinstance(row, dict):
                raise _RowError(f"expected an object with named columns, got {type(row).__name__}")
            out.append(to_example(row, config))
        except _RowError as e:
            if not config.skip_invalid:
                raise ValueError(f"{loc}: {str(e).rstrip('.')}. Fix the row, or set skip_invalid=True to skip bad rows.") from None
            bad.append(f"{loc}: {e}")
    if bad:
        logger.warning("Skipped %d invalid row(s) of %s (skip_invalid=True); first: %s", len(bad), source, "; ".join(bad[:3]))
    if not out:
        why = f"all {len(bad)} rows are invalid" if bad else "it holds no examples (empty file?)"
        raise ValueError(f"No examples in {source}: {why}. Point the config at a file with rows.")
    return Examples(out, skipped=len(bad), source=source)


def _gsm8k_location(config: DataConfig) -> str:
    loc = config.data_path or os.environ.get(GSM8K_ENV)
    if not loc:
        raise ValueError(f"dataset='gsm8k' needs its files: set data_path to a directory with train.jsonl and test.jsonl "
                         f"(or set ${GSM8K_ENV}), or data_path='{GSM8K_HUB}' to download it from the Hugging Face Hub.")
    return loc


def _source_examples(config: DataConfig, part: str) -> Examples:
    """All examples of the source's `train` or `test` data, in source order."""
    to_example = _gsm8k_example if config.dataset == "gsm8k" else _file_example
    if part == "test" and config.test_file:
        loc = config.test_file
    elif config.dataset == "gsm8k":
        loc = _gsm8k_location(config)
        if not loc.startswith("hub:") and Path(loc).expanduser().is_dir():
            loc = str(Path(loc).expanduser() / f"{part}.jsonl")
    else:
        loc = config.dataset
    if loc.startswith("hub:"):
        default_config = "main" if config.dataset == "gsm8k" else None
        return _parse(_read_hub(loc, part, default_config), config, to_example, f"{loc}[{part}]")
    path = Path(loc).expanduser()
    return _parse(_read_file(path), config, to_example, str(path))


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
        from .synthetic import generate_arith, generate_wordops

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
    if not _is_int(k) or k < 0:
        raise ValueError(f"k={k!r} few-shot examples must be an integer >= 0.")
    if k == 0:
        return []
    pool = load_examples(dataclasses.replace(config, num_train=None), "train")
    if k > len(pool):
        raise ValueError(f"k={k} few-shot examples, but the train split of {pool.source} has only {len(pool)}.")
    return random.Random(f"fewshot:{seed}").sample(list(pool), k)
