"""Final-answer extraction and exact match, mirroring lm-eval: its `gsm8k` task (version 3.0), and
its generic `exact_match` metric for free-form answers (`exact_match`, `extract_answer`).

The task YAML (`lm_eval/tasks/gsm8k/gsm8k.yaml`) defines two filters and one metric:

    strict-match      regex  "#### (\\-?[0-9\\.\\,]+)"           first match
    flexible-extract  regex  "(-?[$0-9.,]{2,})|(-?[0-9]+)"     last match (group_select -1),
                                                                whichever group matched
    exact_match       regexes_to_ignore [",", "\\$", "(?s).*#### ", "\\.$"] applied in that
                      order to prediction AND reference, then ignore_case (lower);
                      ignore_punctuation=False

lm-eval's regex filter strips whitespace from the match and returns "[invalid]" when nothing
matches; here that case is `None`, and `is_correct` scores it as wrong (lm-eval compares
"[invalid]" with the reference, which never equals a number). The reference may be the full
GSM8K answer (worked steps + `#### N`) or the bare number: `(?s).*#### ` reduces both alike.
"""

from __future__ import annotations

import re
import string

STRICT_REGEX = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_REGEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE_REGEXES = (",", r"\$", r"(?s).*#### ", r"\.$")
MODES = ("strict", "flexible")


def _select(regex: re.Pattern, text: str, index: int) -> str | None:
    # Same steps as lm_eval.filters.extraction.RegexFilter.apply.
    matches = regex.findall(text if isinstance(text, str) else "")
    if not matches:
        return None
    match = matches[index]
    if isinstance(match, tuple):  # several groups: keep the first one that matched
        match = next((m for m in match if m), None)
        if match is None:
            return None
    return match.strip()


def extract_strict(text: str) -> str | None:
    """lm-eval's strict-match: the number after the first `#### `, or None.

    Example: `"2 + 3 = 5\\n#### 5"` -> `"5"`; `"the answer is 5"` -> None.
    """
    return _select(STRICT_REGEX, text, 0)


def extract_flexible(text: str) -> str | None:
    """lm-eval's flexible-extract: the last number-like span in the text, or None.

    A span is either 2+ characters of `$0-9.,` (optionally after `-`) or a run of digits, so
    `"costs $1,000."` -> `"$1,000."` (normalised later to `"1000"`).
    """
    return _select(FLEXIBLE_REGEX, text, -1)


def normalize(s: str) -> str:
    """Apply the gsm8k `exact_match` normalisation: drop `,` and `$`, everything up to the last
    `#### `, one trailing `.`; then lower-case.

    Example: `"$1,000."` -> `"1000"`; `"... #### 72"` -> `"72"`.
    """
    for pattern in IGNORE_REGEXES:
        s = re.sub(pattern, "", s)
    return s.lower()


def extract(text: str, mode: str = "strict") -> str | None:
    """Extract with `mode` = `strict` | `flexible`."""
    if mode == "strict":
        return extract_strict(text)
    if mode == "flexible":
        return extract_flexible(text)
    raise ValueError(f"Unknown extraction mode {mode!r}. Available: {', '.join(MODES)}")


def is_correct(pred_text: str, gold: str, mode: str = "strict") -> bool:
    """Whether a model's generation gets the gold answer under lm-eval's gsm8k exact match.

    Args:
        pred_text: the raw generated continuation (after cutting at the stop strings).
        gold: the reference: the bare answer (`"72"`) or a full GSM8K answer ending in `#### 72`.
        mode: `strict` (`#### N` required) or `flexible` (last number in the text).

    Returns:
        True when the normalised extraction equals the normalised reference.
    """
    pred = extract(pred_text, mode)
    if pred is None:
        return False
    return normalize(pred) == normalize(gold)


# -- free-form answers (no `#### N`) ------------------------------------------------------------
def extract_answer(text: str, regex: str | re.Pattern) -> str | None:
    """The answer `regex` finds in `text`, as lm-eval's regex filter takes it: the first match, its
    first group that matched (the whole match when the regex has no group), stripped; None when
    nothing matches.

    Example: `extract_answer("so the answer is Paris.", r"answer is (\\w+)")` -> `"Paris"`.
    """
    return _select(re.compile(regex) if isinstance(regex, str) else regex, text, 0)


def exact_match(pred: str, gold: str, ignore_case: bool = False, ignore_punctuation: bool = False) -> bool:
    """lm-eval's `exact_match` metric (`exact_match_hf_evaluate`) on whitespace-stripped strings.

    Both sides are stripped, then lower-cased (`ignore_case`), then stripped of
    `string.punctuation` characters (`ignore_punctuation`), in lm-eval's order, and compared.
    Example: `exact_match(" Paris.", "paris", ignore_case=True, ignore_punctuation=True)` -> True.
    """
    pred, gold = pred.strip(), gold.strip()
    if ignore_case:
        pred, gold = pred.lower(), gold.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        pred, gold = pred.translate(table), gold.translate(table)
    return pred == gold
