import json

import pytest
from gsm8k_path import gsm8k_dir

from matryoshka_lora.data.answers import extract_flexible, extract_strict, is_correct, normalize

# (text, strict, flexible)
EXTRACT_CASES = [
    ("Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7", "7"),
    ("#### -12", "-12", "-12"),
    ("She pays $1,000.\n#### 1,000.", "1,000.", "1,000."),
    ("#### 5\n#### 6", "5", "6"),  # strict: first match; flexible: last match
    ("The answer is 42.", None, "42."),
    ("It costs $1,000.", None, "$1,000."),
    ("2 apples and 3 pears make 5 fruits", None, "5"),  # single digits: second group
    ("from 12 to -3", None, "-3"),
    ("no numbers here", None, None),
    ("", None, None),
    ("#### $18", None, "$18"),  # strict wants a digit right after "#### "
    ("####5", None, "5"),
    ("1.5 and then 7", None, "7"),
    ("values 10, 20", None, "20"),
    ("10, 20,", None, "20,"),  # the comma is part of the span; normalisation removes it
]


@pytest.mark.parametrize("text,strict,flexible", EXTRACT_CASES)
def test_extraction_golden(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


NORMALIZE_CASES = [
    ("$1,000.", "1000"),
    ("1,000", "1000"),
    ("-5", "-5"),
    ("18.", "18"),
    ("18..", "18."),  # one trailing dot only, as lm-eval
    ("3.5", "3.5"),
    ("Janet sells 9.\n#### 18", "18"),
    ("a #### b #### 7", "7"),
    ("ABC", "abc"),
    (" 7", " 7"),  # lm-eval does not strip whitespace here (its regex filter already did)
]


@pytest.mark.parametrize("raw,expected", NORMALIZE_CASES)
def test_normalize_golden(raw, expected):
    assert normalize(raw) == expected


CORRECT_CASES = [
    # (generation, gold, mode, correct)
    ("9 * 2 = 18\n#### 18", "18", "strict", True),
    ("9 * 2 = 18\n#### 18", "Janet ... = $<<9*2=18>>18\n#### 18", "strict", True),
    ("#### 1,000", "1000", "strict", True),
    ("#### 1,000.", "$1,000", "strict", True),
    ("#### -3", "-3", "strict", True),
    ("#### -3", "3", "strict", False),
    ("so the answer is 18", "18", "strict", False),
    ("so the answer is 18", "18", "flexible", True),
    ("so she pays $1,000.", "1000", "flexible", True),
    ("18 eggs, then 20 left", "18", "flexible", False),  # the last number counts
    ("nothing", "18", "flexible", False),
    ("#### 18.0", "18", "strict", False),  # exact string match after normalisation, as lm-eval
]


@pytest.mark.parametrize("generation,gold,mode,correct", CORRECT_CASES)
def test_is_correct(generation, gold, mode, correct):
    assert is_correct(generation, gold, mode) is correct


def test_unknown_mode_lists_modes():
    with pytest.raises(ValueError, match="strict, flexible"):
        is_correct("#### 1", "1", "strikt")


def test_matches_lm_eval_implementation():
    """Our functions against lm-eval's own filter and metric code, on every case above."""
    lm_filters = pytest.importorskip("lm_eval.filters.extraction")
    from lm_eval.api.metrics import exact_match_hf_evaluate

    strict = lm_filters.RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)")
    flexible = lm_filters.RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]
    for generation, gold, mode, _ in CORRECT_CASES + [(t, "7", m, None) for t, *_ in EXTRACT_CASES for m in ("strict", "flexible")]:
        f = strict if mode == "strict" else flexible
        pred = list(f.apply([[generation]], [{}]))[0][0]
        ours = (extract_strict if mode == "strict" else extract_flexible)(generation)
        assert (ours if ours is not None else "[invalid]") == pred
        theirs = exact_match_hf_evaluate([pred], [gold], regexes_to_ignore=ignore, ignore_case=True)["exact_match"]
        assert is_correct(generation, gold, mode) == bool(theirs), (generation, gold, mode)


def test_every_gsm8k_test_answer_strict_parses():
    rows = [json.loads(line) for line in (gsm8k_dir() / "test.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    for row in rows:
        after = row["answer"].split("#### ")[-1].strip()
        assert extract_strict(row["answer"]) == after
        assert is_correct(row["answer"], after, "strict")
        assert is_correct(f"So the total is {after}.", row["answer"], "flexible")
