"""Training on the Hugging Face Trainer (so `accelerate launch` scales it with DDP/FSDP/DeepSpeed).

We add one callback and one `training_step`, nothing else of the Trainer's loop:
- multirank (`MultirankLoss`, a mixin TRL's SFTTrainer takes too): each step trains n ranks of S
  (`MatryoshkaConfig.multirank_plan`): the largest plus n - 1 drawn from the rest, a pure function
  of (seed, step), or all of S when n = |S|. Split rows (the default, n = 2) deal the batch's rows
  out over the n ranks, one rank per row, at the compute of one LoRA step. Stacked rows (n = |S|
  by default) stack the batch n times and copy i runs at the i-th rank, so one forward/backward
  gives the exact mean of the n rank losses at n times the compute. Either way the rows run in
  one masked bottleneck (`set_row_ranks`, kept through the backward so activation checkpointing
  recomputes the same forward).
- DyLoRA: draw one rank per optimizer step (`on_step_begin` runs once per optimizer step, also
  under gradient accumulation), or with `dylora_draw="micro_batch"` one per micro-batch (again
  at `on_substep_end`, after each micro-batch but the step's last). The draw is a pure function
  of (seed, global_step[, micro-batch index]), so every data-parallel process and every resumed
  run draws the same rank.
- a NaN/inf loss stops the run at once, before the optimizer applies it (the Trainer would go on).
- checkpoints are atomic (checkpoints.py), with `matryoshka_config.json` and the DyLoRA draws inside.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SchedulerType

from .checkpoints import STAGING, STATE_NAME, AtomicCheckpoints, last_good_note, resume_point
from .core import peft_seam
from .core.config import MatryoshkaConfig
from .core.files import atomic_write_text
from .core.model import draw_rank, fold_p, get_controller, get_matryoshka_model, set_row_ranks
from .core.saving import save_matryoshka
from .core.weighting import NO_FIXED_P
from .deploy.svd import svd_order

log = logging.getLogger(__name__)

DEPLOY_ORDERS = ("none", "fold", "svd")


@dataclass
class TrainConfig:
    """Training knobs (the usual Trainer ones, with defaults that suit LoRA)."""

    output_dir: str = field(default="runs/train", metadata={"help": "Where the adapter, checkpoints, loss curve and config go."})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW peak learning rate (the default: the rate study v2 picked for the "
                                        "default method; the paper's MatryoshkaLoRA needs ~3x lower, e.g. 3e-4)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training set (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides num_train_epochs when > 0."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    warmup_steps: float = field(default=0.0, metadata={"help": "Warmup steps (an int), or a fraction of all steps when < 1."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the adapter."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Trainer scheduler: linear | cosine | constant | ..."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and DyLoRA draws."})
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch examples of similar length together (the Trainer's LengthGroupedSampler): less "
                          "padding, so faster steps when lengths vary; the order is still random per seed."})
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16 mixed precision (GPUs/CPUs that support it)."})
    fused_forward: bool = field(default=True, metadata={"help": "The fused LoRA forward (core/fused.py): PEFT's outputs "
                                "and gradients in fewer ops, PEFT's forward where not exact. False: PEFT's everywhere."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})
    report_to: str = field(default="none", metadata={"help": "Experiment tracker: none | tensorboard | wandb | ..."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N optimizer steps."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N optimizer steps (0: only the final adapter). "
                                                          "A checkpoint holds the adapter, optimizer, scheduler, RNG states and DyLoRA draws."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints to keep."})
    snapshot_steps: list[int] | None = field(
        default=None,
        metadata={"help": "Also save the adapter alone (no optimizer state) after these optimizer steps, to "
                          "<output_dir>/snapshots/step-N, to score the run along the way (e.g. [75, 150, 300])."})
    stop_after_steps: int = field(
        default=0,
        metadata={"help": "Stop after this many optimizer steps but keep the learning-rate schedule of max_steps, "
                          "writing a checkpoint there; continue later with --resume (0: run to the end)."})
    deploy_order: str = field(
        default="svd",
        metadata={"help": "How the final adapter's rank prefixes are ordered when it is saved: svd (SVD order: rank k "
                          "is the best rank-k cut of the trained delta; part of study v2's winner, README "
                          "'Which method should I use?') | fold (the training P folded into lora_A: rank k is the "
                          "prefix of A diag(P) B; fixed-P methods) | none (as trained; rank k runs the paper's "
                          "s_k A_k B_k: the paper's protocol). Checkpoints and snapshots keep the trained factors."})
    resume: bool = field(default=False, metadata={"help": "Continue from the latest complete checkpoint in output_dir (same options as the run it continues)."})
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
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.save_steps < 0 or self.stop_after_steps < 0:
            problems.append("warmup_steps, weight_decay, save_steps and stop_after_steps must be >= 0.")
        if self.deploy_order not in DEPLOY_ORDERS:
            problems.append(f"Unknown deploy_order {self.deploy_order!r}. Available: {', '.join(DEPLOY_ORDERS)}.")
        if self.snapshot_steps is not None and not all(isinstance(n, int) and n > 0 for n in self.snapshot_steps):
            problems.append(f"snapshot_steps={self.snapshot_steps!r} must be positive step numbers, e.g. [75, 150].")
        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            problems.append(f"Unknown lr_scheduler_type {self.lr_scheduler_type!r}. Available: {', '.join(schedulers)}.")
        if problems:
            raise ValueError("Invalid TrainConfig:\n  - " + "\n  - ".join(problems))

    def training_arguments(self) -> TrainingArguments:
        # transformers 5 names the sampler `train_sampling_strategy`; 4.x has `group_by_length`
        if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
            sampler = {"train_sampling_strategy": "group_by_length" if self.group_by_length else "random"}
        else:
            sampler = {"group_by_length": self.group_by_length}
        return TrainingArguments(
            **sampler,
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


class NonFiniteLoss(FloatingPointError):
    """The loss or the adapter weights became NaN/inf; the message names the step."""


class MatryoshkaCallback(TrainerCallback):
    """DyLoRA: one rank draw per optimizer step (or per micro-batch), recorded for logs, checkpoints and
    tests; adapter snapshots along the way and an early stop that keeps the schedule (`TrainConfig`)."""

    def __init__(self, snapshot_dir: Path | None = None, snapshot_steps=(), stop_after: int = 0):
        # (global_step, k); with dylora_draw="micro_batch": (global_step, micro-batch index, k)
        self.draws: list[tuple[int, ...]] = []
        self.snapshot_dir, self.snapshot_steps, self.stop_after = snapshot_dir, set(snapshot_steps or ()), stop_after

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.snapshot_steps and state.is_world_process_zero:
            save_matryoshka(model, self.snapshot_dir / f"step-{state.global_step}")
        if self.stop_after and state.global_step >= self.stop_after:
            control.should_save = True  # a checkpoint to resume from, with the schedule of max_steps
            control.should_training_stop = True

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        get_controller(model).micro_batch = 0
        self._draw(args, state.global_step, model)

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        controller = get_controller(model)
        controller.micro_batch += 1  # the Trainer calls this after every micro-batch of a step but its last
        if controller.config.dylora_draw == "micro_batch":
            self._draw(args, state.global_step, model)

    def _draw(self, args, step: int, model) -> None:
        controller = get_controller(model)
        micro = controller.micro_batch if controller.config.dylora_draw == "micro_batch" else None
        k = draw_rank(model, step, micro)
        if k is not None:
            self.draws.append((step, k) if micro is None else (step, micro, k))
            log.debug("process %d, step %d, micro-batch %s: DyLoRA rank %d", args.process_index, step, micro, k)


def stack_for_ranks(inputs: dict, ranks) -> tuple[dict, torch.Tensor]:
    """Repeat every (B, ...) tensor |S| times along the batch; copy i gets rank ranks[i].

    Returns:
        (inputs with batch |S|*B, row ranks of shape (|S|*B,)).
    """
    tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    batch = next(iter(tensors.values())).shape[0]
    stacked = {k: v.repeat(len(ranks), *([1] * (v.dim() - 1))) for k, v in tensors.items()}
    return {**inputs, **stacked}, torch.tensor(ranks, dtype=torch.long).repeat_interleave(batch)


class MultirankLoss:
    """Trainer mixin: multirank's exact objective, the mean of the rank losses in one row-stacked batch.

    Put it before the Trainer class it extends (`class T(MultirankLoss, Trainer)`); other methods
    pass through. The row ranks stay set through the backward pass, so activation checkpointing
    recomputes the same forward. Used by `MatryoshkaTrainer` and by the TRL trainer in `sft.py`.
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        controller = get_controller(model)
        if controller.config.method != "multirank":
            return super().training_step(model, inputs, num_items_in_batch)
        step = self.state.global_step
        if controller.config.multirank_plan()[0] == "split":
            batch = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
            with set_row_ranks(model, controller.split_rows(step, controller.micro_batch, batch)):
                return super().training_step(model, inputs, num_items_in_batch)
        ranks = controller.step_ranks(step)
        stacked, rows = stack_for_ranks(inputs, ranks)
        if num_items_in_batch is not None:  # every copy has the same label tokens
            num_items_in_batch = num_items_in_batch * len(ranks)
        with set_row_ranks(model, rows):
            return super().training_step(model, stacked, num_items_in_batch)


class MatryoshkaTrainer(MultirankLoss, AtomicCheckpoints, Trainer):
    """The HF Trainer with multirank, a per-step NaN/inf stop and atomic checkpoints (see the module docstring)."""

    def _any_process(self, flag: bool) -> bool:
        """`flag` or-ed over all processes, so that every process stops at the same point."""
        if self.args.world_size <= 1:
            return flag
        t = torch.tensor([float(flag)], device=self.args.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item())

    def _weights_finite(self) -> bool:
        # FSDP2 parameters are DTensors: each process checks its own shard, _any_process combines.
        local = (p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters() if p.requires_grad)
        return not self._any_process(any(not bool(torch.isfinite(t).all()) for t in local))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = loss.detach().float().mean().item()
        if self._any_process(not math.isfinite(value)):
            raise NonFiniteLoss(
                f"Loss became {value if not math.isfinite(value) else 'NaN/inf on another process'} at step "
                f"{self.state.global_step + 1}; training stopped before that step's update. "
                f"{last_good_note(Path(self.args.output_dir))} Lower --learning-rate, use --dtype float32, or check the data."
            )
        return loss

    def before_checkpoint(self, run_dir: Path, name: str) -> None:
        if not self._weights_finite():
            raise NonFiniteLoss(f"Adapter weights became NaN/inf at step {self.state.global_step}; {name} was not "
                                f"written. {last_good_note(run_dir)} Lower --learning-rate or use --dtype float32.")

    def complete_checkpoint(self, directory: Path) -> None:
        """The adapter options and the DyLoRA draws so far, for resume."""
        get_controller(self.model).config.save(directory)
        draws = next((c.draws for c in self.callback_handler.callbacks if isinstance(c, MatryoshkaCallback)), [])
        state = {"global_step": self.state.global_step, "seed": get_controller(self.model).config.seed,
                 "dylora_draws": draws}
        atomic_write_text(directory / STATE_NAME, json.dumps(state) + "\n")


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

    Runs as one process or under `accelerate launch` (DDP, FSDP, DeepSpeed): every process
    calls this function, process 0 writes the files.

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

    Raises:
        ValueError: resuming from a checkpoint of different adapter options, or a launch whose
            processes did not form a process group.
        FileExistsError: output_dir holds checkpoints and `resume` is off.
        NonFiniteLoss: the loss or the weights became NaN/inf (the last good checkpoint is kept).
        DiskFullError: the disk filled up during a save (nothing half-written is left).
    """
    if config.deploy_order == "fold" and adapter.method in NO_FIXED_P:
        raise ValueError(f"deploy_order='fold' needs a fixed P, but method={adapter.method!r} trains each rank with "
                         "its own s_k P_k; use deploy_order='svd' or 'none'.")
    out = Path(config.output_dir)
    resume = resume_point(out / "checkpoints", adapter, config.resume)
    args = config.training_arguments()
    _check_process_group(args)
    out.mkdir(parents=True, exist_ok=True)
    peft_model, trainer, callback = _build_trainer(model, tokenizer, train_dataset, adapter, config, args, collator)
    _prepare_resume(trainer, callback, resume)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    peft_model.eval()
    per_process = _agreed_draws(trainer, callback.draws)
    meta = {"train": asdict(config), "adapter": adapter.to_dict(), "seconds": seconds, "global_step": trainer.state.global_step,
            "world_size": trainer.args.world_size, "resumed_from": str(resume) if resume else None,
            "dylora_draws": callback.draws, "dylora_draws_per_process": per_process, **(extra_metadata or {})}
    _save_outputs(trainer, peft_model, config.deploy_order, out, meta)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out / "adapter", peft_model, trainer.state.log_history, seconds, callback.draws)


def _check_process_group(args: TrainingArguments) -> None:
    """Refuse a multi-process launch whose processes would each train alone."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise ValueError(
            f"This is one of WORLD_SIZE={launched} launched processes, but they did not form a process group (no GPU "
            "was found), so each would train alone and overwrite the same files. On CPUs launch with "
            f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched} -m matryoshka_lora.cli "
            "train ...`; on GPUs check that CUDA is visible to every process.")


def _build_trainer(model, tokenizer, train_dataset, adapter: MatryoshkaConfig, config: TrainConfig,
                   args: TrainingArguments, collator):
    """(the nested adapter on `model`, seeded; the Trainer; its callback that draws ranks and snapshots)."""
    from transformers import DataCollatorForSeq2Seq

    torch.manual_seed(config.seed)
    peft_model = get_matryoshka_model(model, adapter, fused=config.fused_forward)
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    callback = MatryoshkaCallback(Path(config.output_dir) / "snapshots", config.snapshot_steps, config.stop_after_steps)
    trainer = MatryoshkaTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator or DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[callback],
    )
    return peft_model, trainer, callback


def _prepare_resume(trainer: MatryoshkaTrainer, callback: MatryoshkaCallback, resume: Path | None) -> None:
    """Clear saves killed in an earlier run and take over the DyLoRA draws made before `resume`."""
    if trainer.is_world_process_zero():
        shutil.rmtree(Path(trainer.args.output_dir) / STAGING, ignore_errors=True)
    if resume is not None:
        # The Trainer reads the adapter (safetensors) and, with torch.load(weights_only=True), the
        # optimizer.pt, scheduler.pt and rng_state*.pth files of `resume` (Accelerate's FSDP loader
        # likewise). Those are read only from checkpoints this function wrote into
        # <output_dir>/checkpoints (found by latest_checkpoint), never from a path the user names;
        # weights_only refuses anything but tensors and plain containers. training_args.bin, a
        # pickle the Trainer writes for reference, is never read.
        state_file = resume / STATE_NAME
        if state_file.is_file():  # the draws before the resume point, so train_config.json lists them all
            callback.draws = [tuple(d) for d in json.loads(state_file.read_text())["dylora_draws"]]
    trainer.accelerator.wait_for_everyone()


def _agreed_draws(trainer: MatryoshkaTrainer, draws: list) -> list[list]:
    """Every process's DyLoRA draws, which must agree: the draw is random.Random(f"{seed}:{global_step}"),
    so the same seed gives the same k at each step on every process."""
    per_process = [draws]
    if trainer.args.world_size > 1:
        from accelerate.utils import gather_object
        per_process = gather_object([draws])
    if any(d != per_process[0] for d in per_process):
        raise RuntimeError(f"DyLoRA processes drew different ranks: {per_process}. Every process must run with the same --seed.")
    if draws and len(per_process) > 1:
        log.info("DyLoRA: the %d processes drew the same rank at each of %d steps.", len(per_process), len(draws))
    return per_process


def _save_outputs(trainer: MatryoshkaTrainer, peft_model, deploy_order: str, out: Path, meta: dict) -> None:
    """Process 0 writes `out/adapter` (in `deploy_order`), `loss_curve.json` and `train_config.json` (`meta`)."""
    state_dict = None  # sharded parameters are gathered to full tensors (a collective: every process)
    if trainer.is_fsdp_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
    elif trainer.is_deepspeed_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)
    if not trainer.is_world_process_zero():
        return
    tensors = peft_seam.adapter_state_dict(peft_model, state_dict=state_dict).values()
    if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
        raise NonFiniteLoss(f"Adapter weights are NaN/inf after step {trainer.state.global_step}; the adapter was "
                            f"not saved. {last_good_note(out / 'checkpoints')} Lower --learning-rate or use --dtype float32.")
    if deploy_order != "none":
        if state_dict is not None:
            raise ValueError(f"deploy_order={deploy_order!r} is not supported with sharded training "
                             "(FSDP/ZeRO-3); train with deploy_order='none', then run `mlora svd` or "
                             "`mlora fold` on the saved adapter.")
        (fold_p if deploy_order == "fold" else svd_order)(peft_model)
    save_matryoshka(peft_model, out / "adapter", state_dict)
    history = trainer.state.log_history
    atomic_write_text(out / "loss_curve.json", json.dumps(
        [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")} for h in history if "loss" in h],
        indent=1) + "\n")
    atomic_write_text(out / "train_config.json", json.dumps(meta, indent=2, default=str) + "\n")
