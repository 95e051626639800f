"""`mlora compare` over seeds: every method x learning rate x seed, the rate picked by mean validation
AURAC, tables of mean ± std; the YAML keys `methods`, `lr` and `seeds`, and the flags that override them."""

import json
import statistics

import pytest
import yaml

from matryoshka_lora import MatryoshkaConfig, aurac
from matryoshka_lora.cli import main
from matryoshka_lora.comparison import CompareConfig, SharedBase, pick_learning_rate, run_dir, split_options

SEEDS = [3, 7]


def test_every_method_lr_seed_runs_and_tables_show_mean_std(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "dataset": "arith", "num_train": 16, "num_eval": 4, "validation_size": 4,
        "max_steps": 2, "batch_size": 4, "r": 4, "ranks": [1, 2, 4], "max_new_tokens": 8, "eval_batch_size": 4,
        "max_length": 1024, "disable_tqdm": True, "metrics": ["generate", "loss"], "learning_rate": 1e-3,
        "methods": ["lora", "dylora"], "seeds": SEEDS,
        "lr": {"lora": ["1e-3", "3e-2"], "dylora": [5e-3, 6e-3]},  # YAML 1.1 reads "1e-3" as a string
    }))
    # the flag replaces the file's dylora grid (one rate: nothing to pick), the lora grid stays
    assert main(["compare", "--config", str(config), "--lr", "dylora=2e-3", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == SEEDS and list(res["methods"]) == ["lora", "dylora"]
    assert res["config"]["compare"] == {"methods": ["lora", "dylora"], "lr": {"lora": [1e-3, 3e-2], "dylora": [2e-3]},
                                        "seeds": SEEDS}
    trained = sorted(p.parents[1].relative_to(out).as_posix() for p in out.glob("*/*/*/adapter/adapter_model.safetensors"))
    assert trained == ["dylora/lr0.002/seed3", "dylora/lr0.002/seed7", "lora/lr0.001/seed3", "lora/lr0.001/seed7",
                       "lora/lr0.03/seed3", "lora/lr0.03/seed7"]

    # the pick: the best mean validation AURAC over the seeds
    lora = res["methods"]["lora"]
    val = {lr: [json.loads((run_dir(out, "lora", lr, s) / "eval_validation.json").read_text())["methods"]["lora"]["aurac"]
                for s in SEEDS] for lr in (1e-3, 3e-2)}
    assert [g["validation_aurac"] for g in lora["grid"]] == pytest.approx([statistics.fmean(v) for v in val.values()])
    assert lora["learning_rate"] == max(val, key=lambda lr: statistics.fmean(val[lr]))
    assert "grid" not in res["methods"]["dylora"] and not list(out.glob("dylora/*/*/eval_validation.json"))

    # the table cells are mean ± sample std over the seeds' test runs
    for method, m in res["methods"].items():
        tests = [json.loads((run_dir(out, method, m["learning_rate"], s) / "eval_test.json").read_text())["methods"][method]
                 for s in SEEDS]
        for k in ("1", "2", "4"):
            for metric in ("exact_match_strict", "loss"):
                values = [t["per_rank"][k][metric] for t in tests]
                assert m["per_rank"][k][metric] == pytest.approx(statistics.fmean(values))
                assert m["per_rank"][k][f"{metric}_std"] == pytest.approx(statistics.stdev(values))
        assert m["aurac_std"] == pytest.approx(statistics.stdev([t["aurac"] for t in tests]))
        mean_curve = [m["per_rank"][k]["exact_match_strict"] for k in ("1", "2", "4")]
        assert m["aurac"] == pytest.approx(aurac([1, 2, 4], mean_curve))  # AURAC is linear: mean of AURACs
        assert m["seeds"] == SEEDS and set(m["per_seed"]) == {"3", "7"}
    assert res["methods"]["lora"]["per_rank"]["4"]["loss_std"] > 0  # the seeds do differ
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert row.count(" ± ") == 5 and "mean ± std over 2 seeds" in table  # 3 ranks, AURAC, log-AURAC


def test_train_with_a_compare_config_warns_and_uses_the_single_run_options(tiny_model_dir, tmp_path, caplog):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "num_train": 8, "validation_size": 4, "max_steps": 1,
                                      "batch_size": 4, "r": 4, "ranks": [1, 4], "max_length": 1024, "seed": 3,
                                      "learning_rate": 1e-3, "seeds": SEEDS, "lr": {"lora": [1e-3]},
                                      "output_dir": str(tmp_path / "run"), "disable_tqdm": True}))
    assert main(["train", "--config", str(config)]) == 0
    assert "lr, seeds are `mlora compare` options; `mlora train` runs one adapter with " \
           f"method={MatryoshkaConfig().method}, learning_rate=0.001, seed=3" in caplog.text
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]["seed"] == 3


@pytest.mark.parametrize("values,message", [
    ({"seedz": [1]}, r"Unknown option\(s\) \['seedz'\]. Valid options: .*seeds"),
    ({"methods": ["lora", "matryoska"]}, r"Unknown method\(s\) \['matryoska'\]. Available: matryoshka, lora, dylora"),
    ({"methods": ["lora"], "lr": {"dylora": [1e-4]}}, r"lr has grids for \['dylora'\], which are not in methods \['lora'\]"),
    ({"lr": {"lora": [0.0]}}, r"lr for 'lora' must be one or more positive numbers"),
    ({"seeds": [42, 42]}, r"seeds=\[42, 42\] repeats a seed"),
    ({"seeds": 42}, r"seeds=42 must be a non-empty list of integers"),
    ({"seeds": [1], "learning_rate": -1.0}, r"learning_rate=-1.0 must be > 0"),  # run and compare problems together
    ({"methods": ["lora+sdv"]}, r"Unknown deployment rule in 'lora\+sdv'. Available: lora, lora\+fold, lora\+svd"),
    ({"methods": ["dylora+fold"]}, r"'dylora\+fold': fold needs a fixed P; use dylora\+svd"),
    ({"methods": ["lora"], "deploy_order": "svd"}, r"takes each method's rule from its name: methods lora\+svd"),
])
def test_invalid_compare_options_name_the_fix(values, message):
    with pytest.raises(ValueError, match=message):
        split_options(values)


def test_compare_defaults():
    run, config = split_options({"seed": 5, "learning_rate": 1e-4})
    assert config == CompareConfig() and config.seed_list(run.train.seed) == [5]
    assert config.grid("lora", run.train.learning_rate) == [1e-4]


def test_a_loss_metric_picks_the_lowest_validation_aurac(tiny_model_dir, tmp_path):
    run, config = split_options({
        "model": str(tiny_model_dir), "dataset": "arith", "num_train": 16, "num_eval": 4, "validation_size": 4,
        "max_steps": 4, "batch_size": 4, "r": 4, "ranks": [1, 4], "max_length": 1024, "disable_tqdm": True,
        "metrics": ["loss"], "methods": ["lora"], "lr": {"lora": [1e-5, 3e-2]}, "seeds": [0]})
    lr, grid = pick_learning_rate(SharedBase(run), run, "lora", config, tmp_path)
    loss_aurac = {g["learning_rate"]: g["validation_aurac"] for g in grid}
    assert loss_aurac[3e-2] < loss_aurac[1e-5] and lr == 3e-2  # the larger rate learnt more: lower held-out loss


def test_a_method_with_a_rule_is_the_same_training_saved_in_that_order(tiny_model_dir, tmp_path, caplog):
    """`lora` and `lora+svd` train the same adapter; the second is saved in SVD order: the same at full rank."""
    run, config = split_options({
        "model": str(tiny_model_dir), "dataset": "arith", "num_train": 8, "num_eval": 4, "max_steps": 2,
        "batch_size": 4, "r": 4, "ranks": [1, 2, 4], "max_length": 1024, "disable_tqdm": True, "metrics": ["loss"],
        "learning_rate": 1e-2, "methods": ["lora", "lora+svd"]})
    from matryoshka_lora.comparison import compare

    res = compare(run, config, tmp_path)
    plain, ordered = res["methods"]["lora"], res["methods"]["lora+svd"]
    assert ordered["per_rank"]["4"]["loss"] == pytest.approx(plain["per_rank"]["4"]["loss"], rel=1e-5)
    assert ordered["per_rank"]["1"]["loss"] != pytest.approx(plain["per_rank"]["1"]["loss"], rel=1e-5)
    curves = [json.loads((run_dir(tmp_path, m, 1e-2, 0) / "loss_curve.json").read_text()) for m in ("lora", "lora+svd")]
    assert curves[0] == curves[1]
    saved = [json.loads((run_dir(tmp_path, m, 1e-2, 0) / "adapter" / "matryoshka_config.json").read_text())
             for m in ("lora", "lora+svd")]
    assert saved[0].get("svd_from") is None and saved[1]["svd_from"] == "lora"
