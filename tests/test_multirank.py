"""multirank is the exact objective: the mean over S of the rank-r losses, in one stacked forward."""

import pytest
import torch
from transformers import TrainingArguments

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, set_rank
from matryoshka_lora.training import MatryoshkaTrainer
from conftest import BUILDERS, randomize_adapter


def build(method, ranks, r=8):
    model = get_matryoshka_model(BUILDERS["llama"](0), MatryoshkaConfig(r=r, ranks=ranks, method=method, scaling="sqrt"))
    return randomize_adapter(model).train()


def trainer_loss(model, batch, tmp_path):
    trainer = MatryoshkaTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                                    use_cpu=True))
    return trainer.compute_loss(model, dict(batch))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def batch():
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt tokens
    labels[2, -2:] = -100  # rows with different numbers of label tokens
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_single_rank_equals_plain_training_at_that_rank(batch, tmp_path):
    multi = build("multirank", [4])
    loss = trainer_loss(multi, batch, tmp_path)
    loss.backward()
    ref = build("lora", [4], r=8)
    with set_rank(ref, 4):
        ref_loss = ref(**batch).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    g, g_ref = grads(multi), grads(ref)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5)


def test_two_ranks_equal_mean_of_separate_losses(batch, tmp_path):
    multi = build("multirank", [2, 8])
    loss = trainer_loss(multi, batch, tmp_path)
    loss.backward()
    ref = build("multirank", [2, 8])
    losses = []
    for k in (2, 8):
        with set_rank(ref, k):
            losses.append(ref(**batch).loss)
    mean = (losses[0] + losses[1]) / 2
    mean.backward()
    torch.testing.assert_close(loss, mean, atol=1e-6, rtol=1e-6)
    g, g_ref = grads(multi), grads(ref)
    assert g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5)


def test_eval_mode_and_other_methods_use_the_plain_loss(batch, tmp_path):
    model = build("multirank", [2, 8]).eval()
    with set_rank(model, 8):
        expected = model(**batch).loss
        torch.testing.assert_close(trainer_loss(model, batch, tmp_path), expected)
