"""The main job: train an adapter, evaluate it at every rank, allocate per-layer ranks.

Each function takes a `RunConfig` (model, data, adapter, training and evaluation sections). The
CLI and YAML configs use flat keys (`learning_rate`, `r`, `dataset`, ...) that map to one section
each; `seed` sets both the training seed and the DyLoRA draw seed, `data_seed` the data.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checkpoints import resume_point
from .core.config import MatryoshkaConfig
from .core.files import atomic_write_text
from .core.locking import locks_output
from .core.model import get_controller
from .core.models import DTYPES, check_model, load_model
from .core.saving import check_adapter_dir, load_matryoshka_model
from .data.loading import DataConfig, fewshot_examples, load_examples
from .data.prompts import encode_examples, make_collator
from .evaluation.report import method_summary, write_results
from .evaluation.sweep import EvalConfig, evaluate_ranks
from .training import TrainConfig, train_adapter


@dataclass
class ModelConfig:
    """Which base model, and how prompts are formatted for it."""

    model: str = field(default="smollm2-135m", metadata={"help": "Hugging Face id, local directory, .gguf path, or the embedded 'smollm2-135m'."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside --model (a directory or hub repo)."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32 | bfloat16 | float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub. Off unless you trust the source."})
    chat_template: bool = field(default=True, metadata={"help": "Format prompts with the tokenizer's chat template when it has one."})
    max_length: int = field(default=512, metadata={"help": "Longest training/eval sequence in tokens; longer examples are an error unless truncation is on."})
    truncation: bool = field(
        default=False,
        metadata={"help": "Cut examples longer than max_length to their first max_length tokens (the end of the "
                          "completion and EOS are cut), as the official code does at 512, instead of stopping with "
                          "an error; examples whose prompt alone fills max_length are left out. Both counts are "
                          "logged (training and the loss metric)."})

    def __post_init__(self):
        problems = []
        if not isinstance(self.model, str) or not self.model.strip():
            problems.append(f"model={self.model!r} must be a Hugging Face id, a local path or 'smollm2-135m'.")
        if self.dtype not in DTYPES:
            problems.append(f"Unknown dtype {self.dtype!r}. Available: {', '.join(DTYPES)}.")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 1:
            problems.append(f"max_length={self.max_length!r} must be a positive integer, e.g. 512.")
        if problems:
            raise ValueError("Invalid ModelConfig:\n  - " + "\n  - ".join(problems))


SECTIONS = {"model": ModelConfig, "data": DataConfig, "adapter": MatryoshkaConfig, "train": TrainConfig, "eval": EvalConfig}
# Flat names that differ from the field name (clashes between sections).
RENAMED = {("data", "seed"): "data_seed"}
DERIVED = {("adapter", "seed")}  # set from train.seed
# `paper: true` (`--paper`): the paper's protocol in place of our defaults (options set explicitly win).
# Its learning rate is the user's to set: it sits ~3x below LoRA's (the paper configs carry its grids).
PAPER_PROTOCOL = {"method": "matryoshka", "init": "paper", "deploy_order": "none"}


def flat_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat key -> (section, field) for every option of a run."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if (section, f.name) in DERIVED:
                continue
            out[RENAMED.get((section, f.name), f.name)] = (section, f)
    return out


def run_keys() -> list[str]:
    """Every flat key a run takes: its options (flat_fields) and `paper` (PAPER_PROTOCOL)."""
    return [*flat_fields(), "paper"]


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_flat(cls, values: dict) -> RunConfig:
        """Build from flat keys (CLI flags / YAML); unknown keys and invalid values are reported together.
        `paper: true` fills in PAPER_PROTOCOL where a key is not given."""
        values = dict(values)
        paper = values.pop("paper", False)
        if paper not in (True, False):
            raise ValueError(f"paper={paper!r} must be true or false.")
        if paper:
            values = {**PAPER_PROTOCOL, **values}
        fields = flat_fields()
        unknown = sorted(k for k in values if k not in fields)
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown}. Valid options: {', '.join(sorted(fields))}")
        parts: dict[str, dict] = {s: {} for s in SECTIONS}
        problems = []
        for key, value in values.items():
            section, f = fields[key]
            hint = typing.get_type_hints(SECTIONS[section])[f.name]
            value = _coerce(value, hint)
            if not _conforms(value, hint):
                problems.append(f"{key}={value!r} must be {_describe(hint)}.")
            parts[section][f.name] = value
        if problems:  # the sections' own checks assume the right types
            raise ValueError("Invalid option value(s):\n  - " + "\n  - ".join(problems))
        if "seed" in values:
            parts["adapter"]["seed"] = values["seed"]
        built = {}
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


def _conforms(value, hint) -> bool:
    """Whether a flat option value has its field's type (int, float, str, bool, lists, dicts, unions)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float, str, bool):
        if isinstance(value, bool):
            return hint is bool
        return isinstance(value, (int, float) if hint is float else hint)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:  # keys may arrive as strings ("1": 0.5 from JSON); the section converts them
        return isinstance(value, dict) and all(_conforms(v, args[1]) for v in value.values())
    return True


def _describe(hint) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s, e.g. [1, 2]"
    if origin is dict:
        return "a mapping, e.g. {1: 0.5}"
    return names.get(hint, str(hint))


def load_yaml(path: str | Path) -> dict:
    """Read a YAML run config with flat keys (the same names as the CLI flags, with underscores).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not readable YAML, or not a mapping of option names (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} not found.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start + 1}); re-save it as UTF-8.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', None) or e}).") from None
    except RecursionError:
        raise ValueError(f"{path}: invalid YAML (nested too deeply).") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"{path}: a run config must be a mapping of option: value, with option names as keys.")
    return {k.replace("-", "_"): v for k, v in data.items()}


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """A RunConfig from a YAML file (`load_yaml`) with `overrides` (e.g. command-line flags) on top.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file, or an option value, is invalid; the message names the file.
    """
    values = load_yaml(path)
    values.update(overrides or {})
    try:
        return RunConfig.from_flat(values)
    except ValueError as e:
        raise ValueError(f"Invalid run config {path}" + (" with the command-line options" if overrides else "")
                         + f":\n{e}") from None


def load_model_for(run: RunConfig):
    """The base model and tokenizer named by `run.model`."""
    m = run.model
    return load_model(m.model, m.gguf_file, m.dtype, m.trust_remote_code)


def check_inputs(run: RunConfig, splits=(), adapter_dir=None) -> dict[str, list]:
    """Fail fast: check what a command reads, except the model weights, before the (slow) model load.

    Checks the model path (`models.check_model`), the adapter directory (`check_adapter_dir`) and
    the data, and returns the examples of `splits` ({split: examples}).
    """
    check_model(run.model.model, run.model.gguf_file)
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
    return {split: load_examples(run.data, split) for split in splits}


@locks_output("train", lambda a: a["run"].train.output_dir)
def train(run: RunConfig, model=None, tokenizer=None):
    """`mlora train`: load the model and data, train the nested adapter, save it.

    Returns:
        `training.TrainResult` (adapter in `<output_dir>/adapter`).
    """
    examples = check_inputs(run, ["train"])["train"] if model is None else load_examples(run.data, "train")
    if model is None:
        resume_point(Path(run.train.output_dir) / "checkpoints", run.adapter, run.train.resume)
        run.train.training_arguments()  # transformers' checks (e.g. bf16 on this machine)
        model, tokenizer = load_model_for(run)
    encoded = encode_examples(tokenizer, examples, run.model.chat_template, run.model.max_length,
                              drop_long=run.model.truncation, truncate=run.model.truncation)
    meta = {"model": dataclasses.asdict(run.model), "data": dataclasses.asdict(run.data), "n_train": len(encoded),
            "n_truncated": encoded.truncated, "n_dropped_long": encoded.dropped}
    return train_adapter(model, tokenizer, encoded, run.adapter, run.train, collator=make_collator(tokenizer),
                         extra_metadata=meta)


@locks_output("eval", lambda a: a["out_dir"])
def evaluate(run: RunConfig, adapter_dir: str | Path | None = None, split: str = "test", model=None, tokenizer=None,
             method_name: str | None = None, out_dir: str | Path | None = None, keep_items: bool = False) -> dict:
    """`mlora eval`: score an adapter at every rank (and the base model) on one split.

    Args:
        run: Model, data and eval settings.
        adapter_dir: A saved nested adapter (ignored when `model` is already a matryoshka model).
        split: validation | test.
        model, tokenizer: Reuse an already loaded model.
        method_name: Row name in the table (default: the adapter's method and re-ordering, e.g. dylora+svd).
        out_dir: Where results.json/.md/.png go (None: nothing written).

    Returns:
        A results dict (schema in `report.py`).
    """
    examples = check_inputs(run, [split], adapter_dir if model is None else None)[split]
    shots = fewshot_examples(run.data, run.eval.num_fewshot) if run.eval.num_fewshot else []
    if model is None:
        base, tokenizer = load_model_for(run)
        model = load_matryoshka_model(base, adapter_dir)
    controller = get_controller(model)
    sweep = evaluate_ranks(model, tokenizer, examples, run.eval, shots, run.model.chat_template, run.model.max_length,
                           keep_items=keep_items, truncate=run.model.truncation)
    entry = method_summary(sweep["per_rank"], sweep["metric"])
    entry.update(r=controller.config.r, adapter=str(adapter_dir) if adapter_dir else None,
                 trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad) or _adapter_params(model),
                 timings=sweep["timings"])
    results = {"metric": sweep["metric"], "split": split, "ranks": sweep["ranks"], "base": sweep["base"],
               "methods": {method_name or controller.config.label(): entry},
               "config": {"model": dataclasses.asdict(run.model), "data": dataclasses.asdict(run.data),
                          "eval": dataclasses.asdict(run.eval), "adapter": controller.config.to_dict()}}
    if keep_items:
        results["items"] = sweep["items"]
    if out_dir is not None:
        write_results(results, out_dir)
    return results


def _adapter_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@locks_output("allocate", lambda a: a["out_dir"] or Path(a["adapter_dir"]).parent / "allocation")
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
    from .deploy.allocation import RULES, allocation_curve
    from .deploy.export import export_rank
    from .deploy.spectrum import adapter_is_svd_ordered
    from .deploy.svd import svd_adapter

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
        # fail fast: the model path, the adapter and the data are checked before the model loads
        check_inputs(run, adapter_dir=adapter_dir)
        if by == "calibration":
            calibration = load_examples(dataclasses.replace(run.data, num_eval=num_calibration), "validation")
        if sweep:  # the whole test split can be large (arith: 500); default to 64 held-out examples
            heldout = load_examples(run.data if run.data.num_eval else dataclasses.replace(run.data, num_eval=64), "test")
        base, tokenizer = load_model_for(run)
        model = load_matryoshka_model(base, adapter_dir)
        if calibration is not None:
            calibration = encode_examples(tokenizer, calibration, m.chat_template, m.max_length)
        if heldout is not None:
            heldout = encode_examples(tokenizer, heldout, m.chat_template, m.max_length)
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
        path = atomic_write_text(out / f"rank_pattern-{slug}.json", json.dumps(point.rank_pattern, indent=1) + "\n")
        paths[f"rank_pattern {point.budget}"] = path
        if export:  # spectrum ranks lie outside S on purpose: every prefix of an SVD-ordered adapter is its best cut
            paths[f"adapter {point.budget}"] = export_rank(adapter_dir, point.rank_pattern, out / f"adapter-{slug}",
                                                           overwrite=True, allow_untrained=by == "spectrum")
    return curve, paths
