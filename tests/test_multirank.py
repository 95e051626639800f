"""multirank with stacked rows is the exact objective: the mean over S of the rank-r losses, in one stacked forward;
split rows (the default) deal the batch's rows over the step's ranks instead."""

import dataclasses

import pytest
import torch
from conftest import BUILDERS, randomize_adapter
from transformers import TrainingArguments

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, set_rank
from matryoshka_lora.core.saving import config_differences
from matryoshka_lora.training import MatryoshkaTrainer


def build(method, ranks, r=8):
    model = get_matryoshka_model(BUILDERS["llama"](0), MatryoshkaConfig(r=r, ranks=ranks, method=method, scaling="sqrt",
                                                                       multirank_rows="stack"))
    return randomize_adapter(model).train()


def trainer_loss(model, batch, tmp_path):
    """The Trainer's loss for `batch`: a training step (its backward included) in training mode, else compute_loss."""
    trainer = MatryoshkaTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                                    use_cpu=True))
    if model.training:
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a real run
        return trainer.training_step(model, dict(batch))
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
    ref = build("lora", [4], r=8)
    with set_rank(ref, 4):
        ref_loss = ref(**batch).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-6, rtol=1e-6)
    g, g_ref = grads(multi), grads(ref)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5)


def test_two_ranks_equal_mean_of_separate_losses(batch, tmp_path):
    multi = build("multirank", [2, 8])
    loss = trainer_loss(multi, batch, tmp_path)
    ref = build("multirank", [2, 8])
    losses = []
    for k in (2, 8):
        with set_rank(ref, k):
            losses.append(ref(**batch).loss)
    mean = (losses[0] + losses[1]) / 2
    mean.backward()
    torch.testing.assert_close(loss, mean.detach(), atol=1e-6, rtol=1e-6)
    g, g_ref = grads(multi), grads(ref)
    assert g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5)


def test_eval_mode_and_other_methods_use_the_plain_loss(batch, tmp_path):
    model = build("multirank", [2, 8]).eval()
    with set_rank(model, 8):
        expected = model(**batch).loss
        torch.testing.assert_close(trainer_loss(model, batch, tmp_path), expected)


def test_ranks_per_step_trains_largest_plus_drawn_ranks(batch, tmp_path):
    cfg = dict(r=8, ranks=[1, 2, 4, 8], method="multirank", scaling="sqrt", multirank_rows="stack")
    model = randomize_adapter(get_matryoshka_model(BUILDERS["llama"](0), MatryoshkaConfig(**cfg, ranks_per_step=2))).train()
    controller = model._mlora_controller
    draws = [controller.step_ranks(step) for step in range(40)]
    assert all(len(d) == 2 and d[-1] == 8 for d in draws)
    assert {d[0] for d in draws} == {1, 2, 4}  # every other rank gets drawn
    assert draws == [controller.step_ranks(step) for step in range(40)]  # a pure function of (seed, step)
    # the step's loss is the mean of the two drawn ranks' losses, gradients included
    loss = trainer_loss(model, batch, tmp_path)
    ref = build("multirank", [1, 2, 4, 8])
    losses = []
    for k in draws[0]:  # a fresh Trainer is at global step 0
        with set_rank(ref, k):
            losses.append(ref(**batch).loss)
    mean = sum(losses) / 2
    mean.backward()
    torch.testing.assert_close(loss, mean.detach(), atol=1e-6, rtol=1e-6)
    g, g_ref = grads(model), grads(ref)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5)
    # all of S is the exact objective
    full = randomize_adapter(get_matryoshka_model(BUILDERS["llama"](0), MatryoshkaConfig(**cfg, ranks_per_step=4)))
    assert full._mlora_controller.step_ranks(3) == [1, 2, 4, 8]


@pytest.mark.parametrize("extra,message", [({"method": "lora", "ranks_per_step": 2}, "method='multirank' only"),
                                           ({"method": "multirank", "ranks_per_step": 5}, "from 1 to")])
def test_ranks_per_step_is_validated(extra, message):
    with pytest.raises(ValueError, match=message):
        MatryoshkaConfig(r=8, ranks=[1, 2, 4, 8], **extra)


def test_multirank_with_activation_checkpointing_equals_without(batch, tmp_path):
    """The recomputed forward of a checkpointed layer runs at the same row ranks as the first one."""
    plain, ckpt = build("multirank", [2, 8]), build("multirank", [2, 8])
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.enable_input_require_grads()
    torch.testing.assert_close(trainer_loss(ckpt, batch, tmp_path), trainer_loss(plain, batch, tmp_path))
    g, g_ref = grads(ckpt), grads(plain)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5)


def split_model(ranks, **extra):
    extra = {"ranks_per_step": len(ranks), **extra}  # every rank of S each step unless the test says otherwise
    config = MatryoshkaConfig(r=8, ranks=ranks, method="multirank", scaling="sqrt", multirank_rows="split", **extra)
    return randomize_adapter(get_matryoshka_model(BUILDERS["llama"](0), config)).train()


def test_split_rows_on_copies_of_one_row_equal_the_stacked_exact_objective(batch, tmp_path):
    """Dealing |S| copies of a row over the ranks is the stacked batch of that row, in another row order."""
    one = {k: v[:1] for k, v in batch.items()}
    copies = {k: v[:1].repeat(3, 1) for k, v in batch.items()}
    stacked, split = build("multirank", [1, 2, 8]), split_model([1, 2, 8])
    torch.testing.assert_close(trainer_loss(split, copies, tmp_path), trainer_loss(stacked, one, tmp_path))
    g, g_ref = grads(split), grads(stacked)
    assert g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5)


def test_split_rows_deal_every_rank_evenly_and_reproducibly():
    controller = split_model([1, 2, 4, 8])._mlora_controller
    deals = {(step, micro): controller.split_rows(step, micro, 6) for step in range(20) for micro in range(2)}
    for rows in deals.values():
        assert sorted(rows.count(k) for k in (1, 2, 4, 8)) == [1, 1, 2, 2]  # 6 rows over 4 ranks
    assert len({tuple(rows) for rows in deals.values()}) == 4  # the offset moves with (step, micro-batch)
    assert deals == {key: controller.split_rows(*key, 6) for key in deals}  # a pure function of them
    drawn = split_model([1, 2, 4, 8], ranks_per_step=2)._mlora_controller
    assert set(drawn.split_rows(3, 0, 5)) == set(drawn.step_ranks(3))  # dealt over the step's ranks only


@pytest.mark.parametrize("extra,message", [({"method": "lora", "multirank_rows": "split"}, "method='multirank' only"),
                                           ({"method": "multirank", "multirank_rows": "spilt"}, "Available: stack")])
def test_multirank_rows_is_validated(extra, message):
    with pytest.raises(ValueError, match=message):
        MatryoshkaConfig(r=8, ranks=[1, 2, 4, 8], **extra)


def test_split_rows_follow_the_micro_batches_of_each_step(tiny_model_dir, tmp_path, monkeypatch):
    """Under gradient accumulation each micro-batch is dealt with its own index, the one DyLoRA's draws use."""
    from matryoshka_lora.core.model import RankController
    from matryoshka_lora.core.models import load_model
    from matryoshka_lora.data.loading import DataConfig, load_examples
    from matryoshka_lora.data.prompts import encode_examples, make_collator
    from matryoshka_lora.training import TrainConfig, train_adapter

    seen = []
    original = RankController.split_rows
    monkeypatch.setattr(RankController, "split_rows",
                        lambda self, step, micro, batch: seen.append((step, micro)) or original(self, step, micro, batch))
    base, tok = load_model(str(tiny_model_dir))
    examples = encode_examples(tok, load_examples(DataConfig(dataset="arith", num_train=16), "train"), chat_template=False)
    train_adapter(base, tok, examples, MatryoshkaConfig(r=4, ranks=[1, 2, 4], method="multirank", multirank_rows="split"),
                  TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, gradient_accumulation_steps=3,
                              learning_rate=1e-3, disable_tqdm=True, deploy_order="none"), collator=make_collator(tok))
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_unset_multirank_options_are_split_rows_over_two_ranks_and_leave_nothing_behind():
    """Unset, multirank trains the default (split rows, rank R plus one drawn rank per step); stacked rows
    default to every rank of S (the exact objective); other methods keep the fields unset, so a config
    can switch method."""
    assert MatryoshkaConfig(ranks=[1, 2, 4, 8], method="multirank").multirank_plan() == ("split", 2)
    assert MatryoshkaConfig(ranks=[1, 2, 4, 8], method="multirank", multirank_rows="stack").multirank_plan() == (
        "stack", 4)
    assert MatryoshkaConfig(r=8, ranks=[8], method="multirank").multirank_plan() == ("split", 1)  # |S| = 1
    c = MatryoshkaConfig(method="multirank")
    assert (c.multirank_rows, c.ranks_per_step) == (None, None)
    assert dataclasses.replace(c, method="lora").method == "lora"
    # configs saved before these fields could be unset wrote "stack" for every method; they still load
    old = {**MatryoshkaConfig(method="lora").to_dict(), "multirank_rows": "stack"}
    assert MatryoshkaConfig.from_dict(old).method == "lora"
    # and a run resumes from their checkpoints: unset and the value it stands for train the same
    assert config_differences(old, MatryoshkaConfig(method="lora")) == []
    m = dict(ranks=[1, 2, 4, 8], method="multirank")
    assert config_differences(MatryoshkaConfig(**m), MatryoshkaConfig(**m, multirank_rows="split",
                                                                      ranks_per_step=2)) == []
    assert config_differences(MatryoshkaConfig(**m, multirank_rows="stack"),
                              MatryoshkaConfig(**m, multirank_rows="stack", ranks_per_step=4)) == []
    assert config_differences(MatryoshkaConfig(**m), MatryoshkaConfig(**m, ranks_per_step=4)) == [
        ("ranks_per_step", 2, 4)]
