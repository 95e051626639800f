"""Mixed ranks in one batch: each row equals its own single-rank run, in forward and greedy generate."""

import pytest
import torch
from conftest import VOCAB, make_model

from matryoshka_lora import set_rank, set_row_ranks

ARCHS = ["llama", "gpt2"]
ROW_RANKS = [1, 8, 0, 4]  # a cheap tier, a premium tier, the base model and a middle tier together
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def batch(seed=5):
    ids = torch.randint(3, VOCAB, (len(ROW_RANKS), 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for b, pad in enumerate([3, 0, 1, 5]):  # left padding of different lengths
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_rows_equal_single_rank_runs(arch):
    model = make_model(arch, r=8)
    ids, _ = batch()
    with set_row_ranks(model, ROW_RANKS):
        mixed = model(input_ids=ids).logits
    for b, k in enumerate(ROW_RANKS):
        with set_rank(model, k):
            torch.testing.assert_close(mixed[b], model(input_ids=ids[b:b + 1]).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_rows_equal_single_rank_runs(arch):
    model = make_model(arch, r=8)
    model.generation_config.eos_token_id = None  # generate all tokens in every row
    ids, mask = batch()
    with set_row_ranks(model, ROW_RANKS):
        mixed = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    new = mixed.sequences[:, ids.shape[1]:]
    assert new.shape == (len(ROW_RANKS), GEN["max_new_tokens"])
    for b, k in enumerate(ROW_RANKS):
        prompt = ids[b:b + 1, mask[b].bool()]  # the row alone, without padding
        with set_rank(model, k):
            alone = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **GEN)
            same_batch = model.generate(input_ids=ids, attention_mask=mask, **GEN)
        assert torch.equal(new[b], alone.sequences[0, prompt.shape[1]:]), f"row {b} at rank {k}"
        for step, (m, a) in enumerate(zip(mixed.scores, alone.scores)):
            torch.testing.assert_close(m[b], a[0], atol=1e-4, rtol=1e-4, msg=f"row {b} step {step}")
        # against the same padded batch at one rank the match is exact up to float noise
        assert torch.equal(mixed.sequences[b], same_batch.sequences[b])
    assert len({tuple(row.tolist()) for row in new}) > 1  # the tiers really differ


def test_one_masked_bottleneck_per_layer():
    """Each LoRA layer scales its (B, T, R) bottleneck once by a (B, 1, R) mask: no loop over ranks."""
    model = make_model("llama", r=8)
    controller = model._mlora_controller
    shapes = []
    lookup = controller._lookup  # what vector() and the fused forward's scale() both ask

    def spy(name, like):
        out = lookup(name, like)
        shapes.append((tuple(like.shape), tuple(out[0].shape)))
        return out

    controller._lookup = spy
    ids, _ = batch()
    with set_row_ranks(model, ROW_RANKS):
        model(input_ids=ids)
        p = controller.vector(controller.layer_names[0], torch.zeros(4, 9, 8))[:, 0]  # (B, R)
    controller._lookup = lookup
    assert len(shapes) == len(controller.layer_names) + 1
    shapes.pop()
    assert all(out == (len(ROW_RANKS), 1, 8) and like == (len(ROW_RANKS), 9, 8) for like, out in shapes)
    assert torch.equal(p, torch.tensor([[1.0] + [0] * 7, [1.0] * 8, [0.0] * 8, [1.0] * 4 + [0] * 4]))


def test_row_ranks_errors_and_restore():
    model = make_model("llama", r=8)
    ids, _ = batch()
    with set_row_ranks(model, [1, 8]):
        with pytest.raises(ValueError, match="batch of 2 but the model got a batch of 4"):
            model(input_ids=ids)
    assert model._mlora_controller.mode is None  # the context restored training mode
    with pytest.raises(ValueError, match=r"ranks in 0..8"):
        set_row_ranks(model, [1, 9])
