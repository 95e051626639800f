"""Where the real GSM8K JSONL files are: $MLORA_GSM8K_DIR, then <repo>/../shared/data/gsm8k,
then /work/shared/data/gsm8k. Tests that need them skip (with this reason) when none exists."""

import os
from pathlib import Path

import pytest

CANDIDATES = [os.environ.get("MLORA_GSM8K_DIR"), Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k",
              "/work/shared/data/gsm8k"]


def gsm8k_dir() -> Path:
    for c in CANDIDATES:
        if c and (Path(c) / "test.jsonl").is_file() and (Path(c) / "train.jsonl").is_file():
            return Path(c).resolve()
    pytest.skip("GSM8K JSONL not found: set MLORA_GSM8K_DIR to a directory with train.jsonl and test.jsonl")
