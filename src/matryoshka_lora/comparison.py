"""`mlora compare`: every method x learning rate x seed on the same data, one table of mean ± std.

The protocol, per method:

1. Train every learning rate of the method's grid (`CompareConfig.lr`) with every seed
   (`CompareConfig.seeds`); data, steps and rank schedule are shared by all runs.
2. With two or more rates, score every run on the validation split and pick the rate whose runs
   have the best mean validation AURAC over the seeds (the paper picks runs by AURAC; the
   highest for accuracies, the lowest for the `loss` metric).
3. Score the picked rate's runs, one per seed, on the test split. The table shows the mean ± std
   (sample std, n - 1) over seeds at each rank and for AURAC / log-AURAC. AURAC is linear in the
   accuracies, so the mean of the seeds' AURACs is the AURAC of the mean curve.

A method may carry the rule its adapter is saved in (`deploy_order`): `lora` is LoRA as trained,
`lora+svd` the same training saved in SVD order, `matryoshka+fold` with P folded in. The rule is
part of the name, so one table compares training methods and deployment rules side by side.

Runs live in `<out>/<method>/lr<lr>/seed<seed>/` (adapter, checkpoints, `eval_<split>.json`). A
finished run is reused from its `eval_<split>.json` and a trained one from its adapter, and a run
killed mid-training continues from its latest checkpoint, so an interrupted compare resumes.
The seed changes the adapter initialisation, the data order and the DyLoRA draws; `data_seed`
(which examples) stays fixed across seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import latest_checkpoint
from .core.files import atomic_write_text
from .core.locking import locks_output
from .core.saving import load_matryoshka_model
from .core.weighting import METHODS, NO_FIXED_P
from .evaluation.report import higher_is_better, write_results
from .experiment import RunConfig, check_inputs, evaluate, load_model_for, run_keys, train
from .training import DEPLOY_ORDERS

log = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    """What `mlora compare` runs besides the shared run options: methods, learning-rate grids, seeds."""

    methods: list[str] = field(default_factory=lambda: ["lora", "dylora", "multirank+svd"],
                               metadata={"help": "Methods to train, each optionally with the rule its adapter is saved "
                                                 "in: METHOD[+fold|+svd], e.g. lora,dylora,matryoshka+svd (a bare name "
                                                 "is the adapter as trained; the deploy_order option is not used). "
                                                 "Default: the baselines and our default, multirank in SVD order."})
    lr: dict[str, list[float]] | None = field(
        default=None,
        metadata={"help": "Per method, one learning rate or a grid picked by mean validation AURAC over the seeds. "
                          "YAML: {method: [lr, ...]}; CLI: --lr METHOD=LR[,LR...] (repeatable; a flag replaces the "
                          "file's grid for that method). Methods without one use learning_rate."})
    seeds: list[int] | None = field(
        default=None,
        metadata={"help": "Training seeds; every method x learning rate x seed is trained and tables show mean ± std "
                          "over seeds (the paper: 42,666,2408). Default: [seed]."})

    def __post_init__(self):
        problems = []
        if isinstance(self.methods, str):
            self.methods = [m for m in self.methods.split(",") if m]
        unknown = [m for m in self.methods if variant_parts(m)[0] not in METHODS]
        if unknown or not self.methods:
            problems.append(f"Unknown method(s) {unknown or self.methods!r}. Available: {', '.join(METHODS)}, each "
                            "optionally +fold or +svd.")
        for name in [m for m in self.methods if m not in unknown]:
            method, rule = variant_parts(name)
            if name != method and rule not in DEPLOY_ORDERS[1:]:
                problems.append(f"Unknown deployment rule in {name!r}. Available: {method}, "
                                + ", ".join(f"{method}+{r}" for r in DEPLOY_ORDERS[1:]) + ".")
            elif rule == "fold" and method in NO_FIXED_P:
                problems.append(f"{name!r}: fold needs a fixed P; use {method}+svd.")
        if len(set(self.methods)) != len(self.methods):
            problems.append(f"methods={self.methods} names a method twice.")
        if self.lr is not None:
            if not isinstance(self.lr, dict):
                problems.append(f"lr={self.lr!r} must map methods to learning rates, e.g. {{matryoshka: [1e-5, 2e-5]}}.")
            else:
                self.lr = {m: _rates(m, v, problems) for m, v in self.lr.items()}
                extra = sorted(set(self.lr) - set(self.methods))
                if extra:
                    problems.append(f"lr has grids for {extra}, which are not in methods {self.methods}; add them to "
                                    "methods or remove their grids.")
        if self.seeds is not None:
            if isinstance(self.seeds, int) or not self.seeds or \
                    not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
                problems.append(f"seeds={self.seeds!r} must be a non-empty list of integers, e.g. [42, 666, 2408].")
            elif len(set(self.seeds)) != len(self.seeds):
                problems.append(f"seeds={self.seeds} repeats a seed; each seed is one run.")
        if problems:
            raise ValueError("Invalid CompareConfig:\n  - " + "\n  - ".join(problems))

    def grid(self, method: str, default: float) -> list[float]:
        """The learning rates tried for `method`."""
        return list((self.lr or {}).get(method) or [default])

    def seed_list(self, default: int) -> list[int]:
        return list(self.seeds or [default])


def variant_parts(name: str) -> tuple[str, str]:
    """A compare method name -> (training method, deploy_order): `lora` -> ("lora", "none"),
    `matryoshka+svd` -> ("matryoshka", "svd")."""
    method, plus, rule = name.partition("+")
    return method, rule if plus else "none"


def _rates(method: str, value, problems: list[str]) -> list[float]:
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        rates = [float(v) for v in values]  # YAML reads 1e-5 as a string
    except (TypeError, ValueError):
        problems.append(f"lr for {method!r} must be numbers, got {value!r}.")
        return []
    if not rates or any(not r > 0 for r in rates):
        problems.append(f"lr for {method!r} must be one or more positive numbers, got {value!r}.")
    return rates


COMPARE_KEYS = tuple(f.name for f in dataclasses.fields(CompareConfig))


def split_options(values: dict) -> tuple[RunConfig, CompareConfig]:
    """Flat options (a YAML config, CLI flags) -> (the shared run options, the compare options).

    Raises:
        ValueError: unknown keys (the message lists the valid ones) or invalid values, all together.
    """
    valid = [*run_keys(), *COMPARE_KEYS]
    unknown = sorted(k for k in values if k not in valid)
    if unknown:
        valid = sorted(valid)
        raise ValueError(f"Unknown option(s) {unknown}. Valid options: {', '.join(valid)}")
    if values.get("deploy_order", "none") != "none":
        raise ValueError(f"deploy_order={values['deploy_order']!r} is a single-run option; `mlora compare` takes "
                         "each method's rule from its name: methods lora+svd,matryoshka+fold,... (a bare name is "
                         "the adapter as trained).")
    problems, built = [], []
    for build, keys in ((RunConfig.from_flat, [k for k in values if k not in COMPARE_KEYS]),
                        (lambda d: CompareConfig(**d), [k for k in values if k in COMPARE_KEYS])):
        try:
            built.append(build({k: values[k] for k in keys}))
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    if problems:
        raise ValueError("\n".join(problems))
    return built[0], built[1]


# -- one run --------------------------------------------------------------------------------------
def run_dir(out: str | Path, method: str, lr: float, seed: int) -> Path:
    """Where the run of (method, learning rate, seed) lives under a compare's output root."""
    return Path(out) / method / f"lr{lr:g}" / f"seed{seed}"


class SharedBase:
    """One base model for all runs of a compare, loaded on first use and reused between runs."""

    def __init__(self, run: RunConfig):
        self.run, self.model, self.tokenizer, self.base_done = run, None, None, False

    def get(self):
        if self.model is None:
            self.model, self.tokenizer = load_model_for(self.run)
        return self.model, self.tokenizer

    def adapter(self, run: RunConfig, method: str, lr: float, seed: int, out: Path, **flat):
        """The trained model of one run (trained now unless its adapter exists) and its run config.

        Give the model back with `release(model)` before the next run.
        """
        folder = run_dir(out, method, lr, seed)
        trained, rule = variant_parts(method)
        return self.trained(run.replace(method=trained, deploy_order=rule, learning_rate=lr, seed=seed,
                                        output_dir=str(folder), **flat))

    def trained(self, run: RunConfig) -> tuple[torch.nn.Module, RunConfig]:
        """The adapter of the run in `run.output_dir`: loaded if it finished, else trained (a run killed
        mid-training continues from its last checkpoint). Returns the model and the run config used."""
        folder = Path(run.train.output_dir)
        run = run.replace(resume=latest_checkpoint(folder / "checkpoints") is not None)
        base, tokenizer = self.get()
        if (folder / "adapter" / "matryoshka_config.json").is_file():
            return load_matryoshka_model(base, folder / "adapter"), run
        return train(run, base, tokenizer).model, run

    def release(self, model) -> None:
        self.model = model.unload()  # the base model without adapter layers, for the next run


def evaluate_run(shared: SharedBase, run: RunConfig, method: str, lr: float, seed: int, out: Path, split: str) -> dict:
    """Train (or reuse) one run and score it on `split`; cached in its `eval_<split>.json`."""
    cached = run_dir(out, method, lr, seed) / f"eval_{split}.json"
    if cached.is_file():
        log.info("Reusing finished run %s", cached)
        res = json.loads(cached.read_text())
        shared.base_done |= split == "test" and res.get("base") is not None
        return res
    with_base = split == "test" and not shared.base_done  # rank 0 is the same for every run: score it once
    model, sub = shared.adapter(run, method, lr, seed, out, include_base=with_base)
    res = evaluate(sub, cached.parent / "adapter", split, model=model, tokenizer=shared.tokenizer, method_name=method)
    atomic_write_text(cached, json.dumps(res, indent=1) + "\n")
    shared.release(model)
    shared.base_done |= with_base
    return res


# -- the protocol ---------------------------------------------------------------------------------
def pick_learning_rate(shared: SharedBase, run: RunConfig, method: str, config: CompareConfig,
                       out: Path) -> tuple[float, list[dict] | None]:
    """Step 1-2 of the protocol for one method: its learning rate, and the grid's validation scores
    (None for a grid of one rate: nothing is scored)."""
    grid, seeds = config.grid(method, run.train.learning_rate), config.seed_list(run.train.seed)
    if len(grid) == 1:
        return grid[0], None
    scored, sign = [], 1.0
    for lr in grid:
        results = [evaluate_run(shared, run, method, lr, s, out, "validation") for s in seeds]
        per_seed = [r["methods"][method]["aurac"] for r in results]
        sign = 1.0 if higher_is_better(results[0]["metric"]) else -1.0  # AURAC of a loss: lower is better
        mean, std = mean_std(per_seed)
        scored.append({"learning_rate": lr, "validation_aurac": mean, "validation_aurac_std": std,
                       "validation_aurac_per_seed": dict(zip(map(str, seeds), per_seed))})
    best = max(scored, key=lambda g: sign * g["validation_aurac"])  # ties: the first rate of the grid
    return best["learning_rate"], scored


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def seed_summary(per_seed: dict[int, dict], method: str) -> dict:
    """One method's results over seeds ({seed: results dict}) -> a results entry of means; with two
    or more seeds, `<metric>_std` next to each per-rank metric and `aurac_std` / `log_aurac_std`."""
    entries = {s: r["methods"][method] for s, r in per_seed.items()}
    first = next(iter(entries.values()))
    several = len(entries) > 1

    def put(target: dict, name: str, values: list[float]) -> None:
        target[name], std = mean_std(values)
        if several:
            target[f"{name}_std"] = std

    per_rank = {}
    for k, metrics in first["per_rank"].items():
        per_rank[k] = {}
        for name in metrics:
            put(per_rank[k], name, [e["per_rank"][k][name] for e in entries.values()])
    out = {"per_rank": per_rank}
    for name in ("aurac", "log_aurac"):
        put(out, name, [e[name] for e in entries.values()])
    out.update(seeds=list(entries), r=first.get("r"), trainable_params=first.get("trainable_params"),
               adapter=first.get("adapter"), adapters={str(s): e.get("adapter") for s, e in entries.items()},
               per_seed={str(s): {"aurac": e["aurac"], "log_aurac": e["log_aurac"]} for s, e in entries.items()})
    return out


@locks_output("compare", lambda a: a["out_dir"] or a["run"].train.output_dir)
def compare(run: RunConfig, config: CompareConfig | None = None, out_dir: str | Path | None = None) -> dict:
    """`mlora compare`: train each method x learning rate x seed, pick, score on test, one table.

    Args:
        run: Shared settings (model, data, rank schedule, steps; `seed` when `config.seeds` is unset).
        config: Methods, learning-rate grids and seeds (default: lora, dylora, multirank+svd at
            run.train.learning_rate, one seed).
        out_dir: Output root (default run.train.output_dir): the runs, and results.json/.md/.png on top.

    Returns:
        Combined results (schema in `report.py`; with several seeds each value is a mean and has a
        `_std` companion), also written as results.json/.md/.png.
    """
    config = config or CompareConfig()
    out = Path(out_dir or run.train.output_dir)
    grids = any(len(config.lr.get(m) or []) > 1 for m in config.methods) if isinstance(config.lr, dict) else False
    check_inputs(run, ["train", "test"] + (["validation"] if grids else []))  # fail fast, before the model loads
    shared = SharedBase(run)
    seeds = config.seed_list(run.train.seed)
    combined = {"metric": None, "split": "test", "ranks": None, "base": None, "methods": {}, "seeds": seeds,
                "config": {"run": json.loads(json.dumps(run.to_flat(), default=str)),
                           "compare": dataclasses.asdict(config)}}
    started = time.perf_counter()
    for method in config.methods:
        lr, grid = pick_learning_rate(shared, run, method, config, out)
        tests = {s: evaluate_run(shared, run, method, lr, s, out, "test") for s in seeds}
        entry = dict(seed_summary(tests, method), learning_rate=lr)
        if grid is not None:
            entry["grid"] = grid
        combined["methods"][method] = entry
        first = next(iter(tests.values()))
        combined["metric"], combined["ranks"] = first["metric"], first["ranks"]
        combined["base"] = combined["base"] or next((t["base"] for t in tests.values() if t.get("base")), None)
    combined["timings"] = {"seconds": time.perf_counter() - started}
    combined["paths"] = {k: str(v) for k, v in write_results(combined, out).items()}
    return combined
