"""Export a rank prefix as a plain PEFT LoRA adapter that any PEFT-based stack loads.

A rank-k prefix is an ordinary rank-k LoRA adapter (SPEC "Inference at any rank"):

    r = k,   lora_A.weight = A[:k]      (k, m)
             lora_B.weight = B[:, :k]   (n, k)
    lora_alpha = s_k * k,  so PEFT's own scale lora_alpha / r equals s_k = rank_scale(k).

One rule for every scaling (none / rank / sqrt): `use_rslora` is never set, because PEFT's
rslora scale `lora_alpha / sqrt(r)` would only cover "sqrt", and PEFT does not support it
together with the `rank_pattern` / `alpha_pattern` of per-layer exports in every path. `lora_alpha` is therefore a
float for "sqrt" (e.g. 2.0 for k=4, alpha=1), which PEFT and vLLM accept.

Per-layer ranks ({layer pattern: k}) become PEFT's `rank_pattern` / `alpha_pattern`; a layer
at rank 0 is left out of `target_modules` and of the weights (PEFT cannot hold r=0).

The source is a matryoshka model in memory or an adapter directory (`sources.py`); prefixes are
cut with `weighting.prefix_factors`, and export never needs the base model. Every export is written to
a temporary directory next to the target and renamed into place, so an interrupted export
leaves no half-written adapter.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core import peft_seam
from ..core.config import MatryoshkaConfig
from ..core.files import atomic_directory, check_target
from ..core.locking import locks_output
from ..core.ranks import parse_rank_spec, rank_list, resolve_ranks
from ..core.saving import PEFT_CONFIG_NAME, WEIGHTS_NAME
from ..core.weighting import rank_scale
from .cards import CARD_NAME, adapter_card
from .sources import AdapterSource, open_source

# safetensors dtype names, in the order its writer sorts tensors (descending), with element sizes.
_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
                "I32", "U32", "F32", "F64", "I64", "U64"]
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


# -- the rank-k adapter -----------------------------------------------------------------------

def _alpha(k: int, config: MatryoshkaConfig) -> float | int:
    """lora_alpha that makes PEFT's scale lora_alpha / k equal s_k."""
    a = rank_scale(k, config.scaling, config.alpha) * k
    return int(round(a)) if abs(a - round(a)) < 1e-9 else a


def _pattern_key(name: str, names: Sequence[str]) -> str:
    """The module name as a rank_pattern key; escaped if, read as a regex, it would match another layer."""
    if any(other != name and peft_seam.matches(name, other) for other in names):
        return re.escape(name)
    return name


def plain_config(src: AdapterSource, ranks: Mapping[str, int]) -> dict:
    """adapter_config.json of the plain PEFT adapter holding `ranks` ({layer: k}, 0 = left out)."""
    kept = {name: k for name, k in ranks.items() if k > 0}
    counts = Counter(kept.values())
    r = max(counts, key=lambda k: (counts[k], k))  # most layers need no pattern entry
    cfg = dict(src.peft_config)
    cfg.update(r=r, lora_alpha=_alpha(r, src.config), use_rslora=False, inference_mode=True)
    names = list(src.layers)
    others = {name: k for name, k in kept.items() if k != r}
    cfg["rank_pattern"] = {_pattern_key(n, names): k for n, k in others.items()}
    cfg["alpha_pattern"] = {_pattern_key(n, names): _alpha(k, src.config) for n, k in others.items()}
    if len(kept) < len(ranks):  # layers at rank 0: name the kept ones so PEFT adapts only those
        cfg["target_modules"] = sorted(kept)
    return cfg


def _tensor_plan(src: AdapterSource, ranks: Mapping[str, int]) -> list[tuple[str, str, list[int]]]:
    """(key, dtype, shape) of every tensor of the rank-k adapter."""
    plan = []
    for name, keys in src.layers.items():
        k = ranks[name]
        if k == 0:
            continue
        for factor in ("A", "B"):
            dtype, shape = src.meta(keys[factor])
            shape = [k, *shape[1:]] if factor == "A" else [shape[0], k, *shape[2:]]
            plan.append((keys[factor], dtype, shape))
    for key in src.extra:
        dtype, shape = src.meta(key)
        plan.append((key, dtype, shape))
    return plan


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _safetensors_size(plan, metadata: Mapping[str, str]) -> int:
    """The exact size of the safetensors file `save_file` writes for `plan`, without writing it.

    Layout: 8-byte header length, a compact JSON header padded with spaces to a multiple of 8,
    then the tensors sorted by dtype (largest first) and name.
    """
    order = sorted(plan, key=lambda t: (-_DTYPE_ORDER.index(t[1]), t[0]))
    header, offset = {"__metadata__": dict(metadata)}, 0
    for key, dtype, shape in order:
        size = _numel(shape) * _DTYPE_BYTES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    n = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + n + (-n) % 8 + offset


_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Footprint:
    """What a rank-k adapter costs: file size in bytes and trainable parameters sum_l k_l (m_l + n_l)."""

    size_bytes: int
    params: int


def _footprint(src: AdapterSource, ranks: Mapping[str, int]) -> Footprint:
    plan = _tensor_plan(src, ranks)
    return Footprint(_safetensors_size(plan, _METADATA), sum(_numel(shape) for _, _, shape in plan))


def rank_footprint(source, rank: int | Mapping[str, int], default: int | None = None,
                   layout: str = "portable") -> Footprint:
    """Size of the exported rank-k adapter file and its parameter count, without writing it.

    Args:
        source: A matryoshka model or an adapter directory (read from its safetensors header only).
        rank: k in 1..R, or {layer pattern: k}.
        default: With a dict, the rank of layers no pattern matches (default: R).
        layout: As in `export_rank`: per-layer ranks in the portable layout are padded to the
            largest one; "compact" counts each layer at its own rank (the parameters it really uses).

    Returns:
        Footprint(size_bytes, params); params also counts modules_to_save tensors.
    """
    with open_source(source) as src:
        ranks = resolve_ranks(src.config.r, src.config.ranks, list(src.layers), rank, default, allow_untrained=True)
        if layout == "portable" and len({k for k in ranks.values() if k}) > 1:
            ranks = {name: max(ranks.values()) if k else 0 for name, k in ranks.items()}
        return _footprint(src, ranks)


# -- export -----------------------------------------------------------------------------------

LAYOUTS = ("portable", "compact")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def portable_config(src: AdapterSource, ranks: Mapping[str, int]) -> dict:
    """adapter_config.json of the portable per-layer form: one r for every kept layer, scale 1."""
    kept = {name: k for name, k in ranks.items() if k > 0}
    r = max(kept.values())
    cfg = dict(src.peft_config)
    cfg.update(r=r, lora_alpha=r, use_rslora=False, inference_mode=True, rank_pattern={}, alpha_pattern={})
    if len(kept) < len(ranks):
        cfg["target_modules"] = sorted(kept)
    return cfg


def _portable_tensors(src: AdapterSource, ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Each layer's prefix with its scale s_k baked into lora_B, zero-padded to the largest rank."""
    r = max(ranks.values())
    out = {}
    for name, keys in src.layers.items():
        k = ranks[name]
        if k == 0:
            continue
        A, B, scale = src.prefix(name, k)  # (k, m), (n, k), s_k
        B = B * scale
        out[keys["A"]] = torch.cat([A, A.new_zeros(r - k, *A.shape[1:])])  # (r, m)
        out[keys["B"]] = torch.cat([B, B.new_zeros(B.shape[0], r - k, *B.shape[2:])], 1)  # (n, r)
    out.update({key: src.read(key) for key in src.extra})
    return out


def _compact_tensors(src: AdapterSource, ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Each kept layer's prefix (A_k, B_k) as it is; its scale s_k goes into lora_alpha."""
    out = {}
    for name, keys in src.layers.items():
        if ranks[name]:
            out[keys["A"]], out[keys["B"]], _ = src.prefix(name, ranks[name])
    out.update({key: src.read(key) for key in src.extra})
    return out


def _write_one(src: AdapterSource, ranks: Mapping[str, int], target: Path, overwrite: bool, results, method,
               layout: str = "portable") -> Path:
    portable = layout == "portable" and len({k for k in ranks.values() if k}) > 1
    cfg = portable_config(src, ranks) if portable else plain_config(src, ranks)
    with atomic_directory(target, overwrite) as tmp:
        if portable:
            tensors = _portable_tensors(src, ranks)
        else:
            tensors = _compact_tensors(src, ranks)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=_METADATA)
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        size = (tmp / WEIGHTS_NAME).stat().st_size
        params = sum(t.numel() for t in tensors.values())
        (tmp / CARD_NAME).write_text(adapter_card(src.config, src.origin, ranks, cfg, size, params, results, method, tmp))
    return target


def serving_notes(top: int, per_layer: bool, layout: str = "portable") -> list[str]:
    """What a user serving an export of largest rank `top` should know (vLLM's rank sizes, the layout)."""
    notes = []
    if top not in VLLM_RANKS:
        up = next((v for v in VLLM_RANKS if v >= top), None)
        notes.append(f"vLLM accepts --max-lora-rank only from {', '.join(map(str, VLLM_RANKS))}: serve rank {top} "
                     f"with --max-lora-rank {up} (vLLM pads the adapter up to it).")
    if per_layer and layout == "portable":
        notes.append(f"per-layer ranks, portable layout: every layer is padded with zeros to rank {top} and its scale "
                     "is baked into lora_B (lora_alpha = r, no rank/alpha patterns), so PEFT, vLLM and llama.cpp "
                     "apply the same scales; --layout compact writes the smaller rank_pattern/alpha_pattern form, "
                     "which only PEFT applies correctly.")
    elif per_layer:
        notes.append("per-layer ranks, compact layout (rank_pattern/alpha_pattern): PEFT applies it correctly; vLLM "
                     "ignores both patterns and llama.cpp reads one alpha, so serve it there with --layout portable.")
    return notes


@locks_output("export", lambda a: a["out_dir"])
def export_rank(
    source,
    rank,
    out_dir: str | Path,
    *,
    default: int | None = None,
    overwrite: bool = False,
    allow_untrained: bool = False,
    results=None,
    method: str | None = None,
    layout: str = "portable",
) -> Path | list[Path]:
    """Write the rank-k prefix of a nested adapter as a plain PEFT LoRA adapter.

    `PeftModel.from_pretrained(base, out_dir)` then gives the same logits as the nested model
    at `set_rank(k)`. The directory holds `adapter_model.safetensors` (lora_A (k, m), lora_B
    (n, k) per layer), `adapter_config.json` (r = k, lora_alpha = s_k * k, the source's
    base_model_name_or_path) and a README model card.

    Args:
        source: A matryoshka model (get_matryoshka_model / load_matryoshka_model) or an adapter
            directory written by save_matryoshka; a directory needs no base model.
        rank: k in 1..R; a list of ranks (one export each, written to `out_dir/rank-<k>`);
            a {layer pattern: k} dict for per-layer ranks (see `layout`; k=0 leaves a layer out); or the command-line form "4", "1,4,16", "q_proj=2,v_proj=8".
        out_dir: Target directory (the parent of the rank-<k> directories for a list).
        default: With a dict, the rank of layers no pattern matches (default: R).
        overwrite: Replace existing output directories (atomically: the old one is removed
            only after the new one is complete).
        allow_untrained: Export prefixes outside the trained rank set S.
        results: A results.json path or dict (see report.py); the card then lists the
            measured accuracy at that rank.
        method: Which method of `results` to read (needed when it holds several).
        layout: Per-layer ranks only. "portable" (default): every kept layer zero-padded to the
            largest rank with its scale baked into lora_B, lora_alpha = r and no patterns, exact in
            PEFT, vLLM and llama.cpp. "compact": PEFT's rank_pattern / alpha_pattern (smaller
            file; vLLM and llama.cpp apply the wrong scales to it).

    Returns:
        The written directory, or a list of them when `rank` is a list.

    Raises:
        ValueError: k > R, k < 1, k not in S, an unknown layer pattern, a corrupt source.
        FileExistsError: an output directory exists and overwrite is False.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}. Available: {', '.join(LAYOUTS)}.")
    ranks = rank_list(rank)
    several = isinstance(rank, (list, tuple)) or (isinstance(rank, str) and isinstance(parse_rank_spec(rank), list))
    out_dir = Path(out_dir)
    targets = [out_dir / f"rank-{k}" for k in ranks] if several else [out_dir]
    with open_source(source) as src:
        names = list(src.layers)
        resolved = [resolve_ranks(src.config.r, src.config.ranks, names, k, default, allow_untrained) for k in ranks]
        for target in targets:  # refuse before writing anything
            check_target(target, overwrite)
        written = [_write_one(src, per_layer, target, overwrite, results, method, layout)
                   for per_layer, target in zip(resolved, targets)]
    return written if several else written[0]
