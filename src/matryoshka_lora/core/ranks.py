"""Rank specs: which ranks a model may run, deploy or be scored at, written once.

- `parse_rank_spec`: the command-line forms "4", "1,4,16" (several) and "q_proj=2,v_proj=8" (per layer).
- `rank_list`: one deployment or several.
- `layer_ranks`: a rank or {layer pattern: k} resolved to what each adapted layer runs (0..R).
- `resolve_ranks`: the same for a deployment (export, merge): 1..R and trained, unless allowed.
- `check_sweep_ranks`: the ranks of an evaluation sweep, 1..R.

Everything takes R, the trained rank set S and the adapted layer names; no model is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .checks import is_int
from .peft_seam import matches
from .weighting import check_rank


def parse_rank_spec(spec: str) -> int | list[int] | dict[str, int]:
    """Read a command-line rank: "4", "1,4,16" (several exports) or "q_proj=2,v_proj=8" (per layer)."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise ValueError(f"--rank {spec!r} is empty; pass e.g. --rank 4, --rank 1,4,16 or --rank q_proj=2,v_proj=8.")
    if all("=" in s for s in items):
        out = {}
        for s in items:
            pattern, _, k = s.rpartition("=")
            if not k.strip().isdigit():
                raise ValueError(f"--rank {spec!r}: {s!r} must be pattern=rank with an integer rank, e.g. q_proj=2.")
            out[pattern.strip()] = int(k)
        return out
    if any("=" in s for s in items):
        raise ValueError(f"--rank {spec!r} mixes ranks and pattern=rank pairs; use one form "
                         "(--rank 1,4,16 or --rank q_proj=2,v_proj=8 with --default-rank).")
    if not all(s.isdigit() for s in items):
        raise ValueError(f"--rank {spec!r} must be integers, e.g. --rank 4 or --rank 1,4,16.")
    ranks = [int(s) for s in items]
    return ranks[0] if len(ranks) == 1 else ranks


def rank_list(rank) -> list:
    """The deployments asked for: a list of ranks, or one rank / per-layer dict as a list of one."""
    if isinstance(rank, str):
        rank = parse_rank_spec(rank)
    if isinstance(rank, (list, tuple)):
        if not rank:
            raise ValueError("rank is an empty list; pass at least one rank, e.g. [1, 4, 16].")
        if len(set(rank)) != len(rank):
            raise ValueError(f"rank {list(rank)} lists a rank twice; list each rank once.")
        return list(rank)
    return [rank]


def layer_ranks(r: int, layer_names: Sequence[str], rank, default: int | None = None) -> int | dict[str, int]:
    """What every adapted layer runs: an int k in 0..R as it is, or {layer pattern: k} as {layer: k}.

    Patterns match like PEFT's rank_pattern (the whole name or a dotted suffix; the last matching
    pattern wins); layers no pattern matches run `default` (R when None).

    Raises:
        ValueError: a rank outside 0..R, or a pattern that matches no layer.
    """
    if isinstance(rank, Mapping):
        unknown = [p for p in rank if not any(matches(p, n) for n in layer_names)]
        if unknown:
            examples = ", ".join(list(layer_names)[:3])
            raise ValueError(f"Layer patterns {unknown} match no adapted layer. Adapted layers look like: {examples}, ...")
        fallback = r if default is None else default
        per_layer = {}
        for name in layer_names:
            hits = [k for p, k in rank.items() if matches(p, name)]
            per_layer[name] = hits[-1] if hits else fallback
        for k in set(per_layer.values()):
            check_rank(r, k)
        return per_layer
    if not is_int(rank):
        raise ValueError(f"rank={rank!r} must be an int in 0..{r}, a {{layer pattern: rank}} dict, or None for training.")
    return check_rank(r, rank)


def _untrained_hint(trained: Sequence[int]) -> str:
    return (f"the adapter was trained at ranks {', '.join(map(str, trained))}; pick one of them "
            "or pass allow_untrained=True (--allow-untrained) to use this prefix anyway")


def resolve_ranks(r: int, trained: Sequence[int], layer_names: Sequence[str], rank, default: int | None = None,
                  allow_untrained: bool = False) -> dict[str, int]:
    """The rank of every adapted layer for a deployment (export or merge).

    Args:
        r: The adapter's maximum rank R.
        trained: Its trained rank set S.
        layer_names: Adapted module names, as in `peft_seam.lora_layers`.
        rank: One k in 1..R for every layer, or {layer pattern: k} (k=0 switches a layer off).
        default: With a dict, the rank of layers no pattern matches (default: R).
        allow_untrained: Accept ranks outside S.

    Returns:
        {layer name: k}.

    Raises:
        ValueError: k > R, k < 1, k not in S (unless allowed), an unknown pattern, or every layer at 0.
    """
    if isinstance(rank, Mapping):
        per_layer = layer_ranks(r, layer_names, dict(rank), default)
        untrained = sorted({k for k in per_layer.values() if k and k not in trained})
        if untrained and not allow_untrained:
            raise ValueError(f"Per-layer ranks {untrained} were not trained: {_untrained_hint(trained)}.")
        if not any(per_layer.values()):
            raise ValueError(f"Every layer is at rank 0 for rank={dict(rank)} (default={default}); "
                             "nothing to deploy. Give at least one layer a rank >= 1.")
        return per_layer
    if not is_int(rank):
        raise ValueError(f"rank={rank!r} must be an int in 1..{r} or a {{layer pattern: rank}} dict.")
    if rank > r:
        raise ValueError(f"rank {rank} is larger than the adapter's maximum rank r={r}; "
                         f"choose a rank in 1..{r} (trained: {', '.join(map(str, trained))}).")
    if rank < 1:
        raise ValueError(f"rank {rank} is not deployable: ranks start at 1 (rank 0 is the base model "
                         f"without adapter); choose a rank in 1..{r}.")
    if rank not in trained and not allow_untrained:
        raise ValueError(f"rank {rank} was not trained: {_untrained_hint(trained)}.")
    return {name: rank for name in layer_names}


def check_sweep_ranks(r: int, trained: Sequence[int], ranks) -> list[int]:
    """The sorted ranks of an evaluation sweep (default: S), each in 1..R.

    Raises:
        ValueError: an empty list or a rank outside 1..R.
    """
    ranks = sorted(trained if ranks is None else {int(k) for k in ranks})
    if not ranks:
        raise ValueError(f"ranks is empty; pass ranks in 1..r={r}, e.g. {list(trained)}.")
    bad = [k for k in ranks if not 1 <= k <= r]
    if bad:
        raise ValueError(f"ranks {bad} are outside 1..r={r}; the adapter was trained with ranks {list(trained)}.")
    return ranks
