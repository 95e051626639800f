"""Data-free allocation: the energy per parameter decides, any PEFT LoRA comes in through svd_adapter, no model needed."""

import json
import math

import pytest
import torch
from conftest import BUILDERS, make_model, randomize_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from matryoshka_lora import (
    allocate_ranks,
    export_rank,
    load_matryoshka_model,
    save_matryoshka,
    set_rank,
    svd_adapter,
    svd_order,
)
from matryoshka_lora.cli import main
from matryoshka_lora.core.peft_seam import factors, lora_layers
from matryoshka_lora.deploy.allocation import allocation_curve
from matryoshka_lora.deploy.spectrum import layer_spectra

CHEAP = "model.layers.0.self_attn.q_proj"  # m + n = 64 + 64 = 128
DEAR = "model.layers.1.mlp.down_proj"  # m + n = 128 + 64 = 192


def known_spectra(second: dict[str, float]):
    """Every layer's delta is 0 but CHEAP's and DEAR's: sigma = (10, second[layer], 0, ...), set on the diagonal."""
    model = make_model("llama", r=8, ranks=[1, 2, 4, 8], method="lora", randomize=False)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            A, B = factors(layer)  # (R, m), (n, R)
            A.zero_(), B.zero_()
            if name in second:
                for i, s in enumerate((10.0, second[name])):
                    A[i, i] = B[i, i] = math.sqrt(s)  # B A = diag(10, s) in the top-left corner
    svd_order(model)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_spectrum_is_the_singular_values_of_each_delta():
    spectrum = layer_spectra(known_spectra({CHEAP: 3.0, DEAR: 3.5}))
    assert spectrum.names == sorted(spectrum.names)
    sigma = dict(zip(spectrum.names, spectrum.sigma.tolist()))
    size = dict(zip(spectrum.names, spectrum.sizes.tolist()))
    assert sigma[CHEAP] == pytest.approx([10, 3, 0, 0, 0, 0, 0, 0], abs=1e-5) and size[CHEAP] == 128
    assert sigma[DEAR] == pytest.approx([10, 3.5, 0, 0, 0, 0, 0, 0], abs=1e-5) and size[DEAR] == 192
    assert all(max(s) == 0 for name, s in sigma.items() if name not in (CHEAP, DEAR))
    # the gain of rank 1 -> 2 is sigma_2^2, of rank 1 -> 4 (choices 1, 4) sigma_2^2 + sigma_3^2 + sigma_4^2
    gains = spectrum.gains([1, 2, 4])
    assert gains[spectrum.names.index(DEAR)].tolist() == pytest.approx([12.25, 0.0], abs=1e-5)


# (second singular value of CHEAP, of DEAR, extra budget above rank 1 everywhere) -> the layers raised to rank 2
PICKS = [
    (3.0, 3.5, 192, {CHEAP}),  # 9 / 128 > 12.25 / 192: the smaller sigma wins, it costs fewer parameters
    (3.0, 4.0, 192, {DEAR}),  # 16 / 192 > 9 / 128
    (3.0, 3.0, 192, {CHEAP}),  # equal sigma: the cheaper layer
    (3.0, 3.5, 320, {CHEAP, DEAR}),  # room for both
    (3.0, 3.5, 127, set()),  # room for neither; the zero-energy layers are not raised to fill it
]


@pytest.mark.parametrize("cheap,dear,extra,raised", PICKS)
def test_larger_energy_per_parameter_goes_first(cheap, dear, extra, raised):
    model = known_spectra({CHEAP: cheap, DEAR: dear})
    unit = sum(a.shape[1] + b.shape[0] for a, b in (factors(layer) for _, layer in lora_layers(model)))
    alloc = allocate_ranks(model, None, f"params:{unit + extra}", by="spectrum", progress=False)
    assert {name for name, k in alloc.rank_pattern.items() if k > 1} == raised
    assert all(k == 2 for name, k in alloc.rank_pattern.items() if name in raised)
    assert alloc.estimated_gain == pytest.approx(sum({CHEAP: cheap, DEAR: dear}[n] ** 2 for n in raised), abs=1e-5)
    assert alloc.calibration_loss is None  # no data given, nothing measured


def test_unordered_adapters_and_wrong_calls_name_the_fix(tmp_path):
    model = make_model("llama", r=8, ranks=[1, 2, 4, 8])
    with pytest.raises(ValueError, match=r"not SVD-ordered.*svd_order\(model\)"):
        allocate_ranks(model, None, "avg-rank:2", by="spectrum", progress=False)
    save_matryoshka(model, tmp_path / "nested")
    with pytest.raises(ValueError, match="matryoshka adapter.*mlora svd"):
        allocate_ranks(tmp_path / "nested", None, "avg-rank:2", by="spectrum", progress=False)
    with pytest.raises(ValueError, match="Unknown allocation rule by='svd'. Available: calibration"):
        allocate_ranks(model, None, "avg-rank:2", by="svd", progress=False)
    with pytest.raises(ValueError, match="by='calibration' needs the model"):
        allocate_ranks(tmp_path / "nested", None, "avg-rank:2", progress=False)
    with pytest.raises(ValueError, match="calibration_data is empty"):
        allocate_ranks(model, None, "avg-rank:2", progress=False)
    svd_order(model)
    with pytest.raises(ValueError, match=r"ranks=\[0, 3\] must be integers in 1..8"):
        allocate_ranks(model, None, "avg-rank:2", by="spectrum", ranks=[0, 3], progress=False)


def _peft_adapter(base, directory, **lora):
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **lora))
    randomize_adapter(model, std=0.2)
    model.save_pretrained(str(directory))
    return model


def test_plain_peft_adapter_through_svd_adapter(tmp_path, input_ids):
    # per-layer ranks (down_proj 8, the rest 4) are zero-padded to 8 by svd_adapter: the padding has no energy
    peft_model = _peft_adapter(BUILDERS["llama"](0), tmp_path / "plain", r=4, lora_alpha=8, rank_pattern={"down_proj": 8})
    with pytest.raises(ValueError, match="plain PEFT LoRA adapter.*mlora svd"):
        allocate_ranks(tmp_path / "plain", None, "avg-rank:2", by="spectrum", progress=False)
    out, _ = svd_adapter(tmp_path / "plain", tmp_path / "svd")
    spectrum = layer_spectra(out)  # from the file, no base model
    for name, layer in lora_layers(peft_model):  # sigma of the delta PEFT deploys, formed here only to check
        A, B = factors(layer)
        delta = layer.scaling["default"] * B.double() @ A.double()
        sigma = spectrum.sigma[spectrum.names.index(name)]  # (8,)
        torch.testing.assert_close(sigma[: A.shape[0]], torch.linalg.svdvals(delta)[: A.shape[0]])
        assert float(sigma[A.shape[0]:].abs().sum()) < 1e-9  # empty for down_proj (r = 8)

    loaded = load_matryoshka_model(BUILDERS["llama"](0), out)
    from_file = allocate_ranks(out, None, "avg-rank:3", by="spectrum", progress=False)
    from_model = allocate_ranks(loaded, None, "avg-rank:3", by="spectrum", progress=False)
    assert from_file.rank_pattern == from_model.rank_pattern and from_file.params == from_model.params
    assert len(set(from_file.rank_pattern.values())) > 1

    # a budget larger than all the energy: each layer stops at its own rank, the padding is never bought
    full = allocate_ranks(out, None, "fraction:1", by="spectrum", progress=False)
    own = {name: layer.r["default"] for name, layer in lora_layers(peft_model)}
    assert full.rank_pattern == own and full.params < full.budget_params

    exported = export_rank(out, from_file.rank_pattern, tmp_path / "alloc", allow_untrained=True, layout="compact")
    plain = PeftModel.from_pretrained(BUILDERS["llama"](0), str(exported)).eval()
    assert {name: layer.r["default"] for name, layer in lora_layers(plain)} == from_file.rank_pattern
    with set_rank(loaded, from_file.rank_pattern):
        torch.testing.assert_close(logits(plain, input_ids), logits(loaded, input_ids), atol=1e-5, rtol=1e-5)
    with set_rank(loaded, own):  # at each layer's own rank the ordered adapter is the original PEFT adapter
        torch.testing.assert_close(logits(loaded, input_ids), logits(peft_model, input_ids), atol=1e-5, rtol=1e-5)


def test_curve_from_the_file_alone_measures_nothing(tmp_path):
    model = make_model("llama", r=8, ranks=[1, 2, 4, 8])
    svd_order(model)
    save_matryoshka(model, tmp_path / "svd")
    curve = allocation_curve(tmp_path / "svd", None, "avg-rank:2,avg-rank:4", by="spectrum", progress=False)
    assert [p.params for p in curve.points] == sorted(p.params for p in curve.points) and curve.uniform == []
    assert curve.config["by"] == "spectrum" and curve.config["ranks"] == list(range(1, 9)) and curve.refreshes == []
    paths = curve.write(tmp_path / "out")
    assert set(paths) == {"json"}  # no loss, no plot
    with pytest.raises(ValueError, match="needs the model"):
        allocation_curve(tmp_path / "svd", [{"input_ids": [1, 2], "labels": [1, 2]}], "avg-rank:2", by="spectrum")


def test_cli_allocate_by_spectrum_orders_a_plain_adapter_without_the_model(tmp_path, tiny_model_dir, capsys, input_ids):
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    _peft_adapter(base, tmp_path / "plain", r=4, lora_alpha=4)
    out = tmp_path / "out"
    # --model names nothing that exists: the spectrum rule must not load it
    assert main(["allocate", "--adapter", str(tmp_path / "plain"), "--by", "spectrum", "--budget", "avg-rank:2,avg-rank:3",
                 "--model", str(tmp_path / "no-model"), "--out", str(out), "--export"]) == 0
    printed = capsys.readouterr().out
    assert "SVD-ordered adapter" in printed and "avg-rank:3" in printed
    pattern = json.loads((out / "rank_pattern-avg-rank-3.json").read_text())
    assert pattern == allocate_ranks(out / "adapter-svd", None, "avg-rank:3", by="spectrum", progress=False).rank_pattern
    assert json.loads((out / "allocation.json").read_text())["config"]["source"] == str(tmp_path / "plain")
    ordered = load_matryoshka_model(LlamaForCausalLM.from_pretrained(tiny_model_dir), out / "adapter-svd")
    plain = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), str(out / "adapter-avg-rank-3"))
    with set_rank(ordered, pattern):
        torch.testing.assert_close(logits(plain, input_ids), logits(ordered, input_ids), atol=1e-5, rtol=1e-5)

    # an ordered adapter is used as it is; --sweep loads the model and measures held-out loss only
    common = ["allocate", "--adapter", str(out / "adapter-svd"), "--by", "spectrum", "--model", str(tiny_model_dir),
              "--dataset", "arith", "--num-eval", "4", "--validation-size", "4", "--max-length", "1024"]
    assert main([*common, "--sweep", "--out", str(tmp_path / "sweep")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "allocation.json").read_text())
    assert sweep["config"]["adapter"] == sweep["config"]["source"] and not (tmp_path / "sweep" / "adapter-svd").exists()
    assert all(p["heldout_loss"] is not None and p["calibration_loss"] is None for p in sweep["points"])
    assert [u["rank"] for u in sweep["uniform"]] == [1, 2, 4] and (tmp_path / "sweep" / "allocation.png").is_file()
    assert main([*common, "--budget", "avg-rank:0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "below the smallest allocation" in capsys.readouterr().err
