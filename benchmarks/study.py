"""Study v2: which training method and deployment rule make every rank usable.

Run (resumable; `--max-minutes N` works a chunk and stops cleanly between units):

    .venv/bin/python benchmarks/accuracy.py --preset v2 --max-minutes 170

Protocol (preset "v2"): SmolLM2-135M-Instruct, R = 32, S = {1, 2, 4, 8, 16, 32}, all-linear, no
chat template, batch 16, linear schedule to `steps` (600) with no warm-up, adapter snapshots at
75, 150, 300, 600. Every run is trained in segments that end at a snapshot (stop + exact
resume), so an interruption costs at most one segment.
- Learning rate: each method's grid (4 rates, spaced for its effective step; a grid whose best
  rate is at an edge is extended by one point, twice at most) is run with seed 42 to step 150 of
  the 600-step schedule and scored on validation (teacher-forced completion match, all ranks in
  one pass); the rate with the best validation AURAC (best deployment rule of the method) wins.
  The second task reuses the first task's rates.
- Final runs: the picked rate with seeds 42 (the grid run, continued), 666 and 2408. Snapshots
  75/150/300 are scored on validation (where each method plateaus), the last one on test.
- Deployment rules, applied to the same trained adapters: `paper` (rank k runs s_k A_k B_k),
  `fold` (the prefix of A diag(P) B) and `svd` (SVD order of the deployed product; for a fixed P
  this is fold + SVD).
- Equal compute: multirank trains |S| = 6 rank losses per step, so "multirank@compute" runs 1/6
  of the steps (snapshots and grid step scaled alike).
- Final tables: greedy generation strict-match on the test split, scored in the same pass as a
  run's test match while its adapter is on disk (adapters are not committed: a run scored on
  another machine is trained again in a last phase, the methods leading the race for the default
  first). Only the rows match missed are decoded: a matched row is one greedy decoding reproduces.
- Candidate objectives (issue 19 item 4; CANDIDATES): run their grid like any method, then go on
  to the curves and seeds only if their best validation AURAC and log-AURAC at the grid step beat
  the best lora and dylora grid runs on both (the decision: <task>/candidates.json).

Results: one small JSON per (task, method, lr, seed, steps, split, metric) under
benchmarks/results/study/, written when that unit finishes (commit them as they come; adapters
stay under --out), and summary.json / summary.md / plots rebuilt from them after every unit.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from matryoshka_lora import MatryoshkaConfig, fold_p, load_matryoshka_model, svd_order  # noqa: E402
from matryoshka_lora.checkpoints import latest_checkpoint  # noqa: E402
from matryoshka_lora.comparison import mean_std  # noqa: E402
from matryoshka_lora.core.files import atomic_write_text  # noqa: E402
from matryoshka_lora.core.metrics import aurac, log_aurac  # noqa: E402
from matryoshka_lora.core.models import load_model  # noqa: E402
from matryoshka_lora.evaluation.report import new_plot, save_log2_plot  # noqa: E402
from matryoshka_lora.experiment import RunConfig, evaluate, train  # noqa: E402

RANKS = [1, 2, 4, 8, 16, 32]
# name -> adapter options, lr grid, compute per step (in LoRA steps), deployment rules.
METHODS = {
    "lora": ({"method": "lora"}, [1e-4, 3e-4, 1e-3, 3e-3], 1, ["paper", "svd"]),
    "dylora": ({"method": "dylora"}, [1e-4, 3e-4, 1e-3, 3e-3], 1, ["paper", "svd"]),
    # the paper's P has P_1 = |S| = 6 and mean ~2: its grid sits ~3x lower
    "matryoshka": ({"method": "matryoshka"}, [3e-5, 1e-4, 3e-4, 1e-3], 1, ["paper", "fold", "svd"]),
    # init "paper" draws A ~4x larger (U(1/sqrt(R)) against U(1/sqrt(576))): another ~3x lower
    "matryoshka_pinit": ({"method": "matryoshka", "init": "paper"}, [1e-5, 3e-5, 1e-4, 3e-4], 1,
                         ["paper", "fold", "svd"]),
    # the mean of 6 rank losses gives each rank ~1/6 of the gradient: its grid sits ~3x higher
    "multirank@compute": ({"method": "multirank", "multirank_rows": "stack"}, [3e-4, 1e-3, 3e-3, 1e-2], 6,
                          ["paper", "svd"]),
    # issue 19 item 4, a candidate objective at LoRA's compute: each step deals half of the batch's
    # rows to rank R and half to one other rank drawn from S; the rank-R half sees LoRA's grid
    "multirank@split2": ({"method": "multirank", "multirank_rows": "split", "ranks_per_step": 2},
                         [1e-4, 3e-4, 1e-3, 3e-3], 1, ["paper", "svd"]),
}
# New objectives go past their grid only if they beat the baselines there (kept only if they win)
CANDIDATES = {"multirank@split2"}
BASELINES = ("lora", "dylora")
# the summary pairs the best variant with each baseline as trained and in SVD order (the strongest rule)
PAIRED_WITH = ("lora", "lora+svd", "dylora", "dylora+svd")
PRESETS = {
    "v2": dict(model="smollm2-135m", tasks=["arith", "wordops"], methods=list(METHODS),
               task_methods={"wordops": ["lora", "dylora", "matryoshka", "multirank@compute", "multirank@split2"]},
               steps=600, snapshots=[75, 150, 300, 400, 600], grid_at=150, plateau_at=400, batch_size=16,
               n_val=200, n_test=400,
               seeds=[42, 666, 2408], grid_seed=42, max_new_tokens=64, eval_batch_size=64, extend=2),
    # the default-suite test: a tiny model, a few steps, two seeds
    "tiny": dict(model=None, tasks=["arith"], methods=["lora", "matryoshka", "multirank@split2"], task_methods={},
                 steps=4, snapshots=[2, 4], grid_at=2, batch_size=4, n_val=4, n_test=6, seeds=[42, 666], grid_seed=42,
                 max_new_tokens=12, eval_batch_size=16, extend=0,
                 grid={"lora": [1e-3, 3e-3], "matryoshka": [1e-3, 3e-3], "multirank@split2": [3e-3]}),
}
RULE_NAMES = {"paper": "", "fold": "+fold", "svd": "+svd"}


def variant(method: str, rule: str) -> str:
    """Table name of a method under a deployment rule, e.g. lora+svd, matryoshka+fold+svd."""
    if rule == "svd" and "fold" in METHODS[method][3]:
        return f"{method}+fold+svd"
    return method + RULE_NAMES[rule]


def _mean_std(xs) -> dict:
    mean, std = mean_std(xs)
    return {"mean": mean, "std": std}


class Study:
    def __init__(self, preset: dict, out: Path, results: Path, model: str | None, max_minutes: float | None):
        self.p, self.out, self.results = preset, out, results
        self.model_name = model or preset["model"]
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else math.inf
        self.base = self.tok = None
        self.grids: dict[tuple[str, str], list[float]] = {}  # (task, method) -> its grid, extensions included
        # what work took on this machine (kept under --out, which is local to it), to stop before work
        # that would end past the deadline: seconds per compute-step of training (per task) and seconds
        # per rule of scoring (per task, split, strict, and per method too)
        speeds = json.loads(self.speeds_path.read_text()) if self.speeds_path.is_file() else {}
        self.step_seconds: dict[str, float] = speeds.get("step_seconds", {})
        self.rule_seconds: dict[tuple, float] = {tuple(json.loads(k)): v for k, v in speeds.get("rule_seconds", {}).items()}

    @property
    def speeds_path(self) -> Path:
        return self.out / "speeds.json"

    def save_speeds(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.speeds_path, json.dumps({
            "step_seconds": self.step_seconds,
            "rule_seconds": {json.dumps(list(k)): v for k, v in self.rule_seconds.items()}}, indent=1) + "\n")

    # -- units of work ------------------------------------------------------------------------
    def scaled(self, method: str, step: int) -> int:
        return max(1, step // METHODS[method][2])

    def run_dir(self, task, method, lr, seed) -> Path:
        return self.out / task / method / f"lr{lr:g}" / f"seed{seed}"

    def snapshot(self, task, method, lr, seed, step: int) -> Path:
        """The saved adapter of one run at snapshot `step` (unscaled)."""
        return self.run_dir(task, method, lr, seed) / "snapshots" / f"step-{self.scaled(method, step)}"

    def result_path(self, task, method, lr, seed, steps, split, metric) -> Path:
        return self.results / task / method / f"lr{lr:g}" / f"seed{seed}" / f"step{steps}-{split}-{metric}.json"

    def run_config(self, task, method, lr, seed, until: int) -> RunConfig:
        overrides, _, _, _ = METHODS[method]
        steps = self.scaled(method, self.p["steps"])
        p = self.p
        return RunConfig.from_flat(dict(
            model=self.model_name, dataset=task, r=max(RANKS), ranks=RANKS, chat_template=False, arith_max_digits=2,
            max_steps=steps, batch_size=p["batch_size"], num_train=steps * p["batch_size"], learning_rate=lr,
            warmup_steps=0, seed=seed, data_seed=0, num_eval=p["n_test"], validation_size=p["n_val"],
            eval_batch_size=p["eval_batch_size"], max_new_tokens=p["max_new_tokens"], metrics=["match"],
            output_dir=str(self.run_dir(task, method, lr, seed)), disable_tqdm=True, logging_steps=25,
            save_steps=0, save_total_limit=1, snapshot_steps=[self.scaled(method, s) for s in p["snapshots"]],
            group_by_length=True, deploy_order="none",  # the rules are applied at scoring time
            stop_after_steps=until if until < steps else 0, max_length=1024, **overrides))

    def model(self):
        if self.base is None:
            self.base, self.tok = load_model(self.model_name, dtype="float32")
        return self.base, self.tok

    def trained_to(self, task, method, lr, seed) -> int:
        meta = self.run_dir(task, method, lr, seed) / "train_config.json"
        return json.loads(meta.read_text()).get("global_step", 0) if meta.is_file() else 0

    def train_to(self, task, method, lr, seed, step: int) -> None:
        """Train (or continue) one run up to `step` (a scaled snapshot step), one segment at a time."""
        run_dir = self.run_dir(task, method, lr, seed)
        done = self.trained_to(task, method, lr, seed)
        if done < step and latest_checkpoint(run_dir / "checkpoints") is None:
            done = 0  # nothing to resume from: start again at step 0, segment by segment
        for target in [self.scaled(method, s) for s in self.p["snapshots"]]:
            if target > step:
                break
            if done >= target:
                continue
            self.check_time(self.train_estimate(task, method, target - done))
            run = self.run_config(task, method, lr, seed, target).replace(resume=done > 0)
            base, tok = self.model()
            start = time.perf_counter()
            model = train(run, base, tok).model
            self.base = model.unload()
            seconds = time.perf_counter() - start
            self.step_seconds[task] = seconds / ((target - done) * METHODS[method][2])
            self.save_speeds()
            print(f"[study] trained {task} {method} lr={lr:g} seed={seed} to step {target} ({seconds:.0f} s)", flush=True)
            done = target
            if target == self.scaled(method, self.p["steps"]):
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # finished: only snapshots are needed

    def score(self, task, method, lr, seed, step, split, metric="match", strict_too=False) -> dict:
        """Score snapshot `step` (unscaled) of one run under every rule of its method; cached as JSON.
        strict (and `strict_too`, which writes the match and strict JSONs from one pass) decodes only
        the rows teacher-forced match missed: a matched row is one greedy decoding reproduces."""
        s = self.scaled(method, step)
        path = self.result_path(task, method, lr, seed, s, split, metric)
        if path.is_file():
            return json.loads(path.read_text())
        metrics = [metric] + (["strict"] if strict_too and metric == "match" else [])
        generate = "strict" in metrics
        rules = METHODS[method][3]
        # per rule, as this method last took (decoding what its rules miss varies 2x between methods),
        # else as any method did
        kind = (task, split, generate)
        scoring = len(rules) * self.rule_seconds.get(kind + (method,), self.rule_seconds.get(kind, 0.0))
        # training runs segment by segment, each only if it fits (its checkpoint resumes the run on this
        # machine), so a chunk's last minutes are not idle; scoring starts only if all of it fits
        self.train_to(task, method, lr, seed, s)
        self.check_time(scoring, ScoringDoesNotFit)
        run = self.run_config(task, method, lr, seed, s).replace(
            metrics=["generate", "match"] if generate else ["match"], decode_misses=generate)
        outs = {m: {"task": task, "method": method, "lr": lr, "seed": seed, "steps": s, "split": split, "metric": m,
                    "compute_per_step": METHODS[method][2], "rules": {}} for m in metrics}
        start = time.perf_counter()
        base_scores: dict = {}
        for rule in rules:
            base, tok = self.model()
            model = load_matryoshka_model(base, self.snapshot(task, method, lr, seed, step))
            if rule == "fold":
                fold_p(model)
            elif rule == "svd":
                svd_order(model)
            # generation rank by rank: on an idle CPU the draft took 1.04-1.12x of it on the lora+svd adapter
            res = evaluate(run.replace(include_base=not base_scores), None, split, model=model, tokenizer=tok)
            self.base = model.unload()
            entry = next(iter(res["methods"].values()))
            for m, out in outs.items():
                key = res["metric"] if m == "strict" else "match"
                base_scores.setdefault(m, res["base"][key] if res["base"] else None)  # rank 0: the same for every rule
                per_rank = {str(k): v[key] for k, v in entry["per_rank"].items()}
                accs = [per_rank[str(k)] for k in RANKS]
                out["rules"][variant(method, rule)] = {"per_rank": per_rank, "base": base_scores[m],
                                                       "aurac": aurac(RANKS, accs), "log_aurac": log_aurac(RANKS, accs)}
                out["n"] = entry["timings"]["n_examples"]
                if m == "strict":
                    out.setdefault("decoded_rows", {})[variant(method, rule)] = entry["timings"]["decoded_rows"]
        seconds = time.perf_counter() - start
        self.rule_seconds[kind] = self.rule_seconds[kind + (method,)] = seconds / len(rules)
        self.save_speeds()
        for m in sorted(outs, reverse=True):  # strict first: a match JSON on disk means this pass finished
            out = outs[m]
            out["eval_seconds"] = seconds
            if len(outs) > 1:
                out["scored_with"] = sorted(outs)  # one pass: eval_seconds covers both
            target = self.result_path(task, method, lr, seed, s, split, m)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, json.dumps(out, indent=1) + "\n")
            best = max(out["rules"].items(), key=lambda kv: kv[1]["aurac"])
            print(f"[study] {task} {method} lr={lr:g} seed={seed} step {s} {split} {m}: best {best[0]} AURAC "
                  f"{best[1]['aurac']:.1f} ({seconds:.0f} s)", flush=True)
        write_summary(self.results, self.p)
        return outs[metric]

    def check_time(self, expected: float = 0.0, error: type[Exception] | None = None):
        """Stop once the deadline is past, or when the next piece of work (a training segment, or one
        run's scoring), estimated from what the same kind of work last took on this machine, would end
        past it: a piece cut off is lost. With no estimate yet the piece starts. Raises `error` (a
        TimeUp subclass) if given, else TimeUp."""
        if time.monotonic() + expected > self.deadline:
            raise (error or TimeUp)()

    def train_estimate(self, task, method, steps: int) -> float:
        return max(steps, 0) * METHODS[method][2] * self.step_seconds.get(task, 0.0)

    # -- the protocol -------------------------------------------------------------------------
    def grid(self, method) -> list[float]:
        return list(self.p.get("grid", {}).get(method) or METHODS[method][1])

    def pick(self, task, method) -> float:
        """Best validation AURAC (over the method's rules) at the grid step, seed 42; extends an edge."""
        grid = self.grid(method)
        for extension in range(self.p["extend"] + 1):
            scores = {lr: max(r["aurac"] for r in self.score(task, method, lr, self.p["grid_seed"], self.p["grid_at"],
                                                             "validation")["rules"].values()) for lr in grid}
            best = max(grid, key=lambda lr: scores[lr])
            self.grids[(task, method)] = grid
            if len(grid) < 2 or best not in (grid[0], grid[-1]) or extension == self.p["extend"]:
                return best
            factor = grid[1] / grid[0]
            grid = [grid[0] / factor] + grid if best == grid[0] else grid + [grid[-1] * factor]

    def plan(self):
        """Units in priority order, task after task: the grids; the seed-42 runs along their whole
        schedule on validation (where each method plateaus); the final step count from those curves;
        the test split at that step, seed after seed, match and generation strict-match in one pass
        (while the adapter is on disk); last, strict-match for runs whose adapters were gone (trained
        again, the methods leading the race for the default first). A candidate objective (CANDIDATES)
        goes past its grid only if it beat the baselines there."""
        first = self.p["tasks"][0]
        picked, finals, kept = {}, {}, {}
        deferred = False  # a trained run whose scoring did not fit this chunk
        for task in self.p["tasks"]:
            methods = self.p["task_methods"].get(task, self.p["methods"])
            for method in methods:
                if method not in picked:
                    picked[method] = self.pick(first if method in self.p["task_methods"].get(first, self.p["methods"])
                                               else task, method)
            methods = kept[task] = [m for m in methods
                                    if m not in CANDIDATES or self.candidate_kept(first, m, picked[m])]
            curves = {m: {step: self.score(task, m, picked[m], self.p["grid_seed"], step, "validation")
                          for step in self.p["snapshots"]} for m in methods}
            finals[task] = self.final_steps(task, curves)
            for seed in self.p["seeds"]:
                # runs whose adapter is on disk first: scoring them is cheap, and on a new machine they
                # would be trained again
                for method in sorted(methods, key=lambda m: not self.snapshot(task, m, picked[m], seed,
                                                                              finals[task]).is_dir()):
                    # match and strict in one pass, while the adapter is on disk: adapters are not
                    # committed, so a later session (a new machine) would train the run again for it
                    try:
                        self.score(task, method, picked[method], seed, finals[task], "test", strict_too=True)
                        if self.snapshot(task, method, picked[method], seed, finals[task]).is_dir():
                            self.score(task, method, picked[method], seed, finals[task], "test", "strict")
                    except ScoringDoesNotFit:  # its adapter waits on this machine; train the next run meanwhile
                        deferred = True
                    # trained only to the final step: once there its checkpoints are done (a run trained
                    # again whose match is committed is not there yet: its checkpoint resumes it)
                    if seed != self.p["grid_seed"] and (self.trained_to(task, method, picked[method], seed)
                                                        >= self.scaled(method, finals[task])):
                        shutil.rmtree(self.run_dir(task, method, picked[method], seed) / "checkpoints",
                                      ignore_errors=True)
        for task in self.p["tasks"]:  # strict for the runs whose adapters were gone: trained again
            lead = self.lead()
            # a run partway trained first (its checkpoint resumes it), then the contenders for the default
            units = sorted(((seed, m) for seed in self.p["seeds"] for m in kept[task]),
                           key=lambda u: (self.trained_to(task, u[1], picked[u[1]], u[0]) == 0,
                                          -lead.get(u[1], -math.inf)))
            for seed, method in units:
                try:
                    self.score(task, method, picked[method], seed, finals[task], "test", "strict")
                except ScoringDoesNotFit:  # its adapter waits on this machine; train the next run meanwhile
                    deferred = True
        if deferred:
            raise TimeUp

    def lead(self) -> dict:
        """Per method, the score `winner` ranks by (mean of AURAC and log-AURAC over the tasks it ran on)
        of its best variant on the test runs so far, strict where scored: the order in which the runs
        still missing are scored, so that the ones that decide the default come first."""
        tasks = summarize(collect(self.results), self.p)["tasks"].values()
        tables = [t.get("strict_so_far") or t["methods"] for t in tasks]
        out = {}
        for name in {n for t in tables for n in t}:
            method = name.partition("+")[0]
            out[method] = max(out.get(method, -math.inf), cross_task_score(tables, name))
        return out

    def candidate_kept(self, task, method, lr) -> bool:
        """A candidate objective stays in the study when its best validation AURAC and log-AURAC at the
        grid step (any rule, its picked rate) beat the best of every baseline's grid on both; the
        decision is written to <task>/candidates.json."""
        def best(m, key, rates):
            scored = [self.score(task, m, rate, self.p["grid_seed"], self.p["grid_at"], "validation") for rate in rates]
            return max(r[key] for unit in scored for r in unit["rules"].values())

        ours = {key: best(method, key, [lr]) for key in ("aurac", "log_aurac")}
        base = {key: max(best(b, key, self.grids[(task, b)]) for b in BASELINES if b in self.p["methods"])
                for key in ours}
        kept = all(ours[k] > base[k] for k in ours)
        path = self.results / task / "candidates.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        record[method] = {"kept": kept, "lr": lr, "grid_step": self.p["grid_at"], "candidate": ours,
                          "best_baseline": base,
                          "rule": "kept if its best AURAC and log-AURAC beat the best baseline grid run on both"}
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        return kept

    def final_steps(self, task, curves) -> int:
        """The issue's cut: stop at `plateau_at` (400) if no method's validation AURAC (any rule, seed 42)
        gains a point or more from there to the end of the schedule; else train to the end."""
        end, at = self.p["snapshots"][-1], self.p.get("plateau_at", self.p["snapshots"][-1])
        gains = {name: v["aurac"] - curves[m][at]["rules"][name]["aurac"]
                 for m in curves for name, v in curves[m][end]["rules"].items()}
        final = at if all(g < 1.0 for g in gains.values()) else end
        record = {"task": task, "final_steps": final, "plateau_at": at, "end": end,
                  "gain_from_plateau_at_to_end": gains, "rule": "final = plateau_at if every gain < 1.0 point"}
        (self.results / task).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.results / task / "final_steps.json", json.dumps(record, indent=1) + "\n")
        return final


class TimeUp(Exception):
    """--max-minutes ran out; the study stops between units."""


class ScoringDoesNotFit(TimeUp):
    """A run is trained but its scoring would end past --max-minutes: a later chunk scores it from its
    adapter on this machine."""


# -- summary ----------------------------------------------------------------------------------

def collect(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*/*/lr*/seed*/step*.json"))]


def summarize(rows: list[dict], preset: dict, dropped: frozenset = frozenset()) -> dict:
    """summary.json: per task, per variant at the final step on test (mean/std over seeds), plateau
    curves on validation, and paired differences of the best variant against lora and dylora, as
    trained and in SVD order (PAIRED_WITH).
    `dropped`: candidate objectives that lost at their grid (not needed for a complete task)."""
    out = {"protocol": {k: v for k, v in preset.items() if k != "grid"}, "ranks": RANKS, "tasks": {}}
    for task in preset["tasks"]:
        t_rows = [r for r in rows if r["task"] == task]
        final = {}
        for metric in ("strict", "match"):
            tests = [r for r in t_rows if r["split"] == "test" and r["metric"] == metric]
            for r in tests:
                for name, v in r["rules"].items():
                    final.setdefault(metric, {}).setdefault(name, []).append((r, v))
        metric = "strict" if final.get("strict") and all(
            len(final["strict"].get(n, [])) == len(final["match"][n]) for n in final.get("match", {})) else "match"
        methods = method_table(final.get(metric) or {})
        n_test = next((r["n"] for r in t_rows if r["split"] == "test"), 0)
        task_out = {"n_test": n_test, "metric": {"strict": "exact_match_strict", "match": "match"}[metric],
                    "methods": methods, "plateau": plateau(t_rows), "grid": grid_table(t_rows, preset),
                    "strict_minus_match": strict_gap(t_rows)}
        if metric == "match" and final.get("strict"):  # the strict runs scored so far, until they cover match's
            task_out["strict_so_far"] = method_table(final["strict"])
        full = [n for n, m in methods.items() if len(m["seeds"]) == len(preset["seeds"])]
        wanted = {variant(m, rule) for m in preset["task_methods"].get(task, preset["methods"]) if m not in dropped
                  for rule in METHODS[m][3]}
        task_out["complete"] = metric == "strict" and wanted <= set(full)
        if full:
            best = max(full, key=lambda n: methods[n]["aurac"]["mean"] + methods[n]["log_aurac"]["mean"])
            task_out["best"] = {"name": best, "paired": {ref: paired((final.get(metric) or {}), best, ref)
                                                         for ref in PAIRED_WITH if ref in methods and ref != best}}
        out["tasks"][task] = task_out
    out["winner"] = winner(out)
    return out


def method_table(final: dict) -> dict:
    """Per variant: seeds, steps, lr and the mean/std over seeds of every rank and both AURACs."""
    methods = {}
    for name, runs in sorted(final.items()):
        runs = sorted(runs, key=lambda rv: rv[0]["seed"])
        methods[name] = {
            "seeds": [r["seed"] for r, _ in runs], "steps": runs[0][0]["steps"], "lr": runs[0][0]["lr"],
            "compute_per_step": runs[0][0]["compute_per_step"],
            "per_rank": {str(k): _mean_std([v["per_rank"][str(k)] for _, v in runs]) for k in RANKS},
            "aurac": _mean_std([v["aurac"] for _, v in runs]),
            "log_aurac": _mean_std([v["log_aurac"] for _, v in runs]),
            "base": runs[0][1]["base"],
        }
    return methods


# The MatryoshkaConfig fields that tell the variants of METHODS apart (the rest keep their defaults).
VARIANT_FIELDS = tuple(sorted({field for options, *_ in METHODS.values() for field in options}))


def defaults_of(name: str) -> dict:
    """The training options a variant stands for: VARIANT_FIELDS plus "deploy_order" (e.g. lora+svd)."""
    method, _, rule = name.partition("+")
    options, _, _, _ = METHODS[method]
    order = "svd" if rule.endswith("svd") else "fold" if rule == "fold" else "none"
    base = MatryoshkaConfig()
    return {**{k: options.get(k, getattr(base, k)) for k in VARIANT_FIELDS}, "deploy_order": order}


def cross_task_score(tables: list[dict], name: str) -> float:
    """What picks the default: a variant's mean of AURAC and log-AURAC, averaged over the tasks (method
    tables) that have it."""
    return statistics.fmean((t[name]["aurac"]["mean"] + t[name]["log_aurac"]["mean"]) / 2
                            for t in tables if name in t)


def winner(summary: dict) -> dict | None:
    """The variant with the best mean of AURAC and log-AURAC over all tasks, once every task is complete.

    Returns:
        {"name", "score", "wins_everywhere": best on both AURACs on every task, "defaults", "lr"}, or
        None while some task has no variant with all seeds. "lr" is its picked rate, the default
        `learning_rate` with it: one rate, as `plan` reuses the first task's (None if tasks differed).
    """
    tasks = summary["tasks"]
    if not tasks or not all(t.get("complete") for t in tasks.values()):
        return None
    names = set.intersection(*(set(t["methods"]) for t in tasks.values()))
    score = {n: cross_task_score([t["methods"] for t in tasks.values()], n) for n in names}
    best = max(sorted(names), key=lambda n: score[n])
    everywhere = all(t["methods"][best][m]["mean"] >= max(v[m]["mean"] for v in t["methods"].values())
                     for t in tasks.values() for m in ("aurac", "log_aurac"))
    rates = {t["methods"][best]["lr"] for t in tasks.values()}
    return {"name": best, "score": score[best], "wins_everywhere": everywhere, "defaults": defaults_of(best),
            "lr": rates.pop() if len(rates) == 1 else None}


def paired(final: dict, a: str, b: str) -> dict:
    """Mean and std over seeds of (a - b), AURAC and log-AURAC, on the seeds both have."""
    by_seed = {name: {r["seed"]: v for r, v in final[name]} for name in (a, b)}
    seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
    return {"seeds": seeds, **{m: _mean_std([by_seed[a][s][m] - by_seed[b][s][m] for s in seeds]) if seeds else None
                               for m in ("aurac", "log_aurac")}}


def strict_gap(rows: list[dict]) -> dict | None:
    """Strict-match minus match (points) at every rank of every rule, over the test runs scored both
    ways in one pass: how far the cheap teacher-forced metric is from greedy generation on the same
    adapter. A strict result scored alone came from a run trained again, whose adapter is not bit for
    bit the one match scored (up to 2 points apart per rank on arith), so it is left out."""
    match = {(r["method"], r["lr"], r["seed"], r["steps"]): r for r in rows
             if r["split"] == "test" and r["metric"] == "match"}
    diffs, runs = [], 0
    for r in rows:
        m = match.get((r["method"], r["lr"], r["seed"], r["steps"]))
        if r["split"] != "test" or r["metric"] != "strict" or m is None or "scored_with" not in r:
            continue
        runs += 1
        diffs += [v["per_rank"][str(k)] - m["rules"][name]["per_rank"][str(k)]
                  for name, v in r["rules"].items() for k in RANKS]
    if not diffs:
        return None
    return {"runs": runs, "rank_rows": len(diffs), "mean": statistics.fmean(diffs), "min": min(diffs),
            "max": max(diffs)}


def plateau(rows: list[dict]) -> dict:
    """Validation match AURAC at each snapshot of the final runs, mean over the seeds scored."""
    curves: dict = {}
    for r in rows:
        if r["split"] == "validation" and r["metric"] == "match":
            for name, v in r["rules"].items():
                curves.setdefault(name, {}).setdefault((r["lr"], r["steps"]), []).append(v["aurac"])
    out = {}
    for name, points in curves.items():
        out[name] = {f"lr{lr:g}@{steps}": statistics.fmean(v) for (lr, steps), v in sorted(points.items())}
    return out


def grid_table(rows: list[dict], preset: dict) -> dict:
    """Validation AURAC of every grid rate at the grid step (seed 42), per variant."""
    out: dict = {}
    for r in rows:
        at = max(1, preset["grid_at"] // r["compute_per_step"])
        if r["split"] == "validation" and r["seed"] == preset["grid_seed"] and r["steps"] == at:
            for name, v in r["rules"].items():
                out.setdefault(name, {})[f"{r['lr']:g}"] = v["aurac"]
    return out


def table_markdown(methods: dict, ranks) -> list[str]:
    """One row per variant, best AURAC first: lr, steps, seeds, every rank and both AURACs (mean ± std)."""
    lines = ["| method | lr | steps | seeds | " + " | ".join(f"r={k}" for k in ranks) + " | AURAC | log-AURAC |",
             "|" + "---|" * (len(ranks) + 6)]
    for name, m in sorted(methods.items(), key=lambda kv: -kv[1]["aurac"]["mean"]):
        cells = [f"{m['per_rank'][str(k)]['mean']:.1f} ± {m['per_rank'][str(k)]['std']:.1f}" for k in ranks]
        lines.append(f"| {name} | {m['lr']:g} | {m['steps']} | {len(m['seeds'])} | " + " | ".join(cells)
                     + f" | {m['aurac']['mean']:.1f} ± {m['aurac']['std']:.1f} | "
                       f"{m['log_aurac']['mean']:.1f} ± {m['log_aurac']['std']:.1f} |")
    return lines


def markdown(summary: dict) -> str:
    w = summary.get("winner")
    lines = [f"**Winner over all tasks (mean of AURAC and log-AURAC): {w['name']}** ({w['score']:.1f}; best on both "
             f"AURACs on every task: {'yes' if w['wins_everywhere'] else 'no'}). Defaults: {w['defaults']}, "
             f"learning rate {w['lr'] if w['lr'] is None else format(w['lr'], 'g')}.", ""] if w \
        else ["Study incomplete: no winner yet.", ""]
    for name, d in summary.get("candidates", {}).items():
        lines += [f"Candidate objective {name} (lr {d['lr']:g}, validation at step {d['grid_step']}): "
                  f"{'kept' if d['kept'] else 'dropped'}: AURAC {d['candidate']['aurac']:.1f} / log-AURAC "
                  f"{d['candidate']['log_aurac']:.1f} against the best baseline grid run's "
                  f"{d['best_baseline']['aurac']:.1f} / {d['best_baseline']['log_aurac']:.1f}.", ""]
    for task, t in summary["tasks"].items():
        lines += [f"### {task}: test split, {t['n_test']} problems, {t['metric']} (%), mean ± std over seeds", ""]
        lines += table_markdown(t["methods"], summary["ranks"])
        if t.get("best"):
            b = t["best"]
            diffs = "; ".join(f"vs {ref}: AURAC {d['aurac']['mean']:+.1f} ± {d['aurac']['std']:.1f}, log-AURAC "
                              f"{d['log_aurac']['mean']:+.1f} ± {d['log_aurac']['std']:.1f} (seeds {d['seeds']})"
                              for ref, d in b["paired"].items() if d.get("aurac"))
            lines += ["", f"Best (AURAC + log-AURAC, among variants with every seed): **{b['name']}**. Paired differences: {diffs or 'n/a'}."]
        if t.get("strict_minus_match"):
            g = t["strict_minus_match"]
            runs = f"{g['runs']} test run{'s' * (g['runs'] != 1)}"
            lines += ["", (f"Strict-match minus match on the {runs} scored both ways in one pass ({g['rank_rows']} "
                           f"rule x rank cells): mean {g['mean']:+.2f}, min {g['min']:+.2f}, max {g['max']:+.2f} points.")]
        if t.get("strict_so_far"):
            lines += ["", f"Strict-match so far ({task}, test; the table above turns strict once every variant has "
                          "all its seeds scored strict):", ""]
            lines += table_markdown(t["strict_so_far"], summary["ranks"])
        lines += ["", f"Validation match AURAC along the runs ({task}; lr@step, mean over seeds scored):", ""]
        for name, points in sorted(t["plateau"].items()):
            lines.append(f"- {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in points.items()))
        lines += ["", f"Learning-rate grid ({task}, seed 42, validation match AURAC at the grid step):", ""]
        for name, points in sorted(t["grid"].items()):
            lines.append(f"- {name}: " + ", ".join(f"{k}: {v:.1f}" for k, v in points.items()))
        lines.append("")
    return "\n".join(lines)


def write_summary(results: Path, preset: dict) -> dict:
    record = results / preset["tasks"][0] / "candidates.json"
    decisions = json.loads(record.read_text()) if record.is_file() else {}
    summary = summarize(collect(results), preset, frozenset(m for m, d in decisions.items() if not d["kept"]))
    summary["candidates"] = decisions
    for task, t in summary["tasks"].items():  # how the final step count was chosen (Study.final_steps)
        record = results / task / "final_steps.json"
        t["final_steps"] = json.loads(record.read_text()) if record.is_file() else None
    atomic_write_text(results / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(results / "summary.md", markdown(summary))
    for task, t in summary["tasks"].items():
        if not t["methods"]:
            continue
        fig, ax = new_plot()
        for name, m in sorted(t["methods"].items()):
            ax.errorbar(RANKS, [m["per_rank"][str(k)]["mean"] for k in RANKS],
                        yerr=[m["per_rank"][str(k)]["std"] for k in RANKS], marker="o", capsize=2,
                        label=f"{name} ({m['aurac']['mean']:.1f})")
        save_log2_plot(fig, ax, "rank", f"{t['metric']} (%), {task}", results / f"summary-{task}.png")
    return summary


def claim(folder: Path, model: str, preset_model: str | None) -> None:
    """A study's folders hold one model's runs: finished runs are reused by path, which does not name the
    model, so another model's would be taken for this one's. The first run writes `model.json`."""
    marker = folder / "model.json"
    if marker.is_file():
        owner = json.loads(marker.read_text())["model"]
    elif any(folder.glob("*/*/lr*/seed*")):
        owner = preset_model or model  # written before the marker existed: the preset's model
    else:
        owner = model
    if owner != model:
        raise SystemExit(f"{folder} holds the study runs of model {owner!r}, not {model!r}, and finished runs "
                         "would be reused across models. Give this model folders of its own, e.g. "
                         "--out runs/study-other --results runs/study-other-results.")
    if not marker.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"model": model}) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="v2")
    ap.add_argument("--model", default=None, help="Override the preset's model (tests use a tiny local one).")
    ap.add_argument("--out", default="runs/study2", help="Adapters and checkpoints (not committed).")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "study"),
                    help="Result JSONs and the summary (committed).")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="Stop cleanly at this many minutes, or earlier rather than start a training segment "
                         "or a run's scoring that would not end within them, going by what the same work last "
                         "took on this machine (<out>/speeds.json). A run stopped between segments resumes from "
                         "its checkpoint when --out is still there; a trained-again run whose scoring would "
                         "not fit waits there for the next chunk while the next run trains.")
    ap.add_argument("--summary-only", action="store_true", help="Rebuild the summary from the result JSONs.")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    study = Study(preset, Path(args.out), results, args.model, args.max_minutes)
    done = True
    if not args.summary_only:
        for folder in (results, Path(args.out)):
            claim(folder, study.model_name, preset["model"])
        started = time.perf_counter()
        try:
            study.plan()
        except TimeUp:
            done = False
            print(f"[study] --max-minutes reached after {(time.perf_counter() - started) / 60:.1f} min; "
                  "run the same command again to continue.", flush=True)
    summary = write_summary(results, preset)
    summary["complete"] = done
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
