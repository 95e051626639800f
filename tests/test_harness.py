"""lm-evaluation-harness at every rank, offline: a tiny Llama, a byte-level tokenizer, local tasks."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm-eval imports `datasets`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize_adapter
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, set_rank
from matryoshka_lora.evaluation import harness_tasks
from matryoshka_lora.evaluation.harness import (
    HarnessConfig,
    flatten_scores,
    harness_eval,
    harness_sweep,
    resolve_metric,
)
from matryoshka_lora.evaluation.harness_tasks import INSTALL_HINT, TASKS_DIR, HarnessNotInstalled, write_local_tasks
from matryoshka_lora.evaluation.report import write_results

GSM8K_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"
if not GSM8K_DIR.is_dir():
    GSM8K_DIR = Path("/work/shared/data/gsm8k")
RANKS = [1, 8]
BATCH = 8  # the same in every run compared below, so padding is the same too


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level tokenizer with no merges: 256 byte tokens + <eos>, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def byte_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def loglikelihoods(samples_file: Path) -> list[list[float]]:
    """Per item, the log-likelihood of each choice, from lm-eval's logged samples."""
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return [[resp[0] for resp in row["filtered_resps"]] for row in sorted(rows, key=lambda r: r["doc_id"])]


# -- no lm-eval needed --------------------------------------------------------------------------
def test_missing_extra_gives_one_line_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    model = get_matryoshka_model(byte_llama(), MatryoshkaConfig(r=4))
    with pytest.raises(HarnessNotInstalled) as err:
        harness_sweep(model, byte_tokenizer(), ["tiny_mc"])
    assert str(err.value) == INSTALL_HINT and "\n" not in str(err.value)
    # harness_eval fails before loading the (slow, here non-existent) model
    with pytest.raises(HarnessNotInstalled):
        harness_eval(HarnessConfig(model="no/such-model", adapter="no/such-adapter", tasks="tiny_mc"))


def test_gsm8k_local_mirrors_lm_eval_gsm8k():
    lm_eval = pytest.importorskip("lm_eval")
    upstream = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    ours = yaml.safe_load((TASKS_DIR / "gsm8k_local" / "gsm8k_local.yaml").read_text())
    data_source = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs"}
    assert {k: v for k, v in ours.items() if k not in data_source} == {k: v for k, v in upstream.items() if k not in data_source}
    assert ours["task"] == "gsm8k_local" and ours["dataset_path"] == "json" and "tag" not in ours


def test_write_local_tasks_fills_absolute_paths(tmp_path):
    write_local_tasks(tmp_path, gsm8k_dir="/data/gsm8k")
    for path in tmp_path.glob("*/*.yaml"):
        assert "${" not in path.read_text(), path
    gsm = yaml.safe_load((tmp_path / "gsm8k_local" / "gsm8k_local.yaml").read_text())
    assert gsm["dataset_kwargs"]["data_files"] == {"train": "/data/gsm8k/train.jsonl", "test": "/data/gsm8k/test.jsonl"}
    mc = yaml.safe_load((tmp_path / "tiny_mc" / "tiny_mc.yaml").read_text())
    data = Path(mc["dataset_kwargs"]["data_files"]["test"])
    assert data == TASKS_DIR / "tiny_mc" / "tiny_mc.jsonl"  # shipped data is read in place
    assert len(data.read_text().splitlines()) == 12


def test_gsm8k_dir_env_and_missing_data(monkeypatch, tmp_path):
    monkeypatch.setenv("MLORA_GSM8K_DIR", str(tmp_path))
    assert harness_tasks.resolve_gsm8k_dir() == tmp_path.resolve()
    assert harness_tasks.resolve_gsm8k_dir("/x/y") == Path("/x/y")
    with pytest.raises(FileNotFoundError, match="--gsm8k-dir"):
        harness_tasks.check_local_data(["gsm8k_local"], None)
    harness_tasks.check_local_data(["tiny_mc"], None)  # other tasks do not need GSM8K


SCORES = {"exact_match,strict-match": 10.0, "exact_match_stderr,strict-match": 1.0,
          "exact_match,flexible-extract": 20.0}


@pytest.mark.parametrize("tasks, scores, metric, expected", [
    (["gsm8k"], SCORES, None, "exact_match,strict-match"),                      # paper's default
    (["gsm8k"], SCORES, "exact_match,flexible-extract", "exact_match,flexible-extract"),
    (["tiny_mc"], {"acc,none": 1.0, "acc_norm,none": 2.0}, None, "acc,none"),   # first reported
    (["tiny_mc"], {"acc,none": 1.0, "acc_norm,none": 2.0}, "acc_norm", "acc_norm,none"),
    (["gsm8k", "tiny_mc"], {"gsm8k/exact_match,strict-match": 1.0, "tiny_mc/acc,none": 2.0}, None,
     "gsm8k/exact_match,strict-match"),
    (["gsm8k", "tiny_mc"], {"gsm8k/exact_match,strict-match": 1.0, "tiny_mc/acc,none": 2.0}, "tiny_mc/acc",
     "tiny_mc/acc,none"),
])
def test_resolve_metric(tasks, scores, metric, expected):
    assert resolve_metric(scores, tasks, metric) == expected


def test_resolve_metric_errors_list_available():
    with pytest.raises(ValueError, match="ambiguous.*exact_match,strict-match, exact_match,flexible-extract"):
        resolve_metric(SCORES, ["gsm8k"], "exact_match")
    with pytest.raises(ValueError, match="Available"):
        resolve_metric(SCORES, ["gsm8k"], "acc")


def test_flatten_scores_percent_and_prefixes():
    out = {"results": {"a": {"alias": "a", "acc,none": 0.5, "acc_stderr,none": "N/A", "word_perplexity,none": 12.0,
                             "word_perplexity_stderr,none": 0.5},
                       "b": {"exact_match,strict-match": 0.25}}}
    assert flatten_scores(out, ["a"]) == {"acc,none": 50.0, "word_perplexity,none": 12.0, "word_perplexity_stderr,none": 0.5}
    assert flatten_scores(out, ["a", "b"]) == {"a/acc,none": 50.0, "a/word_perplexity,none": 12.0,
                                               "a/word_perplexity_stderr,none": 0.5, "b/exact_match,strict-match": 25.0}
    with pytest.raises(ValueError, match="no aggregate score for 'c'"):
        flatten_scores(out, ["c"])


def test_config_parses_cli_strings_and_reports_every_problem():
    cfg = HarnessConfig.from_args(argparse.Namespace(model="m", adapter="a", tasks="gsm8k, arc_challenge",
                                                     ranks="1,2,4", limit=5.0, num_fewshot=None, other="ignored"))
    assert cfg.tasks == ["gsm8k", "arc_challenge"] and cfg.ranks == [1, 2, 4] and cfg.limit == 5
    assert cfg.num_fewshot is None and cfg.out_dir == "runs/harness"
    with pytest.raises(ValueError) as err:
        HarnessConfig(model="", adapter="a", tasks="", ranks="0,2", batch_size="big", fewshot_as_multiturn=True)
    msg = str(err.value)
    for needle in ("tasks is empty", "ranks=[0, 2]", "model is empty", "batch_size='big'", "fewshot_as_multiturn"):
        assert needle in msg


def test_every_help_text_present():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(HarnessConfig))


def test_unknown_task_suggests_close_names():
    class FakeTaskManager:
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["gsm8k", "gsm8k_local", "tiny_mc"]

    with pytest.raises(ValueError, match="'tiny_mcc' \\(did you mean tiny_mc"):
        harness_tasks.build_task_manager(FakeTaskManager, ["tiny_mcc"], [])


# -- lm-eval on a tiny model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One lm-eval sweep (base + ranks 1 and 8) of a randomized adapter on the tiny MC task."""
    pytest.importorskip("lm_eval")
    out = tmp_path_factory.mktemp("harness")
    tok = byte_tokenizer()
    model = randomize_adapter(get_matryoshka_model(byte_llama(seed=0), MatryoshkaConfig(r=8, method="matryoshka"))).eval()
    results = harness_sweep(model, tok, "tiny_mc", ranks=RANKS, samples_dir=out / "samples", batch_size=BATCH)
    return {"results": results, "model": model, "tokenizer": tok, "samples": out / "samples", "out": out}


def test_sweep_has_one_score_per_rank_and_matching_aurac(sweep):
    res = sweep["results"]
    assert res["metric"] == "acc,none" and res["ranks"] == RANKS
    entry = res["methods"]["matryoshka"]
    assert sorted(entry["per_rank"]) == ["1", "8"]
    scores = [entry["per_rank"][str(k)]["acc,none"] for k in RANKS]
    assert all(0.0 <= s <= 100.0 for s in scores)
    # two ranks: both AURACs are the mean of the two scores
    assert math.isclose(entry["aurac"], sum(scores) / 2) and math.isclose(entry["log_aurac"], sum(scores) / 2)
    assert set(entry["timings"]["per_rank_s"]) == {"1", "8"} and res["timings"]["base_s"] > 0
    assert res["config"]["n_samples"]["tiny_mc"]["effective"] == 12
    # the report writes the same JSON, table and plot as the built-in evaluator
    paths = write_results(res, sweep["out"])
    table = paths["table"].read_text()
    assert "| method | PT | r=1 | r=8 | AURAC | log-AURAC |" in table and paths["plot"].stat().st_size > 0
    assert json.loads(paths["json"].read_text())["base"]["acc,none"] == res["base"]["acc,none"]


def test_ranks_differ_so_no_stale_cache(sweep):
    lls = {k: loglikelihoods(sweep["samples"] / f"rank_{k}_tiny_mc.jsonl") for k in RANKS}
    base = loglikelihoods(sweep["samples"] / "base_tiny_mc.jsonl")
    assert lls[1] != lls[8] and lls[1] != base and lls[8] != base


def test_rank_zero_equals_plain_base_model(sweep, tmp_path):
    """lm-eval on a fresh, never-wrapped base model scores exactly what the sweep reports as PT."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(write_local_tasks(tmp_path)), include_defaults=False)
    plain = lm_eval.simple_evaluate(model=HFLM(pretrained=byte_llama(seed=0), tokenizer=byte_tokenizer(), batch_size=BATCH),
                                    tasks=["tiny_mc"], task_manager=tm)
    assert flatten_scores(plain, ["tiny_mc"]) == sweep["results"]["base"]
    got = loglikelihoods(sweep["samples"] / "base_tiny_mc.jsonl")
    want = [[resp[0] for resp in s["filtered_resps"]] for s in sorted(plain["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)


def test_reused_wrapper_matches_fresh_wrapper(sweep, tmp_path):
    """A new HFLM at rank 8 gives the sweep's rank-8 log-likelihoods: reusing one HFLM leaks nothing."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(write_local_tasks(tmp_path)), include_defaults=False)
    model = sweep["model"]
    with set_rank(model, 8):
        fresh = lm_eval.simple_evaluate(model=HFLM(pretrained=model.get_base_model(), tokenizer=sweep["tokenizer"], batch_size=BATCH),
                                        tasks=["tiny_mc"], task_manager=tm)
    want = [[resp[0] for resp in s["filtered_resps"]] for s in sorted(fresh["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    assert loglikelihoods(sweep["samples"] / "rank_8_tiny_mc.jsonl") == want
    assert get_mode_is_training(model)


def get_mode_is_training(model) -> bool:
    from matryoshka_lora import get_controller

    return get_controller(model).mode is None  # the sweep restored the training weighting


def test_chat_template_and_model_mode_restored(tmp_path):
    """apply_chat_template renders prompts with the tokenizer's template; the model's modes come back."""
    pytest.importorskip("lm_eval")
    from matryoshka_lora import get_controller

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    model = randomize_adapter(get_matryoshka_model(byte_llama(), MatryoshkaConfig(r=4, method="matryoshka"))).train()
    res = harness_sweep(model, tok, ["tiny_mc"], ranks=[4], include_base=False, num_fewshot=1, limit=3,
                        apply_chat_template=True, fewshot_as_multiturn=True, samples_dir=tmp_path)
    assert res["base"] is None and list(res["methods"]["matryoshka"]["per_rank"]) == ["4"]
    row = json.loads((tmp_path / "rank_4_tiny_mc.jsonl").read_text().splitlines()[0])
    prompt = row["arguments"][0][0]
    assert prompt.startswith("<user>Question: ") and prompt.count("<assistant>") == 2 and prompt.endswith("<assistant>")
    assert model.training and get_controller(model).mode is None


def test_rank_outside_adapter_is_refused():
    pytest.importorskip("lm_eval")
    model = get_matryoshka_model(byte_llama(), MatryoshkaConfig(r=4))
    with pytest.raises(ValueError, match=r"ranks \[8\] are outside 1..r=4"):
        harness_sweep(model, byte_tokenizer(), "tiny_mc", ranks=[1, 8])


@pytest.mark.skipif(not (GSM8K_DIR / "test.jsonl").is_file(), reason="shared GSM8K data not present")
def test_gsm8k_local_builds_lm_eval_prompts_offline(tmp_path):
    """The local GSM8K task loads offline and renders lm-eval's gsm8k prompt: 8 train shots, then the question."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(write_local_tasks(tmp_path, GSM8K_DIR)), include_defaults=False)
    task = tm.load(["gsm8k_local"])["tasks"]["gsm8k_local"]
    task.set_fewshot_seed(1234)
    docs = list(task.eval_docs)
    assert len(docs) == 1319
    prompt = task.fewshot_context(docs[0], num_fewshot=8)
    assert prompt.count("Question: ") == 9 and prompt.count("#### ") == 8
    assert prompt.endswith(f"\n\nQuestion: {docs[0]['question']}\nAnswer:")
