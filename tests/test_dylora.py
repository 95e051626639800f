"""DyLoRA's rank draw: one per optimizer step (default) or one per micro-batch (the official code's).

Each mode is checked against its pure function of (seed, step[, micro-batch]), against the rank
each training forward actually ran at, and (micro_batch) for an exact resume.
"""

import json
import random
import shutil

import pytest
from safetensors.torch import load_file

from matryoshka_lora import MatryoshkaConfig
from matryoshka_lora.core.model import get_controller
from matryoshka_lora.experiment import RunConfig, train
from matryoshka_lora.training import MatryoshkaTrainer

RANKS = [1, 2, 4]
SEED = 5


def run_config(model_dir, out, **extra):
    """16 examples, batch 2, 2 micro-batches per step: 4 steps per epoch; 6 steps cross the epoch boundary."""
    return RunConfig.from_flat({
        "model": str(model_dir), "dataset": "arith", "num_train": 16, "validation_size": 4, "max_steps": 6,
        "batch_size": 2, "gradient_accumulation_steps": 2, "r": 4, "ranks": RANKS, "method": "dylora",
        "learning_rate": 3e-3, "logging_steps": 1, "max_length": 1024, "seed": SEED, "output_dir": str(out),
        "disable_tqdm": True, **extra})


def expected_draws(mode, steps, micro):
    if mode == "step":
        return [(s, random.Random(f"{SEED}:{s}").choice(RANKS)) for s in range(steps)]
    return [(s, m, random.Random(f"{SEED}:{s}:{m}").choice(RANKS)) for s in range(steps) for m in range(micro)]


@pytest.mark.parametrize("mode", ["step", "micro_batch"])
def test_each_micro_batch_trains_at_the_drawn_rank(tiny_model_dir, tmp_path, monkeypatch, mode):
    seen = []  # (global step, rank) of every training forward
    original = MatryoshkaTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append((self.state.global_step, get_controller(model).training_k))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(MatryoshkaTrainer, "compute_loss", spy)
    result = train(run_config(tiny_model_dir, tmp_path / mode, dylora_draw=mode))
    expected = expected_draws(mode, 6, 2)
    assert [tuple(d) for d in result.draws] == expected
    if mode == "step":  # the step's rank serves both its micro-batches
        assert seen == [(s, k) for s, k in expected for _ in range(2)]
    else:
        assert seen == [(s, k) for s, _, k in expected]
        assert any(len({k for s2, _, k in expected if s2 == s}) > 1 for s in range(6))  # a step mixes ranks
    meta = json.loads((tmp_path / mode / "train_config.json").read_text())
    assert meta["adapter"]["dylora_draw"] == mode and [tuple(d) for d in meta["dylora_draws"]] == expected


def test_micro_batch_draws_resume_exactly(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = run_config(tiny_model_dir, out, dylora_draw="micro_batch", save_steps=3)
    whole = train(config)
    reference = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # as if killed after checkpoint-3: the later checkpoint and the final files are gone
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    shutil.rmtree(out / "adapter")
    (out / "train_config.json").unlink()
    resumed = train(config.replace(resume=True))
    meta = json.loads((out / "train_config.json").read_text())
    assert meta["resumed_from"].endswith("checkpoint-3")
    assert resumed.draws == whole.draws == expected_draws("micro_batch", 6, 2)
    again = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert max((again[k] - reference[k]).abs().max().item() for k in reference) < 1e-6


def test_unknown_draw_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown dylora_draw 'batch'. Available: step, micro_batch"):
        MatryoshkaConfig(r=4, method="dylora", dylora_draw="batch")
