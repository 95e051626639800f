"""Reproduce the paper's Tables 1-3: train every method x learning rate x seed, score every rank with
lm-eval at the paper's shots, and write our table beside the paper's numbers.

    python benchmarks/reproduce_paper.py --table 1 --dry-run          # the plan: runs, steps, GPU-hours
    python benchmarks/reproduce_paper.py --table 1 --out runs/paper1  # the whole protocol (a GPU machine)
    python benchmarks/reproduce_paper.py --table 1 --smoke            # every stage, 2 steps, embedded SmolLM2

Tables (the settings of SPEC.md "The paper's experiments"; SPEC numbers only Table 1, so which of
the paper's tables holds settings 2 and 3 is our labelling):
  1  Llama-3.2-1B-Instruct, GSM8K, R = 32: lm-eval gsm8k 8-shot, exact match (strict).
  2  Llama-3.1-8B-Instruct, GSM8K, R = 256: lm-eval gsm8k 3- and 8-shot.
  3  Llama-3.1-8B-Instruct, Open-Platypus, R = 256: lm-eval arc_challenge 25-shot, hellaswag 10-shot.

Protocol (training hyperparameters come from the table's config in configs/, checked against the
paper by tests/test_configs.py):
  1. Per method, train every learning rate of its grid with every seed, score each run on the
     validation split (held out of the train split) and pick the rate with the best mean
     validation AURAC (`comparison.pick_learning_rate`, the same rule as `mlora compare`).
  2. Score the picked rate's runs (one per seed) with lm-eval at every rank of S and the base
     model (PT), at each of the table's (task, shots).
  3. Write `<out>/table<N>.{json,md}`: per rank mean ± std over seeds, AURAC, log-AURAC, and next to
     them the paper's numbers and the differences. Paper numbers are the ones in SPEC.md (Table 1:
     PT and the three AURACs); every other cell reads "n/a (not in SPEC)".
Everything is cached under --out (runs, lm-eval results), so a killed reproduction resumes.

--smoke runs the same stages with 2 optimizer steps, the first 2 learning rates and 2 seeds per
method, a 1-shot pick on 2 validation examples, 2 lm-eval documents with at most 16 generated tokens, on --model (default: the embedded
SmolLM2-135M-Instruct), with the local GSM8K copy (shared/data/gsm8k), a few Platypus-style rows
written on the spot, and the shipped `tiny_mc` task in place of ARC-Challenge and HellaSwag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from matryoshka_lora.comparison import SharedBase, mean_std, pick_learning_rate, run_dir, split_options  # noqa: E402
from matryoshka_lora.core.files import atomic_write_text  # noqa: E402
from matryoshka_lora.core.metrics import aurac, log_aurac  # noqa: E402
from matryoshka_lora.experiment import load_yaml  # noqa: E402


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, data if isinstance(data, str) else json.dumps(data, indent=1) + "\n")

NOT_IN_SPEC = "n/a (not in SPEC)"


@dataclass(frozen=True)
class Eval:
    """One lm-eval (task, shots) of a table, with the sizes the GPU-hour estimate uses."""

    task: str
    num_fewshot: int
    metric: str  # lm-eval's "metric,filter" key
    docs: int  # documents scored (the task's test or validation split)
    context_tokens: int  # estimated tokens per request context (shots included)
    gen_tokens: int = 0  # estimated tokens generated per document (0: log-likelihood task)
    choices: int = 1  # requests per document (multiple choice: one per choice)

    @property
    def name(self) -> str:
        return f"{self.task} {self.num_fewshot}-shot"


GSM8K_TOKENS = 190  # mean tokens of "Question: q\nAnswer: a" + EOS over GSM8K train, measured with SmolLM2's tokenizer


def _gsm8k(shots: int) -> Eval:
    # 1,319 test problems; a prompt holds `shots` solved problems and the question (~65 tokens);
    # a generation stops at "Question:" after about one answer (~125 tokens; cap 256).
    return Eval("gsm8k", shots, "exact_match,strict-match", 1319, shots * GSM8K_TOKENS + 65, 125)


@dataclass(frozen=True)
class Table:
    number: int
    title: str
    config: str  # file name in configs/
    evals: tuple[Eval, ...]
    params: float  # base model parameters (the FLOP estimate)
    train_rows: int  # rows of the training source before the validation carve
    tokens_per_example: int  # estimated mean training tokens per example (after truncation)
    paper: dict = field(default_factory=dict)  # eval name -> {"PT": x, "aurac": {method: x}}: SPEC's numbers only
    notes: str = ""


TABLES = {
    1: Table(1, "Llama-3.2-1B-Instruct, GSM8K, R = 32", "llama32-1b-gsm8k-r32.yaml", (_gsm8k(8),), 1.24e9, 7473,
             GSM8K_TOKENS, paper={"gsm8k 8-shot": {"PT": 34.7, "aurac": {"lora": 34.5, "dylora": 34.9,
                                                                          "matryoshka": 38.4}}}),
    2: Table(2, "Llama-3.1-8B-Instruct, GSM8K, R = 256", "llama31-8b-gsm8k-r256.yaml", (_gsm8k(3), _gsm8k(8)), 8.03e9,
             7473, GSM8K_TOKENS),
    3: Table(3, "Llama-3.1-8B-Instruct, Open-Platypus, R = 256", "llama31-8b-platypus-r256.yaml",
             # ARC-Challenge: 1,172 test questions, 4 choices, ~50 tokens per shot; HellaSwag: 10,042
             # validation contexts, 4 endings, ~110 tokens per shot. acc_norm: the Open LLM Leaderboard's
             # metric at these shots (the paper's choice of acc / acc_norm is not in SPEC).
             (Eval("arc_challenge", 25, "acc_norm,none", 1172, 25 * 50 + 60, choices=4),
              Eval("hellaswag", 10, "acc_norm,none", 10042, 10 * 110 + 100, choices=4)),
             8.03e9, 24926, 320,  # Open-Platypus: ~24.9k rows (Hub card); 320 tokens: a guess, not measured
             notes="The learning-rate grid and the pick rule for Open-Platypus are not in SPEC (see the config)."),
}


@dataclass
class Throughput:
    """Assumptions of the GPU-hour estimate (printed with every plan). One H100/H200-class GPU."""

    peak_tflops: float = field(default=989.0, metadata={"help": "Dense bf16 peak of one GPU, TFLOP/s (H100/H200 SXM)."})
    mfu: float = field(default=0.2, metadata={"help": "Fraction of the peak reached in training and prefill (small-batch LoRA: low)."})
    decode_step_s: float = field(default=0.03, metadata={"help": "Seconds per generated token of a batch (HF generate is latency bound)."})
    gen_batch: int = field(default=32, metadata={"help": "Prompts generated together."})

    def compute_hours(self, flops: float) -> float:
        return flops / (self.peak_tflops * 1e12 * self.mfu) / 3600

    def decode_hours(self, docs: int, tokens: int) -> float:
        return math.ceil(docs / self.gen_batch) * tokens * self.decode_step_s / 3600


# -- the plan ---------------------------------------------------------------------------------------
def load_table_config(table: Table, overrides: dict | None = None):
    """(RunConfig, CompareConfig) of the table's config, with flat overrides."""
    return split_options({**load_yaml(ROOT / "configs" / table.config), **(overrides or {})})


def plan(table: Table, throughput: Throughput | None = None, overrides: dict | None = None) -> dict:
    """Runs, optimizer steps, evaluations and a GPU-hour estimate of the table's full protocol."""
    t = throughput or Throughput()
    run, compare = load_table_config(table, overrides)
    seeds = compare.seed_list(run.train.seed)
    grids = {m: compare.grid(m, run.train.learning_rate) for m in compare.methods}
    n_runs = sum(len(g) for g in grids.values()) * len(seeds)
    n_train = table.train_rows - run.data.validation_size
    micro = math.ceil(n_train / run.train.batch_size)
    steps = math.ceil(micro / run.train.gradient_accumulation_steps) * math.ceil(run.train.num_train_epochs)
    ranks = run.adapter.ranks
    train_tokens = n_runs * run.train.num_train_epochs * n_train * table.tokens_per_example
    backward = 6 if run.train.gradient_checkpointing else 4  # fwd 2N + bwd 2N (frozen weights: no weight grads) + recompute
    hours = {"train": t.compute_hours(train_tokens * table.params * backward)}

    # validation pick: every run of a grid of 2+ rates, at every rank, on the validation split
    picked = sum(len(g) for g in grids.values() if len(g) > 1) * len(seeds)
    val_docs = min(run.data.num_eval or run.data.validation_size, run.data.validation_size)
    if "generate" in run.eval.metrics:
        context = run.eval.num_fewshot * table.tokens_per_example + 65
        hours["validation pick"] = picked * len(ranks) * (
            t.compute_hours(2 * table.params * val_docs * context)
            + t.decode_hours(val_docs, min(run.eval.max_new_tokens, 125)))
    else:  # held-out loss: one forward per example
        hours["validation pick"] = t.compute_hours(2 * table.params * picked * len(ranks) * val_docs
                                                   * table.tokens_per_example)
    # lm-eval: the picked rate's runs (one per seed and method) at every rank, plus the base model once
    evaluated = len(compare.methods) * len(seeds) * len(ranks) + 1
    lm_eval_hours = 0.0
    for e in table.evals:
        lm_eval_hours += evaluated * (t.compute_hours(2 * table.params * e.docs * e.choices * e.context_tokens)
                                      + (t.decode_hours(e.docs, e.gen_tokens) if e.gen_tokens else 0.0))
    hours["lm-eval"] = lm_eval_hours
    return {
        "table": table.number, "title": table.title, "config": f"configs/{table.config}",
        "methods": compare.methods, "learning_rates": grids, "seeds": seeds, "ranks": ranks,
        "runs": n_runs, "train_examples": n_train, "steps_per_run": steps, "total_steps": steps * n_runs,
        "effective_batch": run.train.batch_size * run.train.gradient_accumulation_steps,
        "epochs": run.train.num_train_epochs, "train_tokens": train_tokens,
        "validation_scored_runs": picked, "validation_docs": val_docs,
        "lm_eval": [{"task": e.task, "shots": e.num_fewshot, "metric": e.metric, "docs": e.docs,
                     "model_evaluations": evaluated} for e in table.evals],
        "gpu_hours": {**{k: round(v, 1) for k, v in hours.items()}, "total": round(sum(hours.values()), 1)},
        "assumptions": {**dataclasses.asdict(t), "params": table.params, "tokens_per_example": table.tokens_per_example,
                        "backward_factor": backward},
        "notes": table.notes,
    }


def format_plan(p: dict) -> str:
    grids = "; ".join(f"{m}: {len(g)} ({min(g):g}..{max(g):g})" for m, g in p["learning_rates"].items())
    lines = [
        f"Table {p['table']}: {p['title']}  ({p['config']})",
        f"  runs           {p['runs']} = learning rates [{grids}] x {len(p['seeds'])} seeds {p['seeds']}",
        f"  training       {p['train_examples']} examples x {p['epochs']:g} epochs, effective batch {p['effective_batch']}: "
        f"{p['steps_per_run']} optimizer steps per run, {p['total_steps']} in all ({p['train_tokens'] / 1e9:.2f}B tokens)",
        f"  lr pick        {p['validation_scored_runs']} runs scored on {p['validation_docs']} validation examples at "
        f"{len(p['ranks'])} ranks {p['ranks']}",
    ]
    for e in p["lm_eval"]:
        lines.append(f"  lm-eval        {e['task']} {e['shots']}-shot ({e['metric']}, {e['docs']} docs): "
                     f"{e['model_evaluations']} model evaluations (base + {len(p['methods'])} methods x "
                     f"{len(p['seeds'])} seeds x {len(p['ranks'])} ranks)")
    h = p["gpu_hours"]
    a = p["assumptions"]
    lines += [
        "  GPU-hours      " + ", ".join(f"{k} {v:g}" for k, v in h.items() if k != "total") + f"; total ~{h['total']:g}",
        f"  assumptions    {a['params'] / 1e9:.2f}B params, {a['tokens_per_example']} tokens per training example, "
        f"{a['backward_factor']}N FLOPs per training token, {a['peak_tflops']:g} TFLOP/s peak at {a['mfu']:.0%} MFU, "
        f"{a['decode_step_s'] * 1000:g} ms per generated token per batch of {a['gen_batch']} (one H100/H200-class GPU; "
        "a rough estimate)",
    ]
    if p["notes"]:
        lines.append(f"  note           {p['notes']}")
    return "\n".join(lines)


# -- the protocol -----------------------------------------------------------------------------------
SMOKE_RUN = dict(max_steps=2, batch_size=2, gradient_accumulation_steps=1, num_train=8, validation_size=4, num_eval=2,
                 num_fewshot=1, max_new_tokens=16, eval_batch_size=4, dtype="float32", bf16=False, gradient_checkpointing=False,
                 logging_steps=1, disable_tqdm=True, max_length=1024)
SMOKE_PLATYPUS = [  # Platypus-style rows (written for this project): instruction, optional input, output
    dict(zip(("instruction", "input", "output"), row)) for row in [
        ("Add the two numbers.", "3 and 4", "7"), ("Name the capital of France.", "", "Paris"),
        ("Reverse the word.", "stop", "pots"), ("Give the plural of 'mouse'.", "", "mice"),
        ("Translate to French.", "cat", "chat"), ("Count the letters.", "apple", "5"),
        ("Name a primary color.", "", "Red"), ("Double the number.", "21", "42"),
        ("Name the opposite of hot.", "", "cold"), ("Spell the number 3.", "", "three"),
        ("Add one.", "9", "10"), ("Name a fruit that is yellow.", "", "banana")]]


class Reproduction:
    def __init__(self, table: Table, args):
        self.table, self.args, self.out = table, args, Path(args.out)
        overrides = {"output_dir": str(self.out)}
        if args.model:
            overrides["model"] = args.model
        self.evals = list(table.evals)
        self.gsm8k_dir = args.gsm8k_dir
        if args.smoke:
            overrides.update(SMOKE_RUN)
            if args.model is None:
                overrides["model"] = "smollm2-135m"
            self.gsm8k_dir = self.gsm8k_dir or str(_find_gsm8k())
            if table.number == 3:
                self.out.mkdir(parents=True, exist_ok=True)
                data = self.out / "smoke_platypus.jsonl"
                data.write_text("".join(json.dumps(r) + "\n" for r in SMOKE_PLATYPUS))
                overrides["dataset"] = str(data)
                self.evals = [dataclasses.replace(e, task="tiny_mc", num_fewshot=2) for e in self.evals[:1]]
        if self.gsm8k_dir and table.number in (1, 2):
            overrides["data_path"] = self.gsm8k_dir  # train on the local copy too
            self.evals = [dataclasses.replace(e, task="gsm8k_local") for e in self.evals]
        self.run, self.compare = load_table_config(table, overrides)
        if args.smoke:  # the first 2 learning rates and seeds of each grid
            lr = {m: self.compare.grid(m, self.run.train.learning_rate)[:2] for m in self.compare.methods}
            self.compare = dataclasses.replace(self.compare, lr=lr, seeds=self.compare.seed_list(self.run.train.seed)[:2])
        self.seeds = self.compare.seed_list(self.run.train.seed)

    def harness(self, model, tokenizer, e: Eval, include_base: bool) -> dict:
        from matryoshka_lora.evaluation.harness import harness_sweep

        smoke = self.args.smoke
        return harness_sweep(model, tokenizer, [e.task], ranks=self.run.adapter.ranks, num_fewshot=e.num_fewshot,
                             metric=e.metric if not smoke or e.task != "tiny_mc" else "acc_norm,none",
                             limit=2 if smoke else None, gsm8k_dir=self.gsm8k_dir, include_base=include_base,
                             batch_size=4 if smoke else self.args.harness_batch_size, bootstrap_iters=0,
                             gen_kwargs="max_gen_toks=16" if smoke else None)

    def main(self) -> dict:
        started = time.perf_counter()
        shared = SharedBase(self.run)
        picked = {}
        for method in self.compare.methods:  # stage 1: train every lr x seed, pick by validation AURAC
            picked[method] = pick_learning_rate(shared, self.run, method, self.compare, self.out)
            print(f"[reproduce] {method}: learning rate {picked[method][0]:g}", flush=True)
        scores: dict[str, dict[str, dict[str, dict]]] = {e.name: {m: {} for m in picked} for e in self.evals}
        base: dict[str, dict] = {}
        for e in self.evals:
            cached = self.out / "base" / f"{_slug(e)}.json"
            if cached.is_file():
                base[e.name] = json.loads(cached.read_text())
        for method, (lr, _) in picked.items():  # stage 2: lm-eval at every rank, per seed
            for seed in self.seeds:
                folder = run_dir(self.out, method, lr, seed) / "lm_eval"
                todo = [e for e in self.evals if not (folder / f"{_slug(e)}.json").is_file()]
                if todo:
                    model, _ = shared.adapter(self.run, method, lr, seed, self.out)
                    for e in todo:
                        res = self.harness(model, shared.tokenizer, e, include_base=e.name not in base)
                        if res["base"] is not None:
                            base[e.name] = res["base"]
                            _write(self.out / "base" / f"{_slug(e)}.json", res["base"])
                        _write(folder / f"{_slug(e)}.json", res)
                        print(f"[reproduce] {method} lr={lr:g} seed={seed} {e.name}: AURAC "
                              f"{res['methods'][method]['aurac']:.1f}", flush=True)
                    shared.release(model)
                for e in self.evals:
                    scores[e.name][method][str(seed)] = json.loads((folder / f"{_slug(e)}.json").read_text())
        result = self.summarise(picked, scores, base)
        result["seconds"] = time.perf_counter() - started
        _write(self.out / f"table{self.table.number}.json", result)
        _write(self.out / f"table{self.table.number}.md", markdown(result))
        return result

    def summarise(self, picked, scores, base) -> dict:
        """Stage 3: mean ± std over seeds, beside the paper's numbers."""
        evals = {}
        for e in self.evals:
            paper = self.table.paper.get(_paper_name(e), {})
            methods = {}
            for method, (lr, grid) in picked.items():
                runs = [r["methods"][method] for r in scores[e.name][method].values()]
                ranks = self.run.adapter.ranks
                per_rank = {str(k): mean_std([r["per_rank"][str(k)][e.metric] for r in runs]) for k in ranks}
                methods[method] = {
                    "learning_rate": lr, "validation_grid": grid, "seeds": self.seeds, "per_rank": per_rank,
                    "aurac": mean_std([aurac(ranks, [r["per_rank"][str(k)][e.metric] for k in ranks]) for r in runs]),
                    "log_aurac": mean_std([log_aurac(ranks, [r["per_rank"][str(k)][e.metric] for k in ranks])
                                           for r in runs]),
                    "paper": {"aurac": paper.get("aurac", {}).get(method)},
                }
            evals[e.name] = {"task": e.task, "shots": e.num_fewshot, "metric": e.metric,
                             "base": (base.get(e.name) or {}).get(e.metric), "paper_base": paper.get("PT"),
                             "methods": methods}
        return {"table": self.table.number, "title": self.table.title, "smoke": bool(self.args.smoke),
                "config": dataclasses.asdict(self.compare), "run": json.loads(json.dumps(self.run.to_flat(), default=str)),
                "evals": evals}


def _slug(e: Eval) -> str:
    return f"{e.task}-{e.num_fewshot}shot"


def _paper_name(e: Eval) -> str:
    return f"{e.task.replace('_local', '')} {e.num_fewshot}-shot"


def _find_gsm8k() -> Path:
    from matryoshka_lora.evaluation.harness_tasks import resolve_gsm8k_dir

    folder = resolve_gsm8k_dir(None)
    if not (folder / "train.jsonl").is_file():
        folder = ROOT.parent / "shared" / "data" / "gsm8k"
    if not (folder / "train.jsonl").is_file():
        raise FileNotFoundError(f"--smoke needs a local GSM8K copy: pass --gsm8k-dir (no train.jsonl in {folder}).")
    return folder


def _cell(v) -> str:
    return NOT_IN_SPEC if v is None else f"{v:.1f}"


def markdown(result: dict) -> str:
    """Per eval: our per-rank table (mean ± std over seeds), then ours beside the paper's numbers."""
    lines = [f"# Table {result['table']}: {result['title']}" + (" (SMOKE RUN: numbers are meaningless)"
                                                                if result["smoke"] else ""), ""]
    for name, ev in result["evals"].items():
        methods = ev["methods"]
        ranks = list(next(iter(methods.values()))["per_rank"])
        lines += [f"## {name} ({ev['metric']}, percent; mean ± std over seeds)", "",
                  "| method | lr | PT | " + " | ".join(f"r={k}" for k in ranks) + " | AURAC | log-AURAC |",
                  "|" + "---|" * (len(ranks) + 5)]
        for m, d in methods.items():
            cells = [f"{d['per_rank'][k][0]:.1f} ± {d['per_rank'][k][1]:.1f}" for k in ranks]
            lines.append(f"| {m} | {d['learning_rate']:g} | {_cell(ev['base'])} | " + " | ".join(cells)
                         + f" | {d['aurac'][0]:.1f} ± {d['aurac'][1]:.1f} | {d['log_aurac'][0]:.1f} ± {d['log_aurac'][1]:.1f} |")
        lines += ["", "| quantity | ours | paper | ours - paper |", "|---|---|---|---|"]
        rows = [("PT (base model)", ev["base"], 0.0, ev["paper_base"])]
        for m, d in methods.items():
            rows.append((f"{m} AURAC", d["aurac"][0], d["aurac"][1], d["paper"]["aurac"]))
            rows.append((f"{m} log-AURAC", d["log_aurac"][0], d["log_aurac"][1], None))
            rows += [(f"{m} r={k}", d["per_rank"][k][0], d["per_rank"][k][1], None) for k in ranks]
        for label, ours, std, paper in rows:
            mine = "-" if ours is None else f"{ours:.1f}" + (f" ± {std:.1f}" if std else "")
            diff = f"{ours - paper:+.1f}" if ours is not None and paper is not None else "n/a"
            lines.append(f"| {label} | {mine} | {_cell(paper)} | {diff} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=int, choices=sorted(TABLES), required=True)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="Print the plan (runs, steps, GPU-hours) and exit.")
    mode.add_argument("--smoke", action="store_true", help="Every stage for 2 steps on a small model (CPU is fine).")
    ap.add_argument("--out", default=None, help="Output root (default: runs/paper-table<N>[-smoke]).")
    ap.add_argument("--model", default=None, help="Base model instead of the config's (smoke default: smollm2-135m).")
    ap.add_argument("--gsm8k-dir", default=None, help="Local GSM8K folder (train.jsonl, test.jsonl): train on it and "
                                                      "score lm-eval's gsm8k on it (task gsm8k_local), no Hub access.")
    ap.add_argument("--harness-batch-size", default="auto", help="lm-eval batch size: an integer or 'auto'.")
    for f in dataclasses.fields(Throughput):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                        help=f"--dry-run estimate: {f.metadata['help']} (default: {f.default})")
    args = ap.parse_args(argv)
    table = TABLES[args.table]
    if args.dry_run:
        throughput = Throughput(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Throughput)})
        p = plan(table, throughput)
        print(format_plan(p))
        return p
    args.out = args.out or f"runs/paper-table{args.table}" + ("-smoke" if args.smoke else "")
    result = Reproduction(table, args).main()
    print(markdown(result))
    print(f"Written: {args.out}/table{args.table}.json, table{args.table}.md")
    return result


if __name__ == "__main__":
    main()
