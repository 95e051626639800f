"""Score every rank prefix with lm-evaluation-harness, so numbers compare with the paper's.

One model load, one `HFLM` wrapper, one lm-eval run per rank (SPEC "Inference at any rank"):

    lm = HFLM(pretrained=model, tokenizer=tokenizer)      # built once
    for k in [0, *ranks]:                                  # 0 = base model, the table's "PT"
        with set_rank(model, k):
            lm_eval.simple_evaluate(model=lm, tasks=..., use_cache=None, cache_requests=False)

Reusing the wrapper is safe: lm-eval caches model outputs only when `use_cache` names a
database and caches built prompts (not scores) with `cache_requests`; both stay off here, and
its `logits_cache` only shares logits between requests of one call. A test checks that two
ranks give different log-likelihoods and that a fresh wrapper per rank gives the same scores.

Scores land in `report.py`'s results schema, in percent (perplexity-like metrics as reported).
Metric keys are lm-eval's `"<metric>,<filter>"` (e.g. `"exact_match,strict-match"`); with
several tasks each key is prefixed by its task (`"gsm8k/exact_match,strict-match"`).

The shipped local tasks (`gsm8k_local`, `tiny_mc`), lm-eval's optional import and the task
lookup live in `harness_tasks.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.locking import locks_output
from ..core.model import get_controller
from ..core.ranks import check_sweep_ranks
from ..data.gsm8k import DEFAULT_GSM8K_DIR, GSM8K_ENV
from .harness_tasks import build_task_manager, check_local_data, import_lm_eval, resolve_gsm8k_dir, write_local_tasks
from .report import method_summary, write_results
from .sweep import each_rank

# Headline metric when the user names none. GSM8K: the paper's strict exact match. ARC and
# HellaSwag at 25/10 shots are the Open LLM Leaderboard settings, which report acc_norm.
DEFAULT_METRICS = {
    "gsm8k": "exact_match,strict-match",
    "gsm8k_local": "exact_match,strict-match",
    "arc_challenge": "acc_norm,none",
    "hellaswag": "acc_norm,none",
}
# Metrics lm-eval reports on their own scale; every other metric is a fraction, shown in percent.
_RAW_SCALE = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "bleu", "chrf", "ter"}


# -- metrics ----------------------------------------------------------------------------------
def _to_percent(metric_key: str, value: float) -> float:
    name = metric_key.split(",", 1)[0].removesuffix("_stderr")
    return float(value) if name in _RAW_SCALE or name.startswith("rouge") else 100.0 * float(value)


def _task_metrics(task_result: dict[str, Any]) -> dict[str, float]:
    """lm-eval's per-task dict -> {"metric,filter": value in percent}, numbers only."""
    out = {}
    for key, value in task_result.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias", "samples", and "N/A" stderrs
        if math.isfinite(value):
            out[key] = _to_percent(key, value)
    return out


def flatten_scores(lm_results: dict, tasks: Sequence[str]) -> dict[str, float]:
    """The scores of one lm-eval run, keyed `"metric,filter"` (one task) or `"task/metric,filter"`."""
    table = lm_results["results"]
    scores: dict[str, float] = {}
    for task in tasks:
        if task not in table:
            raise ValueError(f"lm-eval returned no aggregate score for {task!r} (a tag or a group without "
                             f"aggregate metrics); list its tasks instead: {', '.join(sorted(table))}.")
        metrics = _task_metrics(table[task])
        scores.update(metrics if len(tasks) == 1 else {f"{task}/{k}": v for k, v in metrics.items()})
    return scores


def resolve_metric(scores: dict[str, float], tasks: Sequence[str], metric: str | None = None) -> str:
    """Pick the headline key: `metric` (full key, `metric,filter`, or bare name), else the first task's default.

    Raises:
        ValueError: the metric is unknown or ambiguous; the message lists the available keys.
    """
    prefix = "" if len(tasks) == 1 else f"{tasks[0]}/"
    if metric is None:
        default = DEFAULT_METRICS.get(tasks[0])
        if default and prefix + default in scores:
            return prefix + default
        firsts = [k for k in scores if k.startswith(prefix) and "_stderr," not in k]
        if not firsts:
            raise ValueError(f"lm-eval reported no numeric metric for {tasks[0]!r}.")
        return firsts[0]
    candidates = [metric, prefix + metric] if "/" not in metric else [metric]
    for c in candidates:
        if c in scores:
            return c
    if "," not in metric:  # bare name: accept when exactly one filter reports it
        base = metric if "/" in metric else prefix + metric
        hits = [k for k in scores if k.split(",", 1)[0] == base]
        if len(hits) == 1:
            return hits[0]
    available = ", ".join(k for k in scores if "_stderr," not in k)
    raise ValueError(f"Unknown or ambiguous metric {metric!r}. Available: {available}")


# -- the sweep --------------------------------------------------------------------------------
def _write_samples(samples_dir: Path, label: str, samples: dict[str, list]) -> None:
    samples_dir.mkdir(parents=True, exist_ok=True)
    for task, items in samples.items():
        with open(samples_dir / f"{label}_{task}.jsonl", "w") as f:
            for item in items:
                f.write(json.dumps(item, default=str) + "\n")


def harness_sweep(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] | str,
    ranks: Sequence[int] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    metric: str | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    gsm8k_dir: str | Path | None = None,
    batch_size: int | str = 1,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = False,
    system_instruction: str | None = None,
    include_base: bool = True,
    method_name: str | None = None,
    samples_dir: str | Path | None = None,
    bootstrap_iters: int = 100000,
    max_length: int | None = None,
    gen_kwargs: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval tasks at the base model and at every rank prefix of a nested adapter.

    Args:
        model: A model from `get_matryoshka_model` / `load_matryoshka_model`, already on its device.
        tokenizer: Its tokenizer (a `transformers` tokenizer).
        tasks: lm-eval task names (list or comma-separated), built in or found in `include_path`;
            the shipped local tasks `gsm8k_local` and `tiny_mc` are always available.
        ranks: Ranks to evaluate, each in 1..R. Default: the adapter's rank set S.
        num_fewshot: Shots per prompt (None: each task's own default, e.g. 5 for gsm8k). lm-eval
            keeps 0 for a task whose YAML says `num_fewshot: 0`, whatever is passed here.
        limit: Evaluate only the first `limit` documents (or this fraction if < 1) of each task.
        metric: Headline metric, e.g. "acc_norm,none" (see `resolve_metric`); default per task.
        include_path: Extra folder(s) of lm-eval task YAMLs.
        gsm8k_dir: Folder with GSM8K's train/test JSONL for `gsm8k_local`.
        batch_size: lm-eval batch size (int, or "auto").
        apply_chat_template: Wrap prompts in the tokenizer's chat template.
        fewshot_as_multiturn: With a chat template, give each shot as its own user/assistant turn.
        system_instruction: Optional system prompt.
        include_base: Also score rank 0 (the base model, "PT").
        method_name: Row name in the results (default: the adapter's method, e.g. "matryoshka").
        samples_dir: If set, write lm-eval's per-item records as `<base|rank_k>_<task>.jsonl` there.
        bootstrap_iters: lm-eval's bootstrap draws for stderrs of metrics such as f1 or bleu
            (means use a closed form); 0 reports no stderrs at all.
        max_length: Context length for lm-eval (default: from the model config).
        gen_kwargs: lm-eval's generation overrides for generate_until tasks, e.g. "max_gen_toks=16"
            (quick checks); None keeps each task's own settings.

    Returns:
        A results dict in `report.py`'s schema: "metric", "ranks", "base", "methods"
        (one entry with per-rank scores, AURAC, log-AURAC and per-rank timings), "config", "timings".
        The model ends in its previous train/eval mode and rank mode. Side effects of lm-eval:
        each run reseeds Python, NumPy and torch global RNGs (to its defaults 0/1234/1234), and
        the tokenizer gets a pad token if it had none.

    Raises:
        HarnessNotInstalled: lm-eval is missing.
        ValueError: an unknown task, metric or rank.
        FileNotFoundError: `gsm8k_local` requested but its data is missing.
    """
    lm_eval, HFLM, TaskManager = import_lm_eval()
    tasks = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not tasks:
        raise ValueError("tasks is empty; name at least one lm-eval task, e.g. tasks=['gsm8k'].")
    controller = get_controller(model)
    ranks = check_sweep_ranks(controller.config.r, controller.config.ranks, ranks)
    check_local_data(tasks, gsm8k_dir)
    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])

    started = time.perf_counter()
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers stay injected
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="mlora_tasks_") as tmp:
            include = [str(write_local_tasks(tmp, gsm8k_dir))] + [str(Path(p).resolve()) for p in extra]
            task_manager = build_task_manager(TaskManager, tasks, include)
            lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)

            headline = first = None

            def evaluate(k: int) -> dict[str, float]:
                nonlocal headline, first
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                    use_cache=None, cache_requests=False,  # fresh outputs for every rank
                    log_samples=samples_dir is not None, bootstrap_iters=bootstrap_iters,
                    apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
                    system_instruction=system_instruction, gen_kwargs=gen_kwargs,
                )
                if samples_dir is not None:
                    _write_samples(Path(samples_dir), "base" if k == 0 else f"rank_{k}", out["samples"])
                scores = flatten_scores(out, tasks)
                if headline is None:  # resolved at the first point (the base model): fail before the sweep
                    headline, first = resolve_metric(scores, tasks, metric), out
                return scores

            per_rank, rank_s = each_rank(model, ([0] if include_base else []) + ranks, evaluate)
            base, base_s = (per_rank.pop(0), rank_s.pop("0")) if include_base else (None, None)
    finally:
        model.train(was_training)

    name = method_name or controller.config.label()
    entry = method_summary(per_rank, headline)
    entry.update(r=controller.config.r, timings={"per_rank_s": rank_s})
    info = first.get("config", {})
    return {
        "metric": headline,
        "ranks": ranks,
        "base": base,
        "methods": {name: entry},
        "config": {
            "evaluator": "lm-eval",
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "tasks": tasks,
            "num_fewshot": num_fewshot,
            "limit": limit,
            "n_samples": {t: first.get("n-samples", {}).get(t) for t in tasks},
            "task_versions": {t: first.get("versions", {}).get(t) for t in tasks},
            "batch_size": batch_size,
            "apply_chat_template": apply_chat_template,
            "fewshot_as_multiturn": fewshot_as_multiturn,
            "system_instruction": system_instruction,
            "gen_kwargs": gen_kwargs,
            "include_path": [str(p) for p in extra],
            "gsm8k_dir": str(resolve_gsm8k_dir(gsm8k_dir)) if any(t == "gsm8k_local" for t in tasks) else None,
            "model": info.get("model"),
            "model_dtype": str(info.get("model_dtype")),
            "adapter_method": controller.config.method,
            "adapter_ranks": controller.config.ranks,
        },
        "timings": {"base_s": base_s, "per_rank_s": rank_s, "total_s": time.perf_counter() - started},
    }


# -- from a config (what `mlora eval --harness` calls) ----------------------------------------
def _split(value, cast=str) -> list | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [cast(v.strip() if isinstance(v, str) else v) for v in items if not (isinstance(v, str) and not v.strip())]


@dataclass
class HarnessConfig:
    """`mlora eval --harness`: score an adapter at every rank with lm-evaluation-harness."""

    model: str = field(default="", metadata={"help": "Base model: a Hugging Face id or a local directory (the one the adapter was trained on)."})
    adapter: str = field(default="", metadata={"help": "Adapter directory written by save_matryoshka / `mlora train`."})
    tasks: list[str] = field(default_factory=lambda: ["gsm8k"], metadata={"help": "lm-eval tasks, comma-separated, e.g. gsm8k,arc_challenge; local: gsm8k_local, tiny_mc."})
    ranks: list[int] | None = field(default=None, metadata={"help": "Ranks to evaluate, e.g. 1,2,4,8 (default: the adapter's rank set). Rank 0 (base) is always added as PT."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Shots per prompt (paper: gsm8k 8, arc_challenge 25, hellaswag 10). Default: each task's own."})
    limit: float | None = field(default=None, metadata={"help": "Only the first N documents per task (or this fraction if < 1), for quick checks."})
    metric: str | None = field(default=None, metadata={"help": "Headline metric, e.g. exact_match,strict-match or acc_norm,none (task/metric with several tasks). Default: per task."})
    include_path: list[str] | None = field(default=None, metadata={"help": "Extra folders of lm-eval task YAMLs (e.g. dataset_path: json with absolute data_files)."})
    gsm8k_dir: str | None = field(default=None, metadata={"help": f"GSM8K folder (train.jsonl, test.jsonl) for gsm8k_local. Default: ${GSM8K_ENV}, else the nearest shared/data/gsm8k above the working directory ({DEFAULT_GSM8K_DIR} from the repo root)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside --model, for GGUF checkpoints (dequantized on load)."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32 | bfloat16 | float16 | auto."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:0, ... Default: cuda if available, else cpu."})
    batch_size: str = field(default="1", metadata={"help": "lm-eval batch size: an integer or 'auto'."})
    apply_chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the tokenizer's chat template (instruct models)."})
    fewshot_as_multiturn: bool = field(default=False, metadata={"help": "With --apply-chat-template: each shot as its own user/assistant turn."})
    system_instruction: str | None = field(default=None, metadata={"help": "Optional system prompt."})
    method_name: str | None = field(default=None, metadata={"help": "Row name in the table (default: the adapter's method)."})
    out_dir: str = field(default="runs/harness", metadata={"help": "Where results.json, results.md and results.png are written."})
    log_samples: bool = field(default=False, metadata={"help": "Also write lm-eval's per-item records to <out_dir>/samples/."})

    def __post_init__(self):
        problems = []
        try:
            self.tasks = _split(self.tasks) or []
        except (TypeError, ValueError):
            problems.append(f"tasks={self.tasks!r} must be task names, e.g. gsm8k,arc_challenge.")
        if not self.tasks:
            problems.append("tasks is empty; name at least one lm-eval task, e.g. --tasks gsm8k.")
        try:
            self.ranks = _split(self.ranks, int)
        except (TypeError, ValueError):
            problems.append(f"ranks={self.ranks!r} must be integers, e.g. --ranks 1,2,4,8.")
        else:
            if self.ranks is not None and (not self.ranks or any(k < 1 for k in self.ranks)):
                problems.append(f"ranks={self.ranks} must be positive (rank 0, the base model, is always included).")
        if isinstance(self.include_path, str):
            self.include_path = [self.include_path]
        if not self.model:
            problems.append("model is empty; pass the base model id or directory (--model).")
        if not self.adapter:
            problems.append("adapter is empty; pass the adapter directory (--adapter).")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            problems.append(f"num_fewshot={self.num_fewshot!r} must be a non-negative integer.")
        if self.limit is not None and not (isinstance(self.limit, (int, float)) and self.limit > 0):
            problems.append(f"limit={self.limit!r} must be a positive number of documents (or a fraction < 1).")
        if isinstance(self.limit, float) and self.limit >= 1 and self.limit.is_integer():
            self.limit = int(self.limit)
        self.batch_size = str(self.batch_size)
        if not (self.batch_size.isdigit() and int(self.batch_size) > 0) and not re.fullmatch(r"auto(:\d+)?", self.batch_size):
            problems.append(f"batch_size={self.batch_size!r} must be a positive integer or 'auto'.")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            problems.append(f"Unknown dtype {self.dtype!r}. Available: float32, bfloat16, float16, auto.")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            problems.append("fewshot_as_multiturn needs apply_chat_template=True (--apply-chat-template).")
        if problems:
            raise ValueError("Invalid HarnessConfig:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_args(cls, args) -> HarnessConfig:
        """Build from an argparse namespace (or any object): attributes named like the fields; None keeps defaults."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
        return cls(**values)


@locks_output("eval", lambda a: a["config"].out_dir)
def harness_eval(config: HarnessConfig) -> dict[str, Path]:
    """Load base model and adapter once, score every rank with lm-eval, write results.{json,md,png}.

    Returns:
        The written paths: {"json", "table", "plot"} (and "samples" with log_samples).
    """
    from ..core.models import check_model, load_model
    from ..core.saving import check_adapter_dir, load_matryoshka_model

    import_lm_eval()  # fail before the (slow) model load
    check_local_data(config.tasks, config.gsm8k_dir)
    check_model(config.model, config.gguf_file)
    check_adapter_dir(config.adapter)
    base, tokenizer = load_model(config.model, config.gguf_file, config.dtype, device=config.device)
    model = load_matryoshka_model(base, config.adapter).eval()
    out_dir = Path(config.out_dir)
    samples_dir = out_dir / "samples" if config.log_samples else None
    batch_size = int(config.batch_size) if config.batch_size.isdigit() else config.batch_size
    results = harness_sweep(
        model, tokenizer, config.tasks, ranks=config.ranks, num_fewshot=config.num_fewshot, limit=config.limit,
        metric=config.metric, include_path=config.include_path, gsm8k_dir=config.gsm8k_dir, batch_size=batch_size,
        apply_chat_template=config.apply_chat_template, fewshot_as_multiturn=config.fewshot_as_multiturn,
        system_instruction=config.system_instruction, method_name=config.method_name, samples_dir=samples_dir,
    )
    name = next(iter(results["methods"]))
    results["methods"][name]["adapter"] = str(config.adapter)
    results["config"].update(base_model=config.model, gguf_file=config.gguf_file, dtype=config.dtype)
    paths = write_results(results, out_dir)
    if samples_dir is not None:
        paths["samples"] = samples_dir
    return paths

