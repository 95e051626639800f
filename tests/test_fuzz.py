"""Property-based fuzzing of every file the library reads (hypothesis).

The property, for every target: a randomly corrupted input either loads, and what it loads is
usable, or it stops with our `ValueError` / `FileNotFoundError` whose message names the file
(and, for a data row, its line). Never an exception from inside a library, and never a partial
output: a failed export, fold or config leaves no directory and no temporary behind.

`make test` runs each target with the `quick` profile (few examples, derandomized); `make
test-slow` runs them again with `--hypothesis-profile=deep` (see conftest.py).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_model, tiny_llama
from hypothesis import event, given
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file

from matryoshka_lora import export_rank, fold_adapter, load_matryoshka_model, recommend_rank, save_matryoshka, set_rank
from matryoshka_lora.core.config import CONFIG_NAME
from matryoshka_lora.core.saving import PEFT_CONFIG_NAME, WEIGHTS_NAME
from matryoshka_lora.data.examples import Example
from matryoshka_lora.data.loading import DataConfig, load_examples
from matryoshka_lora.experiment import RunConfig, flat_fields, load_run_config

CLEAN = (ValueError, FileNotFoundError)

# -- building blocks ---------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=8)
garbage = st.binary(max_size=64)  # includes bytes that are not UTF-8


def dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


@st.composite
def corrupt_bytes(draw, data: bytes) -> bytes:
    """Truncate, overwrite or splice random bytes into `data` (what a crash or a bad copy does)."""
    how = draw(st.sampled_from(["truncate", "overwrite", "insert", "empty", "replace"]))
    if how == "empty":
        return b""
    if how == "replace":
        return draw(garbage)
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    if how == "truncate":
        return data[:at]
    junk = draw(st.binary(min_size=1, max_size=16))
    return data[:at] + junk + data[at + (len(junk) if how == "overwrite" else 0):]


@st.composite
def corrupt_json_object(draw, obj: dict, keys: list[str]) -> bytes:
    """A JSON object file with one field changed, removed or mistyped, or the file itself broken."""
    how = draw(st.sampled_from(["set", "set", "set", "delete", "not an object", "bytes"]))
    obj = dict(obj)
    key = draw(st.sampled_from(sorted(set(keys) | set(obj))))
    if how == "set":
        near = [v for v in (obj.get(key),) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        value = draw(json_values | st.sampled_from([v + d for v in near for d in (-1, 1)] or [0]) |
                     st.sampled_from([str(v) for v in near] or [""]))
        obj[key] = value
    elif how == "delete":
        obj.pop(key, None)
    elif how == "not an object":
        return dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    text = dumps(obj).encode()
    return draw(corrupt_bytes(text)) if how == "bytes" else text


def assert_clean(error: BaseException, *names: str) -> None:
    """A clean refusal: our error type, and a message that names the file."""
    assert isinstance(error, CLEAN), f"{type(error).__name__}: {error}"
    for name in names:
        assert name in str(error), f"the message does not name {name!r}: {error}"


def outcome(fn):
    """(result, None) or (None, error) for our clean errors; anything else propagates.

    Counted as hypothesis events, so `--hypothesis-show-statistics` shows how many inputs loaded.
    """
    try:
        result = fn()
    except CLEAN as e:
        event(f"refused: {type(e).__name__}")
        return None, e
    event("loaded")
    return result, None


def only(directory: Path, *names: str) -> None:
    """Nothing but `names` in `directory`: no partial output, no temporary left behind."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


# -- data files --------------------------------------------------------------------------------

texts = st.text(max_size=20) | st.sampled_from(["", " ", "\n", "#### 4", "a\x00b", "\"", "é", "\r\n"])
cell_values = texts | json_values


@st.composite
def rows(draw, columns: list[str]) -> list:
    """Rows that are mostly right (the given columns, strings) with random faults mixed in."""
    out = []
    for _ in range(draw(st.integers(0, 5))):
        row = {c: draw(texts | st.just("good text")) for c in columns}
        fault = draw(st.sampled_from(["none", "none", "value", "missing", "extra", "not a dict"]))
        if fault == "value":
            row[draw(st.sampled_from(columns))] = draw(cell_values)
        elif fault == "missing":
            row.pop(draw(st.sampled_from(columns)))
        elif fault == "extra":
            row[draw(st.text(max_size=5))] = draw(cell_values)
        elif fault == "not a dict":
            row = draw(json_values)
        out.append(row)
    return out


@st.composite
def jsonl_file(draw, columns: list[str]) -> bytes:
    lines = [dumps(r) for r in draw(rows(columns))]
    lines += draw(st.lists(st.sampled_from(["", "{", "[1, 2", "null", "{\"prompt\": 1}", "x"]), max_size=2))
    data = "\n".join(draw(st.permutations(lines))).encode()
    return draw(corrupt_bytes(data)) if draw(st.booleans()) else data


@st.composite
def json_file(draw, columns: list[str]) -> bytes:
    data = dumps(draw(rows(columns))).encode()
    choice = draw(st.sampled_from(["list", "list", "other value", "bytes", "deep"]))
    if choice == "other value":
        return dumps(draw(json_values)).encode()
    if choice == "deep":  # a nesting no parser is built for
        return b"[" * draw(st.integers(500, 200_000))
    return draw(corrupt_bytes(data)) if choice == "bytes" else data


@st.composite
def csv_file(draw, columns: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = draw(st.sampled_from([columns, columns + ["x"], columns[:1], []]))
    writer.writerow(header)
    for row in draw(rows(columns)):
        cells = list(row.values()) if isinstance(row, dict) else [row]
        writer.writerow([c if isinstance(c, str) else dumps(c) for c in cells])
    text = buf.getvalue()
    text += draw(st.sampled_from(["", "a,\"unclosed\n", "\x00,\x00\n", "x" * 200_000 + "\n", "a,b,c,d,e\n"]))
    data = text.encode()
    return draw(corrupt_bytes(data)) if draw(st.booleans()) else data


def check_examples(examples, config: DataConfig) -> None:
    """What a loader returns is usable: non-empty strings, valid multiple-choice labels."""
    assert examples, "a load that succeeds returns examples"
    for e in examples:
        assert isinstance(e, Example) and isinstance(e.prompt, str) and isinstance(e.completion, str)
        assert e.prompt.strip() and e.completion.strip()
        if config.choices_column is not None:
            assert all(isinstance(c, str) and c.strip() for c in e.choices) and 0 <= e.label < len(e.choices)


def check_data_load(path: Path, config: DataConfig, split: str) -> None:
    examples, error = outcome(lambda: load_examples(config, split))
    if error is None:
        check_examples(examples, config)
        return
    assert_clean(error, str(path))
    whole_file = r"No examples in|holds out all|validation split .* is empty|does not exist|must hold a list of objects"
    if not re.search(whole_file, str(error)):  # a problem in one place of the file: say where
        assert re.search(re.escape(str(path)) + r"(:\d+|: item \d+)", str(error)), f"no line in: {error}"


DATA_COLUMNS = ["prompt", "completion"]
MC_COLUMNS = ["prompt", "choices", "label"]


@st.composite
def data_options(draw) -> dict:
    return {"validation_size": draw(st.integers(0, 3)), "skip_invalid": draw(st.booleans()),
            "num_train": draw(st.none() | st.integers(1, 4))}


@pytest.mark.parametrize("suffix,files", [(".jsonl", jsonl_file), (".json", json_file), (".csv", csv_file)])
@given(data=st.data())
def test_fuzz_data_files(suffix, files, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data.draw(files(DATA_COLUMNS)))
        config = DataConfig(dataset=str(path), **data.draw(data_options()))
        check_data_load(path, config, data.draw(st.sampled_from(["train", "test"])))


GOOD_CHOICES = [(["a", "b"], [0, 1, "A", "b", "1"]), (["x", "y", "z"], [2, "C", " 2 "]),
                ({"text": ["p", "q"], "label": ["P", "Q"]}, ["Q", "P", 0]), ('["u", "v"]', [1, "B"])]


@st.composite
def mc_rows(draw) -> bytes:
    """Multiple-choice rows, mostly well formed (choices as a list, an ARC dict or a JSON string),
    with random choices, labels or missing columns mixed in."""
    out = []
    for _ in range(draw(st.integers(1, 5))):
        choices, labels = draw(st.sampled_from(GOOD_CHOICES))
        row = {"prompt": draw(st.just("Which?") | texts), "choices": choices, "label": draw(st.sampled_from(labels))}
        fault = draw(st.sampled_from(["none", "none", "choices", "label", "missing"]))
        if fault == "choices":
            row["choices"] = draw(st.builds(dumps, st.lists(texts, max_size=3)) | json_values
                                  | st.fixed_dictionaries({"text": st.lists(texts, max_size=3),
                                                           "label": st.lists(texts, max_size=3)}))
        elif fault == "label":
            row["label"] = draw(st.integers(-1, 4) | st.sampled_from(["Z", "", "10", "b "]) | json_values)
        elif fault == "missing":
            row.pop(draw(st.sampled_from(sorted(row))))
        out.append(row)
    return "\n".join(dumps(r) for r in out).encode()


@given(data=st.data())
def test_fuzz_multiple_choice(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mc.jsonl"
        path.write_bytes(data.draw(mc_rows()))
        config = DataConfig(dataset=str(path), choices_column="choices", label_column="label", validation_size=0,
                            skip_invalid=data.draw(st.booleans()))
        check_data_load(path, config, "test")


@given(data=st.data())
def test_fuzz_gsm8k(data):
    answers = st.sampled_from(["2 + 2 = 4\n#### 4", "#### -1,000", "#### ", "4", "####4", "#### 4.5.6"]) | texts
    with tempfile.TemporaryDirectory() as tmp:
        part = data.draw(st.sampled_from(["train", "test"]))
        lines = [dumps({"question": data.draw(texts | st.just("How many?")), "answer": data.draw(answers)})
                 for _ in range(data.draw(st.integers(1, 4)))]
        body = "\n".join(lines).encode()
        path = Path(tmp) / f"{part}.jsonl"
        path.write_bytes(data.draw(corrupt_bytes(body)) if data.draw(st.booleans()) else body)
        config = DataConfig(dataset="gsm8k", data_path=tmp, validation_size=0, skip_invalid=data.draw(st.booleans()))
        check_data_load(path, config, part)


# -- adapter files: adapter_config.json, matryoshka_config.json, the safetensors header ---------

class Quiet(dict):
    """A dict whose repr stays short in hypothesis' failure reports (it holds tensors)."""

    def __repr__(self):
        return f"<{', '.join(self)}>"


IDS = torch.arange(6)[None]  # (1, 6)
RANKS = (None, 1, 4)  # None: the training weighting P


def logits(model, k=None):
    with torch.no_grad(), set_rank(model, k):
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, dict]:
    """Two tiny nested adapters (explicit target modules, and all-linear) and what they compute:
    logits at each rank, logits of the exported rank-2 adapter, the folded weights."""
    root = tmp_path_factory.mktemp("fuzz-adapters")
    out = Quiet()
    for name, targets in [("listed", ["q_proj", "v_proj"]), ("all-linear", "all-linear")]:
        path = save_matryoshka(make_model("llama", r=4, ranks=[1, 2, 4], target_modules=targets), root / name)
        model = load_matryoshka_model(tiny_llama(0), path)
        out[name] = {"path": path, "logits": {k: logits(model, k) for k in RANKS}, "exported": logits(model, 2),
                     "folded": load_file(str(fold_adapter(path, root / f"{name}-folded") / WEIGHTS_NAME))}
    return out


PEFT_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora", "peft_type",
             "lora_dropout", "modules_to_save", "bias", "fan_in_fan_out", "layers_to_transform", "base_model_name_or_path",
             "init_lora_weights", "task_type", "exclude_modules", "layer_replication", "lora_bias"]
MATRYOSHKA_KEYS = ["r", "ranks", "method", "scaling", "alpha", "weights", "ranks_per_step", "seed", "target_modules",
                   "init", "lora_dropout", "modules_to_save", "folded_from"]


def safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def safetensors_bytes(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


@st.composite
def corrupt_safetensors(draw, data: bytes) -> bytes:
    """A header with one entry changed (dtype, shape, offsets, a key, the config record), or broken bytes."""
    header, body = safetensors_parts(data)
    how = draw(st.sampled_from(["tensor", "tensor", "rename", "drop", "metadata", "length", "truncate", "bytes"]))
    keys = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(keys))
    if how == "tensor":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[key][field] = draw(json_values | st.sampled_from(["F16", "I64", "BOOL", "F8_E4M3", "Q4"])
                                  | st.lists(st.integers(-2, 70_000), max_size=3))
    elif how == "rename":
        header[draw(st.sampled_from(["x", key.replace("lora_A", "lora_B"), key.replace(".weight", ".bias"),
                                     key.replace("lora_A", "lora_embedding_A"), key + "x"]))] = header.pop(key)
    elif how == "drop":
        header.pop(key)
    elif how == "metadata":
        meta = header.setdefault("__metadata__", {})
        field = draw(st.sampled_from(sorted(meta) + ["format", "x"]))
        meta[field] = draw(st.text(max_size=20) | json_values.map(dumps) |
                           st.builds(lambda k, v: dumps({**json.loads(meta.get("matryoshka_config", "{}")), k: v}),
                                     st.sampled_from(MATRYOSHKA_KEYS), json_values))
    elif how == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    elif how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    else:  # bytes of the header only: the tensor data has no checksum, so a changed value cannot be told
        n = len(data) - len(body)
        return draw(corrupt_bytes(data[:n])) + body
    return safetensors_bytes(header, body)


def check_export(adapter: Path, work: Path, names, reference) -> None:
    """export_rank: a clean refusal that leaves nothing, or the same rank-2 adapter as the original's."""
    written, error = outcome(lambda: export_rank(adapter, 2, work / "exported"))
    if error is not None:
        assert_clean(error, *names)
        only(work, "adapter")
        return
    plain = PeftModel.from_pretrained(tiny_llama(0), str(written))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, reference["exported"], atol=1e-5, rtol=1e-5)
    shutil.rmtree(written)


def check_fold(adapter: Path, work: Path, names, reference) -> None:
    """fold_adapter: a clean refusal that leaves nothing, or the original's folded weights."""
    written, error = outcome(lambda: fold_adapter(adapter, work / "folded"))
    if error is not None:
        assert_clean(error, *names)
        only(work, "adapter")
        return
    folded = load_file(str(written / WEIGHTS_NAME))
    assert folded.keys() == reference["folded"].keys()
    for key, t in folded.items():
        torch.testing.assert_close(t, reference["folded"][key], atol=0, rtol=0)
    shutil.rmtree(written)


def check_load(adapter: Path, names, reference) -> None:
    """load_matryoshka_model: a clean refusal, or a model that computes what the original does."""
    model, error = outcome(lambda: load_matryoshka_model(tiny_llama(0), adapter))
    if error is not None:
        assert_clean(error, *names)
        return
    for k in RANKS:
        torch.testing.assert_close(logits(model, k), reference["logits"][k], atol=1e-6, rtol=1e-6)


ADAPTER_FILES = {
    PEFT_CONFIG_NAME: lambda data: corrupt_json_object(json.loads(data), PEFT_KEYS),
    CONFIG_NAME: lambda data: corrupt_json_object(json.loads(data), MATRYOSHKA_KEYS),
    WEIGHTS_NAME: corrupt_safetensors,
}


@pytest.mark.parametrize("name", list(ADAPTER_FILES))
@given(data=st.data())
def test_fuzz_adapter_files(adapters, name, data):
    reference = adapters[data.draw(st.sampled_from(sorted(adapters)))]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapter = work / "adapter"
        shutil.copytree(reference["path"], adapter)
        (adapter / name).write_bytes(data.draw(ADAPTER_FILES[name]((adapter / name).read_bytes())))
        names = (str(adapter), name)
        check_export(adapter, work, names, reference)
        check_fold(adapter, work, names, reference)
        check_load(adapter, names, reference)


# -- results JSON read by `recommend` -----------------------------------------------------------

def results_template(adapter: str | None) -> dict:
    per_rank = {str(k): {"exact_match_strict": 10.0 * i, "loss": 2.0 - i / 4} for i, k in enumerate((1, 2, 4), 1)}
    entry = {"per_rank": per_rank, "aurac": 20.0, "log_aurac": 18.0, "r": 4, "trainable_params": 1000}
    if adapter is not None:
        entry["adapter"] = adapter
    return {"metric": "exact_match_strict", "split": "test", "ranks": [1, 2, 4], "base": {"exact_match_strict": 0.0},
            "methods": {"matryoshka": entry}}


@st.composite
def corrupt_nested(draw, obj):
    """`obj` with one value somewhere inside it replaced, removed or mistyped."""
    if not isinstance(obj, dict) or not obj or draw(st.integers(0, 3)) == 0:
        return draw(json_values | st.sampled_from([{}, [], "", 0, -1, "1", "x", 1e308, float("nan")]))
    key = draw(st.sampled_from(sorted(obj)))
    obj = dict(obj)
    if draw(st.integers(0, 5)) == 0:
        obj.pop(key)
    elif draw(st.booleans()) and isinstance(obj[key], dict):
        obj[key] = draw(corrupt_nested(obj[key]))
    else:
        obj[key] = draw(corrupt_nested(None))
    if draw(st.integers(0, 5)) == 0:  # a new key: an unknown method, rank or metric
        obj[draw(st.sampled_from(["lora", "0", "-1", "a", "1.5", "8"]))] = draw(corrupt_nested(None))
    return obj


@given(data=st.data())
def test_fuzz_results_for_recommend(adapters, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.json"
        adapter = data.draw(st.sampled_from([None, str(adapters["listed"]["path"]), "adapter", "/", "."]))
        results = data.draw(corrupt_nested(results_template(adapter)))
        text = dumps(results).encode()
        path.write_bytes(data.draw(corrupt_bytes(text)) if data.draw(st.integers(0, 4)) == 0 else text)
        recommendation, error = outcome(lambda: recommend_rank(path, data.draw(st.sampled_from([0.0, 1.0, 50.0]))))
        if error is not None:
            assert_clean(error, str(path))
            return
        assert recommendation.chosen in recommendation.rows and str(recommendation).startswith("Recommended rank:")


# -- YAML run configs ---------------------------------------------------------------------------

FLAT = sorted(flat_fields())
YAML_SNIPPETS = ["a: &x [*x]\n", "ranks: &x [*x]\n", "weights: &x {1: *x}\n", "\t- x\n", "key: [unclosed\n", "? [a, b]\n: 1\n", "r: 1\nr: 2\n", "--- 1\n--- 2\n",
                 "!!python/object:os.system x\n", "r: !!binary aGk=\n", "{\n", "- 1\n- 2\n", ""]


@st.composite
def yaml_config(draw) -> bytes:
    how = draw(st.sampled_from(["options", "options", "options", "snippet", "bytes"]))
    if how == "snippet":
        return draw(st.sampled_from(YAML_SNIPPETS)).encode()
    options = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(FLAT) | st.sampled_from(["learning-rate", "lr", "r ", ""]))
        options[key] = draw(json_values | st.sampled_from(["1e-4", "1,2,4", "yes", "~", "all-linear", "hub:x"]))
    text = yaml.safe_dump(options, allow_unicode=True).encode()
    return draw(corrupt_bytes(text)) if how == "bytes" else text


@given(data=st.data())
def test_fuzz_yaml_run_config(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_bytes(data.draw(yaml_config()))
        run, error = outcome(lambda: load_run_config(path))
        if error is not None:
            assert_clean(error, str(path))
            return
        # what the commands then do with it works: flags round-trip, train_config.json, the Trainer's arguments
        assert RunConfig.from_flat(run.to_flat()) == run
        json.dumps(run.to_flat(), allow_nan=True)
        if not run.train.bf16:  # bf16 is checked against the machine, at train time
            run.train.training_arguments()
