"""Train nested adapters with TRL's `SFTTrainer` (optional: `pip install 'matryoshka-lora[trl]'`).

Nothing of TRL's loop changes. P lives in forward hooks on the LoRA layers, so `matryoshka`,
`lora` and `custom` train under any Trainer as they are; two methods need one piece each:
- dylora: the rank draw, `MatryoshkaCallback` (one draw per optimizer step, or per micro-batch);
- multirank: the rows dealt to (split) or stacked at the step's ranks, the `MultirankLoss` mixin.

    from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, save_matryoshka, svd_order
    from matryoshka_lora.sft import sft_trainer
    model = get_matryoshka_model(base, MatryoshkaConfig(r=32, method="dylora"))
    trainer = sft_trainer(model, args=SFTConfig(...), train_dataset=data, processing_class=tok)
    trainer.train()
    svd_order(model)  # mlora train's default deployment rule (TrainConfig.deploy_order)
    save_matryoshka(model, "adapter")
"""

from __future__ import annotations

import functools

from .core.model import get_controller
from .training import MatryoshkaCallback, MultirankLoss


@functools.cache
def trainer_class():
    """`MatryoshkaSFTTrainer`: TRL's SFTTrainer with the multirank loss (built on first use)."""
    try:
        from trl import SFTTrainer
    except ImportError as e:
        raise ImportError("TRL is not installed: pip install 'matryoshka-lora[trl]' (or pip install trl).") from e
    return type("MatryoshkaSFTTrainer", (MultirankLoss, SFTTrainer), {"__doc__": MultirankLoss.__doc__})


def sft_trainer(model, **kwargs):
    """A TRL SFTTrainer for a matryoshka model (from get_matryoshka_model): with the DyLoRA draw
    callback and the multirank loss; every other argument goes to `SFTTrainer` unchanged.

    Pass the model already wrapped, not a `peft_config`: the nested adapter is ours, not a new PEFT one.
    """
    get_controller(model)  # a clear error for a model without nested adapter
    if kwargs.get("peft_config") is not None:
        raise ValueError("Pass a model from get_matryoshka_model() and no peft_config: SFTTrainer would wrap it in a "
                         "second, plain LoRA adapter.")
    callbacks = list(kwargs.pop("callbacks", None) or [])
    if not any(isinstance(c, MatryoshkaCallback) for c in callbacks):
        callbacks.append(MatryoshkaCallback())
    return trainer_class()(model=model, callbacks=callbacks, **kwargs)
