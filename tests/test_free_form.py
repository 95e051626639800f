"""Free-form generation scoring: lm-eval's exact_match and regex filter, and a per-rank sweep on data
without `#### N` answers (a tiny model trained on the spot)."""

import json

import pytest

from matryoshka_lora.data.answers import exact_match, extract_answer
from matryoshka_lora.data.examples import Example
from matryoshka_lora.data.loading import DataConfig, load_examples
from matryoshka_lora.evaluation.generation import GenerationScorer
from matryoshka_lora.evaluation.sweep import EvalConfig

# (prediction, gold, ignore_case, ignore_punctuation, equal)
MATCH_CASES = [
    ("Paris", "Paris", False, False, True),
    ("  Paris\n", " Paris", False, False, True),  # whitespace is stripped on both sides
    ("paris", "Paris", False, False, False),
    ("paris", "Paris", True, False, True),
    ("Paris.", "Paris", False, False, False),
    ("Paris.", "Paris", False, True, True),
    ("P.A.R.I.S!", "paris", True, True, True),
    ("Par is", "Paris", True, True, False),  # inner whitespace counts
    ("Paris .", "Paris", False, True, False),  # stripped first, as lm-eval's strip filter runs first
    ("", "", False, False, True),
]


@pytest.mark.parametrize("pred,gold,ignore_case,ignore_punctuation,equal", MATCH_CASES)
def test_exact_match_golden_and_equal_to_lm_eval(pred, gold, ignore_case, ignore_punctuation, equal):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    assert exact_match(pred, gold, ignore_case, ignore_punctuation) is equal
    theirs = exact_match_hf_evaluate([pred.strip()], [gold.strip()], ignore_case=ignore_case,
                                     ignore_punctuation=ignore_punctuation)["exact_match"]
    assert theirs == float(equal)


# (text, regex, extracted)
REGEX_CASES = [
    ("so the answer is Paris.", r"answer is (\w+)", "Paris"),
    ("answer is A, answer is B", r"answer is (\w)", "A"),  # first match
    ("no answer here", r"answer: (\w+)", None),
    ("Answer: 42 ", r"Answer: .*", "Answer: 42"),  # no group: the whole match, stripped
    ("x=3", r"(y)=(\d)|(x)=(\d)", "x"),  # several groups: the first that matched
]


@pytest.mark.parametrize("text,regex,extracted", REGEX_CASES)
def test_extract_answer_equals_lm_eval_regex_filter(text, regex, extracted):
    from lm_eval.filters.extraction import RegexFilter

    assert extract_answer(text, regex) == extracted
    (theirs,), = RegexFilter(regex_pattern=regex, group_select=0).apply([[text]], None)
    assert theirs == (extracted if extracted is not None else "[invalid]")


def test_scorer_picks_gsm8k_or_free_form_and_scores_by_hand():
    gsm8k = [Example("Q: 2+2?", " 2+2=4\n#### 4", answer="4"), Example("Q: 1+1?", " #### 2", answer="2")]
    scorer = GenerationScorer.for_examples(gsm8k)
    assert not scorer.free_form and scorer.metric == "exact_match_strict"
    assert scorer.score(["so #### 4", "2"])["scores"] == {"exact_match_strict": 50.0, "exact_match_flexible": 100.0}

    free = [Example("Capital of France?", " Paris."), Example("Capital of Italy?", " Rome."),
            Example("Capital of Spain?", " Madrid."), Example("Say 3.", "3!", answer="3")]  # the last has an answer column
    texts = [" Paris.", " rome.", " Madrid", "3"]
    assert GenerationScorer.for_examples(free).score(texts)["scores"] == {"exact_match": 50.0}  # Paris, 3
    lenient = GenerationScorer.for_examples(free, ignore_case=True, ignore_punctuation=True)
    assert lenient.metric == "exact_match" and lenient.score(texts)["scores"] == {"exact_match": 100.0}
    # the regex runs on generations and on gold completions, not on an answer column's value
    by_regex = GenerationScorer.for_examples(free, answer_regex=r"(\w+)")
    assert by_regex.golds == ["Paris", "Rome", "Madrid", "3"]
    scored = by_regex.score(["It is Paris", "Rome, surely", "", "3 apples"])
    assert scored["scores"] == {"exact_match": 50.0}  # "It" != "Paris"; Rome; no answer; 3
    assert [i["pred"] for i in scored["items"]] == ["It", "Rome", None, "3"]
    # a regex turns GSM8K-style data into free-form scoring too
    assert GenerationScorer.for_examples(gsm8k, answer_regex=r"#### (\d+)").score(["#### 4", "#### 3"])["scores"] == \
        {"exact_match": 50.0}


def test_regex_problems_name_the_fix():
    with pytest.raises(ValueError, match=r"answer_regex='\(' is not a valid regular expression"):
        EvalConfig(answer_regex="(")
    with pytest.raises(ValueError, match=r"finds no answer in the gold completion of example 1 \(' Rome'\); fix the regex"):
        GenerationScorer.for_examples([Example("a", " Paris"), Example("b", " Rome")], answer_regex="P(a)")


def test_free_form_task_is_scored_at_every_rank(tiny_model_dir, tmp_path):
    """Train the tiny model to memorise four one-word answers, then score every rank by generation.

    lm_head is adapted too: the random tiny model's final norm and small lm_head cap its logits,
    so the other layers alone cannot bring the loss down. Plain LoRA, so rank R is the trained model.
    """
    from matryoshka_lora.core.models import load_model
    from matryoshka_lora.experiment import RunConfig, evaluate, train

    rows = [{"prompt": p, "completion": c} for p, c in [
        ("Question: Tom has 3 apples.\nAnswer:", " abcdef"), ("How many?\nAnswer:", " Tom"),
        ("abcdef abcdef\nAnswer:", " apples"), ("Question:\nAnswer:", " now")]]
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = RunConfig.from_flat(dict(
        model=str(tiny_model_dir), dataset=str(data), test_file=str(data), validation_size=0, r=4, ranks=[1, 2, 4],
        method="lora", target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], learning_rate=3e-2,
        max_steps=40, batch_size=4, warmup_steps=0, chat_template=False, max_length=64, metrics=["generate"],
        max_new_tokens=6, eval_batch_size=4, disable_tqdm=True, logging_steps=10, output_dir=str(tmp_path / "run"),
        deploy_order="none"))
    base, tokenizer = load_model(str(tiny_model_dir))
    result = train(run, base, tokenizer)
    res = evaluate(run, result.adapter_dir, "test", model=result.model, tokenizer=tokenizer, keep_items=True)
    assert res["metric"] == "exact_match" and res["ranks"] == [1, 2, 4]
    per_rank = res["methods"]["lora"]["per_rank"]
    golds = [r["completion"].strip() for r in rows]
    for k, items in res["items"].items():  # each score is the share of generations equal to the gold
        hits = [item["text"].replace(tokenizer.eos_token, "").strip() == gold for item, gold in zip(items, golds)]
        assert (res["base"] if k == "0" else per_rank[k])["exact_match"] == 100.0 * sum(hits) / len(golds)
    scores = {k: per_rank[str(k)]["exact_match"] for k in (1, 2, 4)}
    print(f"\nfree-form exact match: base {res['base']['exact_match']}, per rank {scores}")
    assert scores[4] == 100.0 and res["base"]["exact_match"] == 0.0  # learnt; the base model knows none
    assert scores[1] < 100.0  # rank 1 of a plain LoRA adapter is not the trained model


def test_free_form_file_loads_without_answers(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "Hi?", "completion": " Hello."}) + "\n")
    (example,) = load_examples(DataConfig(dataset=str(tmp_path / "d.jsonl")), "test")
    assert example.answer is None and GenerationScorer.for_examples([example]).golds == [" Hello."]
