"""Training on the Hugging Face Trainer (so `accelerate launch` scales it with DDP/FSDP/DeepSpeed).

`MatryoshkaTrainer` overrides only `compute_loss`, for `multirank`: the batch is stacked |S|
times and row j of copy i runs at rank S_i (one masked bottleneck, `set_row_ranks`), so one
forward/backward gives the exact mean of the |S| rank losses at |S| times the compute.
One callback does the rest:
- DyLoRA: draw one rank per optimizer step (`on_step_begin` runs once per optimizer step, also
  under gradient accumulation). The draw is a pure function of (seed, global_step), so every
  data-parallel process and every resumed run draws the same rank.
- Checkpoints also hold `matryoshka_config.json`, so each one is a loadable nested adapter.
- A NaN/inf loss stops the run with the step number (the last good checkpoint is kept).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .config import MatryoshkaConfig
from .model import draw_rank, get_controller, get_matryoshka_model, set_row_ranks
from .saving import save_matryoshka

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Training knobs (the usual Trainer ones, with defaults that suit LoRA)."""

    output_dir: str = field(default="runs/train", metadata={"help": "Where the adapter, checkpoints, loss curve and config go."})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW peak learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training set (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides num_train_epochs when > 0."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    warmup_steps: float = field(default=0.0, metadata={"help": "Warmup steps (an int), or a fraction of all steps when < 1."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the adapter."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Trainer scheduler: linear | cosine | constant | ..."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and DyLoRA draws."})
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16 mixed precision (GPUs/CPUs that support it)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})
    report_to: str = field(default="none", metadata={"help": "Experiment tracker: none | tensorboard | wandb | ..."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N optimizer steps."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N optimizer steps (0: only the final adapter)."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints to keep."})
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint in output_dir."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def __post_init__(self):
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} must be > 0, e.g. 3e-4.")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            problems.append("set max_steps > 0 or num_train_epochs > 0.")
        for name in ("batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1.")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.save_steps < 0:
            problems.append("warmup_steps, weight_decay and save_steps must be >= 0.")
        if problems:
            raise ValueError("Invalid TrainConfig:\n  - " + "\n  - ".join(problems))

    def training_arguments(self) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(Path(self.output_dir) / "checkpoints"),
            learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            lr_scheduler_type=self.lr_scheduler_type,
            seed=self.seed,
            data_seed=self.seed,
            bf16=self.bf16,
            gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if self.gradient_checkpointing else None,
            report_to=self.report_to,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            save_strategy="steps" if self.save_steps else "no",
            save_steps=self.save_steps or 500,
            save_total_limit=self.save_total_limit,
            remove_unused_columns=False,
            disable_tqdm=self.disable_tqdm,
            optim="adamw_torch",
            dataloader_pin_memory=torch.cuda.is_available(),
        )


class NonFiniteLoss(RuntimeError):
    pass


class MatryoshkaCallback(TrainerCallback):
    """DyLoRA draws, config in every checkpoint, and a stop on a non-finite loss."""

    def __init__(self):
        self.draws: list[tuple[int, int]] = []  # (global_step, k), for logs and tests

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        k = draw_rank(model, state.global_step)
        if k is not None:
            self.draws.append((state.global_step, k))

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLoss(
                f"Loss became {loss} at step {state.global_step}; stopped. The last good checkpoint (if any) is in "
                f"{args.output_dir}. Lower the learning rate or use --dtype float32."
            )

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and state.is_world_process_zero:
            get_controller(model).config.save(ckpt)


def stack_for_ranks(inputs: dict, ranks) -> tuple[dict, torch.Tensor]:
    """Repeat every (B, ...) tensor |S| times along the batch; copy i gets rank ranks[i].

    Returns:
        (inputs with batch |S|*B, row ranks of shape (|S|*B,)).
    """
    tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    batch = next(iter(tensors.values())).shape[0]
    stacked = {k: v.repeat(len(ranks), *([1] * (v.dim() - 1))) for k, v in tensors.items()}
    return {**inputs, **stacked}, torch.tensor(ranks, dtype=torch.long).repeat_interleave(batch)


class MatryoshkaTrainer(Trainer):
    """The HF Trainer, plus the exact multi-rank objective for method="multirank"."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        controller = get_controller(model)
        if controller.config.method != "multirank" or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ranks = controller.config.ranks
        stacked, rows = stack_for_ranks(inputs, ranks)
        if num_items_in_batch is not None:  # every copy has the same label tokens
            num_items_in_batch = num_items_in_batch * len(ranks)
        with set_row_ranks(model, rows):
            return super().compute_loss(model, stacked, return_outputs, num_items_in_batch)


@dataclass
class TrainResult:
    adapter_dir: Path
    model: torch.nn.Module
    log_history: list[dict]
    seconds: float
    draws: list[tuple[int, int]]


def train_adapter(model, tokenizer, train_dataset, adapter: MatryoshkaConfig, config: TrainConfig,
                  collator=None, extra_metadata: dict | None = None) -> TrainResult:
    """Wrap `model` with a nested adapter and train it on `train_dataset` with the HF Trainer.

    Args:
        model: A base causal LM (frozen; only the adapter trains).
        tokenizer: Its tokenizer (saved with nothing else; used for padding).
        train_dataset: Encoded examples (dicts with input_ids, attention_mask, labels).
        adapter: The rank schedule and LoRA targets.
        config: Trainer knobs.
        collator: Batch collator; default pads inputs and labels (-100).
        extra_metadata: Written into `train_config.json` next to the adapter (e.g. model/data names).

    Returns:
        TrainResult with the saved adapter directory `<output_dir>/adapter`.
    """
    from transformers import DataCollatorForSeq2Seq

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    peft_model = get_matryoshka_model(model, adapter)
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    callback = MatryoshkaCallback()
    trainer = MatryoshkaTrainer(
        model=peft_model,
        args=config.training_arguments(),
        train_dataset=train_dataset,
        data_collator=collator or DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[callback],
    )
    resume = None
    if config.resume:
        resume = latest_checkpoint(out / "checkpoints")
        if resume is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch.", out / "checkpoints")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    peft_model.eval()
    adapter_dir = out / "adapter"
    if trainer.is_world_process_zero():
        save_matryoshka(peft_model, adapter_dir)
        history = trainer.state.log_history
        (out / "loss_curve.json").write_text(json.dumps(
            [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")} for h in history if "loss" in h],
            indent=1) + "\n")
        meta = {"train": dataclasses.asdict(config), "adapter": adapter.to_dict(), "seconds": seconds,
                "dylora_draws": callback.draws, **(extra_metadata or {})}
        (out / "train_config.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return TrainResult(adapter_dir, peft_model, trainer.state.log_history, seconds, callback.draws)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint-N with the largest N that holds a complete adapter, or None."""
    if not directory.is_dir():
        return None
    done = [p for p in directory.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)
