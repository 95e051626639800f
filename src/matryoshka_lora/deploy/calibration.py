"""The calibration rule's estimate: what raising one layer's rank does to the loss, to first order.

Layer l runs `y = x W0 + ((x A) * v_l) B` with `v_l = s_k P_k` (R entries). Raising it from k to
k' changes v_l by `d = s_k' P_k' - s_k P_k`, so

    L(k') - L(k) ~= g_l . d,     g_l = dL/dv_l = sum over tokens of (x A) * dL/d(bottleneck)

An additive gate of zeros on each bottleneck, a leaf tensor, gives every g_l (R numbers per
layer) from one forward and backward pass over the calibration set; the gates do not change
the forward pass. `allocation.allocation_curve(by="calibration")` recomputes the gradients each
time the adapter has grown by `refresh` (25 %) since the last pass, so the estimate follows the
allocation; in between, a layer that was raised is scored with its last gradient. Loss reported
for an allocation is always measured (`evaluation.likelihood.completion_loss`), never this estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..core import peft_seam
from ..core.model import get_controller, set_rank
from ..core.weighting import prefix_weights
from ..evaluation.likelihood import right_pad


def check_data(data: Sequence[Mapping], name: str) -> list[Mapping]:
    """`data` as a list, after checking it holds encoded examples with completion tokens to score."""
    data = list(data) if data is not None else []
    if not data:
        raise ValueError(f"{name} is empty; pass encoded examples (prompts.encode_examples), e.g. 32 or more.")
    if not all(isinstance(e, Mapping) and "input_ids" in e and "labels" in e for e in data):
        raise ValueError(f"{name} must hold encoded examples with 'input_ids' and 'labels' (prompts.encode_examples).")
    if not any(t != -100 for e in data for t in e["labels"][1:]):
        raise ValueError(f"{name} has no completion tokens to score (every label is -100).")
    return data


def _nll_sum(model, batch: Sequence[Mapping]) -> torch.Tensor:
    """Summed NLL of the completion tokens of a batch, as completion_loss counts them."""
    device = next(model.parameters()).device
    ids = right_pad([e["input_ids"] for e in batch], 0).to(device)
    mask = right_pad([[1] * len(e["input_ids"]) for e in batch], 0).to(device)
    tgt = right_pad([e["labels"] for e in batch], -100).to(device)[:, 1:]  # token t is predicted at t-1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="sum")


def vector_gradients(model, layers, data: Sequence[Mapping], batch_size: int) -> tuple[torch.Tensor, float]:
    """dL/dv_l for every layer at the current ranks, (L, R) float64, and the loss itself.

    A prepended hook keeps the raw bottleneck h = x A, and an appended one adds h * g_l after
    the controller has applied v_l; with g_l = 0 the output is unchanged and dL/dg_l = dL/dv_l.
    """
    weight = peft_seam.factors(layers[0][1])[0]
    gates = [torch.zeros(weight.shape[0], device=weight.device, requires_grad=True) for _ in layers]
    raw: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, inputs, output):
            raw[i] = output
        return hook

    def gate(i):
        def hook(module, inputs, output):
            return output + raw.pop(i) * gates[i].to(output.dtype)
        return hook

    handles = []
    for i, (_, layer) in enumerate(layers):
        handles.append(peft_seam.add_bottleneck_hook(layer, keep(i), prepend=True))
        handles.append(peft_seam.add_bottleneck_hook(layer, gate(i)))
    n_tokens = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in data)
    order = sorted(data, key=lambda e: len(e["input_ids"]))  # less padding; the sum does not care
    grads = torch.zeros(len(layers), weight.shape[0], dtype=torch.float64)
    total = 0.0
    try:
        with torch.enable_grad():
            for start in range(0, len(order), batch_size):
                nll = _nll_sum(model, order[start:start + batch_size])
                for i, g in enumerate(torch.autograd.grad(nll / n_tokens, gates)):
                    grads[i] += g.detach().double().cpu()
                total += float(nll.detach())
    finally:
        for h in handles:
            h.remove()
        raw.clear()
    return grads, total / n_tokens


def first_order_score(model, layers, data, choices: list[int], batch_size: int):
    """The calibration rule's `score(pattern)` for the greedy path: each move's estimated loss drop, -g_l . d.

    Returns:
        A function of a rank pattern giving ((L, C-1) gains of every move choices[c] -> choices[c+1],
        the calibration loss measured at that pattern).
    """
    config = get_controller(model).config
    vectors = torch.stack([prefix_weights(config.r, k, config.scaling, config.alpha) for k in choices]).double()
    steps = vectors[1:] - vectors[:-1]  # (C-1, R): d for each move choices[i] -> choices[i+1]

    def score(pattern):
        with set_rank(model, pattern):
            grads, loss = vector_gradients(model, layers, data, batch_size)
        return -(grads @ steps.T), loss  # (L, C-1)

    return score
