"""The main job: train an adapter, evaluate it at every rank, compare methods, and the demo.

Each function takes a `RunConfig` (model, data, adapter, training and evaluation sections). The
CLI and YAML configs use flat keys (`learning_rate`, `r`, `dataset`, ...) that map to one section
each; `seed` sets both the training seed and the DyLoRA draw seed, `data_seed` the data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import MatryoshkaConfig
from .data import DataConfig, fewshot_examples, load_examples
from .evaluation.sweep import EvalConfig, evaluate_ranks
from .model import get_controller
from .models import load_model
from .prompts import encode_examples, make_collator
from .report import method_summary, write_results
from .saving import atomic_write_text, load_matryoshka_model
from .training import TrainConfig, latest_checkpoint, train_adapter

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Which base model, and how prompts are formatted for it."""

    model: str = field(default="smollm2-135m", metadata={"help": "Hugging Face id, local directory, .gguf path, or the embedded 'smollm2-135m'."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside --model (a directory or hub repo)."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32 | bfloat16 | float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub. Off unless you trust the source."})
    chat_template: bool = field(default=True, metadata={"help": "Format prompts with the tokenizer's chat template when it has one."})
    max_length: int = field(default=512, metadata={"help": "Longest training/eval sequence in tokens; longer examples are an error."})


SECTIONS = {"model": ModelConfig, "data": DataConfig, "adapter": MatryoshkaConfig, "train": TrainConfig, "eval": EvalConfig}
# Flat names that differ from the field name (clashes between sections).
RENAMED = {("data", "seed"): "data_seed"}
DERIVED = {("adapter", "seed")}  # set from train.seed


def flat_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat key -> (section, field) for every option of a run."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if (section, f.name) in DERIVED:
                continue
            out[RENAMED.get((section, f.name), f.name)] = (section, f)
    return out


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_flat(cls, values: dict) -> RunConfig:
        """Build from flat keys (CLI flags / YAML); unknown keys and invalid values are reported together."""
        fields = flat_fields()
        unknown = sorted(k for k in values if k not in fields)
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown}. Valid options: {', '.join(sorted(fields))}")
        parts: dict[str, dict] = {s: {} for s in SECTIONS}
        for key, value in values.items():
            section, f = fields[key]
            parts[section][f.name] = _coerce(value, typing.get_type_hints(SECTIONS[section])[f.name])
        if "seed" in values:
            parts["adapter"]["seed"] = values["seed"]
        built, problems = {}, []
        for section, cls_ in SECTIONS.items():
            try:
                built[section] = cls_(**parts[section])
            except (TypeError, ValueError) as e:
                problems.append(str(e))
        if problems:
            raise ValueError("\n".join(problems))
        return cls(**built)

    def to_flat(self) -> dict:
        out = {}
        for key, (section, f) in flat_fields().items():
            out[key] = getattr(getattr(self, section), f.name)
        return out

    def replace(self, **flat) -> RunConfig:
        return RunConfig.from_flat({**self.to_flat(), **flat})


def _coerce(value, hint):
    """YAML reads `1e-4` as a string (YAML 1.1); turn numeric strings into the field's number type."""
    if isinstance(value, str) and (hint is float or float in typing.get_args(hint)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_yaml(path: str | Path) -> dict:
    """Read a YAML run config with flat keys (the same names as the CLI flags, with underscores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} not found.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping of option: value.")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _load(run: RunConfig):
    m = run.model
    return load_model(m.model, m.gguf_file, m.dtype, m.trust_remote_code)


def train(run: RunConfig, model=None, tokenizer=None):
    """`mlora train`: load the model and data, train the nested adapter, save it.

    Returns:
        `training.TrainResult` (adapter in `<output_dir>/adapter`).
    """
    if model is None:
        model, tokenizer = _load(run)
    examples = load_examples(run.data, "train")
    encoded = encode_examples(tokenizer, examples, run.model.chat_template, run.model.max_length)
    meta = {"model": dataclasses.asdict(run.model), "data": dataclasses.asdict(run.data), "n_train": len(encoded)}
    return train_adapter(model, tokenizer, encoded, run.adapter, run.train, collator=make_collator(tokenizer),
                         extra_metadata=meta)


def evaluate(run: RunConfig, adapter_dir: str | Path | None = None, split: str = "test", model=None, tokenizer=None,
             method_name: str | None = None, out_dir: str | Path | None = None, keep_items: bool = False) -> dict:
    """`mlora eval`: score an adapter at every rank (and the base model) on one split.

    Args:
        run: Model, data and eval settings.
        adapter_dir: A saved nested adapter (ignored when `model` is already a matryoshka model).
        split: validation | test.
        model, tokenizer: Reuse an already loaded model.
        method_name: Row name in the table (default: the adapter's method).
        out_dir: Where results.json/.md/.png go (None: nothing written).

    Returns:
        A results dict (schema in `report.py`).
    """
    if model is None:
        base, tokenizer = _load(run)
        model = load_matryoshka_model(base, adapter_dir)
    controller = get_controller(model)
    examples = load_examples(run.data, split)
    shots = fewshot_examples(run.data, run.eval.num_fewshot) if run.eval.num_fewshot else []
    sweep = evaluate_ranks(model, tokenizer, examples, run.eval, shots, run.model.chat_template, run.model.max_length,
                           keep_items=keep_items)
    entry = method_summary(sweep["per_rank"], sweep["metric"])
    entry.update(r=controller.config.r, adapter=str(adapter_dir) if adapter_dir else None,
                 trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad) or _adapter_params(model),
                 timings=sweep["timings"])
    results = {"metric": sweep["metric"], "split": split, "ranks": sweep["ranks"], "base": sweep["base"],
               "methods": {method_name or controller.config.method: entry},
               "config": {"model": dataclasses.asdict(run.model), "data": dataclasses.asdict(run.data),
                          "eval": dataclasses.asdict(run.eval), "adapter": controller.config.to_dict()}}
    if keep_items:
        results["items"] = sweep["items"]
    if out_dir is not None:
        write_results(results, out_dir)
    return results


def _adapter_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def compare(run: RunConfig, methods=("lora", "dylora", "matryoshka"), learning_rates: dict[str, list[float]] | None = None,
            out_dir: str | Path | None = None) -> dict:
    """`mlora compare`: train each method on the same data/seed/steps, evaluate every rank, one table.

    With several learning rates for a method, every run is scored on the validation split and
    the best by AURAC is then scored on the test split (the paper picks runs by AURAC). Finished
    runs are reused from their `eval_<split>.json`, so an interrupted compare resumes where it stopped.

    Args:
        run: Shared settings (model, data, rank schedule, steps, seed).
        methods: Methods to train, e.g. ("lora", "dylora", "matryoshka").
        learning_rates: Per method, one learning rate or a grid; default run.train.learning_rate.
        out_dir: Output root (default run.train.output_dir): `<method>/lr<lr>/` per run, results.* on top.

    Returns:
        Combined results (schema in `report.py`), also written as results.json/.md/.png.
    """
    out = Path(out_dir or run.train.output_dir)
    learning_rates = learning_rates or {}
    shared = _Shared(run)
    combined = {"metric": None, "split": "test", "ranks": None, "base": None, "methods": {},
                "config": {"run": _jsonable(run.to_flat()), "methods": list(methods), "learning_rates": learning_rates}}
    started = time.perf_counter()
    for method in methods:
        grid = list(learning_rates.get(method) or [run.train.learning_rate])
        split = "validation" if len(grid) > 1 else "test"
        scored = [(lr, _train_and_eval(shared, run, method, lr, out, split)) for lr in grid]
        best_lr, best = max(scored, key=lambda c: c[1]["methods"][method]["aurac"])
        if split == "validation":
            best = _train_and_eval(shared, run, method, best_lr, out, "test")
        entry = dict(best["methods"][method], learning_rate=best_lr)
        if len(grid) > 1:
            entry["grid"] = [{"learning_rate": lr, "validation_aurac": r["methods"][method]["aurac"]} for lr, r in scored]
        combined["methods"][method] = entry
        combined["metric"], combined["ranks"] = best["metric"], best["ranks"]
        combined["base"] = combined["base"] or best.get("base")
    combined["timings"] = {"seconds": time.perf_counter() - started}
    combined["paths"] = {k: str(v) for k, v in write_results(combined, out).items()}
    return combined


class _Shared:
    """One base model for all runs of a compare, loaded on first use."""

    def __init__(self, run: RunConfig):
        self.run, self.model, self.tokenizer, self.base_done = run, None, None, False

    def get(self):
        if self.model is None:
            self.model, self.tokenizer = _load(self.run)
        return self.model, self.tokenizer


def _train_and_eval(shared: _Shared, run: RunConfig, method: str, lr: float, out: Path, split: str) -> dict:
    run_dir = out / method / _lr_tag(lr)
    cached = run_dir / f"eval_{split}.json"
    if cached.is_file():
        log.info("Reusing finished run %s (%s)", run_dir, cached.name)
        res = json.loads(cached.read_text())
        shared.base_done |= split == "test" and res.get("base") is not None
        return res
    with_base = split == "test" and not shared.base_done  # rank 0 is the same for every method: score it once
    resume = latest_checkpoint(run_dir / "checkpoints") is not None  # a run killed mid-training continues
    sub = run.replace(method=method, learning_rate=lr, output_dir=str(run_dir), include_base=with_base, resume=resume)
    base, tokenizer = shared.get()
    if (run_dir / "adapter" / "matryoshka_config.json").is_file():
        model = load_matryoshka_model(base, run_dir / "adapter")
    else:
        model = train(sub, base, tokenizer).model
    res = evaluate(sub, run_dir / "adapter", split, model=model, tokenizer=tokenizer, method_name=method)
    atomic_write_text(cached, json.dumps(res, indent=1) + "\n")
    shared.model = model.unload()  # the base model without adapter layers, for the next run
    shared.base_done |= with_base
    return res


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def allocate(run: RunConfig, adapter_dir: str | Path, budgets=None, *, by: str = "calibration", sweep: bool = False,
             out_dir: str | Path | None = None, num_calibration: int = 32, export: bool = False,
             allow_off: bool = False, refresh: float = 0.25):
    """`mlora allocate`: per-layer ranks of a nested adapter under one or more budgets (allocation.py).

    by="calibration": calibration examples are the first `num_calibration` of the validation
    split (carved out of the training data). by="spectrum" uses no data and loads no model
    (unless `sweep`); `adapter_dir` may then be any LoRA adapter, nested or plain PEFT: one that
    is not SVD-ordered is first written SVD-ordered to `adapter-svd/` in the output directory,
    and the ranks are prefixes of that adapter. Held-out examples (`sweep`) are the first
    `run.data.num_eval` (default 64) of the test split, so they never overlap the calibration ones.
    Writes into `out_dir` (default: `allocation/` next to the adapter) `allocation.json`, one
    `rank_pattern-<budget>.json` per budget (a {layer: rank} dict for `set_rank` / `export_rank`
    on the allocated adapter), with `export` a plain PEFT adapter `adapter-<budget>/` each, and
    with `sweep` the plot `allocation.png`.

    Args:
        run: Model, data and batch size (`eval_batch_size`) settings.
        adapter_dir: A nested adapter written by `mlora train` (by="spectrum": any LoRA adapter).
        budgets: "avg-rank:4", "params:500000", "fraction:0.25", a list, or a comma-separated
            string; with `sweep` and no budgets, every uniform rank of S and the midpoints.
        by: "calibration" or "spectrum" (see `allocation.allocation_curve`).
        sweep: Measure held-out loss at every budget and at every uniform rank (the Pareto curve).

    Returns:
        (`allocation.AllocationCurve`, {name: written path}).
    """
    from .allocation import RULES, allocation_curve
    from .export import export_rank
    from .spectrum import adapter_is_svd_ordered
    from .svd import svd_adapter

    if by not in RULES:
        raise ValueError(f"Unknown allocation rule by={by!r}. Available: {', '.join(RULES)}.")
    if not budgets and not sweep:
        raise ValueError("Pass --budget (e.g. --budget avg-rank:4, params:500000 or fraction:0.25) or --sweep "
                         "for the whole budget curve.")
    if not isinstance(num_calibration, int) or num_calibration < 1:
        raise ValueError(f"num_calibration={num_calibration!r} must be a positive integer, e.g. 64.")
    out = Path(out_dir) if out_dir is not None else Path(adapter_dir).parent / "allocation"
    paths = {}
    source, notes = adapter_dir, []
    if by == "spectrum" and not adapter_is_svd_ordered(adapter_dir):
        adapter_dir, notes = svd_adapter(adapter_dir, out / "adapter-svd", overwrite=True)
        paths["SVD-ordered adapter (the rank patterns are its prefixes)"] = adapter_dir
    m = run.model
    model = calibration = heldout = None
    if by == "calibration" or sweep:
        base, tokenizer = _load(run)
        model = load_matryoshka_model(base, adapter_dir)
        if by == "calibration":
            calibration = load_examples(dataclasses.replace(run.data, num_eval=num_calibration), "validation")
            calibration = encode_examples(tokenizer, calibration, m.chat_template, m.max_length)
        if sweep:  # the whole test split can be large (arith: 500); default to 64 held-out examples
            data = run.data if run.data.num_eval else dataclasses.replace(run.data, num_eval=64)
            heldout = encode_examples(tokenizer, load_examples(data, "test"), m.chat_template, m.max_length)
    # a backward pass keeps every layer's activations: at most 8 sequences at a time (SmolLM2, batch 16: 7 GB)
    curve = allocation_curve(model if model is not None else adapter_dir, calibration, budgets or None, heldout, by=by,
                             allow_off=allow_off, refresh=refresh, batch_size=min(run.eval.eval_batch_size, 8),
                             uniform=sweep)
    curve.config.update(adapter=str(adapter_dir), source=str(source), notes=notes,
                        model=m.model if model is not None else None,
                        dataset=run.data.dataset if calibration is not None or heldout is not None else None)
    paths.update(curve.write(out))
    for point in curve.points:
        slug = point.budget.replace(":", "-")
        path = out / f"rank_pattern-{slug}.json"
        path.write_text(json.dumps(point.rank_pattern, indent=1) + "\n")
        paths[f"rank_pattern {point.budget}"] = path
        if export:  # spectrum ranks lie outside S on purpose: every prefix of an SVD-ordered adapter is its best cut
            paths[f"adapter {point.budget}"] = export_rank(adapter_dir, point.rank_pattern, out / f"adapter-{slug}",
                                                           overwrite=True, allow_untrained=by == "spectrum")
    return curve, paths
