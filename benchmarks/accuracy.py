"""Accuracy across ranks: LoRA vs DyLoRA vs MatryoshkaLoRA and variants, with learning-rate grids and seeds.

Run (resumable: finished runs are reused, so a killed study continues where it stopped):

    .venv/bin/python benchmarks/accuracy.py --preset cpu --out runs/study

Writes benchmarks/results/accuracy.{json,md} and accuracy-<task>.png after each stage (per task:
per-rank accuracy mean ± std over seeds on the test split, AURAC and log-AURAC). Each method's
learning rate is picked by validation AURAC over its grid (seed 0) on the grid task; other tasks
reuse the picked rates.

Methods (all through the library, `MatryoshkaConfig.method`):
  lora, dylora, matryoshka (the paper's P), matryoshka_norm (P with lambda = 1/|S|),
  multirank (exact mean of the |S| rank losses; |S| times the compute per step),
  multirank2 (rank R plus one rank drawn from the rest of S per step; 2x the compute).
Evaluation conventions: every run is scored with the paper's rule (s_k A_k B_k); runs of the
fixed-P methods are also scored after `fold_p` (rank k = prefix of A diag(P) B), as "<method>+fold".
Equal compute: "<method>@compute" trains steps/cost steps (grid-picked lr); "multirank@steps" trains
the full steps (|S| times the compute of the others) at LoRA's picked lr, seed 0.
Plateau check ("longer"): the picked runs again at a multiple of the steps, seed 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # study.py beside this file (the v2 preset; the folders' owner)

from matryoshka_lora import MatryoshkaConfig, fold_p, get_matryoshka_model  # noqa: E402
from matryoshka_lora.comparison import SharedBase, mean_std  # noqa: E402
from matryoshka_lora.core.files import atomic_write_text  # noqa: E402
from matryoshka_lora.evaluation.report import plot  # noqa: E402
from matryoshka_lora.experiment import RunConfig, evaluate  # noqa: E402

RANKS = [1, 2, 4, 8, 16, 32]
# lr multipliers per method relative to --base-lr, spaced for each method's effective step: the
# paper's P has P_1 = |S| and mean ~2, so its grid is shifted down; normalised P (lambda = 1/|S|)
# has P <= 1 and mean ~1/3, so its grid is shifted up; multirank@compute gets only steps/|S|
# updates, so its grid is shifted up too.
METHODS = {
    "lora": ({"method": "lora"}, [1 / 3, 1, 3]),
    "dylora": ({"method": "dylora"}, [1 / 3, 1, 3]),
    "matryoshka": ({"method": "matryoshka"}, [1 / 9, 1 / 3, 1]),
    "matryoshka_norm": ({"method": "custom", "weights": None}, [1, 3, 10]),  # weights filled per rank set
    "multirank": ({"method": "multirank"}, [1, 3, 10]),
    # the cheap candidate: rank R plus one rank drawn from the rest of S per step (2x compute)
    "multirank2": ({"method": "multirank", "ranks_per_step": 2}, [1, 3, 10]),
}
FOLDABLE = {"matryoshka", "matryoshka_norm"}
PRESETS = {
    # the default-suite smoke test: tiny model, a few steps
    "tiny": dict(steps=3, batch_size=4, val_eval=4, test_eval=4, max_new_tokens=12, seeds=[0], tasks=["arith"],
                 grid_task="arith", methods=["lora", "matryoshka"], task_methods={}, grid=2, longer=None),
    # sized for about two hours on a quiet 2-core CPU with SmolLM2-135M (stated in the README):
    # the lr grids run on arith (seed 0, validation split); wordops reuses each method's arith lr.
    "cpu": dict(steps=32, batch_size=4, val_eval=24, test_eval=32, max_new_tokens=40, seeds=[0, 1],
                tasks=["arith", "wordops"], grid_task="arith", methods=list(METHODS),
                task_methods={"wordops": ["lora", "dylora", "matryoshka", "multirank", "multirank2"]}, grid=3,
                longer={"task": "arith", "factor": 2, "methods": ["lora", "dylora", "matryoshka"]}),
}


class Study:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.preset = {**PRESETS[args.preset], **({"steps": args.steps} if args.steps else {})}
        self.shared: SharedBase | None = None  # one base model for every run, as in `mlora compare`
        self.picked: dict[str, float] = {}  # method -> lr picked on the grid task

    def shared_base(self) -> SharedBase:
        if self.shared is None:
            self.shared = SharedBase(self.run_config("arith", "lora", self.args.base_lr, 0, 1, self.out))
        return self.shared

    def run_config(self, task, method, lr, seed, steps, out) -> RunConfig:
        overrides, _ = METHODS[method]
        overrides = dict(overrides)
        if method == "matryoshka_norm":
            overrides["weights"] = {q: 1 / len(self.ranks) for q in self.ranks}
        p = self.preset
        return RunConfig.from_flat(dict(
            model=self.args.model, dataset=task, r=max(self.ranks), ranks=self.ranks, chat_template=False,
            arith_max_digits=2, max_steps=steps, batch_size=p["batch_size"], num_train=steps * p["batch_size"],
            learning_rate=lr, warmup_steps=0.1, seed=seed, data_seed=0, num_eval=p["val_eval"],
            eval_batch_size=32, max_new_tokens=p["max_new_tokens"], metrics=["generate"], output_dir=str(out),
            disable_tqdm=True, logging_steps=max(1, steps // 4), save_steps=max(1, steps // 3),
            save_total_limit=3, max_length=1024, deploy_order="none", **overrides))

    @property
    def ranks(self):
        return self.args.ranks

    def one(self, task, method, lr, seed, steps, split, fold=False) -> dict:
        """Train (or reuse) one run and score it on `split`; cached in eval_<split>[_fold].json."""
        out = self.out / task / f"{method}-s{steps}" / f"lr{lr:.3g}" / f"seed{seed}"
        cached = out / f"eval_{split}{'_fold' if fold else ''}.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        start = time.perf_counter()
        model, run = self.shared_base().trained(self.run_config(task, method, lr, seed, steps, out))  # a killed run continues
        if fold:
            fold_p(model)
        size = self.preset["val_eval" if split == "validation" else "test_eval"]
        res = evaluate(run.replace(include_base=False, num_eval=size), out / "adapter", split, model=model,
                       tokenizer=self.shared_base().tokenizer)
        res["seconds"] = time.perf_counter() - start
        res["train_seconds"] = json.loads((out / "train_config.json").read_text()).get("seconds")
        self.shared_base().release(model)
        atomic_write_text(cached, json.dumps(res, indent=1) + "\n")  # a kill never leaves a truncated cache
        print(f"[study] {task} {method}{'+fold' if fold else ''} lr={lr:.3g} seed={seed} steps={steps} {split}: "
              f"AURAC {_score(res):.1f} ({res['seconds']:.0f}s)", flush=True)
        return res

    def pick(self, task, method, steps, fold) -> tuple[float, dict | None]:
        """The method's learning rate: best mean validation AURAC over its grid on the grid task."""
        key = method + ("+fold" if fold else "")
        if task != self.preset["grid_task"] and key in self.picked:
            return self.picked[key], None
        _, mults = METHODS[method]
        grid = [self.args.base_lr * m for m in mults][: self.preset["grid"]]
        val = {lr: self.one(task, method, lr, 0, steps, "validation", fold) for lr in grid}
        best = max(grid, key=lambda lr: _score(val[lr]))
        self.picked[key] = best
        return best, {f"{lr:.3g}": _score(v) for lr, v in val.items()}

    def task(self, task) -> dict:
        p = self.preset
        steps, n = p["steps"], len(self.ranks)
        rows = {}
        for method in p["task_methods"].get(task, p["methods"]):
            variants = [(method, False)] + ([(method + "+fold", True)] if method in FOLDABLE else [])
            for name, fold in variants:
                cost = self.cost(method)
                if cost > 1:  # equal compute with the 1x methods: steps/cost steps
                    short = max(1, steps // cost)
                    best, grid = self.pick(task, method, short, fold)
                    tests = [self.one(task, method, best, s, short, "test") for s in p["seeds"]]
                    rows[f"{method}@compute"] = _summary(tests, best, grid, short, cost=cost)
                    continue
                best, grid = self.pick(task, method, steps, fold)
                tests = [self.one(task, method, best, s, steps, "test", fold) for s in p["seeds"]]
                rows[name] = _summary(tests, best, grid, steps, cost=1)
        if task == p["grid_task"] and "multirank" in p["methods"] and "lora" in self.picked:
            # equal steps (|S| times the compute of the others), at LoRA's learning rate, seed 0 only
            lr = self.picked["lora"]
            rows["multirank@steps"] = _summary([self.one(task, "multirank", lr, 0, steps, "test")], lr, None,
                                               steps, cost=n)
        return {"methods": rows, "steps": steps, "base_test": self.base_score(task)}

    def cost(self, method) -> int:
        """Forward/backward passes per step, in LoRA steps."""
        overrides, _ = METHODS[method]
        if overrides["method"] != "multirank":
            return 1
        return overrides.get("ranks_per_step") or len(self.ranks)

    def longer(self) -> dict:
        """Plateau check: the picked lr at `factor` times the steps (seed 0), next to the preset's steps."""
        spec = self.preset["longer"]
        task, steps = spec["task"], self.preset["steps"] * spec["factor"]
        rows = {}
        for method in spec["methods"]:
            variants = [(method, False)] + ([(method + "+fold", True)] if method in FOLDABLE else [])
            for name, fold in variants:
                lr = self.picked[name]
                rows[name] = _summary([self.one(task, method, lr, 0, steps, "test", fold)], lr, None, steps, cost=1)
        return {"task": task, "steps": steps, "methods": rows}

    def base_score(self, task):
        """Rank 0 (the base model) on the test split, scored once per task."""
        out = self.out / task / "base.json"
        if out.is_file():
            return json.loads(out.read_text())
        method = self.preset["methods"][0]
        run = self.run_config(task, method, self.args.base_lr, 0, self.preset["steps"], self.out / task / "base")
        base, tok = self.shared_base().get()
        model = get_matryoshka_model(base, MatryoshkaConfig(r=max(self.ranks), ranks=self.ranks))
        res = evaluate(run.replace(include_base=True, eval_ranks=[self.ranks[0]], num_eval=self.preset["test_eval"]),
                       None, "test", model=model, tokenizer=tok)
        self.shared_base().release(model)
        atomic_write_text(out, json.dumps(res["base"]) + "\n")
        return res["base"]


def _score(res) -> float:
    return next(iter(res["methods"].values()))["aurac"]


def _summary(tests, lr, grid, steps, cost) -> dict:
    metric = tests[0]["metric"]
    per_rank = {}
    for k in tests[0]["ranks"]:
        per_rank[str(k)] = mean_std([next(iter(t["methods"].values()))["per_rank"][str(k)][metric] for t in tests])
    au = mean_std([next(iter(t["methods"].values()))["aurac"] for t in tests])
    la = mean_std([next(iter(t["methods"].values()))["log_aurac"] for t in tests])
    return {"learning_rate": lr, "validation_aurac_grid": grid, "steps": steps, "compute_per_step": cost,
            "seeds": len(tests), "per_rank": per_rank, "aurac": au, "log_aurac": la,
            "train_seconds": statistics.fmean(t.get("train_seconds") or 0 for t in tests)}


def markdown(results) -> str:
    sections = [(f"{task} (test split, {results['preset']['test_eval']} problems; mean ± std over seeds; "
                 f"base model {t['base_test'][results['metric']]:.1f})", t["methods"])
                for task, t in results["tasks"].items()]
    if results.get("longer"):
        g = results["longer"]
        sections.append((f"{g['task']} at {g['steps']} steps (plateau check, seed 0)", g["methods"]))
    lines = []
    for title, methods in sections:
        ranks = sorted({int(k) for m in methods.values() for k in m["per_rank"]})
        lines += [f"### {title}", "",
                  "| method | lr | steps | cost/step | seeds | " + " | ".join(f"r={k}" for k in ranks)
                  + " | AURAC | log-AURAC |", "|" + "---|" * (len(ranks) + 7)]
        for name, m in methods.items():
            cells = [f"{m['per_rank'][str(k)][0]:.1f} ± {m['per_rank'][str(k)][1]:.1f}" for k in ranks]
            lines.append(f"| {name} | {m['learning_rate']:.2g} | {m['steps']} | {m['compute_per_step']}x | "
                         f"{m['seeds']} | " + " | ".join(cells) + f" | {m['aurac'][0]:.1f} ± {m['aurac'][1]:.1f} | "
                         f"{m['log_aurac'][0]:.1f} ± {m['log_aurac'][1]:.1f} |")
        lines.append("")
    return "\n".join(lines)


def write(results, stem: Path, started: float) -> None:
    results["seconds"] = time.perf_counter() - started
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    for task, t in results["tasks"].items():  # one plot per task, in the report.py style
        fake = {"metric": results["metric"], "base": t["base_test"],
                "methods": {n: {"per_rank": {k: {results["metric"]: v[0]} for k, v in m["per_rank"].items()},
                                "aurac": m["aurac"][0]} for n, m in t["methods"].items()}}
        plot(fake, stem.with_name(f"{stem.name}-{task}.png"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=[*PRESETS, "v2"], default="cpu",
                    help="v2: the decisive study (benchmarks/study.py; its own flags, e.g. --max-minutes).")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=RANKS)
    ap.add_argument("--base-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=None, help="Override the preset's optimizer steps.")
    ap.add_argument("--out", default=None, help="Adapters (default runs/study; v2: runs/study2).")
    ap.add_argument("--results", default=None,
                    help="Result JSONs (default benchmarks/results/accuracy; v2: benchmarks/results/study).")
    args, rest = ap.parse_known_args(argv)
    if args.preset == "v2":
        import study as v2  # benchmarks/study.py

        paths = [*(["--out", args.out] if args.out else []), *(["--results", args.results] if args.results else [])]
        model = ["--model", args.model] if args.model != "smollm2-135m" else []
        return v2.main(["--preset", "v2", *model, *paths, *rest])
    args.out = args.out or "runs/study"
    args.results = args.results or str(ROOT / "benchmarks" / "results" / "accuracy")
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    from study import claim  # benchmarks/study.py: finished runs under --out are reused, so they must be this model's
    claim(Path(args.out), args.model, ap.get_default("model"))  # unmarked runs: made with the default model
    study = Study(args)
    started = time.perf_counter()
    results = {"command": "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "preset": study.preset, "ranks": args.ranks, "metric": "exact_match_strict", "model": args.model,
               "base_lr": args.base_lr, "tasks": {}}
    stem = Path(args.results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for task in study.preset["tasks"]:  # results are rewritten after each stage, so a partial study reports
        results["tasks"][task] = study.task(task)
        write(results, stem, started)
    if study.preset["longer"]:
        results["longer"] = study.longer()
        write(results, stem, started)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
