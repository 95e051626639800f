"""The unit every data source produces: a prompt/completion `Example`; the loss is on the completion.

This module imports nothing from the package, so the loaders (`data.py`, `synthetic.py`) and
the consumers (`prompts.py`, `evaluation/`) can all build on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


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
