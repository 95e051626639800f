"""What a per-layer rank allocation produced: `Allocation` (one budget), `AllocationCurve` (several,
with uniform ranks for comparison), and how they are shown (JSON, markdown table, plot)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.files import atomic_write_text


@dataclass
class Allocation:
    """One per-layer rank choice and what it measured."""

    budget: str  # as given, e.g. "avg-rank:4"
    budget_params: int
    rank_pattern: dict[str, int]  # every adapted layer -> rank; set_rank and export_rank accept it
    params: int  # sum_l k_l (m_l + n_l) <= budget_params
    avg_rank: float  # params / sum_l (m_l + n_l): the uniform rank of the same size
    calibration_loss: float | None = None  # measured mean NLL per completion token on the calibration set
    heldout_loss: float | None = None  # the same on held-out examples (allocation_curve)
    estimated_gain: float = 0.0  # the rule's own score from the start: first-order loss drop, or sigma^2 kept

    @property
    def rank_counts(self) -> dict[int, int]:
        """How many layers run at each rank."""
        return dict(sorted(Counter(self.rank_pattern.values()).items()))

    def to_dict(self) -> dict:
        return {**asdict(self), "rank_counts": {str(k): n for k, n in self.rank_counts.items()}}


@dataclass
class AllocationCurve:
    """Allocations at several budgets from one greedy path, with uniform ranks for comparison."""

    points: list[Allocation]
    uniform: list[dict] = field(default_factory=list)  # {"rank", "params", "calibration_loss", "heldout_loss"}
    refreshes: list[dict] = field(default_factory=list)  # gradient passes: {"params", "calibration_loss"}
    config: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"points": [p.to_dict() for p in self.points], "uniform": self.uniform,
                "refreshes": self.refreshes, "config": self.config, "seconds": self.seconds}

    def write(self, out_dir: str | Path, stem: str = "allocation") -> dict[str, Path]:
        """Write `<stem>.json` and, with two or more measured points, the plot `<stem>.png`; return the paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / f"{stem}.json"}
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=1) + "\n")
        if len(self.points) + len(self.uniform) >= 2 and _loss_key(self) is not None:
            paths["plot"] = plot_curve(self, out_dir / f"{stem}.png")
        return paths


def curve_table(curve: AllocationCurve) -> str:
    """A markdown table: each budget's allocation (measured losses, ranks used), then the uniform ranks."""
    head = "| allocation | params | avg rank | calibration loss | held-out loss | layers per rank |"
    lines = [head, "|---|---|---|---|---|---|"]

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    for p in curve.points:
        counts = ", ".join(f"{k}: {n}" for k, n in p.rank_counts.items())
        lines.append(f"| {p.budget} | {p.params:,} | {p.avg_rank:.2f} | {fmt(p.calibration_loss)} | "
                     f"{fmt(p.heldout_loss)} | {counts} |")
    for u in curve.uniform:
        lines.append(f"| uniform r={u['rank']} | {u['params']:,} | {u['rank']:.2f} | {fmt(u.get('calibration_loss'))} | "
                     f"{fmt(u.get('heldout_loss'))} | {u['rank']}: all |")
    return "\n".join(lines) + "\n"


def _loss_key(curve: AllocationCurve) -> str | None:
    """The loss every point and uniform row has: held-out if measured, else calibration, else None."""
    for key in ("heldout_loss", "calibration_loss"):
        if all(getattr(p, key) is not None for p in curve.points) and all(u.get(key) is not None for u in curve.uniform):
            return key
    return None


def plot_curve(curve: AllocationCurve, path: str | Path) -> Path:
    """Loss against adapter size (log2 axis): allocated per-layer ranks vs uniform rank."""
    from ..evaluation.report import new_plot, save_log2_plot

    key = _loss_key(curve)
    if key is None:
        raise ValueError("Nothing to plot: no loss was measured (a spectrum allocation from the adapter file alone).")
    fig, ax = new_plot()
    ax.plot([p.params for p in curve.points], [getattr(p, key) for p in curve.points], marker="o",
            label="allocated per-layer ranks")
    uniform = [u for u in curve.uniform if u["params"] > 0]
    if uniform:
        ax.plot([u["params"] for u in uniform], [u[key] for u in uniform], marker="s", linestyle="--",
                label="uniform rank")
        for u in uniform:
            ax.annotate(f"r={u['rank']}", (u["params"], u[key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    return save_log2_plot(fig, ax, "adapter parameters", key.replace("_", " "), path)
