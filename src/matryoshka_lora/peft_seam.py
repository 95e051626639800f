"""The one place that touches PEFT internals (LoRA layers, their factors and their scale).

PEFT's LoRA forward is `y = base(x) + lora_B(lora_A(dropout(x))) * scaling`. We set
`scaling = 1` (lora_alpha = r) and multiply the output of `lora_A` by the rank vector,
which gives Eq. 7: `y = x W0 + x (A * P) B` with one elementwise scale and no copy of A.
Tested against PEFT >= 0.17, < 0.22 (pinned in pyproject.toml).
"""

from __future__ import annotations

import re
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


def load(model: torch.nn.Module, path, is_trainable: bool = False) -> PeftModel:
    return PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)


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


def adapter_config_dict(model: torch.nn.Module, adapter: str = ADAPTER) -> dict:
    """The adapter config as PEFT writes it to adapter_config.json (sets become sorted lists)."""
    config = model.peft_config[adapter]
    out = config.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    out["inference_mode"] = True
    if out.get("base_model_name_or_path") is None:
        out["base_model_name_or_path"] = getattr(model.get_base_model(), "name_or_path", None) or None
    out["base_model_name_or_path"] = portable_name(out["base_model_name_or_path"])
    return out


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
