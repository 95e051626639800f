"""Results of a rank sweep: one JSON schema, a paper-style markdown table, and a plot.

Schema (`results.json`), shared by `mlora eval`, `mlora compare`, the lm-eval path and `recommend`:

    {
      "metric": "exact_match_strict",          # headline metric, in percent
      "ranks": [1, 2, 4, ...],
      "base": {"exact_match_strict": 12.5, ...},       # rank 0, the base model ("PT")
      "methods": {
        "matryoshka": {
          "per_rank": {"1": {"exact_match_strict": 20.0, "loss": 1.3, ...}, ...},
          "aurac": 31.2, "log_aurac": 28.0,
          "adapter": "runs/x/matryoshka/adapter",       # optional
          "r": 32, "trainable_params": 123, "timings": {...}   # optional
        }, ...
      },
      "config": {...}, "timings": {...}
    }

`mlora compare` with two or more seeds stores means in these fields, each with a `<name>_std`
companion (`"exact_match_strict_std"` per rank, `"aurac_std"`, `"log_aurac_std"`) and the list
`"seeds"`; the table then shows `mean ± std`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_text, read_json
from ..core.metrics import aurac, log_aurac


def method_summary(per_rank: dict[int, dict[str, float]], metric: str) -> dict[str, Any]:
    """Per-rank metrics -> {"per_rank", "aurac", "log_aurac"} on the headline metric."""
    ranks = sorted(int(k) for k in per_rank)
    scores = [per_rank[k][metric] if k in per_rank else per_rank[str(k)][metric] for k in ranks]
    return {
        "per_rank": {str(k): dict(per_rank[k] if k in per_rank else per_rank[str(k)]) for k in ranks},
        "aurac": aurac(ranks, scores),
        "log_aurac": log_aurac(ranks, scores),
    }


def scores(results: dict, method: str, metric: str | None = None) -> tuple[list[int], list[float]]:
    metric = metric or results["metric"]
    per_rank = results["methods"][method]["per_rank"]
    ranks = sorted(int(k) for k in per_rank)
    return ranks, [per_rank[str(k)][metric] for k in ranks]


def markdown_table(results: dict, metric: str | None = None) -> str:
    """Rows are methods, columns are PT (base), each rank, then AURAC and log-AURAC, as in the paper."""
    metric = metric or results["metric"]
    ranks = sorted({int(k) for m in results["methods"].values() for k in m["per_rank"]})
    base = results.get("base") or {}
    head = ["method", "PT"] + [f"r={k}" for k in ranks] + ["AURAC", "log-AURAC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        cells = [name, _fmt(base.get(metric))]
        cells += [_fmt_std(m["per_rank"].get(str(k), {}), metric) for k in ranks]
        cells += [_fmt_std(m, "aurac"), _fmt_std(m, "log_aurac")]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = {len(m["seeds"]) for m in results["methods"].values() if len(m.get("seeds") or []) > 1}
    note = f"; mean ± std over {'/'.join(map(str, sorted(seeds)))} seeds" if seeds else ""
    return "\n".join(lines) + f"\n\nMetric: {metric}" + (" (percent)" if is_percent(metric) else "") + note + "\n"


def _fmt_std(d: dict, key: str) -> str:
    """`mean ± std` when `d` holds `<key>_std` (several seeds), else the value alone."""
    std = d.get(f"{key}_std")
    return _fmt(d.get(key)) + (f" ± {std:.2f}" if std is not None else "")


def is_percent(metric: str) -> bool:
    return not any(t in metric for t in ("loss", "perplexity"))


def higher_is_better(metric: str) -> bool:
    """Accuracies: yes; losses and perplexities (so their AURAC too): no."""
    return is_percent(metric)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}"


def plot(results: dict, path: str | Path, metric: str | None = None) -> Path:
    """Accuracy against rank on a log2 axis; one line per method, the base model dashed."""
    metric = metric or results["metric"]
    fig, ax = new_plot()
    for name in results["methods"]:
        ranks, ys = scores(results, name, metric)
        ax.plot(ranks, ys, marker="o", label=f"{name} (AURAC {results['methods'][name].get('aurac', float('nan')):.1f})")
    base = (results.get("base") or {}).get(metric)
    if base is not None:
        ax.axhline(base, linestyle="--", color="gray", label="base model (PT)")
    return save_log2_plot(fig, ax, "rank", metric, path)


def new_plot():
    """A (fig, ax) pair on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))


def save_log2_plot(fig, ax, xlabel: str, ylabel: str, path) -> Path:
    """Finish a figure in the project's style (log2 x axis, grid, legend) and write it as PNG."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: dict, out_dir: str | Path, stem: str = "results") -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` into out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "table": out_dir / f"{stem}.md", "plot": out_dir / f"{stem}.png"}
    atomic_write_text(paths["json"], json.dumps(results, indent=2) + "\n")
    atomic_write_text(paths["table"], markdown_table(results))
    plot(results, paths["plot"])
    return paths


_FIX = "pass the results.json written by `mlora eval` or `mlora compare`"


def load_results(path: str | Path) -> dict:
    """Read a results file (or `<dir>/results.json`) and check it against the schema above."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    return check_results(read_json(path, _FIX), str(path))


def _is_score(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _scores_problem(row, where: str) -> str | None:
    if not isinstance(row, dict) or not all(isinstance(m, str) and _is_score(v) for m, v in row.items()):
        return f"{where} must map metric names to numbers, got {row!r}"
    return None


def check_results(data, origin: str) -> dict:
    """`data` if it follows the results schema; else a ValueError naming `origin` and every problem."""
    problems = []
    if not isinstance(data, dict):
        problems.append(f"it must hold a JSON object, not {type(data).__name__}")
        data = {"metric": "?", "methods": {"?": {"per_rank": {"1": {}}}}}
    if not isinstance(data.get("metric"), str) or not data.get("metric"):
        problems.append(f"'metric' must be the name of the headline metric, got {data.get('metric')!r}")
    methods = data.get("methods")
    if not isinstance(methods, dict) or not methods:
        problems.append(f"'methods' must map method names to their results, got {methods!r}")
        methods = {}
    for name, entry in methods.items():
        where = f"methods[{name!r}]"
        per_rank = entry.get("per_rank") if isinstance(entry, dict) else None
        if not isinstance(per_rank, dict) or not per_rank:
            problems.append(f"{where} must hold 'per_rank': {{rank: {{metric: score}}}}, got {entry!r}")
            continue
        for k, row in per_rank.items():
            if not re.fullmatch(r"[0-9]+", k) or int(k) < 1:
                problems.append(f"{where}['per_rank'] has the key {k!r}; ranks are integers from 1")
            problems.append(_scores_problem(row, f"{where}['per_rank'][{k!r}]"))
        for key, kind in (("adapter", str), ("r", int), ("trainable_params", int), ("aurac", float), ("log_aurac", float)):
            v = entry.get(key)
            ok = v is None or (_is_score(v) if kind is float else isinstance(v, kind) and not isinstance(v, bool))
            if not ok or (kind is int and v is not None and v < (1 if key == "r" else 0)):
                problems.append(f"{where}[{key!r}] is {v!r}")
    if data.get("base") is not None:
        problems.append(_scores_problem(data["base"], "'base'"))
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{origin} is not a valid matryoshka-lora results file:\n  - " + "\n  - ".join(problems)
                         + f"\nFix it, or {_FIX}.")
    return data


def pick_method(results: Mapping, method: str | None = None, origin: str = "The results") -> str:
    """`method` if the results hold it; the only method when there is one; else a ValueError listing them."""
    names = list(results["methods"])
    if method is None:
        if len(names) == 1:
            return names[0]
        raise ValueError(f"{origin} hold several methods; pick one with method= (--method). Available: {', '.join(names)}")
    if method not in names:
        raise ValueError(f"Unknown method {method!r}. Available: {', '.join(names)} (in {origin}).")
    return method


def accuracy_at(results, rank: int, method: str | None = None) -> tuple[str, str, float] | None:
    """(method, metric, score) measured at `rank` in a results file or dict; None if not evaluated."""
    data = results if isinstance(results, Mapping) else load_results(results)
    method = pick_method(data, method)
    row = data["methods"][method]["per_rank"].get(str(rank))
    if row is None or data["metric"] not in row:
        return None
    return method, data["metric"], float(row[data["metric"]])
