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

The source is a matryoshka model in memory or an adapter directory. A directory is read
with safetensors slices only: export never needs the base model. Every export is written to
a temporary directory next to the target and renamed into place, so an interrupted export
leaves no half-written adapter.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import peft_seam
from .config import MatryoshkaConfig
from .locking import locks_output
from .model import RankController, _resolve, get_controller
from .saving import PEFT_CONFIG_NAME, WEIGHTS_NAME, adapter_lora_config, atomic_directory, check_adapter_dir, check_target
from .weighting import rank_scale

CARD_NAME = "README.md"

# safetensors dtype names, in the order its writer sorts tensors (descending), with element sizes.
_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
                "I32", "U32", "F32", "F64", "I64", "U64"]
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_TORCH_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                 torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.float16: "F16",
                 torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
                 torch.int64: "I64"}


# -- ranks ------------------------------------------------------------------------------------

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


def _untrained_hint(config: MatryoshkaConfig) -> str:
    return (f"the adapter was trained at ranks {', '.join(map(str, config.ranks))}; pick one of them "
            "or pass allow_untrained=True (--allow-untrained) to use this prefix anyway")


def resolve_ranks(
    config: MatryoshkaConfig,
    layer_names: Sequence[str],
    rank: int | Mapping[str, int],
    default: int | None = None,
    allow_untrained: bool = False,
) -> dict[str, int]:
    """The rank of every adapted layer for a deployment (export or merge).

    Args:
        config: The adapter's rank schedule (gives R and the trained ranks S).
        layer_names: Adapted module names, as in `peft_seam.lora_layers`.
        rank: One k in 1..R for every layer, or {layer pattern: k} (patterns match like
            PEFT's rank_pattern; k=0 switches a layer off).
        default: With a dict, the rank of layers no pattern matches (default: R).
        allow_untrained: Accept ranks outside the trained set S.

    Returns:
        {layer name: k}.

    Raises:
        ValueError: k > R, k < 1, k not in S (unless allowed), an unknown pattern, or every layer at 0.
    """
    r = config.r
    if isinstance(rank, Mapping):
        # the same resolution (and pattern check) as set_rank, on a controller that holds no model
        per_layer = _resolve(RankController(config, layer_names), dict(rank), default)
        untrained = sorted({k for k in per_layer.values() if k and k not in config.ranks})
        if untrained and not allow_untrained:
            raise ValueError(f"Per-layer ranks {untrained} were not trained: {_untrained_hint(config)}.")
        if not any(per_layer.values()):
            raise ValueError(f"Every layer is at rank 0 for rank={dict(rank)} (default={default}); "
                             "nothing to deploy. Give at least one layer a rank >= 1.")
        return per_layer
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank={rank!r} must be an int in 1..{r} or a {{layer pattern: rank}} dict.")
    if rank > r:
        raise ValueError(f"rank {rank} is larger than the adapter's maximum rank r={r}; "
                         f"choose a rank in 1..{r} (trained: {', '.join(map(str, config.ranks))}).")
    if rank < 1:
        raise ValueError(f"rank {rank} is not deployable: ranks start at 1 (rank 0 is the base model "
                         f"without adapter); choose a rank in 1..{r}.")
    if rank not in config.ranks and not allow_untrained:
        raise ValueError(f"rank {rank} was not trained: {_untrained_hint(config)}.")
    return {name: rank for name in layer_names}


def _rank_list(rank) -> list:
    if isinstance(rank, str):
        rank = parse_rank_spec(rank)
    if isinstance(rank, (list, tuple)):
        if not rank:
            raise ValueError("rank is an empty list; pass at least one rank, e.g. [1, 4, 16].")
        if len(set(rank)) != len(rank):
            raise ValueError(f"rank {list(rank)} lists a rank twice; list each rank once.")
        return list(rank)
    return [rank]


# -- sources ----------------------------------------------------------------------------------

@dataclass
class _Source:
    """An adapter to cut prefixes from: configs, per-layer factor keys and a tensor reader."""

    config: MatryoshkaConfig
    peft_config: dict
    layers: dict[str, dict[str, str]]  # module -> {"A": key, "B": key}, in file order
    extra: list[str]  # non-LoRA tensors (modules_to_save), copied whole
    origin: str
    _read: object  # (key, k | None, factor | None) -> tensor
    _meta: object  # key -> (dtype name, shape)

    def read(self, key: str, k: int | None = None, factor: str | None = None) -> torch.Tensor:
        """A tensor, or its rank-k prefix: lora_A rows [:k] (k, m), lora_B columns [:, :k] (n, k)."""
        return self._read(key, k, factor)

    def meta(self, key: str) -> tuple[str, list[int]]:
        return self._meta(key)


def _prefix(t, k, factor):
    # slicing works on tensors and on safetensors slices alike
    if k is None:
        return t[:]
    return t[:k] if factor == "A" else t[:, :k]


@contextmanager
def open_source(source) -> Iterator[_Source]:
    """Open a matryoshka model (in memory) or an adapter directory as a prefix source.

    Raises:
        FileNotFoundError / ValueError: see `saving.check_adapter_dir`; a model without adapter.
    """
    if isinstance(source, torch.nn.Module):
        config = get_controller(source).config
        state = peft_seam.adapter_state_dict(source)
        layers, extra = peft_seam.index_keys(list(state), "The model")

        def read(key, k=None, factor=None):
            return _prefix(state[key].detach(), k, factor).contiguous().clone()

        def meta(key):
            return _TORCH_DTYPES[state[key].dtype], list(state[key].shape)

        yield _Source(config, peft_seam.adapter_config_dict(source), layers, extra, "a model in memory", read, meta)
        return
    directory = Path(source)
    config = check_adapter_dir(directory)
    peft_config = peft_seam.config_dict(adapter_lora_config(directory, config))
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        layers, extra = peft_seam.index_keys(list(f.keys()), str(directory))

        def read(key, k=None, factor=None):
            return _prefix(f.get_slice(key), k, factor).contiguous()

        def meta(key):
            s = f.get_slice(key)
            return s.get_dtype(), list(s.get_shape())

        yield _Source(config, peft_config, layers, extra, f"`{directory}`", read, meta)


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


def plain_config(src: _Source, ranks: Mapping[str, int]) -> dict:
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


def _tensor_plan(src: _Source, ranks: Mapping[str, int]) -> list[tuple[str, str, list[int], int | None, str | None]]:
    """(key, dtype, shape, k, factor) of every tensor of the rank-k adapter."""
    plan = []
    for name, keys in src.layers.items():
        k = ranks[name]
        if k == 0:
            continue
        for factor in ("A", "B"):
            dtype, shape = src.meta(keys[factor])
            shape = [k, *shape[1:]] if factor == "A" else [shape[0], k, *shape[2:]]
            plan.append((keys[factor], dtype, shape, k, factor))
    for key in src.extra:
        dtype, shape = src.meta(key)
        plan.append((key, dtype, shape, None, None))
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
    for key, dtype, shape, *_ in order:
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


def _footprint(src: _Source, ranks: Mapping[str, int]) -> Footprint:
    plan = _tensor_plan(src, ranks)
    return Footprint(_safetensors_size(plan, _METADATA), sum(_numel(shape) for _, _, shape, *_ in plan))


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
        ranks = resolve_ranks(src.config, list(src.layers), rank, default, allow_untrained=True)
        if layout == "portable" and len({k for k in ranks.values() if k}) > 1:
            ranks = {name: max(ranks.values()) if k else 0 for name, k in ranks.items()}
        return _footprint(src, ranks)


# -- model card -------------------------------------------------------------------------------

def _rank_text(ranks: Mapping[str, int]) -> str:
    values = set(ranks.values())
    if len(values) == 1:
        return str(values.pop())
    counts = Counter(ranks.values())
    return "per layer: " + ", ".join(f"{counts[k]} layers at rank {k}" for k in sorted(counts)) + \
        (" (rank 0 = left out)" if 0 in counts else "")


def _scale_text(ranks: Mapping[str, int], config: MatryoshkaConfig) -> str:
    ks = sorted({k for k in ranks.values() if k})
    return ", ".join(f"s_{k} = {rank_scale(k, config.scaling, config.alpha):.6g}" for k in ks) + \
        f" (scaling={config.scaling}, alpha={config.alpha:g}; lora_alpha = s_k * k)"


def accuracy_at(results, rank: int, method: str | None = None) -> tuple[str, str, float] | None:
    """(method, metric, score) measured at `rank` in a results file or dict; None if not evaluated."""
    from .recommend import pick_method
    from .report import load_results

    data = results if isinstance(results, Mapping) else load_results(results)
    method = pick_method(data, method)
    row = data["methods"][method]["per_rank"].get(str(rank))
    if row is None or data["metric"] not in row:
        return None
    return method, data["metric"], float(row[data["metric"]])


def model_card(*, title: str, base_model: str | None, rows: list[tuple[str, str]], usage: str,
               library: str = "peft", tags: Sequence[str] = ("lora", "matryoshka-lora")) -> str:
    """A Hugging Face style README: YAML front matter, a table of facts, and how to load it."""
    front = ["---"] + ([f"base_model: {base_model}"] if base_model else []) + \
        [f"library_name: {library}", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(front + [f"# {title}", ""] + table + ["", usage, ""])


def _results_section(results, method, directory: Path) -> str:
    """The measured per-rank table of `method` and its plot (written to `directory/ranks.png`)."""
    from .recommend import pick_method
    from .report import load_results, markdown_table, plot

    data = results if isinstance(results, Mapping) else load_results(results)
    method = pick_method(data, method)
    one = dict(data, methods={method: data["methods"][method]})
    plot(one, directory / "ranks.png")
    return (f"## Measured at every rank of the source adapter\n\n{markdown_table(one)}\n\n"
            f"({data['metric']}; rows from the results the export was given.)\n\n![accuracy by rank](ranks.png)\n")


def _adapter_card(src: _Source, ranks, cfg, size: int, params: int, results, method, directory: Path) -> str:
    base = cfg.get("base_model_name_or_path")
    c = src.config
    rows = [
        ("base model", f"`{base}`" if base else "not recorded in the source adapter"),
        ("rank", _rank_text(ranks)),
        ("scale", _scale_text(ranks, c)),
        ("adapter file", f"`{WEIGHTS_NAME}`, {size:,} bytes"),
        ("trainable parameters", f"{params:,}"),
        ("source", f"nested adapter {src.origin}: method {c.method}, r = {c.r}, "
                   f"trained ranks {', '.join(map(str, c.ranks))}"),
    ]
    uniform = set(ranks.values())
    if results is not None:
        found = accuracy_at(results, uniform.pop(), method) if len(uniform) == 1 else None
        rows.append(("measured accuracy", f"{found[2]:.2f} ({found[1]}, method {found[0]})" if found
                     else "not evaluated at this rank"))
    measured = _results_section(results, method, directory) + "\n" if results is not None else ""
    usage = measured + ("## Load\n\nA plain PEFT LoRA adapter; no matryoshka-lora needed:\n\n```python\n"
             "from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"path/to/this/dir\")\n```\n\n"
             f"Servers that load PEFT LoRA adapters (e.g. vLLM with `--enable-lora --max-lora-rank {max(ranks.values())}` "
             "or more) load it as is.")
    title = f"Rank-{next(iter(set(ranks.values())))} LoRA adapter" if len(set(ranks.values())) == 1 \
        else "Mixed-rank LoRA adapter"
    return model_card(title=title + " cut from a nested (Matryoshka) adapter", base_model=base, rows=rows, usage=usage)


# -- export -----------------------------------------------------------------------------------

LAYOUTS = ("portable", "compact")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def portable_config(src: _Source, ranks: Mapping[str, int]) -> dict:
    """adapter_config.json of the portable per-layer form: one r for every kept layer, scale 1."""
    kept = {name: k for name, k in ranks.items() if k > 0}
    r = max(kept.values())
    cfg = dict(src.peft_config)
    cfg.update(r=r, lora_alpha=r, use_rslora=False, inference_mode=True, rank_pattern={}, alpha_pattern={})
    if len(kept) < len(ranks):
        cfg["target_modules"] = sorted(kept)
    return cfg


def _portable_tensors(src: _Source, ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Each layer's prefix with its scale s_k baked into lora_B, zero-padded to the largest rank."""
    r = max(ranks.values())
    out = {}
    for name, keys in src.layers.items():
        k = ranks[name]
        if k == 0:
            continue
        A, B = src.read(keys["A"], k, "A"), src.read(keys["B"], k, "B")  # (k, m), (n, k)
        B = B * rank_scale(k, src.config.scaling, src.config.alpha)
        out[keys["A"]] = torch.cat([A, A.new_zeros(r - k, *A.shape[1:])])  # (r, m)
        out[keys["B"]] = torch.cat([B, B.new_zeros(B.shape[0], r - k, *B.shape[2:])], 1)  # (n, r)
    out.update({key: src.read(key) for key in src.extra})
    return out


def _write_one(src: _Source, ranks: Mapping[str, int], target: Path, overwrite: bool, results, method,
               layout: str = "portable") -> Path:
    portable = layout == "portable" and len({k for k in ranks.values() if k}) > 1
    cfg = portable_config(src, ranks) if portable else plain_config(src, ranks)
    with atomic_directory(target, overwrite) as tmp:
        if portable:
            tensors = _portable_tensors(src, ranks)
        else:
            tensors = {key: src.read(key, k, factor) for key, _, _, k, factor in _tensor_plan(src, ranks)}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=_METADATA)
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        size = (tmp / WEIGHTS_NAME).stat().st_size
        params = sum(t.numel() for t in tensors.values())
        (tmp / CARD_NAME).write_text(_adapter_card(src, ranks, cfg, size, params, results, method, tmp))
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
    ranks = _rank_list(rank)
    several = isinstance(rank, (list, tuple)) or (isinstance(rank, str) and isinstance(parse_rank_spec(rank), list))
    out_dir = Path(out_dir)
    targets = [out_dir / f"rank-{k}" for k in ranks] if several else [out_dir]
    with open_source(source) as src:
        names = list(src.layers)
        resolved = [resolve_ranks(src.config, names, k, default, allow_untrained) for k in ranks]
        for target in targets:  # refuse before writing anything
            check_target(target, overwrite)
        written = [_write_one(src, per_layer, target, overwrite, results, method, layout)
                   for per_layer, target in zip(resolved, targets)]
    return written if several else written[0]
