"""Fail fast: every command checks its configs, paths and data before it loads a model.

Loading the embedded SmolLM2-135M takes about 30 s on a CPU, a large model minutes; a missing
dataset or adapter must not wait for that. Each case runs the real CLI with the embedded model
configured, with model loading replaced by a failure, and must end with exit code 2 and a message
that names the problem within 5 seconds.
"""

import json
import re
import time

import pytest
import transformers
from conftest import make_model

from matryoshka_lora import save_matryoshka
from matryoshka_lora.cli import main


@pytest.fixture(scope="module", autouse=True)
def commands_imported():
    """The commands' modules, imported once (the CLI imports them on first use): the timings are
    of the checks, not of importing transformers into a fresh interpreter."""
    import matryoshka_lora.deploy.merge  # noqa: F401
    import matryoshka_lora.evaluation.harness  # noqa: F401
    import matryoshka_lora.experiment  # noqa: F401


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load model weights or a tokenizer fails the test."""
    def refuse(*args, **kwargs):
        pytest.fail(f"a model was loaded: from_pretrained{args[:1]}")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return save_matryoshka(make_model("llama", r=4, ranks=[1, 2, 4]), tmp_path_factory.mktemp("ff") / "adapter")


EMBEDDED = ["--model", "smollm2-135m"]
CASES = {  # name -> (argv with {tmp} and {adapter}, message regex)
    "train: missing dataset": (["train", *EMBEDDED, "--dataset", "{tmp}/nope.jsonl", "--output-dir", "{tmp}/run"],
                               r"Data file \S+nope\.jsonl does not exist"),
    "train: bad row": (["train", *EMBEDDED, "--dataset", "{tmp}/bad.jsonl", "--validation-size", "0",
                        "--output-dir", "{tmp}/run"], r"bad\.jsonl:2: invalid JSON"),
    "train: checkpoints without --resume": (["train", *EMBEDDED, "--output-dir", "{tmp}/old"],
                                            r"already holds checkpoints of a run \(latest: checkpoint-2\)"),
    "train: missing local model": (["train", "--model", "{tmp}/no-model", "--output-dir", "{tmp}/run"],
                                   r"Model \S+no-model not found"),
    "eval: missing dataset": (["eval", *EMBEDDED, "--adapter", "{adapter}", "--dataset", "{tmp}/nope.csv"],
                              r"Data file \S+nope\.csv does not exist"),
    "eval: missing adapter": (["eval", *EMBEDDED, "--adapter", "{tmp}/no-adapter"],
                              r"Adapter directory \S+no-adapter does not exist"),
    "eval --harness: missing adapter": (["eval", "--harness", *EMBEDDED, "--adapter", "{tmp}/no-adapter",
                                         "--tasks", "tiny_mc"], r"Adapter directory \S+no-adapter does not exist"),
    "compare: missing dataset": (["compare", *EMBEDDED, "--dataset", "{tmp}/nope.json", "--out", "{tmp}/cmp"],
                                 r"Data file \S+nope\.json does not exist"),
    "allocate: missing dataset": (["allocate", *EMBEDDED, "--adapter", "{adapter}", "--budget", "avg-rank:2",
                                   "--dataset", "{tmp}/nope.jsonl"], r"Data file \S+nope\.jsonl does not exist"),
    "merge: rank not trained": (["merge", "--model", "smollm2-135m", "--adapter", "{adapter}", "--rank", "3",
                                 "--out", "{tmp}/merged"], r"rank 3 was not trained"),
    "merge: missing adapter": (["merge", "--model", "smollm2-135m", "--adapter", "{tmp}/no-adapter", "--rank", "2",
                                "--out", "{tmp}/merged"], r"Adapter directory \S+no-adapter does not exist"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_before_the_model_loads(name, tmp_path, adapter, no_model_loading, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": " b"}\n{"prompt": \n')
    (tmp_path / "old" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({}))
    argv, message = CASES[name]
    argv = [a.format(tmp=tmp_path, adapter=adapter) for a in argv]
    started = time.perf_counter()
    assert main(argv) == 2
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert f"mlora {argv[0]}: error:" in err and re.search(message, err), err
    print(f"\n{name}: refused in {seconds:.2f} s")
    assert seconds < 5
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists() and not (tmp_path / "cmp").exists()
