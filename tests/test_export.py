"""Export: a rank-k prefix loaded by plain PEFT gives the logits of set_rank(k); bad input fails cleanly."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import BUILDERS, make_model
from peft import PeftModel
from safetensors.torch import load_file

from matryoshka_lora import export_rank, merge_rank, rank_footprint, save_matryoshka, set_rank, unmerge
from matryoshka_lora.cli import main as cli_main
from matryoshka_lora.deploy import export as export_mod

RANKS = [1, 2, 4, 8]


def plain_peft(arch, directory):
    """A fresh base model with the exported adapter, loaded by PEFT alone."""
    return PeftModel.from_pretrained(BUILDERS[arch](0), str(directory)).eval()


def assert_no_matryoshka(model):
    for module in model.modules():
        assert "_mlora_controller" not in module.__dict__
        assert not module._forward_hooks, f"unexpected hook on {type(module).__name__}"


# every scaling on Llama; GPT-2 (Conv1D, fan_in_fan_out) with the scaling that gives float lora_alpha
@pytest.mark.parametrize("arch,scaling", [("llama", "none"), ("llama", "rank"), ("llama", "sqrt"), ("gpt2", "sqrt")])
def test_every_rank_loads_in_plain_peft_with_same_logits_and_merge(arch, scaling, tmp_path, input_ids):
    model = make_model(arch, r=8, scaling=scaling, alpha=2.0)
    save_matryoshka(model, tmp_path / "nested")
    out = export_rank(tmp_path / "nested", RANKS, tmp_path / "export")
    assert out == [tmp_path / "export" / f"rank-{k}" for k in RANKS]
    for k, directory in zip(RANKS, out):
        cfg = json.loads((directory / "adapter_config.json").read_text())
        assert cfg["r"] == k and cfg["use_rslora"] is False and not cfg["rank_pattern"]
        assert cfg["lora_alpha"] / k == pytest.approx(export_mod.rank_scale(k, scaling, 2.0))
        weights = load_file(str(directory / "adapter_model.safetensors"))
        assert all(w.shape[0] == k for n, w in weights.items() if "lora_A" in n)
        assert all(w.shape[1] == k for n, w in weights.items() if "lora_B" in n)

        plain = plain_peft(arch, directory)
        assert_no_matryoshka(plain)
        with set_rank(model, k):
            expected = model(input_ids=input_ids).logits
        torch.testing.assert_close(plain(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)

        # PEFT's own merge of the exported adapter equals our merge at rank k
        peft_merged = plain.merge_and_unload()
        ours = merge_rank(model, k)
        base_weights = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                        for n, p in ours.named_parameters() if "lora_" not in n}
        for name, w in peft_merged.named_parameters():
            torch.testing.assert_close(base_weights[name], w, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(ours(input_ids=input_ids).logits, peft_merged(input_ids=input_ids).logits,
                                   atol=1e-5, rtol=1e-5)
        unmerge(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_from_memory_equals_export_from_directory(arch, tmp_path):
    model = make_model(arch, r=8)
    save_matryoshka(model, tmp_path / "nested")
    a = export_rank(model, 4, tmp_path / "mem")
    b = export_rank(tmp_path / "nested", 4, tmp_path / "dir")
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=0, rtol=0)
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (a, b))
    ca.pop("auto_mapping", None), cb.pop("auto_mapping", None)
    assert {k: v for k, v in ca.items() if k != "target_modules"} == {k: v for k, v in cb.items() if k != "target_modules"}
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])


def test_modules_to_save_travel_with_the_prefix(tmp_path, input_ids):
    model = make_model("llama", r=8, modules_to_save=["lm_head"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)  # a trained head that differs from the base one
    out = export_rank(model, 2, tmp_path / "r2")
    assert "base_model.model.lm_head.weight" in load_file(str(out / "adapter_model.safetensors"))
    with set_rank(model, 2):
        torch.testing.assert_close(plain_peft("llama", out)(input_ids=input_ids).logits,
                                   model(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)


MIXED = {
    # overlapping patterns (last one wins, as in set_rank), a layer switched off (0), a default
    "llama": ({r"layers\.0\..*": 2, "q_proj": 8, r"layers\.1\.self_attn\.v_proj": 0}, 4),
    "gpt2": ({r"h\.0\..*": 1, "c_attn": 8, r"h\.1\.mlp\.c_fc": 0}, 2),
}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scaling", ["none", "sqrt"])
def test_portable_per_layer_export_has_no_patterns_and_same_logits(arch, scaling, tmp_path, input_ids):
    model = make_model(arch, r=8, scaling=scaling, alpha=1.5)
    pattern, default = MIXED[arch]
    out = export_rank(model, pattern, tmp_path / "portable", default=default)  # layout="portable" is the default
    cfg = json.loads((out / "adapter_config.json").read_text())
    # one r and lora_alpha = r: PEFT, vLLM (one global lora_alpha / r) and llama.cpp (alpha / tensor rank) all scale by 1
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and cfg["lora_alpha"] == cfg["r"] == 8
    with set_rank(model, pattern, default=default) as controller:
        expected = model(input_ids=input_ids).logits
        kept = {name for name, k in controller.mode.items() if k > 0}
    plain = plain_peft(arch, out)
    torch.testing.assert_close(plain(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    from matryoshka_lora.core.peft_seam import lora_layers
    assert {name for name, _ in lora_layers(plain)} == kept  # the rank-0 layer is still left out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_rank_pattern_round_trips_through_plain_peft(arch, tmp_path, input_ids):
    model = make_model(arch, r=8)
    pattern, default = MIXED[arch]
    out = export_rank(model, pattern, tmp_path / "mixed", default=default, layout="compact")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"].keys() == cfg["rank_pattern"].keys()
    plain = plain_peft(arch, out)
    with set_rank(model, pattern, default=default) as controller:
        expected = model(input_ids=input_ids).logits
        per_layer = controller.mode
    torch.testing.assert_close(plain(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    # the rank-0 layer is not in the plain adapter; every other layer has its own rank
    from matryoshka_lora.core.peft_seam import lora_layers
    loaded = {name: layer.r["default"] for name, layer in lora_layers(plain)}
    assert loaded == {name: k for name, k in per_layer.items() if k > 0}
    assert 0 in per_layer.values() and len(set(loaded.values())) > 1
    # PEFT's merge of the mixed adapter equals our per-layer merge
    merged = merge_rank(model, pattern, default=default)
    torch.testing.assert_close(merged(input_ids=input_ids).logits, plain.merge_and_unload()(input_ids=input_ids).logits,
                               atol=1e-5, rtol=1e-5)


LOAD_SCRIPT = """
import sys
import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import save_file
model = AutoPeftModelForCausalLM.from_pretrained({path!r}).eval()   # base model from base_model_name_or_path
ids = torch.load({ids!r}, weights_only=True)
save_file({{"logits": model(input_ids=ids).logits.contiguous()}}, {out!r})
assert "matryoshka_lora" not in sys.modules, "the plain load imported matryoshka_lora"
"""


def test_plain_peft_in_fresh_process_without_matryoshka(tmp_path, input_ids):
    BUILDERS["llama"](0).save_pretrained(tmp_path / "base")
    from conftest import randomize_adapter
    from transformers import AutoModelForCausalLM

    from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model

    model = randomize_adapter(get_matryoshka_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                                   MatryoshkaConfig(r=8, scaling="sqrt"))).eval()
    save_matryoshka(model, tmp_path / "nested")
    out = export_rank(tmp_path / "nested", 2, tmp_path / "rank2")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    torch.save(input_ids, tmp_path / "ids.pt")
    code = LOAD_SCRIPT.format(path=str(out), ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "logits.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    with set_rank(model, 2):
        expected = model(input_ids=input_ids).logits
    torch.testing.assert_close(load_file(str(tmp_path / "logits.safetensors"))["logits"], expected, atol=1e-5, rtol=1e-5)


def test_card_lists_base_rank_scale_size_and_accuracy(tmp_path):
    model = make_model("llama", r=8, scaling="rank", alpha=4.0)
    results = {"metric": "accuracy", "ranks": [1, 4, 8],
               "methods": {"matryoshka": {"per_rank": {"1": {"accuracy": 20.0}, "4": {"accuracy": 37.25},
                                                       "8": {"accuracy": 38.0}}}}}
    four, two = export_rank(model, [4, 2], tmp_path / "x", results=results)
    card = (four / "README.md").read_text()
    size = (four / "adapter_model.safetensors").stat().st_size
    assert "| rank | 4 |" in card and "s_4 = 1 " in card and f"{size:,} bytes" in card
    assert "37.25 (accuracy, method matryoshka)" in card and "library_name: peft" in card
    assert "not evaluated at this rank" in (two / "README.md").read_text()
    # the whole measured table and its plot travel with the card
    assert "| matryoshka |" in card and "37.25" in card.split("## Measured")[1] and "![accuracy by rank](ranks.png)" in card
    assert (four / "ranks.png").stat().st_size > 1000


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_footprint_is_the_exported_file_size(arch, tmp_path):
    model = make_model(arch, r=8)
    save_matryoshka(model, tmp_path / "nested")
    pattern, default = MIXED[arch]
    for rank, layout in [(1, "portable"), (8, "portable"), (pattern, "portable"), (pattern, "compact")]:
        out = export_rank(tmp_path / "nested", rank, tmp_path / f"e{len(list(tmp_path.iterdir()))}", default=default,
                          layout=layout)
        fp = rank_footprint(tmp_path / "nested", rank, default=default, layout=layout)
        assert fp.size_bytes == (out / "adapter_model.safetensors").stat().st_size
        assert fp.params == sum(w.numel() for w in load_file(str(out / "adapter_model.safetensors")).values())
    padded, compact = (rank_footprint(model, pattern, default=default, layout=lay) for lay in ("portable", "compact"))
    assert padded.params > compact.params
    # trainable params = k * sum(m + n): tiny Llama has q 64+64, k/v 64+32, o 64+64, gate/up 64+128, down 128+64
    if arch == "llama":
        assert rank_footprint(model, 4).params == 4 * 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("rank,error,message", [
    (3, ValueError, r"rank 3 was not trained: the adapter was trained at ranks 1, 2, 4, 8.*--allow-untrained"),
    (16, ValueError, r"rank 16 is larger than the adapter's maximum rank r=8"),
    (0, ValueError, r"rank 0 is not deployable"),
    ({"no_such_layer": 2}, ValueError, r"match no adapted layer"),
    ({"q_proj": 9}, ValueError, r"outside 0..r=8"),
    ({"q_proj": 3}, ValueError, r"Per-layer ranks \[3\] were not trained"),
    ({".*": 0}, ValueError, r"Every layer is at rank 0"),
    ("4,q_proj=2", ValueError, r"mixes ranks and pattern=rank"),
    ([1, 1], ValueError, r"lists a rank twice"),
])
def test_bad_ranks_give_clear_errors(rank, error, message, tmp_path):
    model = make_model("llama", r=8)
    with pytest.raises(error, match=message):
        export_rank(model, rank, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_untrained_rank_exports_when_allowed(tmp_path, input_ids):
    model = make_model("llama", r=8)
    out = export_rank(model, 3, tmp_path / "r3", allow_untrained=True)
    with set_rank(model, 3):
        torch.testing.assert_close(plain_peft("llama", out)(input_ids=input_ids).logits,
                                   model(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)


def test_existing_output_needs_overwrite_and_nothing_is_written_first(tmp_path):
    model = make_model("llama", r=8)
    export_rank(model, 4, tmp_path / "out" / "rank-4")
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True \(--overwrite\)"):
        export_rank(model, [1, 4], tmp_path / "out")
    assert not (tmp_path / "out" / "rank-1").exists()  # refused before writing anything
    (tmp_path / "out" / "rank-4" / "stale.txt").write_text("old")
    export_rank(model, [1, 4], tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "rank-4" / "stale.txt").exists()
    assert json.loads((tmp_path / "out" / "rank-4" / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rank-1", "rank-4"]  # no temp dirs left


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_export_leaves_no_half_written_adapter(overwrite, tmp_path, monkeypatch):
    model = make_model("llama", r=8)
    target = tmp_path / "out"
    if overwrite:
        export_rank(model, 8, target)
    real_save = export_mod.save_file

    def crash_after_writing(tensors, path, metadata=None):
        real_save(dict(list(tensors.items())[:2]), path, metadata=metadata)  # a partial file, then die
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "save_file", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        export_rank(model, 2, target, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if overwrite else [])
    if overwrite:  # the previous export is untouched
        assert json.loads((target / "adapter_config.json").read_text())["r"] == 8
        assert len(load_file(str(target / "adapter_model.safetensors"))) > 2


def test_corrupt_source_directory_is_refused(tmp_path):
    model = make_model("llama", r=8)
    save_matryoshka(model, tmp_path / "nested")
    (tmp_path / "nested" / "matryoshka_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="matryoshka_config.json is missing"):
        export_rank(tmp_path / "nested", 4, tmp_path / "out")


def test_cli_export_several_ranks(tmp_path, capsys, input_ids):
    model = make_model("gpt2", r=8)
    save_matryoshka(model, tmp_path / "nested")
    assert cli_main(["export", str(tmp_path / "nested"), "--rank", "1,8", "--out", str(tmp_path / "x")]) == 0
    assert "rank-1" in capsys.readouterr().out
    with set_rank(model, 8):
        torch.testing.assert_close(plain_peft("gpt2", tmp_path / "x" / "rank-8")(input_ids=input_ids).logits,
                                   model(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)
    assert cli_main(["export", str(tmp_path / "nested"), "--rank", "8", "--out", str(tmp_path / "x" / "rank-8")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    capsys.readouterr()
    cli_main(["export", str(tmp_path / "nested"), "--rank", "c_attn=2,c_fc=0", "--default-rank", "4",
              "--out", str(tmp_path / "mixed")])
    out = capsys.readouterr().out
    assert "portable layout" in out and "rank 4 with --max-lora-rank 8" in out  # vLLM takes 1, 8, 16, ...
    assert not json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())["rank_pattern"]
    cli_main(["export", str(tmp_path / "nested"), "--rank", "c_attn=2,c_fc=0", "--default-rank", "4",
              "--out", str(tmp_path / "compact"), "--layout", "compact"])
    assert "compact layout" in capsys.readouterr().out
    assert json.loads((tmp_path / "compact" / "adapter_config.json").read_text())["rank_pattern"]
    cli_main(["export", str(tmp_path / "nested"), "--rank", "8", "--out", str(tmp_path / "r8")])
    assert "note:" not in capsys.readouterr().out  # rank 8, one rank: nothing to say


def test_folded_adapter_exports_and_reloads(tmp_path, input_ids):
    from matryoshka_lora import fold_p, load_matryoshka_model

    model = make_model("llama", r=8)
    fold_p(model)
    save_matryoshka(model, tmp_path / "folded")
    reloaded = load_matryoshka_model(BUILDERS["llama"](0), tmp_path / "folded")
    assert reloaded._mlora_controller.config.folded_from == "matryoshka"
    export_rank(tmp_path / "folded", 4, tmp_path / "r4")
    with set_rank(model, 4):
        torch.testing.assert_close(plain_peft("llama", tmp_path / "r4")(input_ids=input_ids).logits,
                                   model(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fold_adapter_on_disk_equals_fold_p_and_export_merge_honour_it(arch, tmp_path, input_ids, capsys):
    from matryoshka_lora import fold_adapter, fold_p, load_matryoshka_model
    from matryoshka_lora.deploy.merge import merge_to_dir

    model = make_model(arch, r=8, scaling="sqrt", alpha=2.0)
    save_matryoshka(model, tmp_path / "nested")
    assert cli_main(["fold", str(tmp_path / "nested"), "--out", str(tmp_path / "folded")]) == 0
    assert "folded" in capsys.readouterr().out
    fold_p(model)  # the in-memory fold is the reference
    on_disk = load_file(tmp_path / "folded" / "adapter_model.safetensors")
    for key, value in export_mod.peft_seam.adapter_state_dict(model).items():
        torch.testing.assert_close(on_disk[key], value, atol=0, rtol=0)
    reloaded = load_matryoshka_model(BUILDERS[arch](0), tmp_path / "folded")
    assert reloaded._mlora_controller.config == model._mlora_controller.config
    export_rank(tmp_path / "folded", 2, tmp_path / "r2")
    merged = merge_to_dir(BUILDERS[arch](0), tmp_path / "folded", 2, tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    with set_rank(model, 2):  # rank 2 of the folded adapter = prefix of A diag(P) B
        expected = model(input_ids=input_ids).logits
    torch.testing.assert_close(plain_peft(arch, tmp_path / "r2")(input_ids=input_ids).logits, expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=input_ids).logits,
                               expected, atol=1e-5, rtol=1e-5)
    # folding twice, or an adapter with no single P, is refused with the reason
    assert cli_main(["fold", str(tmp_path / "folded"), "--out", str(tmp_path / "again")]) == 2
    assert "already folded" in capsys.readouterr().err
    save_matryoshka(make_model(arch, r=8, method="dylora"), tmp_path / "dy")
    with pytest.raises(ValueError, match="no single P"):
        fold_adapter(tmp_path / "dy", tmp_path / "dy-folded")
    assert not (tmp_path / "dy-folded").exists()
