import csv
import json
import logging
import re

import pytest
from gsm8k_path import gsm8k_dir

from matryoshka_lora.data.answers import extract_strict
from matryoshka_lora.data.examples import Example
from matryoshka_lora.data.loading import DataConfig, carve_validation, fewshot_examples, load_examples, platypus_prompt
from matryoshka_lora.data.synthetic import WORDOPS, generate_arith, generate_wordops, split_of

SPLITS = ("train", "validation", "test")
CALC = re.compile(r"<<([0-9+\-*]+)=(-?[0-9]+)>>\2")


# -- synthetic tasks ----------------------------------------------------------------------------
def _check_arith(e: Example):
    """Recompute every <<expr=result>> annotation and the final answer."""
    steps = CALC.findall(e.completion)
    assert steps, e.completion
    for expr, result in steps:
        a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)", expr).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result), expr
    assert extract_strict(e.completion) == e.answer == steps[-1][1]
    assert int(e.answer) >= 0
    # each operand of the first step is stated in the question
    first_a, _, first_b = re.fullmatch(r"(\d+)([+\-*])(\d+)", steps[0][0]).groups()
    assert {first_a, first_b} <= set(re.findall(r"\d+", e.prompt))


@pytest.mark.parametrize("task", ["arith", "wordops"])
def test_synthetic_deterministic_and_seeded(task):
    a = load_examples(DataConfig(dataset=task, num_train=50, seed=0), "train")
    b = load_examples(DataConfig(dataset=task, num_train=50, seed=0), "train")
    c = load_examples(DataConfig(dataset=task, num_train=50, seed=1), "train")
    assert a == b
    assert [e.prompt for e in a] != [e.prompt for e in c]


@pytest.mark.parametrize("task", ["arith", "wordops"])
def test_synthetic_splits_disjoint_and_formatted(task):
    cfg = DataConfig(dataset=task, num_train=400, num_eval=150, validation_size=150)
    splits = {s: load_examples(cfg, s) for s in SPLITS}
    questions = {s: {e.prompt for e in ex} for s, ex in splits.items()}
    for s, ex in splits.items():
        assert len(questions[s]) == len(ex) == (400 if s == "train" else 150)  # no duplicates within a split
        for e in ex:
            assert e.prompt.startswith("Question: ") and e.prompt.endswith("\nAnswer:")
            assert e.completion.startswith(" ") and extract_strict(e.completion) == e.answer
            assert split_of(e.prompt[len("Question: "):-len("\nAnswer:")]) == s
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    # disjoint from the other seed's splits too: a question's split depends on its text only
    other = load_examples(DataConfig(dataset=task, num_train=400, seed=7), "train")
    assert not {e.prompt for e in other} & (questions["test"] | questions["validation"])


def test_arith_answers_recompute_and_mix():
    examples = generate_arith("train", 600, seed=3)
    for e in examples:
        _check_arith(e)
    ops = [set(op for expr, _ in CALC.findall(e.completion) for op in re.findall(r"[+\-*]", expr)) for e in examples]
    two_step = sum(len(CALC.findall(e.completion)) == 2 for e in examples) / len(examples)
    assert all(any(op in o for o in ops) for op in "+-*")
    assert 0.2 < two_step < 0.4  # arith_two_step=0.3
    digits = {len(n) for e in examples for n in re.findall(r"\d+", e.prompt)}
    assert {1, 2, 3} <= digits
    assert any("$" in e.prompt for e in examples) and any("$" not in e.prompt for e in examples)
    lengths = [len(e.completion.split()) for e in examples]
    assert max(lengths) < 40  # short enough for a 135M model to learn in ~100 steps


ARITH_KNOBS = [
    (dict(arith_operations=["+"], arith_two_step=0.5), {"+"}),
    (dict(arith_operations=["-", "*"]), {"-", "*"}),
    (dict(arith_max_digits=1), {"+", "-", "*"}),
]


@pytest.mark.parametrize("knobs,ops", ARITH_KNOBS)
def test_arith_knobs(knobs, ops):
    examples = load_examples(DataConfig(dataset="arith", num_train=200, **knobs), "train")
    used = {op for e in examples for expr, _ in CALC.findall(e.completion) for op in re.findall(r"[+\-*]", expr)}
    assert used == ops
    for e in examples:
        _check_arith(e)
    if knobs.get("arith_max_digits") == 1:
        assert all(len(n) == 1 for e in examples for n in re.findall(r"\d+", e.prompt))


def test_wordops_answers_recompute():
    examples = generate_wordops("test", 300, seed=0)
    kinds = set()
    for e in examples:
        q = e.prompt[len("Question: "):-len("\nAnswer:")]
        n = int(e.answer)
        assert extract_strict(e.completion) == e.answer
        if m := re.fullmatch(r'How many vowels are in the word "(\w+)"\?', q):
            kinds.add("vowels"); assert n == sum(ch in "aeiou" for ch in m[1])
        elif m := re.fullmatch(r'How many times does the letter "(\w)" appear in "(\w+)"\?', q):
            kinds.add("letter_count"); assert n == m[2].count(m[1])
        elif m := re.fullmatch(r'Sort these words alphabetically: ([\w, ]+)\. What is the position of "(\w+)"\?', q):
            kinds.add("sort_position"); assert sorted(m[1].split(", "))[n - 1] == m[2]
        elif m := re.fullmatch(r'Reverse this list: ([\w, ]+)\. What is the position of "(\w+)" now\?', q):
            kinds.add("reverse_position"); assert m[1].split(", ")[::-1][n - 1] == m[2]
        elif m := re.fullmatch(r"How many letters does the longest of these words have: ([\w, ]+)\?", q):
            kinds.add("longest"); assert n == max(map(len, m[1].split(", ")))
        elif m := re.fullmatch(r'How many of these words start with "(\w)": ([\w, ]+)\?', q):
            kinds.add("starts_with"); assert n == sum(w.startswith(m[1]) for w in m[2].split(", "))
        else:
            raise AssertionError(f"unrecognised wordops question {q!r}")
    assert kinds == set(WORDOPS)


def test_synthetic_too_many_requested_names_fix():
    with pytest.raises(ValueError, match="ask for fewer"):
        generate_arith("test", 5000, max_digits=1, operations=["+"], two_step=0.0)


# -- gsm8k --------------------------------------------------------------------------------------
def test_gsm8k_format_and_splits():
    cfg = DataConfig(dataset="gsm8k", data_path=str(gsm8k_dir()))
    test = load_examples(cfg, "test")
    train, val = load_examples(cfg, "train"), load_examples(cfg, "validation")
    assert (len(train), len(val), len(test)) == (7473 - 200, 200, 1319)
    row = json.loads((gsm8k_dir() / "test.jsonl").read_text().splitlines()[0])
    assert test[0].prompt == f"Question: {row['question']}\nAnswer:"  # lm-eval's doc_to_text
    assert test[0].completion == " " + row["answer"] and test[0].answer == "18"
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    # the carve ignores the seed; num_train/num_eval take nested subsets
    cfg2 = DataConfig(dataset="gsm8k", data_path=str(gsm8k_dir()), seed=5, num_train=100, num_eval=50)
    assert load_examples(cfg2, "validation") == val[:50]
    assert load_examples(cfg2, "test") == test[:50]
    small = load_examples(cfg2, "train")
    assert len(small) == 100 and {e.prompt for e in small} <= {e.prompt for e in train}
    assert load_examples(DataConfig(dataset="gsm8k", data_path=str(gsm8k_dir()), seed=5, num_train=150), "train")[:100] == small
    shots = fewshot_examples(cfg2, 8, seed=1234)
    assert len(shots) == 8 and not {e.prompt for e in shots} & {e.prompt for e in val}
    assert shots == fewshot_examples(cfg, 8, seed=1234)  # num_train does not change the pool


def test_gsm8k_from_env_and_single_file(monkeypatch):
    monkeypatch.setenv("MLORA_GSM8K_DIR", str(gsm8k_dir()))
    assert len(load_examples(DataConfig(dataset="gsm8k", num_eval=3), "test")) == 3
    one = DataConfig(dataset="gsm8k", data_path=str(gsm8k_dir() / "test.jsonl"), validation_size=19)
    assert len(load_examples(one, "train")) == 1300


def test_gsm8k_without_location_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("MLORA_GSM8K_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no shared/data/gsm8k above it
    with pytest.raises(ValueError, match="data_path.*MLORA_GSM8K_DIR.*hub:openai/gsm8k"):
        load_examples(DataConfig(dataset="gsm8k"), "test")


def test_gsm8k_answer_without_final_line(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q?", "answer": "it is 4"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:1: .*'#### N'"):
        load_examples(DataConfig(dataset="gsm8k", data_path=str(tmp_path)), "test")


# -- your own files -----------------------------------------------------------------------------
ROWS = [{"instruction": f"Say {i}.", "output": f"{i}!", "gold": i} for i in range(10)]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_generic_file_columns(tmp_path, suffix):
    path = write(tmp_path / f"d{suffix}", ROWS)
    cfg = DataConfig(dataset=str(path), prompt_column="instruction", completion_column="output",
                     answer_column="gold", validation_size=2)
    test = load_examples(cfg, "test")
    assert test[3] == Example(prompt="Say 3.", completion="3!", answer="3")  # used as-is: no space added
    train, val = load_examples(cfg, "train"), load_examples(cfg, "validation")
    assert len(train) == 8 and len(val) == 2 and not {e.prompt for e in train} & {e.prompt for e in val}
    assert test.skipped == 0


def test_platypus_prompt_format_is_the_official_one(tmp_path):
    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
            {"instruction": "Name a color.", "output": "Red"}]  # no input column at all
    path = write(tmp_path / "p.jsonl", rows)
    cfg = DataConfig(dataset=str(path), prompt_column="instruction", completion_column="output", prompt_format="platypus")
    got = load_examples(cfg, "test")
    assert [e.prompt for e in got] == [
        "### Instruction:\nAdd 2 and 3.\n\n### Response:\n",
        "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n",
        "### Instruction:\nName a color.\n\n### Response:\n"]
    assert [e.completion for e in got] == ["5", "Hello", "Red"]  # the training text is prompt + output (+ EOS)
    assert platypus_prompt("Translate.", "Bonjour") == got[1].prompt
    with pytest.raises(ValueError, match="prompt_format='platypus' is for your own files and hub datasets"):
        DataConfig(dataset="gsm8k", prompt_format="platypus")
    with pytest.raises(ValueError, match="Unknown prompt_format 'alpaca'. Available: column, platypus"):
        DataConfig(dataset=str(path), prompt_format="alpaca")


BAD_FILES = [
    # (suffix, content, message regex)
    (".jsonl", '{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": \n', r"d\.jsonl:2: invalid JSON"),
    (".jsonl", '\n{"prompt": "a", "completion": " b"}\n\n{"prompt": "a", "answer": " b"}\n',
     r"d\.jsonl:4: missing column 'completion'; available columns: prompt, answer"),
    (".jsonl", '{"prompt": "a", "completion": "  "}\n', r"d\.jsonl:1: column 'completion' is empty"),
    (".jsonl", '{"prompt": 5, "completion": "b"}\n', r"d\.jsonl:1: column 'prompt' must be a string, got int"),
    (".jsonl", '["a", "b"]\n', r"d\.jsonl:1: expected an object"),
    (".csv", "prompt,completion\na,b\nc\n", r"d\.csv:3: column 'completion' is empty"),
    (".csv", "prompt,completion\na,b,c\n", r"d\.csv:2: 3 cells but the header has 2"),
    (".csv", "question,output\na,b\n", r"d\.csv:2: missing column 'prompt'; available columns: question, output"),
    (".json", '{"prompt": "a"}', r"d\.json: a \.json data file must hold a list"),
    (".json", '[{"prompt": "a", "completion": "b"}, {"prompt": "a"}]', r"d\.json: item 1: missing column 'completion'"),
]


@pytest.mark.parametrize("suffix,content,message", BAD_FILES)
def test_malformed_file_names_line_and_problem(tmp_path, suffix, content, message):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_examples(DataConfig(dataset=str(path)), "test")


@pytest.mark.parametrize("suffix,content", [(".jsonl", ""), (".jsonl", "\n\n"), (".csv", ""), (".csv", "prompt,completion\n"), (".json", "[]")])
def test_empty_file(tmp_path, suffix, content):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"No examples in {re.escape(str(path))}"):
        load_examples(DataConfig(dataset=str(path)), "test")


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        load_examples(DataConfig(dataset=str(tmp_path / "nope.jsonl")), "train")


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
    lines = ['{"prompt": "a", "completion": " b"}', "not json", '{"prompt": "c"}', '{"prompt": "d", "completion": " e"}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="d.jsonl:2"):
        load_examples(DataConfig(dataset=str(path)), "test")
    with caplog.at_level(logging.WARNING, logger="matryoshka_lora.data.rows"):
        got = load_examples(DataConfig(dataset=str(path), skip_invalid=True), "test")
    assert [e.prompt for e in got] == ["a", "d"] and got.skipped == 2
    assert "Skipped 2 invalid row(s)" in caplog.text and "d.jsonl:3" in caplog.text
    path.write_text("oops\n")
    with pytest.raises(ValueError, match="all 1 rows are invalid"):
        load_examples(DataConfig(dataset=str(path), skip_invalid=True), "test")


MC_ROWS = [
    ({"q": "Sky?", "choices": ["red", "blue"], "label": 1}, (["red", "blue"], 1)),
    ({"q": "Sky?", "choices": {"text": ["red", "blue", "green"], "label": ["A", "B", "C"]}, "label": "B"}, (["red", "blue", "green"], 1)),
    ({"q": "Sky?", "choices": {"text": ["red", "blue"], "label": ["1", "2"]}, "label": "2"}, (["red", "blue"], 1)),
    ({"q": "Sky?", "choices": ["red", "blue"], "label": "A"}, (["red", "blue"], 0)),
    ({"q": "Sky?", "choices": '["red", "blue"]', "label": "1"}, (["red", "blue"], 1)),  # CSV cell style
]


@pytest.mark.parametrize("row,expected", MC_ROWS)
def test_multiple_choice_rows(tmp_path, row, expected):
    path = write(tmp_path / "mc.jsonl", [row])
    cfg = DataConfig(dataset=str(path), prompt_column="q", choices_column="choices", label_column="label")
    (e,) = load_examples(cfg, "test")
    assert (e.choices, e.label) == expected
    assert e.completion == " " + expected[0][expected[1]]


def test_multiple_choice_bad_label(tmp_path):
    path = write(tmp_path / "mc.jsonl", [{"q": "Sky?", "choices": ["red", "blue"], "label": 2}])
    cfg = DataConfig(dataset=str(path), prompt_column="q", choices_column="choices", label_column="label")
    with pytest.raises(ValueError, match=r"mc\.jsonl:1: label 2 is out of range for 2 choices"):
        load_examples(cfg, "test")


def test_test_file_and_validation_errors(tmp_path):
    train, test = write(tmp_path / "train.jsonl", ROWS), write(tmp_path / "test.csv", ROWS[:3])
    cfg = DataConfig(dataset=str(train), test_file=str(test), prompt_column="instruction", completion_column="output")
    assert len(load_examples(cfg, "test")) == 3
    with pytest.raises(ValueError, match="holds out all 10 examples"):
        load_examples(DataConfig(dataset=str(train), prompt_column="instruction", completion_column="output", validation_size=10), "train")
    with pytest.raises(ValueError, match="validation_size > 0"):
        load_examples(DataConfig(dataset=str(train), prompt_column="instruction", completion_column="output", validation_size=0), "validation")
    with pytest.raises(ValueError, match="Unknown split 'dev'. Available: train, validation, test"):
        load_examples(cfg, "dev")


def test_carve_keeps_duplicate_prompts_on_one_side():
    examples = [Example(f"p{i % 7}", "c") for i in range(40)]
    train, val = carve_validation(examples, 3)
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    assert len(train) + len(val) <= 40 and len(val) == 3


# -- config -------------------------------------------------------------------------------------
def test_config_reports_every_problem():
    with pytest.raises(ValueError) as info:
        DataConfig(dataset="gsm8kk", num_train=0, num_eval=-1, validation_size=-2, arith_operations=["/"],
                   arith_two_step=2.0, arith_max_digits=0, choices_column="c", data_path="x")
    msg = str(info.value)
    for part in ["Unknown dataset 'gsm8kk'. Available: arith, wordops, gsm8k", "num_train=0", "num_eval=-1",
                 "validation_size=-2", "arith_operations", "arith_two_step", "arith_max_digits", "label_column",
                 "data_path is only read for dataset='gsm8k'"]:
        assert part in msg, part


def test_config_from_dict_lists_valid_keys():
    assert DataConfig.from_dict({"dataset": "wordops", "seed": 3}).seed == 3
    with pytest.raises(ValueError, match="Unknown DataConfig keys \\['promt_column'\\]. Valid keys: .*prompt_column"):
        DataConfig.from_dict({"promt_column": "x"})


def test_every_field_has_help():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))


def test_hub_sources_go_through_datasets(monkeypatch):
    """hub: sources call datasets.load_dataset (patched here: tests never download)."""
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": f"q{i}?", "answer": f"so {i}\n#### {i}", "prompt": f"p{i}", "completion": f" c{i}"} for i in range(5)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    gsm = load_examples(DataConfig(dataset="gsm8k", data_path="hub:openai/gsm8k"), "test")
    assert gsm[2] == Example("Question: q2?\nAnswer:", " so 2\n#### 2", "2") and calls[-1] == ("openai/gsm8k", "main", "test")
    load_examples(DataConfig(dataset="gsm8k", data_path="hub:openai/gsm8k", validation_size=1), "validation")
    assert calls[-1] == ("openai/gsm8k", "main", "train")
    own = load_examples(DataConfig(dataset="hub:someone/data:cfg", validation_size=1), "train")
    assert len(own) == 4 and calls[-1] == ("someone/data", "cfg", "train")
