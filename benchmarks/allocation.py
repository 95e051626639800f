"""Benchmark: per-layer rank allocation vs uniform rank at equal parameter budgets.

    PYTHONPATH=src python benchmarks/allocation.py [--adapter DIR] [--budgets 2,4,8]
    PYTHONPATH=src python benchmarks/allocation.py --rules [--adapter DIR] [--budgets 2,4,8]

One MatryoshkaLoRA adapter (SmolLM2-135M-Instruct, r=32, S={1,..,32}, the embedded `arith`
task; trained here with the demo's MatryoshkaLoRA settings unless --adapter is given) is run
at each budget in two ways: every layer at uniform rank k, and the per-layer ranks that
`allocation_curve` picks for `avg-rank:k` (the same number of adapter parameters or fewer).
Calibration examples are the validation split (carved out of the training data, never trained
on); held-out loss and generation exact match are measured on the test split, which the
calibration never sees. Writes benchmarks/results/allocation.json and prints the table.

With --rules (any LoRA made rank-elastic): one plain LoRA adapter (the same data and schedule,
method lora at the demo's LoRA learning rate 1e-3) is SVD-ordered, and at each budget the
per-layer ranks of three rules are compared on held-out loss: the calibration greedy (ranks in S),
the data-free spectrum rule (largest sigma^2 / (m + n); every rank 1..R, and restricted to S), and
PEFT's per-module energy fraction (peft's convert_to_lora with a float rank: each module keeps the
smallest k holding a fraction t of its energy; one t for all modules, the largest that fits the
budget). Uniform ranks of the ordered adapter (truncated SVD) and of the adapter as trained give
context. Writes benchmarks/results/allocation_rules.json.

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
from matryoshka_lora.core.models import load_model  # noqa: E402
from matryoshka_lora.data.prompts import build_prompt, encode_prompt, stop_strings  # noqa: E402
from matryoshka_lora.deploy.allocation import allocation_curve  # noqa: E402
from matryoshka_lora.evaluation.generation import generate, score_generations  # noqa: E402
from matryoshka_lora.evaluation.likelihood import completion_loss, token_logprobs  # noqa: E402
from matryoshka_lora.experiment import RunConfig, train  # noqa: E402

MODEL = "smollm2-135m"
# The demo's MatryoshkaLoRA run (demo.py: DEMO with DEMO_LRS["matryoshka"]).
TRAIN = dict(model=MODEL, dataset="arith", method="matryoshka", r=32, ranks=[1, 2, 4, 8, 16, 32], max_steps=60,
             batch_size=8, num_train=480, learning_rate=1e-4, warmup_steps=0.1, lr_scheduler_type="linear",
             logging_steps=10, seed=0, deploy_order="none")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def get_adapter(args, settings: dict = TRAIN) -> Path:
    if args.adapter:
        return Path(args.adapter)
    adapter = args.work_dir / "train" / "adapter"
    if (adapter / "matryoshka_config.json").is_file():
        log(f"reusing the adapter trained earlier: {adapter}")
        return adapter
    log(f"training a {settings['method']} adapter (60 steps, batch 8) ...")
    start = time.perf_counter()
    train(RunConfig.from_flat({**settings, "output_dir": str(args.work_dir / "train")}))
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


def load(adapter: Path, args):
    """The model with the adapter, and the calibration (validation) and held-out (test) examples, encoded."""
    base, tok = load_model(MODEL)
    model = load_matryoshka_model(base, adapter).eval()
    calibration = load_examples(DataConfig(dataset="arith", num_eval=args.num_calibration), "validation")
    test = load_examples(DataConfig(dataset="arith", num_eval=args.num_eval), "test")
    assert not {e.prompt for e in calibration} & {e.prompt for e in test}, "calibration and test overlap"
    return model, tok, test, encode_examples(tok, calibration, True, 512), encode_examples(tok, test, True, 512)


def accuracy(model, tokenizer, prompts, golds, stop, args) -> dict:
    texts = generate(model, tokenizer, prompts, stop, args.max_new_tokens, args.batch_size)
    scored = score_generations(texts, golds)
    return {"exact_match_strict": scored["exact_match_strict"], "exact_match_flexible": scored["exact_match_flexible"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=None, help="A MatryoshkaLoRA adapter for SmolLM2 on arith (default: train one).")
    p.add_argument("--work-dir", type=Path, default=None, help="Default: runs/bench-allocation[-rules].")
    p.add_argument("--out", type=Path, default=None, help="Default: benchmarks/results/allocation[_rules].json.")
    p.add_argument("--budgets", default="2,4,8", help="Uniform ranks whose sizes are the budgets.")
    p.add_argument("--num-calibration", type=int, default=32, help="Validation examples that steer the search.")
    p.add_argument("--num-eval", type=int, default=64, help="Test examples for held-out loss and exact match.")
    p.add_argument("--refresh", type=float, default=0.25, help="allocation_curve's gradient refresh.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reference-ranks", default="0,32", help="Uniform ranks measured for context (0 = base model).")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; 1 is much "
                                                            "faster on a loaded CPU).")
    p.add_argument("--rules", action="store_true", help="Compare the allocation rules on a plain LoRA adapter "
                                                        "(calibration, spectrum, PEFT energy fraction).")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = "allocation_rules" if args.rules else "allocation"
    args.work_dir = args.work_dir or ROOT / "runs" / f"bench-{stem.replace('_', '-')}"
    args.out = args.out or ROOT / "benchmarks" / "results" / f"{stem}.json"
    if args.rules:
        return compare_rules(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    budgets = [int(k) for k in args.budgets.split(",")]

    adapter = get_adapter(args)
    settings = {"adapter": str(adapter), "budgets": budgets, "num_calibration": args.num_calibration,
                "num_eval": args.num_eval, "refresh": args.refresh, "max_new_tokens": args.max_new_tokens}
    state = State(args.work_dir / "state.json", settings)
    model, tok, test, calib_enc, test_enc = load(adapter, args)
    prompts = [encode_prompt(tok, build_prompt(tok, e, (), True)) for e in test]
    golds = [e.answer for e in test]
    stop = stop_strings(True, tok)

    curve = state.get("curve")
    if curve is None:
        log(f"allocating {len(budgets)} budgets on {len(calib_enc)} calibration examples ...")
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
    }
    return write(args.out, results, table)


def write(out: Path, results: dict, make_table) -> int:
    """Add the machine, write the JSON, print the table."""
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(make_table(results))
    log(f"wrote {out}")
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


# -- --rules: calibration vs spectrum vs PEFT's energy fraction on a plain LoRA ---------------

# the same run with plain LoRA at the demo's LoRA learning rate (demo.py: DEMO_LRS["lora"])
LORA_TRAIN = {**TRAIN, "method": "lora", "learning_rate": 1e-3}


def energy_fraction_ranks(spectrum, budget_params: int) -> tuple[torch.Tensor, float]:
    """PEFT's float-rank rule under a budget: per module the smallest k with sum_{i<=k} sigma_i^2 >= t * sum sigma^2.

    peft 0.21 (tuners/lora/conversion.py, `_find_cutoff_index`) applies one threshold t to every
    module; it has no budget, so t is the largest whose ranks fit (checked against PEFT's own
    convert_to_lora in compare_rules). Returns (ranks (L,), t).
    """
    energy = spectrum.sigma ** 2  # (L, R)
    frac = energy.cumsum(1) / energy.sum(1, keepdim=True)  # (L, R): energy fraction kept at rank 1..R
    cuts = torch.unique(frac.flatten())  # k_l(t) = 1 + #{k: frac_lk < t} changes only at these values
    ts = torch.cat([cuts[:1] / 2, (cuts[:-1] + cuts[1:]) / 2])  # one t inside each interval of fixed ranks
    ranks = 1 + (frac[None] < ts[:, None, None]).sum(2)  # (T, L)
    params = (ranks.double() * spectrum.sizes[None]).sum(1)  # (T,)
    best = int(torch.nonzero(params <= budget_params + 1e-9).max())
    return ranks[best], float(ts[best])


def nll(model, rank, encoded, batch_size) -> dict:
    """Held-out loss (as completion_loss) and each example's summed NLL, for paired differences."""
    with set_rank(model, rank):
        sums = token_logprobs(model, [e["input_ids"] for e in encoded], [e["labels"] for e in encoded], batch_size)
    tokens = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in encoded)
    return {"heldout_loss": -sum(sums) / tokens, "example_nll": [-x for x in sums], "tokens": tokens}


def paired(a: dict, b: dict) -> dict:
    """Loss of a minus loss of b on the same examples, with the standard error over examples."""
    d = torch.tensor(a["example_nll"], dtype=torch.float64) - torch.tensor(b["example_nll"], dtype=torch.float64)
    return {"diff": float(d.sum()) / a["tokens"], "se": float(d.std() * len(d) ** 0.5) / a["tokens"]}


RULE_NAMES = {
    "uniform-trained": "uniform rank k, LoRA as trained (plain prefix)",
    "uniform-svd": "uniform rank k, SVD-ordered (truncated SVD)",
    "calibration": "calibration greedy, ranks in S (validation examples)",
    "spectrum": "spectrum, ranks 1..32 (no data)",
    "spectrum-S": "spectrum, ranks in S (no data)",
    "peft-energy": "PEFT energy fraction t per module, ranks 1..32 (no data)",
}


def compare_rules(args) -> int:
    from peft.tuners.lora.conversion import convert_to_lora

    from matryoshka_lora import svd_adapter
    from matryoshka_lora.deploy.allocation import _layer_keys
    from matryoshka_lora.deploy.spectrum import layer_spectra

    args.work_dir.mkdir(parents=True, exist_ok=True)
    budgets = sorted(int(k) for k in args.budgets.split(","))  # allocation_curve returns its points ascending
    adapter = get_adapter(args, LORA_TRAIN)
    ordered = args.work_dir / "adapter-svd"
    if not (ordered / "matryoshka_config.json").is_file():
        svd_adapter(adapter, ordered, overwrite=True)
    settings = {"adapter": str(adapter), "budgets": budgets, "num_calibration": args.num_calibration,
                "num_eval": args.num_eval, "refresh": args.refresh}
    state = State(args.work_dir / "state.json", settings)
    start = time.perf_counter()
    spectrum = layer_spectra(ordered)  # from the file: no model, no data
    spectrum_seconds = time.perf_counter() - start
    names = _layer_keys(spectrum.names)
    unit = int(spectrum.sizes.sum())

    model, _, _, calib_enc, test_enc = load(ordered, args)
    specs = [f"avg-rank:{k}" for k in budgets]

    curves = state.get("curves") or {}
    for rule, kwargs in (("spectrum", {}), ("spectrum-S", {"ranks": [1, 2, 4, 8, 16, 32]}),
                         ("calibration", {"refresh": args.refresh})):
        if rule not in curves:
            log(f"allocating by {rule} ...")
            by = rule.split("-")[0]
            data = calib_enc if by == "calibration" else None
            curves[rule] = allocation_curve(model, data, specs, by=by, uniform=False, batch_size=min(args.batch_size, 8),
                                            **kwargs).to_dict()
            state.put("curves", curves)
            log(f"{rule}: {curves[rule]['seconds']:.0f} s")
    energy = state.get("energy") or {}
    for k, spec in zip(budgets, specs):
        if spec in energy:
            continue
        ranks, t = energy_fraction_ranks(spectrum, k * unit)
        mine = {n: int(r) for n, r in zip(names, ranks)}
        peft_cfg, _ = convert_to_lora(model, t, progressbar=False)  # PEFT's own rule, on the full m x n deltas
        energy[spec] = {"threshold": t, "rank_pattern": dict(peft_cfg.rank_pattern),
                        "agrees_with_peft_convert_to_lora": dict(peft_cfg.rank_pattern) == mine}
        state.put("energy", energy)
        log(f"PEFT energy fraction {spec}: t = {t:.6f}, convert_to_lora agrees: {energy[spec]['agrees_with_peft_convert_to_lora']}")

    trained = None
    rows = []
    for k, spec in zip(budgets, specs):
        patterns = {"uniform-svd": k, **{rule: curves[rule]["points"][budgets.index(k)]["rank_pattern"] for rule in curves},
                    "peft-energy": energy[spec]["rank_pattern"]}
        row = {"budget": spec, "budget_params": k * unit, "rules": {}}
        for rule in ["uniform-trained", *patterns]:
            key = f"{rule}-{k}"
            if state.get(key) is None:
                if rule == "uniform-trained" and trained is None:
                    trained = load_matryoshka_model(load_model(MODEL)[0], adapter).eval()
                log(f"measuring {key} ...")
                state.put(key, nll(trained if rule == "uniform-trained" else model,
                                   k if rule == "uniform-trained" else patterns[rule], test_enc, args.batch_size))
            pattern = k if rule.startswith("uniform") else patterns[rule]
            per_layer = [pattern] * len(names) if isinstance(pattern, int) else [pattern[n] for n in names]
            params = int(sum(r * s for r, s in zip(per_layer, spectrum.sizes.tolist())))
            counts = {str(r): per_layer.count(r) for r in sorted(set(per_layer))}
            row["rules"][rule] = {"name": RULE_NAMES[rule], "params": params, "avg_rank": params / unit,
                                  "heldout_loss": state.get(key)["heldout_loss"], "rank_counts": counts}
        for rule, r in row["rules"].items():
            r["vs_spectrum"] = paired(state.get(f"{rule}-{k}"), state.get(f"spectrum-{k}"))
        rows.append(row)
    reference = []
    for k in [int(k) for k in args.reference_ranks.split(",") if k.strip()]:
        if state.get(f"reference-{k}") is None:
            log(f"measuring reference-{k} ...")
            state.put(f"reference-{k}", nll(model, k, test_enc, args.batch_size))
        reference.append({"rank": k, "params": k * unit, "heldout_loss": state.get(f"reference-{k}")["heldout_loss"]})

    results = {
        "description": "Per-layer ranks of a plain LoRA adapter made rank-elastic by SVD order (SmolLM2-135M-Instruct, "
                       "LoRA r=32 on arith), three allocation rules at equal adapter-parameter budgets; held-out loss "
                       "on the test split (mean NLL per completion token). vs_spectrum: loss minus the spectrum rule's "
                       "on the same examples, with its standard error over examples.",
        "settings": {**settings, "train": LORA_TRAIN if not args.adapter else "given by --adapter", "model": MODEL,
                     "layers": len(names), "unit_params": unit, "ordered_adapter": str(ordered),
                     "peft_energy_rule": "peft.tuners.lora.conversion (peft 0.21): k = smallest with cumulative "
                                         "sigma^2 >= t * total, one t for all modules, the largest t within the budget"},
        "allocation_seconds": {"spectrum_from_file": spectrum_seconds,
                               **{rule: c["seconds"] for rule, c in curves.items()}},
        "calibration_gradient_passes": len(curves["calibration"]["refreshes"]),
        "peft_energy": {spec: {k: v for k, v in e.items() if k != "rank_pattern"} for spec, e in energy.items()},
        "budgets": rows,
        "reference": reference,
    }
    return write(args.out, results, rules_table)


def rules_table(results: dict) -> str:
    lines = ["| budget | rule | params | held-out loss | minus spectrum (± s.e.) | layer ranks |",
             "|---|---|---|---|---|---|"]
    for row in results["budgets"]:
        for rule, r in row["rules"].items():
            diff = "-" if rule == "spectrum" else f"{r['vs_spectrum']['diff']:+.4f} ± {r['vs_spectrum']['se']:.4f}"
            ks = [int(k) for k in r["rank_counts"]]
            counts = f"{min(ks)}..{max(ks)} ({len(ks)} distinct)" if len(ks) > 1 else f"{ks[0]}: all"
            lines.append(f"| {row['budget']} | {r['name']} | {r['params']:,} | {r['heldout_loss']:.4f} | {diff} | {counts} |")
    for r in results.get("reference", []):
        name = "base model (rank 0)" if r["rank"] == 0 else f"full rank {r['rank']}"
        lines.append(f"| reference | {name} | {r['params']:,} | {r['heldout_loss']:.4f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
