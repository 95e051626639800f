"""GSM8K on the data side: where its files are, and how one of its rows becomes an `Example`.

Training data (`DataConfig(dataset="gsm8k")`) and lm-eval's `gsm8k_local` task both find the
GSM8K folder with `find_gsm8k`, and both say how to fix a missing one with `gsm8k_missing`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .answers import extract_strict, normalize
from .examples import Example
from .rows import RowError, column_text

GSM8K_ENV = "MLORA_GSM8K_DIR"
GSM8K_HUB = "hub:openai/gsm8k"
DEFAULT_GSM8K_DIR = "../shared/data/gsm8k"  # from a checkout next to `shared/`


def find_gsm8k(location: str | Path | None = None) -> str | None:
    """Where GSM8K is: `location`; else $MLORA_GSM8K_DIR; else the nearest `shared/data/gsm8k`
    (holding test.jsonl) in the working directory or one of its parents.

    Args:
        location: A folder with train.jsonl and test.jsonl, one .jsonl file, or `hub:openai/gsm8k`
            (the data loader reads all three; lm-eval's `gsm8k_local` needs the folder).

    Returns:
        The location as given, or the folder found; None when nothing is set or found
        (`gsm8k_missing` says how to fix that).
    """
    chosen = location or os.environ.get(GSM8K_ENV)
    if chosen:
        return str(chosen)
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        candidate = folder / "shared" / "data" / "gsm8k"
        if (candidate / "test.jsonl").is_file():
            return str(candidate)
    return None


def gsm8k_missing(problem: str) -> str:
    """The one error message for GSM8K files that cannot be found: `problem`, then the fix."""
    return (f"{problem}. Pass the folder holding GSM8K's train.jsonl and test.jsonl: data_path (--data-path) "
            f"for training data, gsm8k_dir (--gsm8k-dir) for lm-eval's gsm8k_local; or set ${GSM8K_ENV} to it. "
            f"data_path='{GSM8K_HUB}' downloads it from the Hugging Face Hub instead.")


def gsm8k_example(row: dict) -> Example:
    """One GSM8K `question`/`answer` row, formatted exactly like lm-eval's gsm8k task.

    Raises:
        RowError: a column is missing or empty, or the answer has no final `#### N` line.
    """
    question, answer = column_text(row, "question"), column_text(row, "answer")
    if extract_strict(answer) is None:
        raise RowError("column 'answer' has no final '#### N' line")
    # Exactly lm-eval's gsm8k: doc_to_text "Question: {{question}}\nAnswer:", target_delimiter " ".
    return Example(prompt=f"Question: {question}\nAnswer:", completion=" " + answer, answer=normalize(answer))
