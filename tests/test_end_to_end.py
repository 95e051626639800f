"""End to end on a tiny local model: mlora train / eval / compare, from the CLI, nothing downloaded."""

import json

import pytest

from matryoshka_lora.cli import main
from matryoshka_lora.training import TrainConfig


def common(model_dir, out):
    return ["--model", str(model_dir), "--dataset", "arith", "--num-train", "24", "--num-eval", "6",
            "--validation-size", "6", "--max-steps", "3", "--batch-size", "4", "--r", "4", "--ranks", "1,2,4",
            "--max-new-tokens", "12", "--eval-batch-size", "6", "--disable-tqdm", "--logging-steps", "1",
            "--max-length", "1024", "--output-dir", str(out)]


def test_train_then_eval(tiny_model_dir, tmp_path, capsys):
    assert main(["train", *common(tiny_model_dir, tmp_path / "run"), "--method", "dylora"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "matryoshka_config.json").is_file()
    curve = json.loads((tmp_path / "run" / "loss_curve.json").read_text())
    assert [c["step"] for c in curve] == [1, 2, 3]
    meta = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert [k for _, k in meta["dylora_draws"]] and all(k in (1, 2, 4) for _, k in meta["dylora_draws"])
    assert main(["eval", *common(tiny_model_dir, tmp_path / "run"), "--adapter", str(adapter),
                 "--metrics", "generate,loss", "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["ranks"] == [1, 2, 4] and set(res["methods"]) == {"dylora+svd"}  # saved in SVD order (the default)
    per_rank = res["methods"]["dylora+svd"]["per_rank"]
    assert set(per_rank) == {"1", "2", "4"} and {"exact_match_strict", "exact_match_flexible", "loss"} <= set(per_rank["1"])
    assert res["base"]["loss"] > 0
    # the adapter changes the model: rank 4 loss differs from the base model's
    assert per_rank["4"]["loss"] != pytest.approx(res["base"]["loss"], abs=1e-6)
    assert "| dylora+svd |" in capsys.readouterr().out


def test_compare_writes_consistent_json_table_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", *common(tiny_model_dir, out), "--methods", "lora,dylora,matryoshka",
            "--lr", "matryoshka=1e-3,3e-3", "--metrics", "generate,loss"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["lora", "dylora", "matryoshka"]
    assert res["metric"] == "exact_match_strict" and res["base"] is not None
    for name, m in res["methods"].items():
        ranks = sorted(int(k) for k in m["per_rank"])
        acc = [m["per_rank"][str(k)]["exact_match_strict"] for k in ranks]
        assert ranks == [1, 2, 4]
        a1, a2, a4 = acc  # trapezoids over widths 1 and 2 (ranks), 1 and 1 (log2 ranks)
        assert m["aurac"] == pytest.approx(((a1 + a2) / 2 + (a2 + a4)) / 3)
        assert m["log_aurac"] == pytest.approx(((a1 + a2) / 2 + (a2 + a4) / 2) / 2)
    grid = res["methods"]["matryoshka"]["grid"]
    assert [g["learning_rate"] for g in grid] == [1e-3, 3e-3]
    assert res["methods"]["matryoshka"]["learning_rate"] in (1e-3, 3e-3)
    table = (out / "results.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 4 and "AURAC" in table  # header + 3 rows
    assert (out / "results.png").stat().st_size > 1000
    # resumable: a second call reuses every finished run (no training: the adapters are not rewritten)
    weights = out / "lora" / f"lr{TrainConfig().learning_rate:g}" / "seed0" / "adapter" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns  # lora ran at the default rate (no grid given for it)
    assert main(argv) == 0
    assert weights.stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["methods"]["lora"]["per_rank"] == res["methods"]["lora"]["per_rank"]


def test_bad_option_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    assert main(["train", *common(tiny_model_dir, tmp_path / "x"), "--ranks", "1,8"]) == 2
    assert "larger than r=4" in capsys.readouterr().err


def test_eval_harness_from_cli(tiny_model_dir, tmp_path, capsys):
    from conftest import randomize_adapter

    from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, save_matryoshka
    from matryoshka_lora.core.models import load_model

    base, _ = load_model(str(tiny_model_dir))
    save_matryoshka(randomize_adapter(get_matryoshka_model(base, MatryoshkaConfig(r=4, method="matryoshka"))),
                    tmp_path / "ad")
    argv = ["eval", "--harness", "--tasks", "tiny_mc", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "ad"),
            "--eval-ranks", "1,4", "--limit", "4", "--harness-batch-size", "4", "--out", str(tmp_path / "h")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "h" / "results.json").read_text())
    assert sorted(res["methods"]["matryoshka"]["per_rank"]) == ["1", "4"] and res["base"] is not None
    assert "| matryoshka |" in capsys.readouterr().out
