"""Model cards: the README.md written next to every exported adapter and merged model.

A Hugging Face style card (YAML front matter with `base_model`, a table of facts, how to load
it) and, when the export is given a results file, the measured per-rank table and its plot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.config import MatryoshkaConfig
from ..core.saving import WEIGHTS_NAME
from ..core.weighting import rank_scale
from ..evaluation.report import accuracy_at, load_results, markdown_table, pick_method, plot

CARD_NAME = "README.md"


def _rank_text(ranks: Mapping[str, int]) -> str:
    values = set(ranks.values())
    if len(values) == 1:
        return str(values.pop())
    counts = Counter(ranks.values())
    return "per layer: " + ", ".join(f"{counts[k]} layers at rank {k}" for k in sorted(counts)) + \
        (" (rank 0 = left out)" if 0 in counts else "")


def _scale_text(ranks: Mapping[str, int], config: MatryoshkaConfig) -> str:
    ks = sorted({k for k in ranks.values() if k})
    return ", ".join(f"s_{k} = {rank_scale(k, config.scaling, config.alpha):.6g}" for k in ks) + \
        f" (scaling={config.scaling}, alpha={config.alpha:g}; lora_alpha = s_k * k)"


def model_card(*, title: str, base_model: str | None, rows: list[tuple[str, str]], usage: str,
               library: str = "peft", tags: Sequence[str] = ("lora", "matryoshka-lora")) -> str:
    """A Hugging Face style README: YAML front matter, a table of facts, and how to load it."""
    front = ["---"] + ([f"base_model: {base_model}"] if base_model else []) + \
        [f"library_name: {library}", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(front + [f"# {title}", ""] + table + ["", usage, ""])


def _results_section(results, method, directory: Path) -> str:
    """The measured per-rank table of `method` and its plot (written to `directory/ranks.png`)."""
    data = results if isinstance(results, Mapping) else load_results(results)
    method = pick_method(data, method)
    one = dict(data, methods={method: data["methods"][method]})
    plot(one, directory / "ranks.png")
    return (f"## Measured at every rank of the source adapter\n\n{markdown_table(one)}\n\n"
            f"({data['metric']}; rows from the results the export was given.)\n\n![accuracy by rank](ranks.png)\n")


def adapter_card(config: MatryoshkaConfig, origin: str, ranks: Mapping[str, int], cfg: dict, size: int, params: int,
                 results, method: str | None, directory: Path) -> str:
    """The card of an exported adapter: base model, ranks, scales, file size, source, and (with
    `results`) the measured accuracy at its rank plus the per-rank table and plot of the source."""
    base = cfg.get("base_model_name_or_path")
    c = config
    rows = [
        ("base model", f"`{base}`" if base else "not recorded in the source adapter"),
        ("rank", _rank_text(ranks)),
        ("scale", _scale_text(ranks, c)),
        ("adapter file", f"`{WEIGHTS_NAME}`, {size:,} bytes"),
        ("trainable parameters", f"{params:,}"),
        ("source", f"nested adapter {origin}: method {c.method}, r = {c.r}, "
                   f"trained ranks {', '.join(map(str, c.ranks))}"),
    ]
    uniform = set(ranks.values())
    if results is not None:
        found = accuracy_at(results, uniform.pop(), method) if len(uniform) == 1 else None
        rows.append(("measured accuracy", f"{found[2]:.2f} ({found[1]}, method {found[0]})" if found
                     else "not evaluated at this rank"))
    measured = _results_section(results, method, directory) + "\n" if results is not None else ""
    usage = measured + ("## Load\n\nA plain PEFT LoRA adapter; no matryoshka-lora needed:\n\n```python\n"
             "from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"path/to/this/dir\")\n```\n\n"
             f"Servers that load PEFT LoRA adapters (e.g. vLLM with `--enable-lora --max-lora-rank {max(ranks.values())}` "
             "or more) load it as is.")
    title = f"Rank-{next(iter(set(ranks.values())))} LoRA adapter" if len(set(ranks.values())) == 1 \
        else "Mixed-rank LoRA adapter"
    return model_card(title=title + " cut from a nested (Matryoshka) adapter", base_model=base, rows=rows, usage=usage)


def merged_card(base: str | None, rank, default: int | None, adapter_dir, config: MatryoshkaConfig) -> str:
    """The card of a merged model: base model, the merged rank, and the nested adapter it came from."""
    rows = [("base model", f"`{base}`" if base else "not recorded"),
            ("merged rank", str(rank) if not isinstance(rank, Mapping) else f"per layer {dict(rank)}, default {default}"),
            ("source", f"nested adapter `{adapter_dir}`: method {config.label()}, r = {config.r}, "
                       f"trained ranks {', '.join(map(str, config.ranks))}")]
    usage = "## Load\n\n```python\nfrom transformers import AutoModelForCausalLM\n" \
            "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/dir\")\n```"
    return model_card(title="Base model with a nested LoRA prefix merged in", base_model=str(base) if base else None,
                      rows=rows, usage=usage, library="transformers", tags=("matryoshka-lora", "merged"))
