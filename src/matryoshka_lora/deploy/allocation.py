"""Per-layer ranks under a parameter budget, chosen after training from one nested checkpoint.

Every rank prefix of a nested adapter is a valid adapter, so each adapted layer l can run at
its own rank k_l from the trained set S (the paper's open limitation: it uses one rank for the
whole network). Layer l at rank k costs what export writes for it, lora_A (k, m_l) plus
lora_B (n_l, k):

    params(k) = sum_l k_l (m_l + n_l)

The parts, one module each:
- budget.py: `Budget`, `parse_budget` (`params:N`, `avg-rank:a`, `fraction:f`);
- greedy.py: the greedy path (raise the layer with the largest gain per added parameter); one
  path gives every budget, so `allocation_curve` walks it once (the Pareto curve);
- the gain of a move, one of two rules (`by`): calibration.py, the first-order calibration-loss
  drop over the ranks in S; or spectrum.py, the singular-value energy sigma^2 a step keeps,
  over every rank 1..R of an SVD-ordered adapter, with no data and no model;
- allocation_result.py: `Allocation`, `AllocationCurve`, their table and plot.

This module puts them together. Loss reported for an allocation is always measured
(`evaluation.likelihood.completion_loss`), never the estimate.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core import peft_seam
from ..core.model import get_controller, set_rank
from ..evaluation.likelihood import completion_loss
from .allocation_result import Allocation, AllocationCurve
from .budget import Budget, parse_budget, parse_budgets
from .calibration import check_data, first_order_score
from .greedy import Greedy
from .spectrum import layer_spectra

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


def _measure(model, pattern, calibration_data, heldout_data, batch_size: int) -> dict[str, float]:
    """The measured losses at `pattern` on the data given: {"calibration_loss", "heldout_loss"}."""
    losses = {}
    with set_rank(model, pattern):
        if calibration_data is not None:
            losses["calibration_loss"] = completion_loss(model, calibration_data, batch_size)["loss"]
        if heldout_data is not None:
            losses["heldout_loss"] = completion_loss(model, heldout_data, batch_size)["loss"]
    return losses


def _choices(config, ranks, allow_off: bool, by: str) -> list[int]:
    """The ranks a layer may take (0 first with allow_off)."""
    if ranks is None:  # after SVD order every prefix is the best cut of its rank, trained or not
        ranks = sorted(config.ranks) if by == "calibration" else range(1, config.r + 1)
    ranks = list(ranks)
    if not ranks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.r for k in ranks):
        raise ValueError(f"ranks={ranks!r} must be integers in 1..{config.r}, e.g. the trained "
                         f"{sorted(config.ranks)} (allow_off=True adds rank 0).")
    return ([0] if allow_off else []) + sorted(set(ranks))


def _rule(model, by: str, calibration_data, ranks, allow_off: bool, refresh: float, batch_size: int):
    """(config, layer names, m_l + n_l (L,), the ranks a layer may take, the rule's score, its refresh)."""
    if by == "calibration":
        config = get_controller(model).config
        layers = list(peft_seam.lora_layers(model))
        names = [name for name, _ in layers]
        sizes = torch.tensor([a.shape[1] + b.shape[0] for a, b in (peft_seam.factors(layer) for _, layer in layers)],
                             dtype=torch.float64)  # m_l + n_l
        choices = _choices(config, ranks, allow_off, by)
        score = first_order_score(model, layers, calibration_data, choices, batch_size)
        return config, names, sizes, choices, score, refresh
    spectrum = layer_spectra(model)
    choices = _choices(spectrum.config, ranks, allow_off, by)
    gains = spectrum.gains(choices)  # fixed: never re-scored (refresh = inf)
    return spectrum.config, spectrum.names, spectrum.sizes, choices, lambda pattern: (gains, None), math.inf


def _targets(budgets, unit: int, choices: list[int], config, allow_off: bool) -> list[tuple[int, Budget]]:
    """(parameters, budget) for each budget, ascending; checked against the smallest and largest allocation.

    The default: the size of every uniform rank in S and the geometric midpoints between neighbours.
    """
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
    return sorted(targets, key=lambda t: t[0])


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
        calibration_data = check_data(calibration_data, "calibration_data")
    if heldout_data is not None:
        heldout_data = check_data(heldout_data, "heldout_data")
    if not live and (calibration_data is not None or heldout_data is not None):
        raise ValueError("Measuring a loss needs the model: pass load_matryoshka_model(base, adapter_dir) instead of "
                         "the directory, or no data.")
    if not (isinstance(refresh, (int, float)) and refresh > 0):
        raise ValueError(f"refresh={refresh!r} must be a positive fraction, e.g. 0.25 (recompute the gradients "
                         "every time the adapter grows by 25%).")
    config, names, sizes, choices, score, every = _rule(model, by, calibration_data, ranks, allow_off, refresh,
                                                        batch_size)
    unit = int(sizes.sum())
    targets = _targets(budgets, unit, choices, config, allow_off)
    lo = choices[0] * unit
    measured = calibration_data is not None or heldout_data is not None

    was_training = live and model.training
    if live:
        model.eval()
    points = []
    try:
        with tqdm(total=int(targets[-1][0] - lo), desc="allocate (params added)", unit="param", unit_scale=True,
                  disable=not progress) as bar:
            walker = Greedy(_layer_keys(names), sizes, choices, score, every, bar, positive_only=by == "spectrum")
            for n, b in targets:
                pattern, params, gain = walker.at(n)
                losses = {}
                if measured:
                    bar.set_description(f"measure {b}")
                    losses = _measure(model, pattern, calibration_data, heldout_data, batch_size)
                    bar.set_description("allocate (params added)")
                points.append(Allocation(str(b), n, pattern, int(params), params / unit, estimated_gain=gain, **losses))
        uniform_rows = []
        if uniform and live and measured:
            for k in sorted(config.ranks):
                uniform_rows.append({"rank": k, "params": k * unit,
                                     **_measure(model, k, calibration_data, heldout_data, batch_size)})
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

    See greedy.py for the search, calibration.py for the calibration estimate and spectrum.py for
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
