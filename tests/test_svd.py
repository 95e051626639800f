"""SVD order: the full-rank product is unchanged, prefixes are Eckart-Young optimal, plain PEFT LoRA comes in."""

import dataclasses
import json

import pytest
import torch
from conftest import BUILDERS, make_model, randomize_adapter
from peft import LoraConfig, PeftModel, get_peft_model

from matryoshka_lora import (
    MatryoshkaConfig,
    export_rank,
    fold_p,
    load_matryoshka_model,
    save_matryoshka,
    set_rank,
    svd_adapter,
    svd_order,
)
from matryoshka_lora.cli import main as cli_main
from matryoshka_lora.core.peft_seam import factors, lora_layers
from matryoshka_lora.deploy.svd import deployed_weights, svd_factors

METHODS = [dict(method="lora"), dict(method="matryoshka"), dict(method="matryoshka", scaling="sqrt", alpha=2.0),
           dict(method="dylora"), dict(method="multirank", scaling="rank"), dict(method="custom", weights={1: 2.0, 8: 0.5})]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def deltas(model, p):
    """Per layer, the deployed delta B diag(p) A as an (n, m) matrix (built only in tests)."""
    return [B.double() @ (p.double()[:, None] * A.double()) for _, (A, B) in
            ((n, factors(layer)) for n, layer in lora_layers(model))]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_full_rank_unchanged(arch, cfg, input_ids):
    model = make_model(arch, r=8, ranks=[1, 2, 4, 8], **cfg)
    with set_rank(model, None if cfg["method"] in ("lora", "matryoshka", "custom") else 8):
        before = logits(model, input_ids)
    new = svd_order(model)
    assert new.method == "lora" and new.scaling == "none" and new.svd_from == cfg["method"]
    with set_rank(model, 8):
        torch.testing.assert_close(logits(model, input_ids), before, atol=1e-5, rtol=1e-5)
    with set_rank(model, None):  # the training-mode P of the new config is ones: the same product
        torch.testing.assert_close(logits(model, input_ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 64, 96), (8, 5, 40), (8, 40, 3)])  # (R, m, n), also R > m and R > n
def test_prefix_error_is_sum_of_dropped_sigma_squared(shape):
    R, m, n = shape
    g = torch.Generator().manual_seed(0)
    A, B, p = torch.randn(R, m, generator=g), torch.randn(n, R, generator=g), torch.rand(R, generator=g) + 0.5
    dW = B.double() @ (p.double()[:, None] * A.double())
    A2, B2, sigma = svd_factors(A, B, p)
    assert torch.all(sigma[:-1] >= sigma[1:])
    torch.testing.assert_close(torch.linalg.svdvals(dW)[: min(R, m, n)], sigma[: min(R, m, n)], rtol=1e-6, atol=1e-6)
    for k in range(R + 1):
        err = ((dW - B2[:, :k].double() @ A2[:k].double()) ** 2).sum()
        dropped = (sigma[k:] ** 2).sum()
        assert float(err) == pytest.approx(float(dropped), rel=1e-4, abs=1e-6)


def test_prefix_beats_plain_truncation_and_balances_factors():
    model = make_model("llama", r=8, ranks=[1, 2, 4, 8], method="lora")
    before = deltas(model, deployed_weights(model._mlora_controller.config))
    plain = [B[:, :2].double() @ A[:2].double() for _, (A, B) in ((n, factors(l)) for n, l in lora_layers(model))]
    svd_order(model)
    cut = [B[:, :2].double() @ A[:2].double() for _, (A, B) in ((n, factors(l)) for n, l in lora_layers(model))]
    for d, p_, c in zip(before, plain, cut):
        assert ((d - c) ** 2).sum() < ((d - p_) ** 2).sum()
    for _, layer in lora_layers(model):  # B' = U S^1/2, A' = S^1/2 V^T: row norms of A' equal column norms of B'
        A, B = factors(layer)
        torch.testing.assert_close(A.norm(dim=1), B.norm(dim=0), rtol=1e-4, atol=1e-6)


def test_svd_adapter_on_disk_equals_in_memory(tmp_path, input_ids):
    model = make_model("llama", r=8, ranks=[1, 2, 4, 8], method="matryoshka")
    save_matryoshka(model, tmp_path / "src")
    out, notes = svd_adapter(tmp_path / "src", tmp_path / "svd")
    assert notes == []
    reference = make_model("llama", r=8, ranks=[1, 2, 4, 8], method="matryoshka")  # the same weights (seeded)
    svd_order(reference)
    loaded = load_matryoshka_model(BUILDERS["llama"](0), out)
    assert loaded._mlora_controller.config == reference._mlora_controller.config
    for k in (1, 2, 4, 8):
        with set_rank(loaded, k), set_rank(reference, k):
            torch.testing.assert_close(logits(loaded, input_ids), logits(reference, input_ids), atol=1e-5, rtol=1e-5)
    # fold then SVD gives the same product as SVD straight away (the training P is what both deploy)
    folded = make_model("llama", r=8, ranks=[1, 2, 4, 8], method="matryoshka")
    fold_p(folded)
    svd_order(folded)
    with set_rank(folded, 8), set_rank(loaded, 8):
        torch.testing.assert_close(logits(folded, input_ids), logits(loaded, input_ids), atol=1e-5, rtol=1e-5)
    # the ordered adapter works with export like any nested adapter
    exported = export_rank(out, 2, tmp_path / "r2")
    plain = PeftModel.from_pretrained(BUILDERS["llama"](0), str(exported))
    with set_rank(loaded, 2):
        torch.testing.assert_close(logits(plain, input_ids), logits(loaded, input_ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError, match="overwrite"):
        svd_adapter(tmp_path / "src", tmp_path / "svd")


def _peft_adapter(tmp_path, name, **lora):
    torch.manual_seed(0)
    model = get_peft_model(BUILDERS["llama"](0), LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **lora))
    randomize_adapter(model, std=0.2)
    model.save_pretrained(str(tmp_path / name))
    return model


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=12), dict(r=8, lora_alpha=3, use_rslora=True),
                                  dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 8}, alpha_pattern={"v_proj": 2})],
                         ids=["alpha-ne-r", "rslora", "patterns"])
def test_plain_peft_import_same_logits_as_peft(tmp_path, input_ids, lora):
    peft_model = _peft_adapter(tmp_path, "plain", **lora)
    out, notes = svd_adapter(tmp_path / "plain", tmp_path / "nested")
    assert ("padded" in " ".join(notes)) == ("rank_pattern" in lora)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["lora_alpha"] == cfg["r"]
    nested = load_matryoshka_model(BUILDERS["llama"](0), out)
    R = nested._mlora_controller.config.r
    with set_rank(nested, R):
        torch.testing.assert_close(logits(nested, input_ids), logits(peft_model, input_ids), atol=1e-5, rtol=1e-5)


def test_dora_and_broken_adapters_refused_nothing_written(tmp_path, capsys):
    _peft_adapter(tmp_path, "dora", r=4, lora_alpha=4, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        svd_adapter(tmp_path / "dora", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert cli_main(["svd", str(tmp_path / "dora"), "--out", str(tmp_path / "out")]) == 2
    assert "DoRA" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        svd_adapter(tmp_path, tmp_path / "out")


def test_cli_svd_then_eval_ready(tmp_path, capsys):
    model = make_model("llama", r=8, ranks=[1, 2, 4, 8], method="dylora")
    save_matryoshka(model, tmp_path / "src")
    assert cli_main(["svd", str(tmp_path / "src"), "--out", str(tmp_path / "svd")]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((tmp_path / "svd" / "matryoshka_config.json").read_text())
    assert saved["method"] == "lora" and saved["svd_from"] == "dylora" and saved["ranks"] == [1, 2, 4, 8]


def test_plain_peft_adapter_elsewhere_names_mlora_svd(tmp_path):
    _peft_adapter(tmp_path, "plain", r=4, lora_alpha=4)
    with pytest.raises(FileNotFoundError, match="mlora svd"):
        load_matryoshka_model(BUILDERS["llama"](0), tmp_path / "plain")


@pytest.mark.parametrize("method,order", [("lora", "svd"), ("matryoshka", "fold"), ("dylora", "svd")])
def test_train_deploy_order_saves_ordered_adapter_same_full_rank(tiny_model_dir, tmp_path, input_ids, method, order):
    from matryoshka_lora.core.models import load_model

    def train(out, deploy):
        argv = ["train", "--model", str(tiny_model_dir), "--dataset", "arith", "--num-train", "8", "--max-steps", "2",
                "--batch-size", "4", "--r", "4", "--ranks", "1,2,4", "--method", method, "--learning-rate", "1e-2",
                "--seed", "3", "--output-dir", str(out), "--deploy-order", deploy, "--disable-tqdm"]
        assert cli_main(argv) == 0
        base, _ = load_model(str(tiny_model_dir))
        return load_matryoshka_model(base, out / "adapter")

    plain, ordered = train(tmp_path / "plain", "none"), train(tmp_path / "ordered", order)
    cfg = ordered._mlora_controller.config
    assert cfg.method == "lora" and (cfg.svd_from == method if order == "svd" else cfg.folded_from == method)
    reference = dict(lora=4, dylora=4).get(method)  # rank 4 under the paper rule; matryoshka: its training P
    with set_rank(plain, reference), set_rank(ordered, 4):
        torch.testing.assert_close(logits(ordered, input_ids), logits(plain, input_ids), atol=1e-5, rtol=1e-5)


def test_deploy_order_fold_refuses_dylora(tiny_model_dir, tmp_path, capsys):
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", "arith", "--num-train", "8", "--max-steps", "1",
            "--r", "4", "--ranks", "1,2,4", "--method", "dylora", "--output-dir", str(tmp_path / "o"),
            "--deploy-order", "fold"]
    assert cli_main(argv) == 2
    assert "deploy_order='svd'" in capsys.readouterr().err


def test_labels_name_the_method_and_its_reordering():
    from matryoshka_lora.deploy.svd import ordered_config

    c = MatryoshkaConfig(r=4, method="dylora")
    assert c.label() == "dylora" and ordered_config(c).label() == "dylora+svd"
    folded = dataclasses.replace(MatryoshkaConfig(r=4, method="matryoshka"), folded_from="matryoshka")
    assert folded.label() == "matryoshka+fold" and ordered_config(folded).label() == "matryoshka+fold+svd"
    assert ordered_config(ordered_config(c)).label() == "dylora+svd"  # SVD order of SVD order: the same
