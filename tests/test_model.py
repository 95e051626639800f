"""Equivalence tests: Eq. 7 (diag P) against Eq. 4 (mask sum), LoRA/DyLoRA recovery, Eq. 12-13, set_rank."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, make_model
from peft import LoraConfig, get_peft_model

from matryoshka_lora import MatryoshkaConfig, draw_rank, get_matryoshka_model, rank_scale, set_rank, set_row_ranks
from matryoshka_lora.core.peft_seam import factors, lora_layers

ARCHS = ["llama", "gpt2"]


def reference_model(model, terms):
    """A copy whose LoRA layers compute Eq. 4 by hand: y = base(x) + sum_(q, s) s * x A_q B_q with masks.

    `terms` is a list of (q, s_q). The masked factors (A * M_q, B * M_q) give the same gradient
    flow as slicing, one full product per rank, as the paper's reference form does.
    """
    ref = copy.deepcopy(model)
    for _, layer in lora_layers(ref):
        layer._forward_hooks.clear()
        layer.lora_A["default"]._forward_hooks.clear()

        def forward(x, *args, _layer=layer, **kwargs):
            out = _layer.base_layer(x, *args, **kwargs)
            A, B = factors(_layer)  # (R, m), (n, R)
            R = A.shape[0]
            for q, s in terms:
                mask = (torch.arange(R) < q).to(A.dtype)
                out = out + s * F.linear(F.linear(x, A * mask[:, None]), B * mask[None, :])
            return out

        layer.forward = forward
    return ref


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, input_ids):
    model.zero_grad()
    logits = model(input_ids=input_ids).logits
    (logits.float() ** 2).mean().backward()
    return logits.detach(), grads(model)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_eq4_equals_eq7(arch, scaling, input_ids):
    model = make_model(arch, r=8, ranks=[1, 2, 4, 8], scaling=scaling, alpha=1.5)
    ref = reference_model(model, [(q, rank_scale(q, scaling, 1.5)) for q in [1, 2, 4, 8]])
    out7, g7 = loss_and_grads(model, input_ids)
    out4, g4 = loss_and_grads(ref, input_ids)
    torch.testing.assert_close(out7, out4, atol=1e-5, rtol=1e-5)
    assert set(g7) == set(g4) and len(g7) > 0
    for name in g7:
        torch.testing.assert_close(g7[name], g4[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_dylora_forward_equals_hand_prefix(arch, input_ids):
    model = make_model(arch, r=8, method="dylora", scaling="sqrt", seed=0)
    for step in range(4):
        k = draw_rank(model, step)
        assert k in [1, 2, 4, 8]
        ref = reference_model(model, [(k, rank_scale(k, "sqrt"))])
        out, g = loss_and_grads(model, input_ids)
        out_ref, g_ref = loss_and_grads(ref, input_ids)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        for name in g:
            torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4)
        # columns of A / rows of B beyond k get no gradient (Eq. 2)
        for name, grad in g.items():
            if "lora_A" in name:
                assert torch.count_nonzero(grad[k:]) == 0
            if "lora_B" in name:
                assert torch.count_nonzero(grad[:, k:]) == 0


def test_dylora_draws_are_a_function_of_seed_and_step():
    a = make_model("llama", method="dylora", seed=0)
    draws = [draw_rank(a, s) for s in range(30)]
    assert draws == [draw_rank(a, s) for s in range(30)]
    assert set(draws) == {1, 2, 4, 8}
    b = get_matryoshka_model(BUILDERS["llama"](0), MatryoshkaConfig(r=8, method="dylora", seed=1))
    assert draws != [draw_rank(b, s) for s in range(30)]
    assert draw_rank(make_model("llama", method="matryoshka"), 0) is None


# scaling -> (lora_alpha, use_rslora) giving PEFT's own scale s_R for R=8, alpha=2
PEFT_EQUIV = {"none": (16.0, False), "rank": (2.0, False), "sqrt": (2.0, True)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_lora_method_equals_plain_peft(arch, scaling, input_ids):
    model = make_model(arch, r=8, method="lora", scaling=scaling, alpha=2.0)
    lora_alpha, rslora = PEFT_EQUIV[scaling]
    plain = get_peft_model(BUILDERS[arch](0), LoraConfig(r=8, lora_alpha=lora_alpha, use_rslora=rslora,
                                                        target_modules="all-linear"))
    plain.load_state_dict(model.state_dict())
    assert plain.base_model.model is not model.base_model.model
    out, g = loss_and_grads(model, input_ids)
    out_p, g_p = loss_and_grads(plain.eval(), input_ids)
    torch.testing.assert_close(out, out_p, atol=1e-5, rtol=1e-5)
    for name in g:
        torch.testing.assert_close(g[name], g_p[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_follow_eq12_13(arch):
    """grad_A = D B^T diag(P), grad_B = diag(P) A^T D: P scales each rank component's gradient."""
    model = make_model(arch, r=8, ranks=[1, 2, 4, 8])
    ones = make_model(arch, r=8, method="lora")  # P = 1, same weights (same seeds)
    p = torch.tensor([4, 3, 2, 2, 1, 1, 1, 1.0])
    (_, layer), (_, layer1) = next(iter(lora_layers(model))), next(iter(lora_layers(ones)))
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn_like(layer(x))
    for lay in (layer, layer1):
        (lay(x) * upstream).sum().backward()
    A, B = factors(layer)
    A1, B1 = factors(layer1)
    torch.testing.assert_close(A.grad, A1.grad * p[:, None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(B.grad, B1.grad * p[None, :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scaling", ["none", "sqrt"])
def test_set_rank_equals_hand_computed_prefix(arch, scaling):
    model = make_model(arch, r=8, scaling=scaling, alpha=2.0)
    _, layer = next(iter(lora_layers(model)))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    base = layer.base_layer(x)
    A, B = factors(layer)
    for k in [0, 1, 3, 4, 8]:
        set_rank(model, k)
        expected = base + rank_scale(max(k, 1), scaling, 2.0) * (x @ A[:k].T @ B[:, :k].T) if k else base
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_rank_zero_is_base_model_and_context_restores(arch, input_ids):
    base_logits = BUILDERS[arch](0)(input_ids=input_ids).logits
    model = make_model(arch, r=8)
    train_logits = model(input_ids=input_ids).logits
    with set_rank(model, 0):
        torch.testing.assert_close(model(input_ids=input_ids).logits, base_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=input_ids).logits, train_logits)
    set_rank(model, 4)
    assert not torch.allclose(model(input_ids=input_ids).logits, train_logits)
    set_rank(model, None)
    torch.testing.assert_close(model(input_ids=input_ids).logits, train_logits)


def test_per_layer_and_per_row_ranks(input_ids):
    model = make_model("llama", r=8)
    set_rank(model, 2)
    at2 = model(input_ids=input_ids).logits
    set_rank(model, 8)
    at8 = model(input_ids=input_ids).logits
    with set_rank(model, {"q_proj": 2}, default=2):
        torch.testing.assert_close(model(input_ids=input_ids).logits, at2)
    with set_rank(model, {r"layers\.0\..*": 8, r"layers\.1\..*": 8}):
        torch.testing.assert_close(model(input_ids=input_ids).logits, at8)
    with set_row_ranks(model, [2, 8]):
        mixed = model(input_ids=input_ids).logits
    torch.testing.assert_close(mixed[0], at2[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], at8[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,message", [(9, r"outside 0..r=8"), (-1, "outside"), ("4", "must be an int"),
                                         ({"no_such_layer": 2}, "match no adapted layer")])
def test_set_rank_errors(bad, message):
    model = make_model("llama", r=8)
    with pytest.raises(ValueError, match=message):
        set_rank(model, bad)


def test_p_is_built_once_not_per_layer_or_step(input_ids, monkeypatch):
    import matryoshka_lora.core.model as model_mod

    calls = []
    real = model_mod.rank_weights
    monkeypatch.setattr(model_mod, "rank_weights", lambda *a, **k: calls.append(a) or real(*a, **k))
    model = make_model("llama", r=8)
    first = model(input_ids=input_ids).logits
    second = model(input_ids=input_ids).logits
    assert len(calls) == 1  # every layer of both forwards shares one P
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_optimizer_step_changes_only_adapter(arch, input_ids):
    model = get_matryoshka_model(BUILDERS[arch](0), MatryoshkaConfig(r=8)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B starts at zero, so A first moves on step 2
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n in changed if "lora_B" in n} and {n for n in changed if "lora_A" in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_p_runs_prefix_of_trained_product(arch, input_ids):
    from matryoshka_lora import fold_p
    from matryoshka_lora.core.weighting import rank_weights

    model = make_model(arch, r=8, ranks=[1, 2, 4, 8], scaling="sqrt")
    train_logits = model(input_ids=input_ids).logits
    p = rank_weights(8, [1, 2, 4, 8], scaling="sqrt")
    _, layer = next(iter(lora_layers(model)))
    A, B = (w.detach().clone() for w in factors(layer))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    cfg = fold_p(model)
    assert cfg.folded_from == "matryoshka" and cfg.method == "lora" and cfg.scaling == "none"
    torch.testing.assert_close(model(input_ids=input_ids).logits, train_logits, atol=1e-5, rtol=1e-5)
    for k in (1, 4, 8):
        with set_rank(model, k):
            expected = layer.base_layer(x) + (x @ A[:k].T * p[:k]) @ B[:, :k].T
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already folded"):
        fold_p(model)
    with pytest.raises(ValueError, match="no single P to fold"):
        fold_p(make_model(arch, r=8, method="dylora"))


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_init_bound_and_zero_b(arch):
    r = 16
    peft = make_model(arch, r=r, ranks=[1, 4, 16], init="peft", randomize=False)
    paper = make_model(arch, r=r, ranks=[1, 4, 16], init="paper", randomize=False)
    for (_, lp), (_, lq) in zip(lora_layers(peft), lora_layers(paper)):
        (a_peft, b_peft), (a_paper, b_paper) = factors(lp), factors(lq)
        m = a_peft.shape[1]
        assert float(b_paper.abs().max()) == 0.0 and float(b_peft.abs().max()) == 0.0
        # U(+-1/sqrt(R)) on (R, in): the bound is reached within a few percent, never exceeded
        assert 0.9 / r ** 0.5 < float(a_paper.abs().max()) <= 1 / r ** 0.5
        assert float(a_peft.abs().max()) <= 1 / m ** 0.5 < 0.9 / r ** 0.5
    with pytest.raises(ValueError, match="Unknown init 'kaiming'. Available: peft, paper"):
        MatryoshkaConfig(r=4, init="kaiming")
