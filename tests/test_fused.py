"""The fused LoRA forward (core/fused.py) against PEFT's own forward: same outputs, same gradients."""

import copy

import pytest
import torch
from conftest import BUILDERS, VOCAB, randomize_adapter

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, set_rank, set_row_ranks
from matryoshka_lora.core import fused, peft_seam
from matryoshka_lora.core.model import get_controller, set_fused
from matryoshka_lora.core.peft_seam import add_bottleneck_hook, lora_layers
from matryoshka_lora.deploy.merge import merge_rank

IDS = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
MASK = torch.ones_like(IDS)
MASK[0, :4] = 0  # one left-padded row


def pair(arch="llama", **cfg):
    """The same adapter twice: one with the fused forward, one with PEFT's forward."""
    cfg.setdefault("r", 8)
    models = []
    for is_fused in (True, False):
        model = get_matryoshka_model(BUILDERS[arch](0), MatryoshkaConfig(**cfg), fused=is_fused)
        models.append(randomize_adapter(model).train())
    return models


def forward_backward(model):
    out = model(input_ids=IDS, attention_mask=MASK, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


def assert_same(a, b):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "matryoshka", "dylora", "multirank"])
def test_training_outputs_and_gradients_match_peft(arch, method):
    fast, slow = pair(arch, method=method, ranks=[1, 2, 4, 8])
    for model in (fast, slow):
        get_controller(model).draw(3)  # DyLoRA: the same rank in both
    if method == "multirank":  # its training batches are stacked copies at row ranks
        for model in (fast, slow):
            set_row_ranks(model, [1, 4, 8])
    assert_same(forward_backward(fast), forward_backward(slow))


@pytest.mark.parametrize("rank", [0, 1, 3, 8, {"q_proj": 2, "mlp\\..*": 5}])
def test_rank_modes_match_peft(rank):
    fast, slow = pair()
    for model in (fast, slow):
        set_rank(model, rank)
    assert_same(forward_backward(fast), forward_backward(slow))


def test_shared_input_groups_run_one_a_matmul(monkeypatch):
    fast, _ = pair()
    groups = {id(layer._mlora_shared[0]): layer._mlora_shared[0] for _, layer in lora_layers(fast)
              if layer._mlora_shared[0] is not None}
    names = sorted(tuple(n.rsplit(".", 1)[1] for n, layer in lora_layers(fast) if layer._mlora_shared[0] is g)
                   for g in groups.values())
    assert names == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    calls = []
    original = torch.nn.functional.linear

    def counting(x, w, *args):
        calls.append(tuple(w.shape))
        return original(x, w, *args)

    monkeypatch.setattr(fused.F, "linear", counting)  # fused.F is torch.nn.functional: nn.Linear calls it too
    with torch.no_grad():
        fast(input_ids=IDS)
    bottlenecks = [s for s in calls if s[0] in (8, 16, 24)]  # (members * R, in)
    assert sorted(bottlenecks).count((24, 64)) == 2 and sorted(bottlenecks).count((16, 64)) == 2
    assert all(g.shared for g in groups.values())


def test_members_with_different_inputs_stop_sharing_and_stay_exact():
    fast, slow = pair()
    (q, q_slow), (k, k_slow) = layer_pair(fast, slow, "0.self_attn.q_proj"), layer_pair(fast, slow, "0.self_attn.k_proj")
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), q_slow(x))
        torch.testing.assert_close(k(y), k_slow(y))  # k reads another tensor than q
        assert q._mlora_shared[0].shared is False
        torch.testing.assert_close(q(x), q_slow(x))


def layer_pair(fast, slow, suffix):
    return [next(layer for n, layer in lora_layers(m) if n.endswith(suffix)) for m in (fast, slow)]


def test_weights_changed_in_place_are_seen():
    fast, slow = pair()
    (q, _), (k, k_slow) = layer_pair(fast, slow, "0.self_attn.q_proj"), layer_pair(fast, slow, "0.self_attn.k_proj")
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        q(x)  # k's slice is now cached
        for layer in (k, k_slow):
            layer.lora_A["default"].weight.mul_(2)
        torch.testing.assert_close(k(x), k_slow(x))


@pytest.mark.parametrize("case", ["dropout", "extra_hook", "merged", "disabled", "unfused", "modules_to_save"])
def test_falls_back_to_peft_where_not_exact(case, monkeypatch):
    cfg = dict(lora_dropout=0.1) if case == "dropout" else dict(modules_to_save=["lm_head"]) \
        if case == "modules_to_save" else {}
    fast, slow = pair(**cfg)
    for model in (fast, slow):
        model.eval()  # dropout: the same (identity) in both, though PEFT's forward must still run
        if case == "extra_hook":
            for _, layer in lora_layers(model):
                add_bottleneck_hook(layer, lambda m, i, o: o * 0.5)
        if case == "merged":
            merge_rank(model, 4)
    if case == "unfused":
        set_fused(fast, False)
    fallbacks = []
    peft_forward = peft_seam.peft_forward
    monkeypatch.setattr(peft_seam, "peft_forward", lambda *a, **k: fallbacks.append(1) or peft_forward(*a, **k))
    with torch.no_grad():
        if case == "disabled":
            with fast.disable_adapter(), slow.disable_adapter():
                a, b = fast(input_ids=IDS).logits, slow(input_ids=IDS).logits
        else:
            a, b = fast(input_ids=IDS).logits, slow(input_ids=IDS).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    n_layers = len(list(lora_layers(fast)))
    assert len(fallbacks) == (1 if case == "modules_to_save" else 2) * n_layers  # the unfused twin always does


def test_deepcopy_keeps_each_copy_on_its_own_weights():
    fast, slow = pair()
    clone = copy.deepcopy(fast)
    with torch.no_grad():
        for _, layer in lora_layers(clone):
            layer.lora_B["default"].weight.zero_()
        base = clone(input_ids=IDS).logits
        torch.testing.assert_close(fast(input_ids=IDS).logits, slow(input_ids=IDS).logits)
    for _, layer in lora_layers(clone):
        group = layer._mlora_shared[0]
        assert layer.forward.__self__ is layer and (group is None or layer in group.layers)
    with torch.no_grad(), fast.disable_adapter():
        torch.testing.assert_close(base, fast(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_bfloat16_base_with_float32_adapter_matches_peft():
    """PEFT keeps the adapter in float32 on a bf16 model, casts x up and the sum back down."""
    models = []
    for is_fused in (True, False):
        base = BUILDERS["llama"](0).to(torch.bfloat16)
        model = randomize_adapter(get_matryoshka_model(base, MatryoshkaConfig(r=8), fused=is_fused)).train()
        assert next(layer for _, layer in lora_layers(model)).lora_A["default"].weight.dtype == torch.float32
        models.append(model)
    (logits_a, grads_a), (logits_b, grads_b) = (forward_backward(m) for m in models)
    assert logits_a.dtype == torch.bfloat16
    torch.testing.assert_close(logits_a, logits_b, atol=2e-2, rtol=2e-2)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches_peft(reentrant):
    """Checkpointed blocks run forward again in backward: the shared bottleneck is recomputed, not reused."""
    fast, slow = pair()
    for model in (fast, slow):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    assert_same(forward_backward(fast), forward_backward(slow))
