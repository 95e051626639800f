"""Benchmark: per-layer rank allocation vs uniform rank at equal parameter budgets.

    PYTHONPATH=src python benchmarks/allocation.py [--adapter DIR] [--budgets 2,4,8]

One MatryoshkaLoRA adapter (SmolLM2-135M-Instruct, r=32, S={1,..,32}, the embedded `arith`
task; trained here with the demo's MatryoshkaLoRA settings unless --adapter is given) is run
at each budget in two ways: every layer at uniform rank k, and the per-layer ranks that
`allocation_curve` picks for `avg-rank:k` (the same number of adapter parameters or fewer).
Calibration examples are the validation split (carved out of the training data, never trained
on); held-out loss and generation exact match are measured on the test split, which the
calibration never sees. Writes benchmarks/results/allocation.json and prints the table.

Resumable: the adapter, the allocation and every finished measurement are kept in --work-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from matryoshka_lora import DataConfig, encode_examples, load_examples, load_matryoshka_model, set_rank  # noqa: E402
from matryoshka_lora.allocation import allocation_curve  # noqa: E402
from matryoshka_lora.evaluation.generation import generate, score_generations  # noqa: E402
from matryoshka_lora.evaluation.likelihood import completion_loss  # noqa: E402
from matryoshka_lora.experiment import RunConfig, train  # noqa: E402
from matryoshka_lora.models import load_model  # noqa: E402
from matryoshka_lora.prompts import build_prompt, encode_prompt, stop_strings  # noqa: E402

MODEL = "smollm2-135m"
# The demo's MatryoshkaLoRA run (demo.py: DEMO with DEMO_LRS["matryoshka"]).
TRAIN = dict(model=MODEL, dataset="arith", method="matryoshka", r=32, ranks=[1, 2, 4, 8, 16, 32], max_steps=60,
             batch_size=8, num_train=480, learning_rate=1e-4, warmup_steps=0.1, lr_scheduler_type="linear",
             logging_steps=10, seed=0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def get_adapter(args) -> Path:
    if args.adapter:
        return Path(args.adapter)
    adapter = args.work_dir / "train" / "adapter"
    if (adapter / "matryoshka_config.json").is_file():
        log(f"reusing the adapter trained earlier: {adapter}")
        return adapter
    log("training a MatryoshkaLoRA adapter (60 steps, batch 8) ...")
    start = time.perf_counter()
    train(RunConfig.from_flat({**TRAIN, "output_dir": str(args.work_dir / "train")}))
    log(f"trained in {time.perf_counter() - start:.0f} s")
    return adapter


class State:
    """Finished measurements, kept on disk so an interrupted run resumes."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        if self.data.get("settings") != settings:
            self.data = {"settings": settings}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def accuracy(model, tokenizer, prompts, golds, stop, args) -> dict:
    texts = generate(model, tokenizer, prompts, stop, args.max_new_tokens, args.batch_size)
    scored = score_generations(texts, golds)
    return {"exact_match_strict": scored["exact_match_strict"], "exact_match_flexible": scored["exact_match_flexible"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=None, help="A MatryoshkaLoRA adapter for SmolLM2 on arith (default: train one).")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-allocation")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "allocation.json")
    p.add_argument("--budgets", default="2,4,8", help="Uniform ranks whose sizes are the budgets.")
    p.add_argument("--num-calibration", type=int, default=32, help="Validation examples that steer the search.")
    p.add_argument("--num-eval", type=int, default=64, help="Test examples for held-out loss and exact match.")
    p.add_argument("--refresh", type=float, default=0.25, help="allocation_curve's gradient refresh.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reference-ranks", default="0,32", help="Uniform ranks measured for context (0 = base model).")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; 1 is much "
                                                            "faster on a loaded CPU).")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    budgets = [int(k) for k in args.budgets.split(",")]

    adapter = get_adapter(args)
    settings = {"adapter": str(adapter), "budgets": budgets, "num_calibration": args.num_calibration,
                "num_eval": args.num_eval, "refresh": args.refresh, "max_new_tokens": args.max_new_tokens}
    state = State(args.work_dir / "state.json", settings)
    base, tok = load_model(MODEL)
    model = load_matryoshka_model(base, adapter).eval()
    calibration = load_examples(DataConfig(dataset="arith", num_eval=args.num_calibration), "validation")
    test = load_examples(DataConfig(dataset="arith", num_eval=args.num_eval), "test")
    assert not {e.prompt for e in calibration} & {e.prompt for e in test}, "calibration and test overlap"
    calib_enc = encode_examples(tok, calibration, True, 512)
    test_enc = encode_examples(tok, test, True, 512)
    prompts = [encode_prompt(tok, build_prompt(tok, e, (), True)) for e in test]
    golds = [e.answer for e in test]
    stop = stop_strings(True, tok)

    curve = state.get("curve")
    if curve is None:
        log(f"allocating {len(budgets)} budgets on {len(calibration)} calibration examples ...")
        result = allocation_curve(model, calib_enc, [f"avg-rank:{k}" for k in budgets], test_enc, refresh=args.refresh,
                                  batch_size=args.batch_size, uniform=False)
        curve = result.to_dict()
        state.put("curve", curve)
        log(f"allocation took {result.seconds:.0f} s ({len(result.refreshes)} gradient passes)")
    patterns = {k: point["rank_pattern"] for k, point in zip(budgets, curve["points"])}

    rows = []
    for k, point in zip(budgets, curve["points"]):
        for kind, rank in (("uniform", k), ("allocated", patterns[k])):
            key = f"{kind}-{k}"
            done = state.get(key)
            if done is None:
                log(f"measuring {key} ...")
                t = time.perf_counter()
                with set_rank(model, rank):
                    done = {"heldout_loss": completion_loss(model, test_enc, args.batch_size)["loss"],
                            "calibration_loss": completion_loss(model, calib_enc, args.batch_size)["loss"]}
                    done.update(accuracy(model, tok, prompts, golds, stop, args))
                done["seconds"] = time.perf_counter() - t
                state.put(key, done)
                log(f"{key}: {done}")
        unit = curve["config"]["unit_params"]
        rows.append({
            "budget": point["budget"], "budget_params": point["budget_params"],
            "uniform": {"rank": k, "params": k * unit, **state.get(f"uniform-{k}")},
            "allocated": {"params": point["params"], "avg_rank": point["avg_rank"], "rank_counts": point["rank_counts"],
                          **state.get(f"allocated-{k}"), "rank_pattern": point["rank_pattern"]},
        })

    reference = []
    for k in [int(k) for k in args.reference_ranks.split(",") if k.strip()]:
        key = f"reference-{k}"
        if state.get(key) is None:
            log(f"measuring {key} ...")
            with set_rank(model, k):
                done = {"heldout_loss": completion_loss(model, test_enc, args.batch_size)["loss"],
                        "calibration_loss": completion_loss(model, calib_enc, args.batch_size)["loss"]}
                done.update(accuracy(model, tok, prompts, golds, stop, args))
            state.put(key, done)
            log(f"{key}: {done}")
        reference.append({"rank": k, "params": k * curve["config"]["unit_params"], **state.get(key)})

    results = {
        "description": "Uniform rank vs per-layer allocated ranks at equal adapter-parameter budgets "
                       "(SmolLM2-135M-Instruct, MatryoshkaLoRA r=32 on arith; calibration: validation split, "
                       "held-out loss and exact match: test split).",
        "settings": {**settings, "train": TRAIN if not args.adapter else None, "model": MODEL,
                     "estimator": curve["config"]["estimator"], "layers": curve["config"]["layers"]},
        "allocation": {"seconds": curve["seconds"], "gradient_passes": curve["refreshes"]},
        "budgets": rows,
        "reference": reference,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    log(f"wrote {args.out}")
    return 0


def table(results: dict) -> str:
    lines = ["| budget | config | params | held-out loss | calibration loss | exact match strict | flexible |",
             "|---|---|---|---|---|---|---|"]
    for row in results["budgets"]:
        for kind in ("uniform", "allocated"):
            r = row[kind]
            name = f"uniform r={r['rank']}" if kind == "uniform" else \
                "allocated (" + ", ".join(f"r{k}x{n}" for k, n in r["rank_counts"].items()) + ")"
            lines.append(f"| {row['budget']} | {name} | {r['params']:,} | {r['heldout_loss']:.4f} | "
                         f"{r['calibration_loss']:.4f} | {r['exact_match_strict']:.1f} | {r['exact_match_flexible']:.1f} |")
    for r in results.get("reference", []):
        name = "base model (rank 0)" if r["rank"] == 0 else f"uniform r={r['rank']}"
        lines.append(f"| reference | {name} | {r['params']:,} | {r['heldout_loss']:.4f} | {r['calibration_loss']:.4f} | "
                     f"{r['exact_match_strict']:.1f} | {r['exact_match_flexible']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
