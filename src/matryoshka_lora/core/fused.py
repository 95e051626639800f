"""The fused LoRA forward: PEFT's outputs and gradients with fewer, larger operations.

PEFT runs, for each LoRA layer, `y = base(x) + lora_B(lora_A(dropout(x))) * scaling`, and we add
one multiply by P on the bottleneck (a hook on lora_A). Where that is exactly `base(x) + (x A^T * P) B^T`
(see `peft_seam.plain_lora`), the fused forward computes it as:

- one A matmul for the layers that read the same input tensor (q/k/v, gate/up):
  `x @ cat(A_q, A_k, A_v)^T`, split into the three bottlenecks;
- no multiply where P is all ones (plain LoRA training, rank R of the rank rule);
- B and the residual add as one `addmm`, and no multiply by PEFT's scale (it is 1).

An input in another dtype than the adapter is cast to it, and the sum back, as PEFT does. Anything
else runs PEFT's own forward: dropout > 0, DoRA, LoRA bias, merged or disabled adapters, extra
hooks on lora_A (calibration), `adapter_names` batches. The weights and the saved format are
PEFT's either way; `set_fused(model, False)` switches back to PEFT's forward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import peft_seam

# Sibling modules that read one input tensor in the common decoder blocks (Llama, Mistral, Qwen,
# Gemma, Mixtral experts, BERT). The sharing is also checked at run time (the same tensor object):
# a group whose members get different inputs computes each bottleneck on its own, still exactly.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


class SharedInput:
    """LoRA layers that read the same input: the first to see a tensor computes every bottleneck.

    The result is kept until each member has taken its slice; a member that comes back for the same
    tensor, or finds the weights or the input changed in place since, computes afresh.
    """

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.layers = list(layers)
        self.shared = True  # False once the members were seen reading different inputs
        self._x = self._key = self._parts = None
        self._served: set[int] = set()

    def __deepcopy__(self, memo):  # a copy starts with no cached bottleneck (it may hold a graph)
        new = SharedInput([copy.deepcopy(layer, memo) for layer in self.layers])
        new.shared = self.shared
        return new

    def __getstate__(self):
        return {"layers": self.layers, "shared": self.shared}

    def __setstate__(self, state):
        self.__init__(state["layers"])
        self.shared = state["shared"]

    def _state(self, x: torch.Tensor, weights) -> tuple:
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        return version, tuple(w._version for w in weights), torch.is_grad_enabled()

    def bottleneck(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """`x @ A_index^T` of member `index`, in the adapter's dtype: (..., R)."""
        weights = [peft_seam.factors(layer)[0] for layer in self.layers]  # each (R, m)
        if not self.shared:
            return F.linear(x.to(weights[index].dtype), weights[index])
        if self._x is x and index not in self._served and self._key == self._state(x, weights):
            part = self._parts[index]
            self._served.add(index)
            if len(self._served) == len(self.layers):
                self._x = self._key = self._parts = None
            return part
        if self._x is not None and self._x is not x:
            self.shared = False  # a member read another tensor before all had their slice
            self._x = self._key = self._parts = None
            return F.linear(x.to(weights[index].dtype), weights[index])
        h = F.linear(x.to(weights[0].dtype), torch.cat(weights))  # (..., n_members * R)
        self._x, self._key, self._served = x, self._state(x, weights), {index}
        self._parts = h.split([w.shape[0] for w in weights], dim=-1)
        return self._parts[index]


def fused_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`base(x) + (x A^T * P) B^T`, or PEFT's forward where that is not what PEFT would compute."""
    controller = layer._mlora_controller
    if not (controller.fused and peft_seam.plain_lora(layer, x, kwargs)
            and peft_seam.bottleneck_hooks_only(layer, controller.hook_ids)):
        return peft_seam.peft_forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args)  # (..., n)
    A, B = peft_seam.factors(layer)  # (R, m), (n, R)
    group, index = layer._mlora_shared
    h = group.bottleneck(index, x) if group is not None else F.linear(x.to(A.dtype), A)  # (..., R)
    p = controller.scale(layer._mlora_name, h)
    if p is not None:
        h = h * p
    flat = result.reshape(-1, result.shape[-1])  # (tokens, n)
    if flat.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
        flat = flat.to(h.dtype)  # PEFT adds in the adapter's dtype too (a bf16 base with float32 adapters)
    return torch.addmm(flat, h.reshape(-1, h.shape[-1]), B.t()).view(result.shape).to(result.dtype)


def install(named_layers: Sequence[tuple[str, torch.nn.Module]]) -> None:
    """Give every layer the fused forward and group the ones that share an input (`SHARED_INPUT`)."""
    by_parent: dict[str, dict[str, torch.nn.Module]] = {}
    for name, layer in named_layers:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = layer
        layer._mlora_name = name
        layer._mlora_shared = (None, 0)
        peft_seam.replace_forward(layer, fused_forward)
    for leaves in by_parent.values():
        for names in SHARED_INPUT:
            members = [leaves[n] for n in names if n in leaves]
            if len(members) > 1 and len({peft_seam.factors(m)[0].shape[1] for m in members}) == 1:
                group = SharedInput(members)
                for i, layer in enumerate(members):
                    layer._mlora_shared = (group, i)
