"""Rank weightings: the vector P that sits between the LoRA factors (SPEC Eq. 7, Algorithm 1).

Every method is a choice of P (length R). With `s_q` the scale of rank q and
`P_q = (1,..,1,0,..,0)` (q ones):

    matryoshka  P = sum_{q in S} s_q P_q          ->  P_i = sum_{q in S, q >= i} s_q
    lora        P = s_R * ones(R)
    dylora      P = s_k P_k                        (k drawn from S each step)
    custom      P = sum_{q in S} w_q s_q P_q
    multirank   the exact objective mean_{q in S} loss(s_q P_q): one row-stacked batch per step
                (training.MatryoshkaTrainer); a plain forward in training mode falls back to its
                first-order surrogate P = (1/|S|) sum_q s_q P_q

Evaluating or deploying at rank k uses the same prefix rule as DyLoRA:
`prefix_weights(r, k) = s_k P_k` on the live model, `prefix_factors` (A_k, B_k, s_k) on saved
factors, and `fold_factors` moves a P into lora_A. Nothing else in the package builds P or cuts a prefix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .checks import is_int

METHODS = ("matryoshka", "lora", "dylora", "custom", "multirank")
NO_FIXED_P = ("dylora", "multirank")  # each rank trains with its own s_k P_k: no single P to fold
SCALINGS = ("none", "rank", "sqrt")


def default_ranks(r: int) -> list[int]:
    """All powers of two up to `r`, plus `r` itself when it is not one (e.g. 8 -> [1, 2, 4, 8])."""
    ranks = [1 << i for i in range(int(r).bit_length()) if (1 << i) <= r]
    if ranks and ranks[-1] != r:
        ranks.append(int(r))
    return ranks


def rank_scale(q: int, scaling: str = "none", alpha: float = 1.0) -> float:
    """The scale `s_q = alpha * {1, 1/q, 1/sqrt(q)}` for scaling `none | rank | sqrt`."""
    if scaling == "none":
        return float(alpha)
    if scaling == "rank":
        return float(alpha) / q
    if scaling == "sqrt":
        return float(alpha) / math.sqrt(q)
    raise ValueError(f"Unknown scaling {scaling!r}. Available: {', '.join(SCALINGS)}")


def validate_schedule(
    r,
    ranks,
    method: str = "matryoshka",
    scaling: str = "none",
    alpha: float = 1.0,
    weights=None,
    k=None,
) -> list[str]:
    """Return every problem with a rank schedule, each naming the fix (empty list when valid)."""
    problems: list[str] = []
    if not is_int(r) or r < 1:
        problems.append(f"r={r!r} must be a positive integer (the maximum rank R), e.g. r=32.")
        r = None
    if ranks is None or len(ranks) == 0:
        problems.append("ranks is empty; pass at least one rank, e.g. ranks=[1, 2, 4, 8].")
        ranks = []
    bad_type = [q for q in ranks if not is_int(q)]
    if bad_type:
        problems.append(f"ranks must be integers; got {bad_type}.")
    ints = [q for q in ranks if is_int(q)]
    non_pos = [q for q in ints if q < 1]
    if non_pos:
        problems.append(f"ranks must be positive; remove {non_pos}.")
    dups = sorted({q for q in ints if ints.count(q) > 1})
    if dups:
        problems.append(f"ranks contain duplicates {dups}; list each rank once.")
    if r is not None:
        too_big = [q for q in ints if q > r]
        if too_big:
            problems.append(f"ranks {too_big} are larger than r={r}; drop them or raise r to at least {max(too_big)}.")
    if method not in METHODS:
        problems.append(f"Unknown method {method!r}. Available: {', '.join(METHODS)}.")
    if scaling not in SCALINGS:
        problems.append(f"Unknown scaling {scaling!r}. Available: {', '.join(SCALINGS)}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        problems.append(f"alpha={alpha!r} must be a positive finite number, e.g. alpha=1.0.")
    if weights is not None:
        if method != "custom":
            problems.append(f"weights are only used with method='custom' (got method={method!r}); drop weights or set method='custom'.")
        try:
            wmap = _weight_map(ranks, weights)
        except ValueError as e:
            problems.append(str(e))
        else:
            neg = {q: w for q, w in wmap.items() if not (w >= 0 and math.isfinite(w))}
            if neg:
                problems.append(f"weights must be non-negative and finite; fix {neg}.")
            unknown = [q for q in wmap if q not in ints]
            if unknown:
                problems.append(f"weights name ranks {unknown} that are not in ranks={list(ranks)}.")
    elif method == "custom":
        problems.append("method='custom' needs weights, one non-negative number per rank, e.g. weights={1: 0.5, 8: 0.5}.")
    if method == "dylora":
        if k is None:
            problems.append("method='dylora' needs the sampled rank k; pass k= one of ranks.")
        elif not is_int(k) or k not in ints:
            problems.append(f"k={k!r} is not in ranks={list(ranks)}; DyLoRA draws k from the rank set.")
    return problems


def _weight_map(ranks: Sequence[int], weights) -> dict[int, float]:
    if isinstance(weights, Mapping):
        return {int(q): float(w) for q, w in weights.items()}
    weights = list(weights)
    if len(weights) != len(ranks):
        raise ValueError(
            f"weights has {len(weights)} entries but ranks has {len(ranks)}; give one weight per rank "
            "or a mapping {rank: weight}."
        )
    return {int(q): float(w) for q, w in zip(ranks, weights)}


def check_schedule(r, ranks, method="matryoshka", scaling="none", alpha=1.0, weights=None, k=None) -> None:
    """Raise one ValueError naming every problem with the schedule."""
    problems = validate_schedule(r, ranks, method, scaling, alpha, weights, k)
    if problems:
        raise ValueError("Invalid rank schedule:\n  - " + "\n  - ".join(problems))


def check_rank(r: int, k) -> int:
    """k itself when a layer can run it (0 = base model .. R), else a ValueError naming the range."""
    if not is_int(k) or not 0 <= k <= r:
        raise ValueError(f"rank k={k!r} is outside 0..r={r}; pick a rank between 0 (base model) and {r}.")
    return k


def prefix_weights(r: int, k: int, scaling: str = "none", alpha: float = 1.0) -> torch.Tensor:
    """The rank-k prefix rule `s_k P_k` as the live model's vector: shape (r,), first k entries s_k,
    rest 0. k=0 gives zeros (adapter off). `prefix_factors` is the same rule on the factors."""
    check_rank(r, k)
    p = torch.zeros(r, dtype=torch.float64)
    if k > 0:
        p[:k] = rank_scale(k, scaling, alpha)
    return p.float()


def prefix_factors(A, B, k: int, scaling: str = "none", alpha: float = 1.0):
    """The rank-k prefix of one layer's factors: (A_k, B_k, s_k), so that rank k adds s_k B_k A_k.

    PEFT layout: A = lora_A (R, m) gives its first k rows (k, m), B = lora_B (n, R) its first k
    columns (n, k). Works on tensors and on safetensors slices alike. This is `prefix_weights`
    applied to the factors; merge and export cut ranks with it.
    """
    R = A.get_shape()[0] if hasattr(A, "get_shape") else A.shape[0]
    if not is_int(k) or not 1 <= k <= R:
        raise ValueError(f"rank k={k!r} is outside 1..r={R}; a prefix has between 1 and {R} ranks.")
    return A[:k], B[:, :k], rank_scale(k, scaling, alpha)


def fold_factors(A: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`diag(p) A` (A = lora_A (R, m)): the vector p moved into the factor ("fold"), so the plain
    prefix rule on the result cuts the trained product A diag(p) B."""
    return A * p.to(A.device, A.dtype)[:, None]


def rank_weights(
    r: int,
    ranks: Sequence[int],
    method: str = "matryoshka",
    scaling: str = "none",
    alpha: float = 1.0,
    weights: Mapping[int, float] | Sequence[float] | None = None,
    k: int | None = None,
) -> torch.Tensor:
    """Build the training vector P for one method (SPEC Eq. 7 and Algorithm 1).

    Args:
        r: Maximum rank R (the LoRA bottleneck size).
        ranks: The rank set S, each in 1..r, any order, no duplicates.
        method: "matryoshka" | "lora" | "dylora" | "custom" | "multirank" (its surrogate P).
        scaling: "none" (s=1) | "rank" (s=1/q) | "sqrt" (s=1/sqrt(q)), times `alpha`.
        alpha: Constant multiplier on every scale.
        weights: For "custom", one non-negative weight per rank (list aligned with
            `ranks`, or a mapping rank -> weight).
        k: For "dylora", the rank drawn for this step.

    Returns:
        float32 tensor of shape (r,).

    Raises:
        ValueError: naming every problem with the arguments.
    """
    check_schedule(r, ranks, method, scaling, alpha, weights, k)
    if method == "lora":
        return prefix_weights(r, r, scaling, alpha)
    if method == "dylora":
        return prefix_weights(r, k, scaling, alpha)
    if method == "custom":
        lam = _weight_map(ranks, weights)
    else:
        lam = {q: (1.0 / len(ranks) if method == "multirank" else 1.0) for q in ranks}
    # Algorithm 1 in float64, then cast: P_i = sum_{q >= i} lam_q s_q.
    p = torch.zeros(r, dtype=torch.float64)
    for q in ranks:
        p[:q] += lam.get(q, 0.0) * rank_scale(q, scaling, alpha)
    return p.float()
