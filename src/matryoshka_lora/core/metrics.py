"""AURAC and log-AURAC: the area under the rank-accuracy curve (SPEC Eq. 14-15).

    AURAC     = 1/(r_n - r_1) * sum_i (a_i + a_{i+1})/2 * (r_{i+1} - r_i)
    log-AURAC = the same with log2(r) in place of r

A single rank gives that rank's accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check(ranks: Sequence[float], accuracies: Sequence[float]) -> None:
    problems = []
    if len(ranks) == 0:
        problems.append("ranks is empty; pass at least one (rank, accuracy) pair.")
    if len(ranks) != len(accuracies):
        problems.append(f"ranks has {len(ranks)} entries but accuracies has {len(accuracies)}; pass one accuracy per rank.")
    if any(r <= 0 for r in ranks):
        problems.append(f"ranks must be positive; got {list(ranks)}.")
    if any(b <= a for a, b in zip(ranks, ranks[1:])):
        problems.append(f"ranks must be strictly increasing (sorted, no duplicates); got {list(ranks)}.")
    if any(not math.isfinite(a) for a in accuracies):
        problems.append(f"accuracies must be finite numbers; got {list(accuracies)}.")
    if problems:
        raise ValueError("Cannot compute AURAC:\n  - " + "\n  - ".join(problems))


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) == 1:
        return float(ys[0])
    area = sum((ys[i] + ys[i + 1]) / 2 * (xs[i + 1] - xs[i]) for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def aurac(ranks: Sequence[int], accuracies: Sequence[float]) -> float:
    """Normalised area under accuracy-vs-rank (Eq. 14).

    Args:
        ranks: Strictly increasing positive ranks r_1 < ... < r_n.
        accuracies: Accuracy at each rank, any unit (the result has the same unit).

    Returns:
        The mean accuracy weighted by rank interval width.

    Raises:
        ValueError: empty input, length mismatch, unsorted/duplicate or non-positive ranks.
    """
    _check(ranks, accuracies)
    return _trapezoid([float(r) for r in ranks], [float(a) for a in accuracies])


def log_aurac(ranks: Sequence[int], accuracies: Sequence[float]) -> float:
    """Like `aurac` but on a log2 rank axis (Eq. 15): every doubling counts equally."""
    _check(ranks, accuracies)
    return _trapezoid([math.log2(r) for r in ranks], [float(a) for a in accuracies])
