"""Pick a deployment rank: the smallest rank within `tolerance` points of the best one.

Reads the results schema of `report.py`. Scores are in percent for accuracy metrics (higher
is better) and the tolerance is in the same points; for loss / perplexity metrics lower is
better and the tolerance is in their units. Sizes are the exact `adapter_model.safetensors`
size `export_rank` would write, computed from the adapter's safetensors header.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluation.report import check_results, is_percent, load_results, pick_method, scores
from .export import Footprint, rank_footprint


@dataclass(frozen=True)
class RankRow:
    rank: int
    score: float
    size_bytes: int | None = None
    params: int | None = None


@dataclass(frozen=True)
class Recommendation:
    """The chosen rank, the best rank, and the whole rank table."""

    method: str
    metric: str
    tolerance: float
    higher_is_better: bool
    chosen: RankRow
    best: RankRow
    rows: list[RankRow] = field(default_factory=list)
    size_note: str = ""

    def __str__(self) -> str:
        unit = " points" if is_percent(self.metric) else ""
        c = self.chosen
        cost = []
        if c.size_bytes is not None:
            cost.append(f"adapter {c.size_bytes:,} bytes")
        if c.params is not None:
            cost.append(f"{c.params:,} trainable parameters")
        lines = [
            f"Recommended rank: {c.rank}  ({self.metric} {c.score:.2f}; best {self.best.score:.2f} at rank "
            f"{self.best.rank}; tolerance {self.tolerance:g}{unit})" + (f"  {', '.join(cost)}" if cost else ""),
            "",
            f"method: {self.method}",
            f"| rank | {self.metric} | size (bytes) | params | |",
            "|---:|---:|---:|---:|---|",
        ]
        for row in self.rows:
            mark = "<- recommended" if row.rank == c.rank else ("best" if row.rank == self.best.rank else "")
            lines.append(f"| {row.rank} | {row.score:.2f} | {_n(row.size_bytes)} | {_n(row.params)} | {mark} |")
        if self.size_note:
            lines += ["", self.size_note]
        return "\n".join(lines)


def _n(v) -> str:
    return "-" if v is None else f"{v:,}"


def _find_adapter(adapter, entry: Mapping, results_path: Path | None) -> Path | None:
    candidate = adapter or entry.get("adapter")
    if candidate is None:
        return None
    path = Path(candidate)
    if not path.is_dir() and not path.is_absolute() and results_path is not None:
        path = results_path.parent / path  # paths in results.json may be relative to the file
    if not path.is_dir():
        if adapter is not None:
            raise FileNotFoundError(f"Adapter directory {adapter} does not exist.")
        return None
    return path


def recommend_rank(
    results,
    tolerance: float = 1.0,
    method: str | None = None,
    metric: str | None = None,
    adapter: str | Path | None = None,
) -> Recommendation:
    """The smallest evaluated rank whose score is within `tolerance` of the best rank's score.

    Args:
        results: A results.json path (or its directory), or the loaded dict.
        tolerance: Allowed loss from the best score, in the metric's points (>= 0).
        method: Which method of the results (default: the only one).
        metric: Metric to rank by (default: the results' headline metric).
        adapter: Adapter directory for sizes (default: the method's "adapter" entry, if present).

    Returns:
        A Recommendation; `str()` of it is the printed report with the whole rank table.

    Raises:
        ValueError: negative tolerance, an unknown method or metric, no finite scores.
    """
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be a number >= 0 (points of {metric or 'the metric'}).")
    results_path = None
    if not isinstance(results, Mapping):
        results_path = Path(results) / "results.json" if Path(results).is_dir() else Path(results)
        results = load_results(results)
    else:
        results = check_results(dict(results), "results")
    origin = str(results_path) if results_path else "the results"
    method = pick_method(results, method, origin)
    metric = metric or results["metric"]
    entry = results["methods"][method]
    missing = [k for k, row in entry["per_rank"].items() if metric not in row]
    if missing:
        known = sorted({m for row in entry["per_rank"].values() for m in row})
        raise ValueError(f"Metric {metric!r} is missing at ranks {missing} of method {method!r} in {origin}. "
                         f"Available: {', '.join(known)}")
    ranks, values = scores(results, method, metric)
    finite = [(k, v) for k, v in zip(ranks, values) if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        raise ValueError(f"Method {method!r} has no finite {metric} scores to choose from in {origin}.")
    higher = is_percent(metric)

    path = _find_adapter(adapter, entry, results_path)
    note = ""
    cost: dict[int, Footprint | tuple[None, int]] = {}
    if path is not None:
        try:
            cost = {k: rank_footprint(path, k) for k in ranks}
        except (FileNotFoundError, ValueError) as e:
            if adapter is not None:
                raise
            raise ValueError(f"{origin} names the adapter {path}: {e}\n"
                             "Pass --adapter DIR (adapter=) to size the ranks with another adapter.") from None
    elif entry.get("trainable_params") and entry.get("r"):
        note = ("No adapter directory found: params are trainable_params * k / r from the results file; "
                "pass adapter= (--adapter DIR) for exact sizes.")
        for k in ranks:
            cost[k] = (None, round(entry["trainable_params"] * k / entry["r"]))
    else:
        note = "No adapter directory found: pass adapter= (--adapter DIR) for sizes and parameter counts."

    def row(k, v):
        c = cost.get(k)
        if isinstance(c, Footprint):
            return RankRow(k, v, c.size_bytes, c.params)
        return RankRow(k, v, None, c[1] if c else None)

    rows = [row(k, v) for k, v in zip(ranks, values)]
    best_v = (max if higher else min)(v for _, v in finite)
    best_k = min(k for k, v in finite if v == best_v)
    slack = tolerance + 1e-9 * max(1.0, abs(best_v))  # inclusive, despite decimal rounding (38.2 - 8.2)
    ok = [k for k, v in finite if (v >= best_v - slack if higher else v <= best_v + slack)]
    by_rank = {r.rank: r for r in rows}
    return Recommendation(method, metric, float(tolerance), higher, by_rank[min(ok)], by_rank[best_k], rows, note)
