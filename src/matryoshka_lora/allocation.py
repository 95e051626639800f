"""Per-layer ranks under a parameter budget, chosen after training from one nested checkpoint.

Every rank prefix of a nested adapter is a valid adapter, so each adapted layer l can run at
its own rank k_l from the trained set S (the paper's open limitation: it uses one rank for the
whole network). Layer l at rank k costs what export writes for it, lora_A (k, m_l) plus
lora_B (n_l, k):

    params(k) = sum_l k_l (m_l + n_l)

Budgets (`Budget`, `parse_budget`): `params:N` (that many adapter parameters), `avg-rank:a`
(the size of uniform rank a, i.e. a * sum_l (m_l + n_l)), or `fraction:f` (f times the
full-rank adapter, every layer at R). modules_to_save tensors do not depend on ranks and are
not counted.

Search (greedy, the same path through every budget): every layer starts at its smallest allowed
rank (min(S); 0, the adapter switched off, with `allow_off=True`). Each step raises the layer
whose next rank has the largest gain per added parameter; the path stops before the first step
that would exceed the budget, and what is left of the budget is filled with the best steps that
still fit. One path therefore gives every budget: `allocation_curve` walks it once and measures
the loss at each budget point (the Pareto curve). The gain is one of two rules (`by`):
`calibration`, the estimated calibration-loss drop below, over the ranks in S; or `spectrum`, the
singular-value energy sigma^2 a step keeps, over every rank 1..R of an SVD-ordered adapter, with
no data and no model (spectrum.py).

Estimate (first order, one backward pass scores all layers at once): layer l runs
`y = x W0 + ((x A) * v_l) B` with `v_l = s_k P_k` (R entries). Raising it from k to k'
changes v_l by `d = s_k' P_k' - s_k P_k`, so

    L(k') - L(k) ~= g_l . d,     g_l = dL/dv_l = sum over tokens of (x A) * dL/d(bottleneck)

An additive gate of zeros on each bottleneck, a leaf tensor, gives every g_l (R numbers per
layer) from one forward and backward pass over the calibration set; the gates do not change
the forward pass. The gradients are recomputed each time the adapter has grown by `refresh`
(25 %) since the last pass, so the estimate follows the allocation; in between, a layer that
was raised is scored with its last gradient. Loss reported for an allocation is always
measured (`evaluation.likelihood.completion_loss`), never the estimate.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import peft_seam
from .evaluation.likelihood import right_pad, completion_loss
from .files import atomic_write_text
from .model import get_controller, set_rank
from .spectrum import layer_spectra
from .weighting import prefix_weights

UNITS = ("params", "avg-rank", "fraction")
_EXAMPLES = "e.g. avg-rank:4, params:500000 or fraction:0.25"


# -- budgets ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """A parameter budget: `params` (adapter parameters), `avg-rank` (size of that uniform rank)
    or `fraction` (of the full-rank adapter, every layer at R)."""

    unit: str
    value: float

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"Unknown budget unit {self.unit!r}. Available: {', '.join(UNITS)} ({_EXAMPLES}).")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"Budget {self.unit}:{self.value!r} needs a finite number ({_EXAMPLES}).")
        if self.value < 0:
            raise ValueError(f"Budget {self} is negative; a budget is a size, {_EXAMPLES}.")
        if self.unit == "params" and self.value != int(self.value):
            raise ValueError(f"Budget {self} must be a whole number of parameters, e.g. params:{int(self.value)}.")

    def __str__(self) -> str:
        return f"{self.unit}:{int(self.value) if self.unit == 'params' else f'{self.value:g}'}"

    def to_params(self, unit_params: int, r: int) -> int:
        """The budget in parameters, given `unit_params` = sum_l (m_l + n_l) (the size of uniform rank 1)."""
        if self.unit == "params":
            return int(self.value)
        scale = unit_params * (r if self.unit == "fraction" else 1)
        return int(math.floor(self.value * scale + 1e-6))  # 1e-6: avg-rank:4 is exactly 4 * unit_params


def parse_budget(spec: str | Budget) -> Budget:
    """Read a budget: `params:N`, `avg-rank:A` or `fraction:F` (e.g. `avg-rank:4`).

    Raises:
        ValueError: no unit, an unknown unit, a value that is not a number, or a negative one.
    """
    if isinstance(spec, Budget):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"budget={spec!r} has no unit; pass a string such as 'avg-rank:{spec}' or "
                         f"'params:{spec}', or Budget(unit, value) ({_EXAMPLES}).")
    unit, sep, value = spec.strip().partition(":")
    if not sep or not value.strip():
        raise ValueError(f"Budget {spec!r} must look like UNIT:VALUE ({_EXAMPLES}).")
    unit = unit.strip().lower().replace("_", "-")
    if unit not in UNITS:
        raise ValueError(f"Unknown budget unit {unit!r} in {spec!r}. Available: {', '.join(UNITS)} ({_EXAMPLES}).")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"Budget {spec!r}: {value.strip()!r} is not a number ({_EXAMPLES}).") from None
    return Budget(unit, int(number) if unit == "params" and number == int(number) else number)


def parse_budgets(specs: str | Budget | Sequence[str | Budget]) -> list[Budget]:
    """Several budgets: a list, or one comma-separated string (`avg-rank:2,avg-rank:4`)."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    elif isinstance(specs, Budget):
        specs = [specs]
    budgets = [parse_budget(s) for s in specs]
    if not budgets:
        raise ValueError(f"No budget given; pass at least one ({_EXAMPLES}).")
    return budgets


# -- results ----------------------------------------------------------------------------------

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
    from .report import new_plot, save_log2_plot

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


# -- the loss and its gradient with respect to every layer's rank vector ---------------------

def _check_data(data: Sequence[Mapping], name: str) -> list[Mapping]:
    data = list(data) if data is not None else []
    if not data:
        raise ValueError(f"{name} is empty; pass encoded examples (prompts.encode_examples), e.g. 32 or more.")
    if not all(isinstance(e, Mapping) and "input_ids" in e and "labels" in e for e in data):
        raise ValueError(f"{name} must hold encoded examples with 'input_ids' and 'labels' (prompts.encode_examples).")
    if not any(t != -100 for e in data for t in e["labels"][1:]):
        raise ValueError(f"{name} has no completion tokens to score (every label is -100).")
    return data


def _nll_sum(model, batch: Sequence[Mapping]) -> torch.Tensor:
    """Summed NLL of the completion tokens of a batch, as completion_loss counts them."""
    device = next(model.parameters()).device
    ids = right_pad([e["input_ids"] for e in batch], 0).to(device)
    mask = right_pad([[1] * len(e["input_ids"]) for e in batch], 0).to(device)
    tgt = right_pad([e["labels"] for e in batch], -100).to(device)[:, 1:]  # token t is predicted at t-1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="sum")


def _vector_gradients(model, layers, data: Sequence[Mapping], batch_size: int) -> tuple[torch.Tensor, float]:
    """dL/dv_l for every layer at the current ranks, (L, R) float64, and the loss itself.

    A prepended hook keeps the raw bottleneck h = x A, and an appended one adds h * g_l after
    the controller has applied v_l; with g_l = 0 the output is unchanged and dL/dg_l = dL/dv_l.
    """
    weight = peft_seam.factors(layers[0][1])[0]
    gates = [torch.zeros(weight.shape[0], device=weight.device, requires_grad=True) for _ in layers]
    raw: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, inputs, output):
            raw[i] = output
        return hook

    def gate(i):
        def hook(module, inputs, output):
            return output + raw.pop(i) * gates[i].to(output.dtype)
        return hook

    handles = []
    for i, (_, layer) in enumerate(layers):
        handles.append(peft_seam.add_bottleneck_hook(layer, keep(i), prepend=True))
        handles.append(peft_seam.add_bottleneck_hook(layer, gate(i)))
    n_tokens = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in data)
    order = sorted(data, key=lambda e: len(e["input_ids"]))  # less padding; the sum does not care
    grads = torch.zeros(len(layers), weight.shape[0], dtype=torch.float64)
    total = 0.0
    try:
        with torch.enable_grad():
            for start in range(0, len(order), batch_size):
                nll = _nll_sum(model, order[start:start + batch_size])
                for i, g in enumerate(torch.autograd.grad(nll / n_tokens, gates)):
                    grads[i] += g.detach().double().cpu()
                total += float(nll.detach())
    finally:
        for h in handles:
            h.remove()
        raw.clear()
    return grads, total / n_tokens


# -- the greedy path --------------------------------------------------------------------------

class _Greedy:
    """Walks the greedy path; `at(budget)` returns the allocation of a budget (budgets ascending).

    `score(pattern)` gives the gain of every layer's every move at the ranks `pattern`, (L, C-1),
    and the calibration loss it measured (None if it measured none). It is called when the first
    move is needed and again each time the adapter has grown by `refresh` (never with refresh=inf:
    a fixed table). With `positive_only`, moves that gain nothing are never taken.
    """

    def __init__(self, names: list[str], sizes: torch.Tensor, choices: list[int], score, refresh: float, bar,
                 positive_only: bool = False):
        self.names, self.sizes, self.choices, self.score = names, sizes, choices, score  # sizes (L,): m_l + n_l
        self.refresh, self.bar, self.positive_only = refresh, bar, positive_only
        ks = torch.tensor(choices, dtype=torch.float64)
        self.cost = self.sizes[:, None] * (ks[1:] - ks[:-1])[None, :]  # (L, C-1) parameters each move adds
        self.idx = torch.zeros(len(self.names), dtype=torch.long)  # index into choices, per layer
        self.params = float(choices[0] * self.sizes.sum())
        self.estimated_gain = 0.0
        self.refreshes: list[dict] = []
        self.gain = None  # (L, C-1) estimated loss drop of each move; scored when first needed

    def pattern(self, idx: torch.Tensor | None = None) -> dict[str, int]:
        idx = self.idx if idx is None else idx
        return {name: self.choices[i] for name, i in zip(self.names, idx.tolist())}

    def _score(self) -> None:
        """Recompute the gains of every layer's next move at the current ranks."""
        self.gain, loss = self.score(self.pattern())
        self.scored_at = self.params
        if loss is not None:
            self.refreshes.append({"params": int(self.params), "calibration_loss": loss})
            if self.bar is not None:
                self.bar.set_postfix(gradient_passes=len(self.refreshes), loss=f"{loss:.4f}")

    def _best(self, idx: torch.Tensor, room: float | None) -> int | None:
        """The layer whose next move has the best gain per parameter (among those that fit in `room`)."""
        open_ = idx < len(self.choices) - 1
        rows = torch.arange(len(idx))
        col = idx.clamp(max=len(self.choices) - 2)
        cost = self.cost[rows, col]
        ok = open_ if room is None else open_ & (cost <= room + 1e-9)
        if self.positive_only:
            ok &= self.gain[rows, col] > 0
        if not bool(ok.any()):
            return None
        ratio = torch.where(ok, self.gain[rows, col] / cost, torch.tensor(-math.inf, dtype=torch.float64))
        return int(torch.argmax(ratio))

    def at(self, budget: float) -> tuple[dict[str, int], float, float]:
        """Follow the path while the next move fits, then fill the rest; (pattern, params, estimated gain)."""
        open_ = self.idx < len(self.choices) - 1
        col = self.idx.clamp(max=len(self.choices) - 2)
        if not bool((open_ & (self.cost[torch.arange(len(col)), col] <= budget - self.params + 1e-9)).any()):
            return self.pattern(), self.params, self.estimated_gain  # no move fits: no gradients needed
        if self.gain is None:
            self._score()
        while True:
            layer = self._best(self.idx, None)
            if layer is None:
                break
            col = int(self.idx[layer])
            cost = float(self.cost[layer, col])
            if self.params + cost > budget + 1e-9:
                break
            self.idx[layer] += 1
            self.params += cost
            self.estimated_gain += float(self.gain[layer, col])
            if self.bar is not None:
                self.bar.update(int(cost))
            unit = float(self.sizes.sum())
            if self.params - self.scored_at >= self.refresh * max(self.scored_at, unit):
                self._score()
        idx, params, gain = self.idx.clone(), self.params, self.estimated_gain
        while (layer := self._best(idx, budget - params)) is not None:  # fill with the moves that still fit
            col = int(idx[layer])
            idx[layer] += 1
            params += float(self.cost[layer, col])
            gain += float(self.gain[layer, col])
        return self.pattern(idx), params, gain


# -- public entry points ----------------------------------------------------------------------

RULES = {"calibration": "first-order loss drop on calibration data",
         "spectrum": "largest sigma^2 / (m + n) of the SVD-ordered adapter, no data"}
ESTIMATORS = {"calibration": "first-order: dL/dv_l from one backward pass per refresh",
              "spectrum": "sigma_i^2 / (m_l + n_l) of the SVD-ordered factors, no data (spectrum.py)"}


def _layer_keys(names: Sequence[str]) -> list[str]:
    """Each layer's name as a set_rank / PEFT rank_pattern key that matches that layer alone."""
    keys = [re.escape(n) if any(o != n and peft_seam.matches(n, o) for o in names) else n for n in names]
    for name in names:
        hits = [k for k in keys if peft_seam.matches(k, name)]
        if len(hits) != 1:
            raise ValueError(f"Layer {name} is also matched by the pattern {[h for h in hits if h != name][0]!r} "
                             "(a dotted suffix), so per-layer ranks cannot name each layer on its own.")
    return keys


def _measure(model, pattern, data, batch_size) -> float:
    with set_rank(model, pattern):
        return completion_loss(model, data, batch_size)["loss"]


def _first_order_score(model, layers, data, choices: list[int], batch_size: int):
    """The calibration rule's `score`: each move's estimated loss drop, -g_l . d (module docstring)."""
    config = get_controller(model).config
    vectors = torch.stack([prefix_weights(config.r, k, config.scaling, config.alpha) for k in choices]).double()
    steps = vectors[1:] - vectors[:-1]  # (C-1, R): d for each move choices[i] -> choices[i+1]

    def score(pattern):
        with set_rank(model, pattern):
            grads, loss = _vector_gradients(model, layers, data, batch_size)
        return -(grads @ steps.T), loss  # (L, C-1)

    return score


def _choices(config, ranks, allow_off: bool, by: str) -> list[int]:
    """The ranks a layer may take (0 first with allow_off)."""
    if ranks is None:  # after SVD order every prefix is the best cut of its rank, trained or not
        ranks = sorted(config.ranks) if by == "calibration" else range(1, config.r + 1)
    ranks = list(ranks)
    if not ranks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.r for k in ranks):
        raise ValueError(f"ranks={ranks!r} must be integers in 1..{config.r}, e.g. the trained "
                         f"{sorted(config.ranks)} (allow_off=True adds rank 0).")
    return ([0] if allow_off else []) + sorted(set(ranks))


def allocation_curve(
    model: torch.nn.Module | str | Path,
    calibration_data: Sequence[Mapping] | None,
    budgets: str | Budget | Sequence[str | Budget] | None = None,
    heldout_data: Sequence[Mapping] | None = None,
    *,
    by: str = "calibration",
    ranks: Sequence[int] | None = None,
    allow_off: bool = False,
    refresh: float = 0.25,
    batch_size: int = 8,
    uniform: bool = True,
    progress: bool = True,
) -> AllocationCurve:
    """Allocate per-layer ranks at several budgets from one greedy path (the Pareto curve).

    The path is computed once up to the largest budget; each budget takes its allocation from
    it, and its loss on the data given is then measured.

    Args:
        model: A matryoshka model (load_matryoshka_model); its mode is restored afterwards.
            With by="spectrum" also an SVD-ordered adapter directory, read without a base model
            (nothing is measured then).
        calibration_data: Encoded examples ({"input_ids", "labels"}, `prompts.encode_examples`)
            whose completion loss steers the calibration search. by="spectrum" uses no data:
            pass None, or examples whose loss is only measured.
        budgets: Budgets (`parse_budgets`); default: the size of every uniform rank in S and the
            geometric midpoints between neighbours (avg-rank:1, 1.41, 2, 2.83, ...).
        heldout_data: Encoded examples not used for calibration; their loss is measured at each
            point and for each uniform rank.
        by: "calibration" (first-order loss drop on calibration_data) or "spectrum" (the
            largest sigma^2 / (m + n) of an SVD-ordered adapter, no data; spectrum.py).
        ranks: The ranks a layer may take. Default: the trained set S for calibration, every
            rank 1..R for spectrum (after SVD order each prefix is the best cut of its rank).
        allow_off: Let a layer stay at rank 0 (adapter off); the path then starts at 0.
        refresh: Calibration: recompute the gradients after the adapter has grown by this fraction.
        batch_size: Sequences per forward/backward pass.
        uniform: Also measure every uniform rank in S, for comparison (needs the model and data).
        progress: Show a progress bar (parameters added along the path).

    Returns:
        An `AllocationCurve`: one `Allocation` per budget (ascending), the uniform ranks, and
        the gradient passes; `.write(out_dir)` saves JSON and a PNG plot.

    Raises:
        ValueError: a budget below the smallest allocation (every layer at the smallest rank, or
            0 with allow_off) or above the largest (every layer at the largest); empty or unscored
            data; an unknown rule; by="spectrum" on an adapter that is not SVD-ordered.
    """
    started = time.perf_counter()
    if by not in RULES:
        raise ValueError(f"Unknown allocation rule by={by!r}. Available: " + ", ".join(f"{k} ({v})" for k, v in RULES.items()))
    live = isinstance(model, torch.nn.Module)
    if by == "calibration" and not live:
        raise ValueError(f"by='calibration' needs the model, load_matryoshka_model(base, {str(model)!r}); only "
                         "by='spectrum' works from the adapter directory alone.")
    if by == "calibration" or calibration_data is not None:
        calibration_data = _check_data(calibration_data, "calibration_data")
    if heldout_data is not None:
        heldout_data = _check_data(heldout_data, "heldout_data")
    if not live and (calibration_data is not None or heldout_data is not None):
        raise ValueError("Measuring a loss needs the model: pass load_matryoshka_model(base, adapter_dir) instead of "
                         "the directory, or no data.")
    if not (isinstance(refresh, (int, float)) and refresh > 0):
        raise ValueError(f"refresh={refresh!r} must be a positive fraction, e.g. 0.25 (recompute the gradients "
                         "every time the adapter grows by 25%).")
    if by == "calibration":
        config = get_controller(model).config
        layers = list(peft_seam.lora_layers(model))
        names = [name for name, _ in layers]
        sizes = torch.tensor([a.shape[1] + b.shape[0] for a, b in (peft_seam.factors(layer) for _, layer in layers)],
                             dtype=torch.float64)  # m_l + n_l
        choices = _choices(config, ranks, allow_off, by)
        score, every = _first_order_score(model, layers, calibration_data, choices, batch_size), refresh
    else:
        spectrum = layer_spectra(model)
        config, names, sizes = spectrum.config, spectrum.names, spectrum.sizes
        choices = _choices(config, ranks, allow_off, by)
        gains = spectrum.gains(choices)
        score, every = (lambda pattern: (gains, None)), math.inf  # fixed gains: never re-scored
    unit = int(sizes.sum())
    if budgets is None:
        ks = sorted(config.ranks)
        values = sorted({float(k) for k in ks} | {math.sqrt(a * b) for a, b in zip(ks, ks[1:])})
        budget_list = [Budget("avg-rank", round(v, 4) if v != int(v) else int(v)) for v in values]
    else:
        budget_list = parse_budgets(budgets)
    lo, hi = choices[0] * unit, choices[-1] * unit
    targets = []
    for b in budget_list:
        n = b.to_params(unit, config.r)
        if n < lo:
            raise ValueError(f"Budget {b} ({n:,} params) is below the smallest allocation: every layer at rank "
                             f"{choices[0]} takes {lo:,} params (avg-rank:{choices[0]}). Raise the budget"
                             + ("." if allow_off else ", or pass allow_off=True (--allow-off) to let layers switch off."))
        if n > hi:
            raise ValueError(f"Budget {b} ({n:,} params) is above the largest allocation: every layer at rank "
                             f"{choices[-1]} takes {hi:,} params (avg-rank:{choices[-1]}, "
                             f"fraction:{choices[-1] / config.r:g}). Lower the budget.")
        targets.append((n, b))
    targets.sort(key=lambda t: t[0])

    was_training = live and model.training
    if live:
        model.eval()
    points = []
    try:
        with tqdm(total=int(targets[-1][0] - lo), desc="allocate (params added)", unit="param", unit_scale=True,
                  disable=not progress) as bar:
            walker = _Greedy(_layer_keys(names), sizes, choices, score, every, bar, positive_only=by == "spectrum")
            for n, b in targets:
                pattern, params, gain = walker.at(n)
                point = Allocation(str(b), n, pattern, int(params), params / unit, estimated_gain=gain)
                if calibration_data is not None or heldout_data is not None:
                    bar.set_description(f"measure {b}")
                    if calibration_data is not None:
                        point.calibration_loss = _measure(model, pattern, calibration_data, batch_size)
                    if heldout_data is not None:
                        point.heldout_loss = _measure(model, pattern, heldout_data, batch_size)
                    bar.set_description("allocate (params added)")
                points.append(point)
        uniform_rows = []
        if uniform and live and (calibration_data is not None or heldout_data is not None):
            for k in sorted(config.ranks):
                row = {"rank": k, "params": k * unit}
                if calibration_data is not None:
                    row["calibration_loss"] = _measure(model, k, calibration_data, batch_size)
                if heldout_data is not None:
                    row["heldout_loss"] = _measure(model, k, heldout_data, batch_size)
                uniform_rows.append(row)
    finally:
        if live:
            model.train(was_training)
    settings = {"by": by, "ranks": choices, "allow_off": allow_off, "refresh": refresh if by == "calibration" else None,
                "batch_size": batch_size, "n_calibration": len(calibration_data) if calibration_data else 0,
                "n_heldout": len(heldout_data) if heldout_data else 0, "layers": len(names), "unit_params": unit,
                "r": config.r, "estimator": ESTIMATORS[by]}
    return AllocationCurve(points, uniform_rows, walker.refreshes, settings, time.perf_counter() - started)


def allocate_ranks(
    model: torch.nn.Module | str | Path,
    calibration_data: Sequence[Mapping] | None,
    budget: str | Budget,
    *,
    by: str = "calibration",
    ranks: Sequence[int] | None = None,
    allow_off: bool = False,
    refresh: float = 0.25,
    batch_size: int = 8,
    progress: bool = True,
) -> Allocation:
    """Choose a rank for every adapted layer so the adapter fits `budget` (greedy).

    See the module docstring for the search and the calibration estimate, and spectrum.py for
    the data-free rule. The model is left in the mode it was in; run the result with
    `set_rank(model, allocation.rank_pattern)` or write it as a plain PEFT adapter with
    `export_rank(model, allocation.rank_pattern, out_dir)` (by="spectrum" picks ranks outside
    S: pass allow_untrained=True, every prefix of an SVD-ordered adapter is the best cut).

    Args:
        model: A matryoshka model (load_matryoshka_model); with by="spectrum" an SVD-ordered
            one (svd_order), or an SVD-ordered adapter directory (svd_adapter; no base model).
        calibration_data: Encoded examples ({"input_ids", "labels"}, `prompts.encode_examples`),
            e.g. 32-128 from the validation split; None for by="spectrum" (or examples whose
            loss is then only measured).
        budget: "params:N", "avg-rank:A" (the size of uniform rank A) or "fraction:F" (of the
            full-rank adapter), or a `Budget`.
        by: "calibration" (first-order loss drop on the calibration data) or "spectrum" (the
            largest sigma^2 / (m + n), no data).
        ranks: The ranks a layer may take (default: S for calibration, 1..R for spectrum).
        allow_off: Let layers stay at rank 0 (adapter off; export leaves them out).
        refresh: Calibration: recompute the gradients after the adapter has grown by this fraction.
        batch_size: Sequences per forward/backward pass.
        progress: Show a progress bar.

    Returns:
        An `Allocation`: rank_pattern {layer: k}, params <= the budget, and the measured
        calibration loss (None when no data was given).

    Raises:
        ValueError: a malformed, negative, too small or too large budget (the message gives
            the valid range), empty calibration data, or (spectrum) an adapter that is not
            SVD-ordered (the message says how to order it).
    """
    if isinstance(budget, (list, tuple)):
        raise ValueError("allocate_ranks takes one budget; use allocation_curve for several.")
    curve = allocation_curve(model, calibration_data, [parse_budget(budget)], by=by, ranks=ranks, allow_off=allow_off,
                             refresh=refresh, batch_size=batch_size, uniform=False, progress=progress)
    return curve.points[0]
