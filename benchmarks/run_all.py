"""The CPU benchmark suite (`make bench`): training step, rank sweep, inference, one-pass sweep ->
results/cpu.json.

Sizes are chosen so the suite fits in about 18 minutes on 2 shared CPU cores; every comparison is a
ratio between interleaved runs in this one process (see common.py), so load from other
processes slows the suite down but should not move the ratios.

    python -m benchmarks.run_all                 # writes benchmarks/results/cpu.json
    python -m benchmarks.run_all --quick         # 1 round each on tiny shapes (a smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import inference, rank_sweep, sweep_passes, training_step
from .common import RESULTS, environment, log, write_json

# (shape, layers): the embedded SmolLM2-135M in full, and Llama-3.2-1B's shape with 2 of its 16 layers.
# (shape, layers, per-shape settings). The 1B shape's step is mostly its 128k-vocabulary head.
# Many short rounds rather than few long ones: on a shared machine load comes in bursts, and a
# median over 8 rounds survives 3 disturbed ones.
TRAINING_SHAPES = (("smollm2-135m", None, dict(seq=64)), ("llama-3.2-1b", 2, dict(seq=32)))
TRAIN = dict(ranks=(8, 32, 128), batch=1, rounds=8, warmup=0)
SWEEP = dict(shape="smollm2-135m", layers=4, r=32, n_examples=1, rounds=4, warmup=1)
INFER = dict(shape="smollm2-135m", r=32, ks=(8, 32), batch=2, seq=64, rounds=10, warmup=1)
# One pass against rank by rank on an adapter trained here for 40 steps (SmolLM2, arith).
PASSES = dict(steps=40, problems=16, max_new_tokens=48, batch_size=32, rounds=1)


def run(out=None, quick: bool = False, threads: int | None = 1, tokenizer=None) -> dict:
    """Run the suite and write the JSON; `quick` runs each part once on tiny config-built models."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    if quick:
        shapes = (("tiny", None, dict(rounds=1)),)
        train = dict(TRAIN, ranks=(8,))
        sweep = dict(SWEEP, shape="tiny", layers=None, r=4, rounds=1)
        infer = dict(INFER, shape="tiny", r=8, ks=(4,), rounds=1)
    else:
        shapes, train, sweep, infer = TRAINING_SHAPES, TRAIN, SWEEP, INFER
    result = {"environment": environment("cpu"), "training_step": [], "seconds": {}}
    for shape, layers, extra in shapes:
        t0 = time.perf_counter()
        result["training_step"].append(training_step.run(shape, layers=layers, **dict(train, **extra)))
        result["seconds"][f"training_step/{shape}"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    result["rank_sweep"] = rank_sweep.run(**sweep, tokenizer=tokenizer)
    result["seconds"]["rank_sweep"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    result["inference"] = inference.run(**infer)
    result["seconds"]["inference"] = round(time.perf_counter() - t0, 1)
    if not quick:  # it needs a real tokenizer and model (tests run it on a tiny one: test_benchmarks.py)
        t0 = time.perf_counter()
        result["sweep_passes"] = sweep_passes.run(**PASSES)
        result["seconds"]["sweep_passes"] = round(time.perf_counter() - t0, 1)
    result["seconds"]["total"] = round(time.perf_counter() - start, 1)
    result["summary"] = summary(result)
    if out is not None:
        write_json(out, result)
        log(f"wrote {out}")
    return result


def summary(result: dict) -> dict:
    """The headline ratios: what the README quotes (medians of per-round ratios)."""
    out = {"training_step_time_vs_peft_lora": {}, "training_peak_memory_vs_peft_lora": {},
           "training_extra_ops_per_adapted_layer": {}, "disturbed_blocks": []}
    pooled: dict[str, list[float]] = {}
    for res in result["training_step"]:
        key = f"{res['config']['shape']}/{res['config']['layers']}L"
        out["training_step_time_vs_peft_lora"][key] = {
            r: {v: round(t["median_round_ratio"], 3) for v, t in per["time"].items()} for r, per in res["per_r"].items()}
        out["training_peak_memory_vs_peft_lora"][key] = {
            r: {v: round(m, 4) for v, m in per["memory_ratio"].items()} for r, per in res["per_r"].items()}
        out["training_extra_ops_per_adapted_layer"][key] = {
            r: {v: {op: n / per["adapted_layers"] for op, n in diff.items()} for v, diff in per["ops_vs_reference"].items()
                if v != "base_only"} for r, per in res["per_r"].items()}
        for r, per in res["per_r"].items():
            for v, t in per["time"].items():
                pooled.setdefault(v, []).extend(t["round_ratios"])
            floor = per["time"].get("base_only")
            if floor is not None and floor["median_round_ratio"] > 1.0:
                # The floor does strictly less work than PEFT LoRA; where it measured slower, this
                # block's noise was larger than the true gap (small where the vocabulary head dominates).
                out["disturbed_blocks"].append(f"{key} R={r}")
    # Every round of every shape and R together: the systematic part of a ratio, with less noise.
    out["training_step_time_vs_peft_lora_pooled"] = {
        v: {"median": round(statistics.median(x), 3),
            "quartiles": [round(q, 3) for q in statistics.quantiles(x, n=4, method="inclusive")[::2]] if len(x) > 1 else x * 2,
            "rounds": len(x)} for v, x in pooled.items()}
    out["sweep_vs_singles"] = round(result["rank_sweep"]["sweep_ratio"], 3)
    out["mixed_batch_vs_separate"] = round(result["rank_sweep"]["mixed_ratio"], 3)
    if "sweep_passes" in result:
        out["one_pass_vs_by_rank"] = {**{m: round(x, 3) for m, x in result["sweep_passes"]["ratios"].items()},
                                      "same_numbers": result["sweep_passes"]["all_same"]}
    out["inference_vs_base"] = {k: {c: round(t["median_round_ratio"], 3) for c, t in per.items()}
                                for k, per in result["inference"]["per_k"].items()}
    return out


def tables(result: dict) -> str:
    parts = [training_step.table(r) for r in result["training_step"]]
    parts += [rank_sweep.table(result["rank_sweep"]), inference.table(result["inference"])]
    if "sweep_passes" in result:
        parts.append(sweep_passes.table(result["sweep_passes"]))
    return "\n\n".join(parts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "cpu.json"))
    ap.add_argument("--quick", action="store_true", help="Tiny shapes, one round: checks the suite runs.")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine, OpenMP threads waiting on each other "
                         "add more noise than they save).")
    args = ap.parse_args(argv)
    tokenizer = None
    if args.quick:
        sys.path.insert(0, str(RESULTS.parent.parent / "tests"))
        from tiny_tokenizer import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    result = run(args.out, quick=args.quick, threads=args.threads, tokenizer=tokenizer)
    print(tables(result))
    return result


if __name__ == "__main__":
    main()
