"""Every rank in one pass gives the numbers of one rank at a time: generation from one draft
(evaluation/rank_generation.py), row for row, and loss / multiple choice from stacked rows x ranks."""

import pytest
from conftest import randomize_adapter

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, set_rank
from matryoshka_lora.data.examples import Example
from matryoshka_lora.evaluation.generation import generate
from matryoshka_lora.evaluation.rank_generation import generate_ranks
from matryoshka_lora.evaluation.sweep import EvalConfig, evaluate_ranks

RANKS = [0, 1, 2, 4, 8]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_matryoshka_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), MatryoshkaConfig(r=8))
    return randomize_adapter(model, std=0.015).eval(), tok


def prompts(tok, n=9):
    words = ["Tom has", "apples", "abcdef", "How many", "Question: 3 + 4", "more apples. He gets"]
    return [tok(" ".join(words[j % len(words)] for j in range(i, i + 1 + i % 4)))["input_ids"] for i in range(n)]


@pytest.mark.parametrize("stop", [["Question:"], ["Question:", "s", "<|endoftext|>"]])
def test_texts_equal_one_generation_per_rank(model_and_tokenizer, stop):
    model, tok = model_and_tokenizer
    ids = prompts(tok)
    texts, stats = generate_ranks(model, tok, ids, RANKS, stop, max_new_tokens=10, batch_size=4)
    expected = {}
    for k in RANKS:
        with set_rank(model, k):
            expected[k] = generate(model, tok, ids, stop, max_new_tokens=10, batch_size=4)
    assert texts == expected
    assert stats["draft_rank"] == 8 and stats["rows_checked"] == len(ids) * (len(RANKS) - 1)
    assert 0 < stats["rows_redecoded"] < stats["rows_checked"]  # some ranks follow the draft, some depart
    assert not stats["decoded_directly"]
    assert model._mlora_controller.mode is None
    if len(stop) > 1:
        assert all("s" not in t for ts in texts.values() for t in ts)  # every text cut at its first "s"


def test_a_rank_after_one_that_departed_is_decoded_directly(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_matryoshka_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), MatryoshkaConfig(r=8))
    model = randomize_adapter(model, std=0.3).eval()  # ranks far apart: most rows depart at once
    ids = prompts(tok)
    texts, stats = generate_ranks(model, tok, ids, RANKS, ["Question:"], max_new_tokens=10, batch_size=4)
    expected = {}
    for k in RANKS:
        with set_rank(model, k):
            expected[k] = generate(model, tok, ids, ["Question:"], max_new_tokens=10, batch_size=4)
    assert texts == expected
    assert stats["decoded_directly"] and all(stats["redecoded"][str(above)] > 0.75 * len(ids) for above in
                                             [RANKS[RANKS.index(k) + 1] for k in stats["decoded_directly"]])


def test_sweep_scores_equal_with_and_without_the_draft(model_and_tokenizer):
    model, tok = model_and_tokenizer
    examples = [Example(prompt=f"Question: Tom has {a} apples. How many?\nAnswer:", completion=f" {a}\n#### {a}",
                        answer=str(a)) for a in range(6)]
    runs = [evaluate_ranks(model, tok, examples, EvalConfig(metrics=["generate"], max_new_tokens=8, eval_batch_size=4,
                                                            one_pass=shared, draft_generation=shared),
                           chat_template=False, keep_items=True) for shared in (True, False)]
    assert runs[0]["items"] == runs[1]["items"] and runs[0]["per_rank"] == runs[1]["per_rank"]
    assert "generation_draft" in runs[0]["timings"] and "generation_draft" not in runs[1]["timings"]


def test_stacked_loss_and_choices_equal_rank_by_rank(model_and_tokenizer):
    model, tok = model_and_tokenizer
    examples = [Example(prompt=f"Question: Tom has {a} apples. How many?\nAnswer:", completion=f" {a}\n#### {a}",
                        answer=str(a), choices=[f" {a}", f" {a + 1}", " abcdef" * (a % 3 + 1)], label=a % 3)
                for a in range(7)]
    runs = [evaluate_ranks(model, tok, examples, EvalConfig(metrics=["loss", "mc"], eval_batch_size=5, one_pass=one),
                           chat_template=False) for one in (True, False)]
    assert runs[0]["per_rank"].keys() == runs[1]["per_rank"].keys() == {1, 2, 4, 8}
    for one, each in zip([runs[0]["base"], *runs[0]["per_rank"].values()], [runs[1]["base"], *runs[1]["per_rank"].values()]):
        assert one["loss"] == pytest.approx(each["loss"], rel=1e-5)
        assert (one["acc"], one["acc_norm"]) == (each["acc"], each["acc_norm"])
    losses = [runs[0]["base"]["loss"]] + [v["loss"] for v in runs[0]["per_rank"].values()]
    assert len({round(v, 4) for v in losses}) == len(losses)  # the ranks really differ
    assert "seconds_all_ranks" in runs[0]["timings"] and "seconds_per_rank" in runs[1]["timings"]
