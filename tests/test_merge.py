"""Merge at rank k: same outputs as set_rank(k), unmerge restores W0, unload/save gives a plain model."""

import pytest
import torch
from conftest import BUILDERS, make_model
from transformers import AutoModelForCausalLM

from matryoshka_lora import merge_rank, merge_to_dir, save_matryoshka, set_rank, unmerge
from matryoshka_lora.cli import main as cli_main
from matryoshka_lora.core.peft_seam import base_weight, factors, is_merged, lora_layers


def base_weights(model):
    return {name: base_weight(layer).detach().clone() for name, layer in lora_layers(model)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scaling", ["none", "sqrt"])
def test_merge_equals_set_rank_and_unmerge_restores(arch, scaling, input_ids):
    model = make_model(arch, r=8, scaling=scaling, alpha=2.0)
    before = base_weights(model)
    for k in [1, 4, 8]:
        with set_rank(model, k):
            expected = model(input_ids=input_ids).logits
        merge_rank(model, k)
        assert all(is_merged(layer) for _, layer in lora_layers(model))
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        unmerge(model)
        for name, w in base_weights(model).items():
            torch.testing.assert_close(w, before[name], atol=1e-6, rtol=0, msg=name)
        with set_rank(model, k):  # the live adapter works again
            torch.testing.assert_close(model(input_ids=input_ids).logits, expected, atol=1e-6, rtol=1e-6)


def test_merge_delta_is_sk_Bk_Ak_in_the_weight_layout():
    for arch, transpose in [("llama", False), ("gpt2", True)]:
        model = make_model(arch, r=8, scaling="rank", alpha=3.0)
        name, layer = next(iter(lora_layers(model)))
        W0 = base_weight(layer).detach().clone()
        A, B = factors(layer)
        delta = (3.0 / 4) * B[:, :4] @ A[:4]  # s_4 = alpha / 4, (n, m)
        merge_rank(model, 4)
        torch.testing.assert_close(base_weight(layer), W0 + (delta.T if transpose else delta), atol=1e-6, rtol=1e-6)


def test_merged_model_runs_base_layers_only(input_ids):
    model = make_model("llama", r=8)
    merge_rank(model, 2)
    merged = model(input_ids=input_ids).logits
    set_rank(model, 8)  # the adapter is bypassed while merged, so the rank does not matter
    torch.testing.assert_close(model(input_ids=input_ids).logits, merged, atol=0, rtol=0)


def test_per_layer_merge_equals_per_layer_rank(input_ids):
    model = make_model("llama", r=8)
    pattern = {"q_proj": 1, r"layers\.1\.mlp\..*": 0}
    with set_rank(model, pattern, default=4):
        expected = model(input_ids=input_ids).logits
    merge_rank(model, pattern, default=4)
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_errors():
    model = make_model("llama", r=8)
    with pytest.raises(ValueError, match="not merged"):
        unmerge(model)
    with pytest.raises(ValueError, match="larger than the adapter's maximum rank r=8"):
        merge_rank(model, 9)
    with pytest.raises(ValueError, match="rank 5 was not trained"):
        merge_rank(model, 5)
    with pytest.raises(ValueError, match="match no adapted layer"):
        merge_rank(model, {"nope": 2})
    merge_rank(model, 2)
    with pytest.raises(ValueError, match="already merged .* at rank 2.*unmerge"):
        merge_rank(model, 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unload_gives_plain_model_that_saves_as_safetensors(arch, tmp_path, input_ids):
    model = make_model(arch, r=8)
    with set_rank(model, 4):
        expected = model(input_ids=input_ids).logits
    plain = merge_rank(model, 4, unload=True)
    assert type(plain) is type(BUILDERS[arch](0))
    assert not any("lora" in n for n, _ in plain.named_modules())
    torch.testing.assert_close(plain(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_to_dir_and_cli(tmp_path, input_ids, capsys):
    BUILDERS["gpt2"](0).save_pretrained(tmp_path / "base")
    model = make_model("gpt2", r=8)
    save_matryoshka(model, tmp_path / "nested")
    with set_rank(model, 2):
        expected = model(input_ids=input_ids).logits
    assert cli_main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "nested"),
                     "--rank", "2", "--out", str(tmp_path / "merged")]) == 0
    assert "merged" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= files and not any(f.endswith(".bin") for f in files)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_to_dir(BUILDERS["gpt2"](0), tmp_path / "nested", 2, tmp_path / "merged")
    merge_to_dir(BUILDERS["gpt2"](0), tmp_path / "nested", 8, tmp_path / "merged", overwrite=True)
    assert "merged rank | 8" in (tmp_path / "merged" / "README.md").read_text()
