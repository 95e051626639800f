"""Merge a rank prefix into the base weights: a full model with no adapter overhead.

For every adapted layer (SPEC "Inference at any rank", PEFT layout A = lora_A (R, m),
B = lora_B (n, R)):

    W0 <- W0 + s_k B[:, :k] A[:k]        delta (n, m); transposed for GPT-2 Conv1D (fan_in_fan_out)

with (A_k, B_k, s_k) from `weighting.prefix_factors`, the same prefix rule the live model uses at
`set_rank(k)`. `unmerge` subtracts the same delta. Deltas are formed in float32 (or wider) and
added in that precision before casting back, so merge then unmerge returns W0 to within one
rounding of the weight dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..core import peft_seam
from ..core.files import atomic_directory, check_target
from ..core.locking import locks_output
from ..core.model import get_controller
from ..core.models import check_model, load_model, portable_name
from ..core.ranks import parse_rank_spec, resolve_ranks
from ..core.saving import load_matryoshka_model
from ..core.weighting import prefix_factors
from .cards import CARD_NAME, merged_card
from .sources import open_source

_MERGED = "_mlora_merged_rank"  # set on each merged LoRA layer: the rank it was merged at


def _delta(layer, k: int, config) -> torch.Tensor:
    """s_k B_k A_k in the base weight's layout: (n, m), or (m, n) for Conv1D."""
    A, B = peft_seam.factors(layer)  # (R, m), (n, R)
    A_k, B_k, s = prefix_factors(A, B, k, config.scaling, config.alpha)  # (k, m), (n, k), s_k
    dtype = torch.promote_types(peft_seam.base_weight(layer).dtype, torch.float32)
    delta = (B_k.to(dtype) * s) @ A_k.to(dtype)  # (n, k) @ (k, m) -> (n, m)
    return delta.T if peft_seam.base_weight_delta_layout(layer) else delta


def _add(layer, delta: torch.Tensor, sign: int) -> None:
    W = peft_seam.base_weight(layer)
    W.copy_((W.to(delta.dtype) + sign * delta.to(W.device)).to(W.dtype))


@torch.no_grad()
def merge_rank(
    model: torch.nn.Module,
    rank: int | Mapping[str, int],
    *,
    default: int | None = None,
    unload: bool = False,
    allow_untrained: bool = False,
) -> torch.nn.Module:
    """Add the rank-k prefix `s_k A_k B_k` of every layer to its base weight.

    The merged model gives the same outputs as `set_rank(model, rank)` and runs the base
    layers alone (PEFT skips merged adapters). `set_rank` has no effect until `unmerge`.

    Args:
        model: A matryoshka model (get_matryoshka_model / load_matryoshka_model).
        rank: k in 1..R, or {layer pattern: k} per layer (k=0 leaves a layer unchanged).
        default: With a dict, the rank of layers no pattern matches (default: R).
        unload: Return the plain transformers model (LoRA modules removed) instead of the
            PEFT model; it cannot be unmerged, and the PEFT wrapper must not be used again.
        allow_untrained: Accept ranks outside the trained rank set S.

    Returns:
        The same PEFT model (merged), or the unloaded transformers model.

    Raises:
        ValueError: an invalid rank (see ranks.resolve_ranks), or a model already merged.
    """
    controller = get_controller(model)
    layers = list(peft_seam.lora_layers(model))
    merged = [(name, layer) for name, layer in layers if hasattr(layer, _MERGED) or peft_seam.is_merged(layer)]
    if merged:
        name, layer = merged[0]
        how = f"at rank {getattr(layer, _MERGED)}; call unmerge(model)" if hasattr(layer, _MERGED) \
            else "by PEFT; call model.unmerge_adapter()"
        raise ValueError(f"The model is already merged (layer {name} {how} first).")
    c = controller.config
    ranks = resolve_ranks(c.r, c.ranks, controller.layer_names, rank, default, allow_untrained)
    for name, layer in layers:
        k = ranks[name]
        if k:
            _add(layer, _delta(layer, k, controller.config), +1)
        setattr(layer, _MERGED, k)
        peft_seam.set_merged(layer, True)
    return peft_seam.unload(model) if unload else model


@torch.no_grad()
def unmerge(model: torch.nn.Module) -> torch.nn.Module:
    """Subtract what `merge_rank` added, restoring the base weights and the live adapter.

    Raises:
        ValueError: the model is not merged.
    """
    controller = get_controller(model)
    layers = [(name, layer) for name, layer in peft_seam.lora_layers(model) if hasattr(layer, _MERGED)]
    if not layers:
        raise ValueError("The model is not merged; nothing to unmerge (merge it with merge_rank(model, k)).")
    for _, layer in layers:
        k = getattr(layer, _MERGED)
        if k:
            _add(layer, _delta(layer, k, controller.config), -1)
        delattr(layer, _MERGED)
        peft_seam.set_merged(layer, False)
    return model


@locks_output("merge", lambda a: a["out_dir"])
def merge_to_dir(
    base_model: str | torch.nn.Module,
    adapter_dir: str | Path,
    rank: int | Mapping[str, int] | str,
    out_dir: str | Path,
    *,
    default: int | None = None,
    overwrite: bool = False,
    allow_untrained: bool = False,
) -> Path:
    """Load base + nested adapter, merge at rank k, save a full safetensors model to out_dir.

    Args:
        base_model: The base model, or its local path / Hugging Face id (then its tokenizer,
            if it has one, is saved alongside so servers can load the directory directly).
        adapter_dir: A directory written by save_matryoshka.
        rank: As in merge_rank; also the command-line forms "4" or "q_proj=2,v_proj=8".
        out_dir: The model directory to write (atomically).
        default: With a per-layer rank, the rank of layers no pattern matches.
        overwrite: Replace an existing out_dir.
        allow_untrained: Accept ranks outside the trained rank set S.

    Returns:
        out_dir.
    """
    if isinstance(rank, str):
        rank = parse_rank_spec(rank)
    if isinstance(rank, list):
        raise ValueError(f"merge takes one rank (or a per-layer pattern), got {rank}; merge each rank separately.")
    check_target(out_dir, overwrite)  # fail before loading a large model: the output, the adapter, the rank
    with open_source(adapter_dir) as src:
        resolve_ranks(src.config.r, src.config.ranks, list(src.layers), rank, default, allow_untrained)
    name = base_model if isinstance(base_model, (str, Path)) else None
    if name:
        check_model(str(name))
    base, tokenizer = load_model(str(name), dtype="auto") if name else (base_model, None)
    model = load_matryoshka_model(base, adapter_dir)
    config = get_controller(model).config
    plain = merge_rank(model, rank, default=default, unload=True, allow_untrained=allow_untrained)
    with atomic_directory(out_dir, overwrite) as tmp:
        plain.save_pretrained(str(tmp))  # safetensors (the only format transformers >= 5 writes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        base = portable_name(str(name) if name else getattr(plain, "name_or_path", None)) or None
        (Path(tmp) / CARD_NAME).write_text(merged_card(base, rank, default, adapter_dir, config))
    return Path(out_dir)
