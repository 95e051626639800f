"""Pick a rank: golden choices worked out by hand, sizes equal to the exported files, clear errors."""

import json

import pytest
from conftest import make_model

from matryoshka_lora import export_rank, recommend_rank, save_matryoshka
from matryoshka_lora.cli import main as cli_main

# best is 38.2 at rank 8; within 1.0 point: ranks 4 (37.5), 8; within 3: also 2 (35.5)
PER_RANK = {"1": 30.0, "2": 35.5, "4": 37.5, "8": 38.2}


def results(methods=("matryoshka",), adapter=None, metric="exact_match_strict", per_rank=PER_RANK):
    out = {"metric": metric, "ranks": [1, 2, 4, 8], "methods": {}}
    for i, m in enumerate(methods):
        out["methods"][m] = {"per_rank": {k: {metric: v - i} for k, v in per_rank.items()}}
        if adapter is not None:
            out["methods"][m]["adapter"] = str(adapter)
    return out


@pytest.mark.parametrize("tolerance,chosen", [(0.0, 8), (0.7, 4), (1.0, 4), (3.0, 2), (8.2, 1), (100, 1)])
def test_smallest_rank_within_tolerance(tolerance, chosen):
    rec = recommend_rank(results(), tolerance)
    assert rec.chosen.rank == chosen and rec.best.rank == 8 and rec.best.score == 38.2
    assert [r.rank for r in rec.rows] == [1, 2, 4, 8]


def test_loss_metric_is_lower_is_better():
    per_rank = {"1": 2.0, "2": 1.5, "4": 1.45, "8": 1.4}
    rec = recommend_rank(results(metric="loss", per_rank=per_rank), tolerance=0.06)
    assert rec.best.rank == 8 and rec.chosen.rank == 4


def test_sizes_and_params_equal_the_exported_adapters(tmp_path):
    model = make_model("llama", r=8)
    save_matryoshka(model, tmp_path / "nested")
    rec = recommend_rank(results(adapter=tmp_path / "nested"), 1.0)
    out = export_rank(tmp_path / "nested", [1, 2, 4, 8], tmp_path / "x")
    for row, directory in zip(rec.rows, out):
        assert row.size_bytes == (directory / "adapter_model.safetensors").stat().st_size
        assert row.params == row.rank * 2048  # sum of (m + n) over the tiny Llama's 14 layers
    text = str(rec)
    assert text.startswith("Recommended rank: 4")
    assert f"| 4 | 37.50 | {rec.rows[2].size_bytes:,} | 8,192 | <- recommended |" in text
    assert "| 8 | 38.20 |" in text and "best |" in text


def test_cli_reads_results_file_with_relative_adapter_path(tmp_path, capsys):
    model = make_model("llama", r=8)
    save_matryoshka(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "results.json").write_text(json.dumps(results(adapter="adapter")))
    assert cli_main(["recommend", str(tmp_path / "run" / "results.json"), "--tolerance", "1.0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Recommended rank: 4") and "8,192 trainable parameters" in out
    assert out.count("\n| ") == 5  # header + 4 ranks


def test_fallback_without_adapter_uses_trainable_params():
    data = results()
    data["methods"]["matryoshka"].update(r=8, trainable_params=16384)
    rec = recommend_rank(data, 1.0)
    assert rec.chosen.params == 8192 and rec.chosen.size_bytes is None and "--adapter" in str(rec)


def test_several_methods_need_a_choice(tmp_path, capsys):
    data = results(methods=("lora", "matryoshka"))
    with pytest.raises(ValueError, match="several methods.*Available: lora, matryoshka"):
        recommend_rank(data)
    with pytest.raises(ValueError, match="Unknown method 'matryoska'. Available: lora, matryoshka"):
        recommend_rank(data, method="matryoska")
    assert recommend_rank(data, method="matryoshka").best.score == pytest.approx(37.2)
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert cli_main(["recommend", str(tmp_path), "--tolerance", "1"]) == 2
    assert "--method" in capsys.readouterr().err


def test_bad_input():
    with pytest.raises(ValueError, match="tolerance=-1 must be a number >= 0"):
        recommend_rank(results(), -1)
    with pytest.raises(ValueError, match="Metric 'acc' is missing"):
        recommend_rank(results(), metric="acc")
    with pytest.raises(FileNotFoundError, match="results.json"):
        recommend_rank("/nonexistent/results.json")
