"""llama.cpp (GGUF) export: the file llama.cpp's converter writes, with the same rank-k product."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file

from matryoshka_lora import export_rank, save_matryoshka, set_rank
from matryoshka_lora.cli import main as cli_main
from matryoshka_lora.deploy.gguf_export import export_gguf, permute_rows

gguf = pytest.importorskip("gguf")


def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if k.startswith(("general.", "adapter."))}
    # GGUF lists dims fastest-first; numpy's shape is the reverse
    return fields, {t.name: torch.from_numpy(np.array(t.data).reshape(list(reversed(t.shape.tolist())))) for t in r.tensors}


@pytest.mark.parametrize("rank", [2, {"q_proj": 4, "down_proj": 1}])
def test_gguf_adapter_has_llama_cpp_names_alpha_and_the_same_product(tiny_model_dir, tmp_path, rank):
    model = make_model("llama", r=8, ranks=[1, 2, 4, 8], scaling="sqrt", alpha=1.5)
    save_matryoshka(model, tmp_path / "nested")
    out = export_gguf(tmp_path / "nested", rank, tmp_path / "a.gguf", base_model=str(tiny_model_dir), default=2)
    fields, tensors = read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    peft = export_rank(tmp_path / "nested", rank, tmp_path / "peft", default=2)
    cfg = json.loads((peft / "adapter_config.json").read_text())
    assert fields["adapter.lora.alpha"] == pytest.approx(cfg["lora_alpha"])
    ref = load_file(str(peft / "adapter_model.safetensors"))
    assert len(tensors) == len(ref) == 2 * 14  # 2 layers x 7 projections, lora_a and lora_b each
    heads = {"q_proj": 4, "k_proj": 2}  # the tiny Llama: 4 query heads, 2 key/value heads
    for key, t in ref.items():
        layer, proj = key.split("layers.")[1].split(".")[0], key.split(".lora_")[0].rsplit(".", 1)[1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        factor = "a" if ".lora_A." in key else "b"
        got = tensors[f"blk.{layer}.{gname}.weight.lora_{factor}"]
        expected = permute_rows(t, heads[proj]) if factor == "b" and proj in heads else t
        torch.testing.assert_close(got, expected)
    # llama.cpp's product alpha / r * B A equals the nested model's rank-k delta (q_proj, layer 0)
    r = tensors["blk.0.attn_q.weight.lora_a"].shape[0]
    delta = fields["adapter.lora.alpha"] / r * tensors["blk.0.attn_q.weight.lora_b"] @ tensors["blk.0.attn_q.weight.lora_a"]
    from matryoshka_lora.core.peft_seam import factors, lora_layers
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    A, B = factors(layer)
    with set_rank(model, rank, default=2) as controller:
        k = controller.mode if isinstance(controller.mode, int) else controller.mode["model.layers.0.self_attn.q_proj"]
        p = controller.vector("model.layers.0.self_attn.q_proj", A.new_zeros(1, A.shape[0]))
    torch.testing.assert_close(delta, permute_rows(B @ (p[:, None] * A), 4), atol=1e-6, rtol=1e-5)
    assert k in (2, 4)


def test_gguf_export_cli_and_errors(tiny_model_dir, tmp_path, capsys):
    from transformers import GPT2Config
    GPT2Config(n_embd=64, n_layer=2, n_head=4).save_pretrained(tmp_path / "gpt2-base")
    model = make_model("gpt2", r=4, ranks=[1, 2, 4])
    save_matryoshka(model, tmp_path / "gpt2")
    assert cli_main(["export", str(tmp_path / "gpt2"), "--rank", "2", "--format", "gguf", "--out",
                     str(tmp_path / "g.gguf"), "--base-model", str(tmp_path / "gpt2-base")]) == 2
    assert "GGUF export supports llama, mistral" in capsys.readouterr().err
    assert not (tmp_path / "g.gguf").exists()
    llama = make_model("llama", r=4, ranks=[1, 2, 4])
    save_matryoshka(llama, tmp_path / "llama")
    argv = ["export", str(tmp_path / "llama"), "--rank", "2", "--format", "gguf", "--out", str(tmp_path / "l.gguf"),
            "--base-model", str(tiny_model_dir)]
    assert cli_main(argv) == 0 and (tmp_path / "l.gguf").is_file()
    assert cli_main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".l.gguf")]  # no temporaries left


@pytest.mark.slow
def test_llama_cpp_agrees_with_transformers_on_a_trained_smollm2_adapter(tmp_path):
    from matryoshka_lora.experiment import RunConfig, train
    run = RunConfig.from_flat(dict(model="smollm2-135m", dataset="arith", arith_max_digits=2, r=32, method="lora",
                                   chat_template=False, max_steps=40, batch_size=8, num_train=320, learning_rate=1e-3,
                                   output_dir=str(tmp_path / "run"), disable_tqdm=True, deploy_order="svd"))
    adapter = train(run).adapter_dir
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.llama_cpp_agreement import greedy_agreement

    agreement = greedy_agreement(adapter, [4, 32], tmp_path)
    print(f"\nllama.cpp vs transformers greedy agreement over 50 prompts: {agreement}")
    assert all(a >= 0.9 for a in agreement.values()), agreement
