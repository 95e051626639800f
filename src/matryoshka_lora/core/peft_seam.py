"""The one place that touches PEFT internals (LoRA layers, their factors and their scale).

PEFT's LoRA forward is `y = base(x) + lora_B(lora_A(dropout(x))) * scaling`. We set
`scaling = 1` (lora_alpha = r) and multiply the output of `lora_A` by the rank vector,
which gives Eq. 7: `y = x W0 + x (A * P) B` with one elementwise scale and no copy of A.
Tested against PEFT >= 0.17, < 0.22 (pinned in pyproject.toml).
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from .models import portable_name

ADAPTER = "default"


def lora_config(r: int, target_modules, lora_dropout: float = 0.0, modules_to_save=None) -> LoraConfig:
    """A PEFT LoraConfig whose own scale is 1, so all scaling lives in P."""
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=target_modules,
        lora_dropout=lora_dropout,
        modules_to_save=modules_to_save,
        use_rslora=False,
        bias="none",
    )


def wrap(model: torch.nn.Module, config: LoraConfig) -> PeftModel:
    return get_peft_model(model, config)


def load(model: torch.nn.Module, path, config: LoraConfig, is_trainable: bool = False) -> PeftModel:
    """The adapter weights in `path` on `model`, with `config` (see `saved_lora_config`) rather
    than PEFT reading adapter_config.json itself."""
    return PeftModel.from_pretrained(model, str(path), config=config, is_trainable=is_trainable)


def short_name(name: str) -> str:
    """Module name relative to the wrapped model (what PEFT's rank_pattern keys match)."""
    for prefix in ("base_model.model.", "module.base_model.model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def lora_layers(model: torch.nn.Module, adapter: str = ADAPTER) -> Iterator[tuple[str, LoraLayer]]:
    """Yield (short name, layer) for every LoRA layer that holds `adapter`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            yield short_name(name), module


def factors(layer: LoraLayer, adapter: str = ADAPTER) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw factors as PEFT stores them: lora_A (R, m) and lora_B (n, R)."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def set_unit_scaling(layer: LoraLayer, adapter: str = ADAPTER) -> None:
    layer.scaling[adapter] = 1.0


def add_bottleneck_hook(layer: LoraLayer, hook: Callable, adapter: str = ADAPTER, prepend: bool = False):
    """Run `hook(module, inputs, output)` on lora_A's output, i.e. on the (..., R) bottleneck.

    `prepend=True` runs it before the hooks already there (so it sees the bottleneck before P).
    """
    return layer.lora_A[adapter].register_forward_hook(hook, prepend=prepend)


def bottleneck_hooks_only(layer: LoraLayer, hook_ids: set[int], adapter: str = ADAPTER) -> bool:
    """True when lora_A runs no hook but the ones whose handle ids are in `hook_ids` (and no pre-hook)."""
    lora_A = layer.lora_A[adapter]
    return not lora_A._forward_pre_hooks and lora_A._forward_hooks.keys() <= hook_ids


def plain_lora(layer: LoraLayer, x: torch.Tensor, kwargs: dict, adapter: str = ADAPTER) -> bool:
    """True when PEFT's forward of `layer` on `x` is exactly `base(x) + lora_B(lora_A(x))` (scale 1),
    with `x` cast to the adapter's dtype where it differs and the sum cast back to the base output's:
    the one adapter active and unmerged, identity dropout, no DoRA or other variant, no LoRA bias,
    no mixed-adapter batch."""
    return (not layer.disable_adapters and not layer.merged and not kwargs
            and layer.active_adapters == [adapter]
            and isinstance(layer.lora_dropout[adapter], torch.nn.Identity)
            and adapter not in getattr(layer, "lora_variant", {})
            and not getattr(layer, "use_dora", {}).get(adapter, False)
            and layer.lora_B[adapter].bias is None
            and layer.scaling[adapter] == 1.0
            and (x.dtype == layer.lora_A[adapter].weight.dtype or getattr(layer, "cast_input_dtype_enabled", True)))


def replace_forward(layer: LoraLayer, forward: Callable) -> None:
    """Run `forward(layer, x, *args, **kwargs)` instead of PEFT's forward for this layer (a bound
    method, so deep copies of the model call it on their own layer)."""
    layer.forward = types.MethodType(forward, layer)


def peft_forward(layer: LoraLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's own forward of `layer` (whatever `replace_forward` installed)."""
    return type(layer).forward(layer, x, *args, **kwargs)


def matches(pattern: str, name: str) -> bool:
    """PEFT's rank_pattern rule: the pattern matches the whole name or a dotted suffix of it."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def base_weight_delta_layout(layer: LoraLayer) -> bool:
    """True when the base weight is stored (in, out) (GPT-2 Conv1D), so a delta must be transposed."""
    return bool(getattr(layer, "fan_in_fan_out", False))


# -- deployment: export, merge, unload --------------------------------------------------------
# PEFT's file layout: adapter_config.json plus safetensors keys "base_model.model.<module>.lora_A.weight".
KEY_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """`base_model.model.<module>.lora_A.weight` -> (module, "A"); None for any other tensor."""
    m = _LORA_KEY.match(key)
    return (m["module"], m["factor"]) if m else None


def lora_key(module: str, factor: str) -> str:
    """The safetensors key PEFT writes for factor "A" or "B" of `module`."""
    return f"{KEY_PREFIX}{module}.lora_{factor}.weight"


def is_unsupported_key(key: str) -> bool:
    """Adapter tensors a rank prefix cannot be cut from (embedding LoRA, DoRA magnitudes)."""
    return any(t in key for t in ("lora_embedding_", "lora_magnitude_vector", ".lora_B.bias"))


def config_dict(config: LoraConfig) -> dict:
    """A LoraConfig as PEFT writes it to adapter_config.json (sets become sorted lists)."""
    out = config.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    out["inference_mode"] = True
    return out


def adapter_config_dict(model: torch.nn.Module, adapter: str = ADAPTER) -> dict:
    """The adapter config of a model in memory, as PEFT writes it to adapter_config.json."""
    out = config_dict(model.peft_config[adapter])
    if out.get("base_model_name_or_path") is None:
        out["base_model_name_or_path"] = getattr(model.get_base_model(), "name_or_path", None) or None
    out["base_model_name_or_path"] = portable_name(out["base_model_name_or_path"])
    return out


# -- adapter_config.json of a nested adapter ----------------------------------------------------
# The fields that set the adapter's structure or scale are checked against what `lora_config`
# writes (`saved_config_problems`): a nested adapter has lora_alpha = r, no patterns, no rsLoRA
# or DoRA. Every other field is PEFT bookkeeping that loading and export rebuild from the
# rank schedule (`saved_lora_config`) instead of reading it, so a damaged one is ignored.

def _target_problem(targets, layer_names) -> str | None:
    """Why `targets` (target_modules as saved) cannot be the targets of `layer_names`, or None."""
    if targets == "all-linear":
        return None
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            return f"target_modules {targets!r} is not a valid regular expression ({e})"
        missed = [n for n in layer_names if not pattern.fullmatch(n)]
    elif isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        missed = [n for n in layer_names if not any(n == t or n.endswith("." + t) for t in targets)]  # PEFT's rule
    else:
        return f"target_modules is {targets!r}; it must be a module name pattern or a list of module names"
    if missed:
        return f"target_modules {targets!r} does not cover the adapted layer {missed[0]} of the weights"
    return None


def saved_config_problems(saved: dict, r: int, layer_names) -> list[str]:
    """What in a nested adapter's adapter_config.json differs from what `lora_config` writes.

    Args:
        saved: adapter_config.json as read.
        r: The adapter's maximum rank.
        layer_names: The adapted modules found in the weights file.
    """
    problems = []
    if saved.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {saved['peft_type']!r}; a nested adapter is a LoRA adapter (peft_type LORA)")
    alpha = saved.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != r:
        problems.append(f"lora_alpha is {alpha!r}; a nested adapter is saved with lora_alpha = r = {r} (PEFT's own "
                        "scale is 1: the rank scales come from scaling and alpha in matryoshka_config.json)")
    for key in ("rank_pattern", "alpha_pattern"):
        if saved.get(key):
            problems.append(f"{key} is {saved[key]!r}; a nested adapter has one r and one scale for every layer")
    for key in ("use_rslora", "use_dora"):
        if saved.get(key) not in (None, False):
            problems.append(f"{key} is {saved[key]!r}; a nested adapter is saved with {key} = false")
    target = _target_problem(saved.get("target_modules"), layer_names)
    return problems + ([target] if target else [])


def saved_lora_config(saved: dict, r: int, lora_dropout: float, modules_to_save) -> LoraConfig:
    """The LoraConfig to load a nested adapter with: `lora_config` with the saved target modules,
    plus the saved base model name (fields of the wrong type are left out)."""
    config = lora_config(r, saved["target_modules"], lora_dropout, modules_to_save)
    for key in ("base_model_name_or_path", "revision"):
        if isinstance(saved.get(key), str):
            setattr(config, key, saved[key])
    if saved.get("fan_in_fan_out") is True:  # PEFT sets it for GPT-2's Conv1D layers
        config.fan_in_fan_out = True
    mapping = saved.get("auto_mapping")
    if isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        config.auto_mapping = mapping
    return config


def index_keys(keys, origin: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group adapter tensor keys by layer: ({module: {"A": key, "B": key}}, other keys), in key order.

    Raises:
        ValueError: tensors a rank prefix cannot be cut from (embedding LoRA, DoRA, LoRA bias),
            a layer with only one factor, or no LoRA factors at all.
    """
    unsupported = [k for k in keys if is_unsupported_key(k)]
    if unsupported:
        raise ValueError(f"{origin} has adapter tensors a rank prefix cannot be cut from ({unsupported[0]}, ...): "
                         "embedding LoRA, DoRA and LoRA bias are not supported by export/merge.")
    layers: dict[str, dict[str, str]] = {}
    extra = []
    for key in keys:
        parsed = parse_lora_key(key)
        if parsed is None:
            extra.append(key)
        else:
            layers.setdefault(parsed[0], {})[parsed[1]] = key
    broken = [m for m, f in layers.items() if set(f) != {"A", "B"}]
    if broken:
        raise ValueError(f"{origin}: layer {broken[0]} has only one of lora_A / lora_B; the adapter is incomplete.")
    if not layers:
        raise ValueError(f"{origin} holds no LoRA factors (no *.lora_A.weight / *.lora_B.weight tensors).")
    return layers, extra


def adapter_state_dict(model: torch.nn.Module, adapter: str = ADAPTER, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors under the keys PEFT writes to adapter_model.safetensors (taken from
    `state_dict`, the full model's, when given: sharded models gather one first)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter)


def base_weight(layer: LoraLayer) -> torch.Tensor:
    """The frozen weight W0 under the LoRA layer: (n, m), or (m, n) for GPT-2 Conv1D."""
    return layer.get_base_layer().weight


def set_merged(layer: LoraLayer, merged: bool, adapter: str = ADAPTER) -> None:
    """Mark the adapter as merged into W0, so PEFT's forward runs the base layer alone.

    While marked, PEFT's own `unmerge()` / `disable_adapter()` would subtract PEFT's full-rank
    delta, not ours: undo a rank merge with `merge.unmerge` only.
    """
    others = [a for a in layer.merged_adapters if a != adapter]
    layer.merged_adapters = others + [adapter] if merged else others  # new list: never mutate a shared default


def is_merged(layer: LoraLayer, adapter: str = ADAPTER) -> bool:
    return adapter in layer.merged_adapters


def unload(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every LoRA layer by its base layer and return the plain transformers model."""
    return model.unload()
