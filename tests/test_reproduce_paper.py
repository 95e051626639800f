"""benchmarks/reproduce_paper.py: the --dry-run plan against numbers worked out by hand (default suite),
and --smoke, every stage for 2 steps on the tiny model (slow)."""

import json
import math
import statistics

import pytest
from conftest import load_script

from matryoshka_lora import aurac


@pytest.fixture(scope="module")
def rp():
    return load_script("benchmarks/reproduce_paper.py")


# table -> (runs, training examples, optimizer steps per run, lm-eval model evaluations per (task, shots))
HAND = {
    1: (3 * 4 * 3, 7473 - 200, 3 * math.ceil(math.ceil(7273 / 8) / 4), 3 * 3 * 6 + 1),  # 684 steps
    2: (3 * 10 * 3, 7473 - 200, 3 * math.ceil(math.ceil(7273 / 4) / 8), 3 * 3 * 9 + 1),  # 684 steps
    3: (3 * 10 * 3, 24926 - 200, 3 * math.ceil(math.ceil(24726 / 4) / 8), 3 * 3 * 9 + 1),  # 2319 steps
}


@pytest.mark.parametrize("table", sorted(HAND))
def test_dry_run_plan(rp, table, capsys):
    p = rp.main(["--table", str(table), "--dry-run"])
    runs, examples, steps, evaluations = HAND[table]
    assert (p["runs"], p["train_examples"], p["steps_per_run"]) == (runs, examples, steps)
    assert p["total_steps"] == runs * steps and p["effective_batch"] == 32 and p["seeds"] == [42, 666, 2408]
    assert all(e["model_evaluations"] == evaluations for e in p["lm_eval"])
    # training GPU-hours: tokens x params x (4, or 6 with gradient checkpointing) FLOPs at 20% of 989 TFLOP/s
    t = rp.TABLES[table]
    flops = runs * 3 * examples * t.tokens_per_example * t.params * (4 if table == 1 else 6)
    assert p["gpu_hours"]["train"] == pytest.approx(flops / (989e12 * 0.2) / 3600, abs=0.05)
    hours = p["gpu_hours"]
    assert hours["total"] == pytest.approx(hours["train"] + hours["validation pick"] + hours["lm-eval"], abs=0.15)
    out = capsys.readouterr().out
    assert f"Table {table}:" in out and f"runs           {runs} =" in out and f"{steps} optimizer steps per run" in out
    assert "GPU-hours" in out and "assumptions" in out


def test_dry_run_estimate_follows_the_assumptions(rp):
    slow = rp.plan(rp.TABLES[1], rp.Throughput(mfu=0.1))
    fast = rp.plan(rp.TABLES[1], rp.Throughput(mfu=0.2))
    assert slow["gpu_hours"]["train"] == pytest.approx(2 * fast["gpu_hours"]["train"], rel=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("table", [1, 2, 3])
def test_smoke_runs_every_stage(rp, table, tiny_model_dir, tmp_path):
    out = tmp_path / f"t{table}"
    result = rp.main(["--table", str(table), "--smoke", "--model", str(tiny_model_dir), "--out", str(out)])
    run, compare = rp.load_table_config(rp.TABLES[table])
    ranks = run.adapter.ranks
    names = {1: ["gsm8k_local 8-shot"], 2: ["gsm8k_local 3-shot", "gsm8k_local 8-shot"], 3: ["tiny_mc 2-shot"]}[table]
    assert list(result["evals"]) == names
    for name, ev in result["evals"].items():
        assert ev["base"] is not None and set(ev["methods"]) == {"lora", "dylora", "matryoshka"}
        for method, m in ev["methods"].items():
            assert m["seeds"] == [42, 666] and m["learning_rate"] in compare.lr[method][:2]
            assert len(m["validation_grid"]) == 2  # stage 1: both rates x both seeds scored on validation
            slug = name.replace(" ", "-").replace("-shot", "shot")
            runs = [json.loads((out / method / f"lr{m['learning_rate']:g}" / f"seed{s}" / "lm_eval" / f"{slug}.json")
                               .read_text())["methods"][method] for s in (42, 666)]
            for k in ranks:  # stage 3 is the mean over the seeds' lm-eval results
                values = [r["per_rank"][str(k)][ev["metric"]] for r in runs]
                assert m["per_rank"][str(k)] == pytest.approx([statistics.fmean(values), statistics.stdev(values)])
            mean_curve = [m["per_rank"][str(k)][0] for k in ranks]
            assert m["aurac"][0] == pytest.approx(aurac(ranks, mean_curve))
    table_md = (out / f"table{table}.md").read_text()
    assert "SMOKE RUN" in table_md and "n/a (not in SPEC)" in table_md
    if table == 1:  # the paper's numbers from SPEC, and the differences
        assert "| PT (base model) |" in table_md and "| 34.7 |" in table_md and "| 38.4 |" in table_md
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/*/adapter/adapter_model.safetensors")}
        assert len(stamps) == 3 * 2 * 2
        again = rp.main(["--table", "1", "--smoke", "--model", str(tiny_model_dir), "--out", str(out)])
        assert again["evals"] == result["evals"]  # resumed from the caches: nothing retrained
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
