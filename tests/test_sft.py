"""TRL's SFTTrainer trains the same nested adapter as our own Trainer (same data, seed and steps)."""

import pytest
import torch

pytest.importorskip("trl")

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model  # noqa: E402
from matryoshka_lora.core.models import load_model  # noqa: E402
from matryoshka_lora.core.peft_seam import adapter_state_dict  # noqa: E402
from matryoshka_lora.data.loading import DataConfig, load_examples  # noqa: E402
from matryoshka_lora.data.prompts import encode_examples, make_collator  # noqa: E402
from matryoshka_lora.training import TrainConfig, train_adapter  # noqa: E402


@pytest.mark.parametrize("method", ["matryoshka", "dylora", "multirank"])
def test_sft_trainer_matches_our_trainer(tiny_model_dir, tmp_path, method):
    from datasets import Dataset
    from trl import SFTConfig

    from matryoshka_lora.sft import sft_trainer

    examples = load_examples(DataConfig(dataset="arith", num_train=16), "train")
    adapter = MatryoshkaConfig(r=4, ranks=[1, 2, 4], method=method, seed=3)
    steps, lr, seed = 4, 3e-3, 3

    base, tok = load_model(str(tiny_model_dir))
    ours = train_adapter(base, tok, encode_examples(tok, examples, chat_template=False), adapter,
                         TrainConfig(output_dir=str(tmp_path / "ours"), max_steps=steps, batch_size=4, learning_rate=lr,
                                     seed=seed, disable_tqdm=True, deploy_order="none"), collator=make_collator(tok))

    base, tok = load_model(str(tiny_model_dir))
    torch.manual_seed(seed)  # the adapter's initialisation, as train_adapter seeds it
    model = get_matryoshka_model(base, adapter)
    data = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in examples])
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=steps, per_device_train_batch_size=4,
                     learning_rate=lr, seed=seed, data_seed=seed, lr_scheduler_type="linear", warmup_steps=0,
                     report_to="none", completion_only_loss=True, disable_tqdm=True, save_strategy="no",
                     dataloader_pin_memory=False, max_length=None, logging_steps=1, bf16=False)
    trainer = sft_trainer(model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()

    a, b = adapter_state_dict(ours.model), adapter_state_dict(model)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"\n{method}: max |adapter difference| TRL vs ours after {steps} steps: {diff:.3g}")
    assert diff < 1e-5
    if method == "dylora":
        ours_draws = ours.draws
        trl_draws = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "MatryoshkaCallback").draws
        assert trl_draws == ours_draws and len(trl_draws) == steps


def test_sft_trainer_refuses_peft_config(tiny_model_dir):
    from peft import LoraConfig

    from matryoshka_lora.sft import sft_trainer
    base, _ = load_model(str(tiny_model_dir))
    with pytest.raises(ValueError, match="no peft_config"):
        sft_trainer(get_matryoshka_model(base, MatryoshkaConfig(r=4)), peft_config=LoraConfig())
