"""Reading data rows: `.jsonl` / `.json` / `.csv` files and Hub datasets, each row with its location.

Every reader yields `(location, row, problem)`: the location is `file:line` (or `file: item i`,
`hub:name[split] row i`) and `problem` says why a row could not be read (None when it was).
`parse_rows` turns rows into `Example`s and either stops at the first bad row with
`file:line: what is wrong`, or skips bad rows and counts them (`skip_invalid=True`).
Formatting a row as a prompt/completion belongs to the source: `gsm8k.py` and `data.py`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..core.checks import is_int
from .examples import Example, Examples

logger = logging.getLogger(__name__)

Row = tuple[str, Any, str | None]  # (location "file:line", row dict, problem or None)


# -- reading rows -------------------------------------------------------------------------------
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


def read_file(path: Path) -> Iterator[Row]:
    """The rows of a `.jsonl`, `.json` (a list of objects) or `.csv` file, in file order."""
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


def read_hub(spec: str, split: str, default_config: str | None = None) -> Iterator[Row]:
    """The rows of one split of `hub:<name>[:<config>]`, downloaded with `datasets`."""
    import datasets  # only on request: this downloads

    name, _, config = spec[len("hub:"):].partition(":")
    ds = datasets.load_dataset(name, config or default_config, split=split)
    for i, row in enumerate(ds):
        yield f"{spec}[{split}] row {i}", row, None


# -- checking cells -----------------------------------------------------------------------------
class RowError(ValueError):
    """One row is malformed; `parse_rows` adds its location, or skips it with skip_invalid=True."""


def column_text(row: dict, column: str) -> str:
    """The non-empty string in `row[column]`, else a `RowError` that names the available columns."""
    if column not in row:
        raise RowError(f"missing column {column!r}; available columns: {', '.join(map(str, row))}. "
                       f"Set the matching *_column option to one of them.")
    v = row[column]
    if v is None or (isinstance(v, str) and not v.strip()):
        raise RowError(f"column {column!r} is empty")
    if not isinstance(v, str):
        raise RowError(f"column {column!r} must be a string, got {type(v).__name__} ({v!r})")
    return v


def column_choices(row: dict, choices_column: str, label_column: str) -> tuple[list[str], int]:
    """A multiple-choice row's (choices, index of the right one).

    Choices are a list of strings (a JSON list in CSV cells) or `{"text": [...], "label": [...]}`
    as in ARC; the label is an index, one of those labels, or a letter (A = 0).
    """
    if choices_column not in row:
        column_text(row, choices_column)  # raises the missing-column error
    raw = row[choices_column]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)  # CSV cells hold a JSON list
        except json.JSONDecodeError:
            raise RowError(f"column {choices_column!r} must be a list of strings (JSON in CSV cells), got {raw!r}") from None
    labels = None
    if isinstance(raw, dict):  # ARC / HF style: {"text": [...], "label": ["A", "B", ...]}
        labels, raw = raw.get("label"), raw.get("text")
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) and c.strip() for c in raw):
        raise RowError(f"column {choices_column!r} must hold 2+ non-empty strings, got {raw!r}")
    if label_column not in row:
        column_text(row, label_column)
    label = row[label_column]
    if labels is not None and label in labels:
        index = labels.index(label)
    elif is_int(label) or (isinstance(label, str) and label.strip().isdigit()):
        index = int(label)
    elif isinstance(label, str) and len(label.strip()) == 1 and label.strip().isalpha():
        index = ord(label.strip().upper()) - ord("A")
    else:
        raise RowError(f"column {label_column!r} must be a choice index or letter, got {label!r}")
    if not 0 <= index < len(raw):
        raise RowError(f"label {label!r} is out of range for {len(raw)} choices")
    return raw, index


def parse_rows(rows: Iterable[Row], to_example: Callable[[dict], Example], skip_invalid: bool, source: str) -> Examples:
    """`to_example` applied to every row, in order.

    Raises:
        ValueError: a bad row (`file:line: problem`) unless `skip_invalid`, or no examples at all.
    """
    out, bad = [], []
    for loc, row, problem in rows:
        try:
            if problem is not None:
                raise RowError(problem)
            if not isinstance(row, dict):
                raise RowError(f"expected an object with named columns, got {type(row).__name__}")
            out.append(to_example(row))
        except RowError as e:
            if not skip_invalid:
                raise ValueError(f"{loc}: {str(e).rstrip('.')}. Fix the row, or set skip_invalid=True to skip bad rows.") from None
            bad.append(f"{loc}: {e}")
    if bad:
        logger.warning("Skipped %d invalid row(s) of %s (skip_invalid=True); first: %s", len(bad), source, "; ".join(bad[:3]))
    if not out:
        why = f"all {len(bad)} rows are invalid" if bad else "it holds no examples (empty file?)"
        raise ValueError(f"No examples in {source}: {why}. Point the config at a file with rows.")
    return Examples(out, skipped=len(bad), source=source)
