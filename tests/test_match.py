"""Teacher-forced completion match equals greedy generation exact match, row for row, at every rank."""

import pytest
import torch
from conftest import VOCAB, make_model

from matryoshka_lora import set_rank
from matryoshka_lora.evaluation.match import completion_match
from matryoshka_lora.evaluation.sweep import EvalConfig, evaluate_ranks

RANKS = [0, 1, 2, 4, 8]


def greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt):].tolist()


def example(prompt, completion):
    return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}


def test_match_equals_greedy_generation_row_for_row():
    model = make_model("llama", r=8, ranks=[1, 2, 4, 8], method="matryoshka")
    g = torch.Generator().manual_seed(5)
    encoded = []
    for i in range(12):  # prompts of several lengths, golds taken from greedy output at one rank
        prompt = torch.randint(1, VOCAB, (3 + i % 5,), generator=g).tolist()
        with set_rank(model, RANKS[i % len(RANKS)]):
            gold = greedy(model, prompt, 4 + i % 3)
        if i % 4 == 3:  # a wrong last token: never reproduced at the rank it came from
            gold[-1] = (gold[-1] + 1) % VOCAB
        encoded.append(example(prompt, gold))
    hits = completion_match(model, encoded, RANKS, batch_size=7)
    expected = {}
    for k in RANKS:
        with set_rank(model, k):
            expected[k] = [greedy(model, e["input_ids"][:e["labels"].count(-100)], len(e["input_ids"]) -
                                  e["labels"].count(-100)) == e["input_ids"][e["labels"].count(-100):] for e in encoded]
    assert hits == expected
    assert 0 < sum(map(sum, hits.values())) < len(encoded) * len(RANKS)  # both outcomes occur
    assert model._mlora_controller.mode is None  # the training mode is restored


def test_sweep_match_metric_is_the_headline_and_one_pass(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model
    from matryoshka_lora.data.examples import Example
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_matryoshka_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), MatryoshkaConfig(r=4))
    examples = [Example(prompt=f"Question: {a}+1?\nAnswer:", completion=f" {a + 1}\n#### {a + 1}", answer=str(a + 1))
                for a in range(5)]
    res = evaluate_ranks(model, tok, examples, EvalConfig(metrics=["match", "loss"]), chat_template=False, keep_items=True)
    assert res["metric"] == "match" and set(res["per_rank"]) == {1, 2, 4}
    for k, scores in res["per_rank"].items():
        assert scores["match"] == pytest.approx(100.0 * sum(res["match_hits"][str(k)]) / 5)
        assert "loss" in scores
    assert "match_seconds_all_ranks" in res["timings"] and "match" in res["base"]


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    model = get_matryoshka_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                 MatryoshkaConfig(r=4, ranks=[1, 2, 4], init="paper"))
    for name, p in model.named_parameters():  # a non-zero B: the ranks write different texts
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return tok, model.eval()


def test_decode_misses_texts_are_what_generation_writes(tiny_model_dir):
    """A matched row's known text (its gold tokens, cut as `generate` cuts) is the text decoding writes."""
    from types import SimpleNamespace

    from matryoshka_lora.data.prompts import encode_prompt, stop_strings
    from matryoshka_lora.evaluation.generation import generate, generate_tokens
    from matryoshka_lora.evaluation.sweep import matched_texts
    tok, model = _tiny(tiny_model_dir)
    ranks, n = [1, 2, 4], 5
    stop = stop_strings(False, tok)
    prompts = [encode_prompt(tok, f"Question: {a} plus {a}?\nAnswer:") for a in range(9)]
    outputs = {}
    for k in ranks:
        with set_rank(model, k):
            outputs[k] = generate_tokens(model, tok, prompts, stop, n)
    golds = [outputs[ranks[i % 3]][i] for i in range(len(prompts))]  # each row's gold: greedy at one rank
    golds[4] = golds[4][:-1] + [(golds[4][-1] + 1) % len(tok)]  # a gold no rank writes
    prep = SimpleNamespace(gen=(prompts, None), match=[{"input_ids": p + g, "labels": [-100] * len(p) + g}
                                                       for p, g in zip(prompts, golds)])
    hits = completion_match(model, prep.match, ranks)
    known = matched_texts(model, tok, prep, hits, stop, n)
    for k in ranks:
        with set_rank(model, k):
            texts = generate(model, tok, prompts, stop, n)
        assert known[k] and all(texts[i] == t for i, t in known[k].items())
        assert set(known[k]) <= {i for i, h in enumerate(hits[k]) if h}
        assert all(i in known[k] for i in range(len(prompts)) if i % 3 == ranks.index(k) and i != 4)
    assert all(4 not in known[k] for k in ranks)


def test_decode_misses_scores_equal_full_decoding(tiny_model_dir):
    from matryoshka_lora.data.examples import Example
    tok, model = _tiny(tiny_model_dir)
    examples = [Example(prompt=f"Question: {a}+1?\nAnswer:", completion=f" {a + 1}\n#### {a + 1}", answer=str(a + 1))
                for a in range(5)]
    full, fast = (evaluate_ranks(model, tok, examples, EvalConfig(metrics=["generate", "match"], max_new_tokens=8,
                                                                  decode_misses=skip), chat_template=False)
                  for skip in (False, True))
    assert full["per_rank"] == fast["per_rank"] and full["base"] == fast["base"]
    decoded = fast["timings"]["decoded_rows"]
    assert set(decoded) == {"0", "1", "2", "4"}
    assert all(decoded[str(k)] == 5 - round(fast["per_rank"][k]["match"] * 5 / 100) for k in (1, 2, 4))


@pytest.mark.parametrize("kwargs", [dict(metrics=["generate"]), dict(metrics=["generate", "match"], num_fewshot=2)])
def test_decode_misses_needs_match_and_zero_shot(kwargs):
    with pytest.raises(ValueError, match="decode_misses"):
        EvalConfig(decode_misses=True, **kwargs)
