"""Checkpoints on disk: atomic saves, the latest complete checkpoint, resume and rotation.

Layout under a run's output_dir:

    checkpoints/checkpoint-N/   adapter (safetensors), optimizer.pt, scheduler.pt, rng_state*.pth,
                                trainer_state.json, matryoshka_config.json, matryoshka_state.json
    checkpoints/.saving/        a checkpoint being written; renamed to checkpoint-N when complete

A kill or a full disk during a save leaves the previous checkpoint as the latest usable one.

The Trainer has no public hook around a save (`TrainerCallback.on_save` runs after it, and only
`TrainingArguments.output_dir` says where it writes), so `AtomicCheckpoints` overrides two
private Trainer methods: `_save_checkpoint` (to stage, finish and rename each checkpoint) and
`_get_output_dir` (to point the Trainer's own writes at the staging directory). They are the
only private Trainer methods this package touches. `check_trainer_api` checks that the installed
transformers still has them as expected; every `AtomicCheckpoints` trainer runs it when built.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path

from .core.config import CONFIG_NAME, MatryoshkaConfig
from .core.files import explain_disk_full, replace_directory
from .core.saving import check_adapter_dir, config_differences

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STAGING = ".saving"  # checkpoints are written here, then renamed to checkpoints/checkpoint-N
STATE_NAME = "matryoshka_state.json"  # in each checkpoint: seed, global step, DyLoRA draws so far

# The private Trainer methods AtomicCheckpoints overrides, with the parameters it relies on.
PRIVATE_TRAINER_API = {"_save_checkpoint": ("self", "model", "trial"), "_get_output_dir": ("self", "trial")}


def check_trainer_api(trainer_class=None) -> None:
    """Check that `trainer_class` (default: transformers.Trainer) still has what AtomicCheckpoints overrides.

    Raises:
        RuntimeError: a method is missing, its parameters changed, or `_save_checkpoint` no longer
            asks `_get_output_dir` where to write; the message names the fix.
    """
    if trainer_class is None:
        from transformers import Trainer as trainer_class
    import transformers

    problems = []
    for name, expected in PRIVATE_TRAINER_API.items():
        method = getattr(trainer_class, name, None)
        found = tuple(inspect.signature(method).parameters) if callable(method) else None
        if found != expected:
            problems.append(f"expected Trainer.{name}({', '.join(expected)}), found "
                            + (f"{name}({', '.join(found)})" if found is not None else "no such method"))
    try:
        if not problems and "self._get_output_dir(" not in inspect.getsource(trainer_class._save_checkpoint):
            problems.append("Trainer._save_checkpoint no longer calls self._get_output_dir(trial) for its directory")
    except (OSError, TypeError):  # no source shipped: the signatures are all we can check
        pass
    if problems:
        raise RuntimeError(
            f"transformers {transformers.__version__} changed the private Trainer methods that "
            "matryoshka_lora.checkpoints.AtomicCheckpoints overrides for atomic checkpoints:\n  - "
            + "\n  - ".join(problems) + f"\nInstall an earlier transformers (pip install 'transformers<"
            f"{transformers.__version__}'), or update AtomicCheckpoints and PRIVATE_TRAINER_API for this one.")


class AtomicCheckpoints:
    """Trainer mixin: each checkpoint is written into `checkpoints/.saving/` and renamed into place
    when complete (see the module docstring). Put it before the Trainer class it extends.

    Subclasses may refuse a save in `before_checkpoint` (every process, before anything is written)
    and add files in `complete_checkpoint` (process 0, after the Trainer's files, before the rename).
    """

    _staging: str | None = None  # while a checkpoint is being written: the directory it goes to

    def __init__(self, *args, **kwargs):
        check_trainer_api()  # fail at the start, not with a half-atomic checkpoint hours later
        super().__init__(*args, **kwargs)

    def before_checkpoint(self, run_dir: Path, name: str) -> None:
        """Raise to refuse checkpoint `name` before it is written."""

    def complete_checkpoint(self, directory: Path) -> None:
        """Write more files into the staged checkpoint `directory`."""

    def _get_output_dir(self, trial) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        staging, main = run_dir / STAGING, self.is_world_process_zero()
        self.before_checkpoint(run_dir, name)
        if main:
            shutil.rmtree(staging / name, ignore_errors=True)  # left by a save that was killed
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            with explain_disk_full(run_dir / name, f"; the latest complete checkpoint is still "
                                                   f"{latest_checkpoint(run_dir) or 'none'}, resume from it with --resume"):
                super()._save_checkpoint(model, trial)  # every process writes its part (RNG state, shards)
                self.accelerator.wait_for_everyone()
                if main:
                    self.complete_checkpoint(staging / name)
                    replace_directory(staging / name, run_dir / name)
                    _rotate(run_dir, self.args.save_total_limit)
        except BaseException:
            if main:
                shutil.rmtree(staging / name, ignore_errors=True)
            raise
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()


def _rotate(run_dir: Path, keep: int | None) -> None:
    """Delete all but the `keep` newest complete checkpoints (moved into staging first, so a
    checkpoint is never seen half-deleted)."""
    if not keep or keep <= 0:
        return
    for old in _complete_checkpoints(run_dir)[:-keep]:
        trash = run_dir / STAGING / f"deleting-{old.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def last_good_note(run_dir: Path) -> str:
    """A sentence naming the checkpoint a failed run can resume from."""
    last = latest_checkpoint(run_dir)
    return (f"The last good checkpoint is {last}." if last is not None
            else "No checkpoint was written (set --save-steps to keep some).")


def resume_point(checkpoints: Path, adapter: MatryoshkaConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (checked against `adapter`), or None for a fresh run."""
    last = latest_checkpoint(checkpoints)
    if not resume:
        if last is not None:
            raise FileExistsError(
                f"{checkpoints.parent} already holds checkpoints of a run (latest: {last.name}). Pass --resume to "
                f"continue it, or choose a new --output-dir (or delete {checkpoints}) to start over.")
        return None
    if last is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch.", checkpoints)
        return None
    try:
        saved = check_adapter_dir(last)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"Cannot resume from {last}: {e}\nDelete {last} to resume from the checkpoint before it.") from e
    problems = [f"{k}: the checkpoint has {before!r}, this run {now!r}" for k, before, now in config_differences(saved, adapter)]
    if problems:
        raise ValueError(f"Cannot resume from {last}: it was trained with other adapter options ({CONFIG_NAME}):\n  - "
                         + "\n  - ".join(problems) + "\nResume with the options of that run, or choose a new --output-dir.")
    log.info("Resuming from %s", last)
    return last


def _complete_checkpoints(directory: Path) -> list[Path]:
    """checkpoint-N directories that were completely written, by increasing N."""
    if not directory.is_dir():
        return []
    done = [p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()
            and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint-N with the largest N that was completely written, or None.

    Checkpoints are renamed into place only when complete, and half-written ones stay in
    `.saving/`, so this never returns a checkpoint a kill interrupted.
    """
    done = _complete_checkpoints(Path(directory))
    return done[-1] if done else None
