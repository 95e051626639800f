"""An adapter to cut rank prefixes from: a matryoshka model in memory or an adapter directory.

A directory is read through safetensors slices, so a prefix costs only its own bytes and no
base model is needed. Export, merge and the footprint estimate read adapters through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..core import peft_seam
from ..core.config import MatryoshkaConfig
from ..core.model import get_controller
from ..core.saving import WEIGHTS_NAME, adapter_lora_config, check_adapter_dir
from ..core.weighting import prefix_factors

# safetensors dtype names of torch dtypes
TORCH_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64"}


@dataclass
class AdapterSource:
    """Configs, per-layer factor keys, and readers for whole tensors and rank prefixes."""

    config: MatryoshkaConfig
    peft_config: dict
    layers: dict[str, dict[str, str]]  # module -> {"A": key, "B": key}, in file order
    extra: list[str]  # non-LoRA tensors (modules_to_save), copied whole
    origin: str
    _raw: Callable  # key -> tensor or safetensors slice (both slice the same way)
    _meta: Callable  # key -> (dtype name, shape)
    _live: bool = False  # tensors of a model in memory: hand out copies, never views of its weights

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().clone() if self._live else t.contiguous()  # a file slice is already a fresh tensor

    def read(self, key: str) -> torch.Tensor:
        """A whole tensor."""
        return self._out(self._raw(key)[:])

    def prefix(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Layer `name` at rank k: (A_k (k, m), B_k (n, k), s_k), the rule of `weighting.prefix_factors`."""
        keys, c = self.layers[name], self.config
        A_k, B_k, scale = prefix_factors(self._raw(keys["A"]), self._raw(keys["B"]), k, c.scaling, c.alpha)
        return self._out(A_k), self._out(B_k), scale

    def meta(self, key: str) -> tuple[str, list[int]]:
        return self._meta(key)


@contextmanager
def open_source(source) -> Iterator[AdapterSource]:
    """Open a matryoshka model (in memory) or an adapter directory as a prefix source.

    Raises:
        FileNotFoundError / ValueError: see `saving.check_adapter_dir`; a model without adapter.
    """
    if isinstance(source, torch.nn.Module):
        config = get_controller(source).config
        state = {key: t.detach() for key, t in peft_seam.adapter_state_dict(source).items()}
        layers, extra = peft_seam.index_keys(list(state), "The model")
        yield AdapterSource(config, peft_seam.adapter_config_dict(source), layers, extra, "a model in memory",
                            state.__getitem__, lambda key: (TORCH_DTYPES[state[key].dtype], list(state[key].shape)),
                            _live=True)
        return
    directory = Path(source)
    config = check_adapter_dir(directory)
    peft_config = peft_seam.config_dict(adapter_lora_config(directory, config))
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        layers, extra = peft_seam.index_keys(list(f.keys()), str(directory))

        def meta(key):
            s = f.get_slice(key)
            return s.get_dtype(), list(s.get_shape())

        yield AdapterSource(config, peft_config, layers, extra, f"`{directory}`", f.get_slice, meta)
