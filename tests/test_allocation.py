"""Per-layer rank allocation: it finds the layer that matters, keeps the budget, and exports as plain PEFT."""

import json

import pytest
import torch
from conftest import BUILDERS, VOCAB, make_model, randomize_adapter
from peft import PeftModel

from matryoshka_lora import (
    MatryoshkaConfig,
    allocate_ranks,
    allocation_curve,
    export_rank,
    get_controller,
    get_matryoshka_model,
    parse_budget,
    rank_footprint,
    save_matryoshka,
    set_rank,
    svd_order,
)
from matryoshka_lora.cli import main
from matryoshka_lora.core.peft_seam import factors, lora_layers
from matryoshka_lora.deploy.budget import Budget
from matryoshka_lora.deploy.calibration import vector_gradients
from matryoshka_lora.evaluation.likelihood import completion_loss

RANKS = [1, 2, 4, 8]
SIGNAL = "model.layers.1.self_attn.o_proj"  # the one layer whose adapter carries the task


def sizes(model):
    return {name: factors(layer)[0].shape[1] + factors(layer)[1].shape[0] for name, layer in lora_layers(model)}


def random_data(n=6, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g).tolist()
    return [{"input_ids": row, "labels": [-100] * 4 + row[4:]} for row in ids]


def teacher_data(model, n=8, length=12, seed=0):
    """Targets are the model's own greedy tokens at full rank: the loss falls as ranks approach R."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    with torch.no_grad(), set_rank(model, get_controller(model).config.r):
        target = model(input_ids=ids).logits.argmax(-1)  # (n, length): prediction for position t+1
    return [{"input_ids": row.tolist(), "labels": [-100] + t[:-1].tolist()} for row, t in zip(ids, target)]


@pytest.fixture
def signal_model():
    """Only SIGNAL has a non-zero adapter (and a large one), so only its rank changes the loss."""
    model = make_model("llama", r=8, ranks=RANKS)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            a, b = factors(layer)
            if name == SIGNAL:
                a.mul_(20.0), b.mul_(20.0)
            else:
                b.zero_()
    return model


def test_the_layer_that_carries_the_signal_gets_the_rank(signal_model):
    size = sizes(signal_model)
    unit = sum(size.values())
    budget = unit + 7 * size[SIGNAL]  # room for SIGNAL at rank 8, the rest at rank 1
    alloc = allocate_ranks(signal_model, teacher_data(signal_model), f"params:{budget}", progress=False)
    assert alloc.rank_pattern[SIGNAL] == 8
    assert all(k == 1 for name, k in alloc.rank_pattern.items() if name != SIGNAL)
    assert alloc.params == budget and alloc.avg_rank == pytest.approx(budget / unit)
    uniform_same_size = allocation_curve(signal_model, teacher_data(signal_model), [f"avg-rank:{budget / unit}"],
                                         progress=False).uniform
    assert alloc.calibration_loss < next(u for u in uniform_same_size if u["rank"] == 1)["calibration_loss"]


def test_first_order_estimate_matches_the_measured_change_when_the_adapter_is_small():
    # with a small alpha the loss is nearly linear in each rank vector: the estimate must equal the measurement
    # (a hook that saw the bottleneck after P would score the added components as 0)
    model = make_model("llama", r=8, ranks=RANKS, alpha=0.03)
    data = random_data()
    layers = list(lora_layers(model))
    base = {name: 2 for name, _ in layers}
    with set_rank(model, base):
        grads, loss = vector_gradients(model, layers, data, batch_size=4)
        assert loss == pytest.approx(completion_loss(model, data)["loss"], rel=1e-5)
    d = torch.zeros(8, dtype=torch.float64)
    d[2:4] = 0.03  # rank 2 -> 4 adds components 3 and 4 at scale alpha
    for i in (0, 6, 13):
        name = layers[i][0]
        with set_rank(model, {**base, name: 4}):
            measured = completion_loss(model, data)["loss"] - loss
        assert float(grads[i] @ d) == pytest.approx(measured, rel=0.05, abs=5e-7), name


# the same budgets for every rule: (by, ranks a layer may take); the spectrum rule needs an SVD-ordered adapter
RULES = [("calibration", None), ("spectrum", None), ("spectrum", RANKS)]


def rule_model(by):
    model = make_model("llama", r=8, ranks=RANKS)
    if by == "spectrum":
        svd_order(model)
    return model


@pytest.mark.parametrize("by,ranks", RULES, ids=["calibration", "spectrum", "spectrum-S"])
@pytest.mark.parametrize("spec", ["avg-rank:1", "avg-rank:1.3", "avg-rank:2", "fraction:0.4", "avg-rank:5.5", "avg-rank:8"])
def test_budget_is_never_exceeded_and_ranks_come_from_the_allowed_set(spec, by, ranks):
    model = rule_model(by)
    allowed = ranks or (RANKS if by == "calibration" else list(range(1, 9)))
    size = sizes(model)
    alloc = allocate_ranks(model, random_data(), spec, by=by, ranks=ranks, progress=False)
    assert set(alloc.rank_pattern) == set(size) and set(alloc.rank_pattern.values()) <= set(allowed)
    params = sum(k * size[name] for name, k in alloc.rank_pattern.items())
    assert alloc.params == params == rank_footprint(model, alloc.rank_pattern, layout="compact").params
    assert params <= alloc.budget_params == parse_budget(spec).to_params(sum(size.values()), 8)
    # nothing left that would still fit: the next rank of every layer is too expensive
    room = alloc.budget_params - params
    assert all(k == 8 or (allowed[allowed.index(k) + 1] - k) * size[name] > room
               for name, k in alloc.rank_pattern.items())
    with set_rank(model, alloc.rank_pattern):  # the spectrum rule does not use the data, but measures it
        assert alloc.calibration_loss == pytest.approx(completion_loss(model, random_data())["loss"], rel=1e-6)


@pytest.mark.parametrize("arch,allow_off,budget", [("llama", False, "avg-rank:3"), ("gpt2", True, "avg-rank:0.6")])
def test_allocation_round_trips_through_export_and_plain_peft(arch, allow_off, budget, tmp_path, input_ids):
    model = make_model(arch, r=8, ranks=RANKS, scaling="sqrt")
    alloc = allocate_ranks(model, random_data(), budget, allow_off=allow_off, progress=False)
    assert len(set(alloc.rank_pattern.values())) > 1
    assert (0 in alloc.rank_pattern.values()) == allow_off
    (tmp_path / "pattern.json").write_text(json.dumps(alloc.rank_pattern))
    pattern = json.loads((tmp_path / "pattern.json").read_text())
    out = export_rank(model, pattern, tmp_path / "plain", layout="compact")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"].keys() == cfg["rank_pattern"].keys()
    plain = PeftModel.from_pretrained(BUILDERS[arch](0), str(out)).eval()
    loaded = {name: layer.r["default"] for name, layer in lora_layers(plain)}
    assert loaded == {name: k for name, k in alloc.rank_pattern.items() if k > 0}
    with set_rank(model, pattern):
        expected = model(input_ids=input_ids).logits
    torch.testing.assert_close(plain(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


BAD_BUDGETS = [
    ("avg-rank:0.5", "below the smallest allocation"),
    ("params:100", "below the smallest allocation"),
    ("fraction:1.5", "above the largest allocation"),
    ("avg-rank:9", "above the largest allocation"),
    ("params:-10", "negative"),
    ("avg-rank:-1", "negative"),
    ("rank:4", "Unknown budget unit 'rank'"),
    ("4", "must look like UNIT:VALUE"),
    (4, "has no unit"),
    ("avg-rank:four", "is not a number"),
    ("params:1.5", "whole number"),
    ("fraction:nan", "finite number"),
]


@pytest.mark.parametrize("by", ["calibration", "spectrum"])
@pytest.mark.parametrize("spec,message", BAD_BUDGETS)
def test_bad_budgets_are_clear_errors(spec, message, by):
    model = rule_model(by)
    with pytest.raises(ValueError, match=message):
        allocate_ranks(model, random_data() if by == "calibration" else None, spec, by=by, progress=False)


def test_below_minimum_names_the_minimum_and_allow_off():
    model = make_model("llama", r=8, ranks=RANKS)
    unit = sum(sizes(model).values())
    with pytest.raises(ValueError, match=rf"{unit:,} params \(avg-rank:1\).*allow_off"):
        allocate_ranks(model, random_data(), "avg-rank:0.5", progress=False)
    off = allocate_ranks(model, random_data(), "params:0", allow_off=True, progress=False)
    assert set(off.rank_pattern.values()) == {0} and off.params == 0


def test_budget_units_agree():
    assert parse_budget("avg_rank:4") == Budget("avg-rank", 4.0) and str(parse_budget("params:1e6")) == "params:1000000"
    assert Budget("avg-rank", 4).to_params(1000, 32) == Budget("fraction", 0.125).to_params(1000, 32) == 4000
    assert Budget("params", 4000).to_params(1000, 32) == 4000


def test_curve_is_one_path_and_writes_json_and_plot(tmp_path):
    model = make_model("llama", r=8, ranks=RANKS)
    calib, held = random_data(seed=0), random_data(seed=1)
    curve = allocation_curve(model, calib, heldout_data=held, progress=False)
    assert [p.budget for p in curve.points] == ["avg-rank:1", "avg-rank:1.4142", "avg-rank:2", "avg-rank:2.8284",
                                                 "avg-rank:4", "avg-rank:5.6569", "avg-rank:8"]
    params = [p.params for p in curve.points]
    assert params == sorted(params) and curve.points[-1].rank_pattern == {n: 8 for n in sizes(model)}
    assert [u["rank"] for u in curve.uniform] == RANKS and all(u["heldout_loss"] > 0 for u in curve.uniform)
    # rank 1 everywhere and rank 8 everywhere are the uniform models themselves
    assert curve.points[0].heldout_loss == pytest.approx(curve.uniform[0]["heldout_loss"], rel=1e-6)
    assert curve.points[-1].heldout_loss == pytest.approx(curve.uniform[-1]["heldout_loss"], rel=1e-6)
    # a single budget gives the same allocation as that point of the curve
    single = allocate_ranks(model, calib, "avg-rank:2.8284", progress=False)
    assert single.rank_pattern == curve.points[3].rank_pattern
    assert get_controller(model).mode is None  # the training mode is back
    paths = curve.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert len(data["points"]) == 7 and data["points"][2]["rank_counts"] and data["refreshes"]
    assert paths["plot"].stat().st_size > 1000


def test_cli_allocate_writes_patterns_exports_and_sweep(tmp_path, capsys):
    from tiny_tokenizer import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    save_matryoshka(randomize_adapter(get_matryoshka_model(base, MatryoshkaConfig(r=4, ranks=[1, 2, 4]))),
                    tmp_path / "nested")
    common = ["allocate", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "nested"), "--dataset", "arith",
              "--num-calibration", "4", "--num-eval", "4", "--validation-size", "4", "--max-length", "1024"]
    assert main([*common, "--budget", "avg-rank:2,params:700", "--out", str(tmp_path / "out"), "--export"]) == 0
    pattern = json.loads((tmp_path / "out" / "rank_pattern-avg-rank-2.json").read_text())
    assert set(pattern.values()) <= {1, 2, 4}
    assert (tmp_path / "out" / "adapter-avg-rank-2" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "adapter-params-700" / "adapter_model.safetensors").is_file()
    assert "avg-rank:2" in capsys.readouterr().out
    assert main([*common, "--sweep", "--out", str(tmp_path / "sweep")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "allocation.json").read_text())
    assert len(sweep["points"]) == 5 and all(p["heldout_loss"] is not None for p in sweep["points"])
    assert (tmp_path / "sweep" / "allocation.png").is_file()
    assert main([*common, "--budget", "avg-rank:0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "below the smallest allocation" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "none")]) == 2
    assert "--budget" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_all_210_modules_within_budget(tmp_path):
    from matryoshka_lora import DataConfig, encode_examples, load_examples
    from matryoshka_lora.core.models import load_model

    base, tok = load_model("smollm2-135m")
    model = randomize_adapter(get_matryoshka_model(base, MatryoshkaConfig(r=32)), std=0.02).eval()
    calib = encode_examples(tok, load_examples(DataConfig(dataset="arith", num_eval=8), "validation"), True, 512)
    alloc = allocate_ranks(model, calib, "avg-rank:2", refresh=0.5, progress=False)
    assert len(alloc.rank_pattern) == 210 and set(alloc.rank_pattern.values()) <= {1, 2, 4, 8, 16, 32}
    assert alloc.params <= alloc.budget_params == 2 * sum(sizes(model).values())
    out = export_rank(model, alloc.rank_pattern, tmp_path / "plain", layout="compact")
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"]


def test_rank_vectors_first_built_under_inference_mode_allow_a_backward(input_ids):
    # evaluation (inference_mode) then gradients at the same ranks: what the allocator does at every refresh
    model = make_model("llama", r=8, ranks=RANKS)
    with set_rank(model, {SIGNAL: 4}, default=2):
        with torch.inference_mode():
            model(input_ids=input_ids)
        model(input_ids=input_ids).logits.sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
