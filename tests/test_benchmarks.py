"""The benchmark suite runs end to end on tiny config-built models and writes well-formed JSON.

Timings are never asserted here (they belong to `make bench`); only the structure of the
results and the exact quantities: peak memory of our LoRA equals plain PEFT LoRA's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common, inference, rank_sweep, run_all, sweep_passes, training_step  # noqa: E402

TIMING = {"median_s", "min_s", "max_s", "ratio_of_medians", "ratio_of_mins", "median_round_ratio", "round_ratio_quartiles", "round_ratios",
          "times_s"}


def test_interleave_rotates_the_order_and_summarize_takes_per_round_ratios():
    calls = []
    times = common.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up, round 0, round 1 (rotated)
    assert {name: len(t) for name, t in times.items()} == {"a": 2, "b": 2}  # one time per round, warm-up left out
    summary = common.summarize({"ref": [1.0, 2.0, 4.0], "x": [1.5, 2.0, 4.4]}, reference="ref")
    assert summary["x"]["round_ratios"] == [1.5, 1.0, 1.1]
    assert summary["x"]["median_round_ratio"] == pytest.approx(1.1)
    assert summary["x"]["ratio_of_medians"] == pytest.approx(1.0)
    assert set(summary["ref"]) == TIMING


def test_step_peak_bytes_sees_torch_cpu_allocations():
    import torch

    x = torch.zeros(256, 1024)  # 1 MiB

    def step():
        y = x + 1  # 1 MiB live
        z = y * 2  # 2 MiB live at the peak
        return float(z[0, 0])

    assert 2 * 2**20 <= common.step_peak_bytes(step, "cpu") <= 2 * 2**20 + 64  # + the scalars 1 and 2


def test_run_all_quick_writes_the_full_structure(tmp_path):
    out = tmp_path / "cpu.json"
    result = run_all.run(out, quick=True, tokenizer=tiny_tokenizer())
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    env = result["environment"]
    assert {"torch", "transformers", "peft", "cpu", "torch_threads", "date", "command"} <= set(env)

    (train,) = result["training_step"]
    assert train["memory_method"] and train["config"]["reference"] == "peft_lora"
    per_r = train["per_r"]["8"]
    assert set(per_r["time"]) == set(training_step.VARIANTS)
    assert all(set(t) == TIMING for t in per_r["time"].values())
    # Exact, unlike timings. PEFT's forward plus our P hook: PEFT's ops plus one multiply by the
    # cached P (forward) and its backward per adapted layer, so nothing is rebuilt per step, no loop
    # over ranks, no copy of A; and the step allocates exactly what PEFT LoRA's does.
    layers = per_r["adapted_layers"]
    assert layers == 14  # 2 Llama blocks x 7 linear layers
    ops = per_r["ops_vs_reference"]
    assert ops["matryoshka_unfused"] == {"aten::mul": 2 * layers, "MulBackward0": layers,
                                         "autograd::engine::evaluate_function: MulBackward0": layers}
    assert per_r["peak_bytes"]["matryoshka_unfused"] == per_r["peak_bytes"]["peft_lora"]
    # The fused forward: per block one A matmul for q/k/v and one for gate/up (2 cats, 2 splits),
    # B and the add as one addmm per layer (no add), and PEFT's multiply by its scale replaced by
    # the multiply by P, or by nothing where P is all ones (lora).
    groups = 2 * 2  # q/k/v and gate/up in each of 2 blocks
    a_matmuls = groups + (layers - 5 * 2)  # one per group, one per layer outside a group (o, down)
    for variant in ("lora", "dylora", "matryoshka"):
        diff = ops[variant]
        assert diff["aten::addmm"] == layers and diff["aten::add"] == -layers, variant
        assert diff["aten::linear"] == a_matmuls - 2 * layers, variant  # PEFT: lora_A and lora_B in each layer
        assert diff["aten::cat"] == 2 * groups and diff["aten::split_with_sizes"] == groups, variant
        assert diff.get("aten::mul", 0) == (-2 * layers if variant == "lora" else 0), variant
        assert per_r["peak_bytes"][variant] <= 1.01 * per_r["peak_bytes"]["peft_lora"], variant
    assert per_r["peak_bytes"]["base_only"] < per_r["peak_bytes"]["peft_lora"]
    assert per_r["trainable_params"]["base_only"] == 0
    assert len({per_r["trainable_params"][v] for v in ("peft_lora", "lora", "dylora", "matryoshka")}) == 1

    sweep = result["rank_sweep"]
    assert set(sweep["sweep_vs_singles"]) == {"sweep", "singles"}
    assert set(sweep["mixed_vs_separate"]) == {"mixed", "separate"}
    assert sweep["config"]["ranks"] == [1, 2, 3, 4]
    assert set(result["inference"]["per_k"]["4"]) == {"base", "unmerged", "merged", "merged_unloaded"}

    summary = result["summary"]
    assert set(summary["training_step_time_vs_peft_lora"]["tiny/2L"]["8"]) == set(training_step.VARIANTS)
    assert isinstance(summary["sweep_vs_singles"], float) and isinstance(summary["mixed_batch_vs_separate"], float)
    assert isinstance(summary["disturbed_blocks"], list) and summary["training_step_time_vs_peft_lora_pooled"]["matryoshka"]["rounds"] == 1
    tables = run_all.tables(result)
    assert tables.count("| peft_lora |") == 1 and "merged_unloaded" in tables


def test_multirank_split2_step_runs_under_the_dealt_row_ranks():
    """The benchmark's multirank-split2 step trains as MultirankLoss does: each step's forward and
    backward see the rows dealt over rank R and one drawn rank, and training mode comes back after."""
    import torch

    from matryoshka_lora.core.model import get_controller

    base = common.build_base("tiny", layers=1)
    model, optimizer, before_step = training_step.build_variant(base, "multirank-split2", r=4, batch=4)
    controller = get_controller(model)
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(controller.mode.tolist()))
    step = training_step.make_step(model, optimizer, before_step, torch.randint(0, 100, (4, 6)))
    for _ in range(3):
        step()
    handle.remove()
    assert controller.mode is None and len(seen) == 3
    for n, rows in enumerate(seen):
        assert rows == controller.split_rows(n, 0, 4) and max(rows) == 4 and len(set(rows)) == 2


def test_each_module_runs_alone(tiny_model_dir):
    assert "per_r" in training_step.run("tiny", ranks=(4,), batch=1, seq=8, rounds=1, variants=("peft_lora", "matryoshka"))
    passes = sweep_passes.run(model_name=str(tiny_model_dir), steps=2, problems=3, max_new_tokens=4, batch_size=8,
                              rounds=1)
    assert passes["all_same"] and set(passes["ratios"]) == set(sweep_passes.METRICS)
    assert "sweep_ratio" in rank_sweep.run("tiny", r=2, layers=None, rounds=1, warmup=0, tokenizer=tiny_tokenizer())
    assert "per_k" in inference.run("tiny", r=4, ks=(2,), batch=1, seq=8, rounds=1, warmup=0)


def test_gpu_script_runs_its_python_on_cpu(tmp_path):
    """benchmarks/gpu.sh is only ever run on a GPU by hand; here its command line runs tiny on CPU."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--shape", "tiny", "--layers", "1",
                           "--dtype", "bfloat16", "--batch", "1", "--seq", "8", "--rounds", "1", "--warmup", "0",
                           "--ranks", "4", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["training_step"]["config"]["dtype"] == "bfloat16"
    assert set(printed["training_step"]["per_r"]["4"]["time"]) == set(training_step.VARIANTS)


def test_allocation_benchmark_energy_rule_is_peft_convert_to_lora_within_the_budget():
    """The PEFT energy-fraction baseline of benchmarks/allocation.py --rules is PEFT's own rule, cut to the budget."""
    from conftest import make_model
    from peft.tuners.lora.conversion import convert_to_lora

    from benchmarks import allocation
    from matryoshka_lora import svd_order
    from matryoshka_lora.deploy.spectrum import layer_spectra

    model = make_model("llama", r=8, ranks=[1, 2, 4, 8], method="lora")
    svd_order(model)
    spectrum = layer_spectra(model)
    unit = int(spectrum.sizes.sum())
    seen = set()
    for avg in (1, 1.5, 2, 3, 5, 8):
        ranks, t = allocation.energy_fraction_ranks(spectrum, int(avg * unit))
        params = float((ranks.double() * spectrum.sizes).sum())
        assert params <= avg * unit
        frac = (spectrum.sigma ** 2).cumsum(1) / (spectrum.sigma ** 2).sum(1, keepdim=True)  # (L, R)
        above = frac[frac > t]
        if above.numel():  # t is the largest that fits: just past the next energy fraction, the ranks do not
            more = 1 + (frac <= above.min()).sum(1)
            assert float((more.double() * spectrum.sizes).sum()) > avg * unit
        peft_cfg, _ = convert_to_lora(model, t, progressbar=False)
        assert peft_cfg.rank_pattern == {n: int(k) for n, k in zip(spectrum.names, ranks)}
        seen.add(tuple(ranks.tolist()))
    assert len(seen) > 3  # the budgets give different allocations
