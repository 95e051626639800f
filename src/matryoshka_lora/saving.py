"""Save and load nested adapters: PEFT's safetensors adapter plus `matryoshka_config.json`.

Loading reads JSON and safetensors only; a directory without `adapter_model.safetensors`
is refused rather than falling back to a pickle.

Every write goes to a temporary file or directory next to its target and is renamed into
place when complete (`atomic_directory`, `atomic_write_text`), so a crash, a kill or a full
disk during a save leaves the previous version, never a half-written one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import peft_seam
from .config import CONFIG_NAME, MatryoshkaConfig
from .model import attach, fold_plan, get_controller
from .models import portable_name

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
CONFIG_RECORD = "matryoshka_config"  # safetensors metadata key: the config the weights were saved with


# -- atomic writes ------------------------------------------------------------------------------

def check_target(target: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output directory unless overwrite is set; refuse a file either way."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory; choose another output path.")
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it, "
                                  "or choose another output directory.")
    return target


def replace_directory(new: Path, target: Path) -> None:
    """Rename the complete directory `new` to `target`, replacing an existing `target`.

    The old directory is moved aside first and deleted only once `new` is in place; a kill
    between the two renames leaves `target` missing and the old copy in a hidden `.old`
    directory next to it, never a mix of both.
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / "dir")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "dir", target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; rename it to `target` once the block completes.

    On an error the temporary directory is removed and `target` is untouched. With `overwrite`
    the old directory is moved aside, the new one renamed in, and only then the old one deleted.
    A full disk is reported as `DiskFullError` naming `target`.
    """
    target = check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result normal permissions
        with explain_disk_full(target):
            yield tmp
        check_target(target, overwrite)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary file and a rename (never a half-written file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with explain_disk_full(path), os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class DiskFullError(OSError):
    """The disk filled up during a save; the message names what was being written."""


def is_disk_full(error: BaseException, directory: Path) -> bool:
    """Whether `error` came from a full disk.

    Writers report it differently: Python raises OSError(ENOSPC), safetensors a SafetensorError
    saying "No space left on device (os error 28)", torch.save a RuntimeError about a failed
    write; for the last, look at the free space left.
    """
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(error) or "os error 28" in str(error):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        probe = next(p for p in (directory, *directory.parents) if p.exists())
        return shutil.disk_usage(probe).free < 16 * 2**20
    except (OSError, StopIteration):
        return False


@contextmanager
def explain_disk_full(target: Path, note: str = ""):
    """Turn a full-disk error from any writer into a `DiskFullError` that names `target`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e, Path(target).parent):
            raise
        raise DiskFullError(errno.ENOSPC, f"No space left on device while writing {target} ({e}); nothing was "
                            f"half-written{note}. Free disk space or choose another output directory, then run again.") from e


# -- save / check / load ------------------------------------------------------------------------

def save_matryoshka(model: torch.nn.Module, directory: str | Path, state_dict: dict | None = None) -> Path:
    """Write the adapter (PEFT format, safetensors) and its rank schedule to `directory`.

    The directory is written whole and renamed into place (an existing one is replaced only
    once the new one is complete). The rank schedule is also recorded in the safetensors
    metadata, so a `matryoshka_config.json` edited later is detected on load.

    Args:
        model: A matryoshka model (get_matryoshka_model / load_matryoshka_model).
        directory: Target directory.
        state_dict: The full model state dict when the live parameters are sharded (FSDP,
            DeepSpeed ZeRO-3): what `accelerator.get_state_dict(model)` returns.
    """
    directory = Path(directory)
    config = get_controller(model).config
    with atomic_directory(directory, overwrite=True) as tmp:
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(str(tmp), safe_serialization=True, **extra)
        portable_base_name(tmp)
        config.save(tmp)
        record_config(tmp, config)
    return directory


def portable_base_name(directory: Path) -> None:
    """Record an embedded base model by its Hub id, not the local path it was loaded from."""
    path = Path(directory) / PEFT_CONFIG_NAME
    cfg = json.loads(path.read_text())
    name = portable_name(cfg.get("base_model_name_or_path"))
    if name != cfg.get("base_model_name_or_path"):
        path.write_text(json.dumps(dict(cfg, base_model_name_or_path=name), indent=2, sort_keys=True) + "\n")


def config_record(config: MatryoshkaConfig) -> dict[str, str]:
    """The safetensors metadata entry that records the rank schedule the weights were saved with."""
    return {CONFIG_RECORD: json.dumps(config.to_dict(), sort_keys=True)}


def record_config(directory: Path, config: MatryoshkaConfig) -> None:
    """Re-write the adapter weights (as PEFT wrote them) with the rank schedule in their metadata."""
    path = Path(directory) / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    save_file(load_file(str(path)), str(path), metadata={**metadata, **config_record(config)})


def _normalise_targets(t):
    return sorted(t) if isinstance(t, (list, tuple, set)) else t


def check_adapter_dir(directory: str | Path) -> MatryoshkaConfig:
    """Check that a directory holds a consistent nested adapter; return its config.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the files disagree (r, ranks, target modules, weight shapes) or are corrupt.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist.")
    for name in (PEFT_CONFIG_NAME, WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            hint = " (pickled .bin adapters are not loaded; re-save with safetensors)" if name == WEIGHTS_NAME else ""
            if name == CONFIG_NAME:
                hint = (f": {directory} looks like a plain PEFT LoRA adapter. Make it nested (every rank prefix "
                        f"usable) with `mlora svd {directory} --out NEW_DIR` (svd_adapter() in Python), then use NEW_DIR")
            raise FileNotFoundError(f"{directory / name} is missing{hint}.")
    config = MatryoshkaConfig.load(directory)
    try:
        peft_cfg = json.loads((directory / PEFT_CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / PEFT_CONFIG_NAME} is not valid JSON ({e}).") from e
    problems = []
    if peft_cfg.get("r") != config.r:
        problems.append(f"{CONFIG_NAME} says r={config.r} but {PEFT_CONFIG_NAME} says r={peft_cfg.get('r')}")
    if peft_cfg.get("rank_pattern"):
        problems.append(f"{PEFT_CONFIG_NAME} has a rank_pattern; a nested adapter has one r for every layer")
    targets = config.target_modules
    if targets != "all-linear" and _normalise_targets(targets) != _normalise_targets(peft_cfg.get("target_modules")):
        problems.append(f"target_modules differ: {CONFIG_NAME} has {targets}, {PEFT_CONFIG_NAME} has {peft_cfg.get('target_modules')}")
    try:
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            recorded = (f.metadata() or {}).get(CONFIG_RECORD)
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if ".lora_A." in key and shape[0] != config.r:
                    problems.append(f"weight {key} has rank {shape[0]}, expected r={config.r}")
                    break
                if ".lora_B." in key and shape[-1] != config.r:
                    problems.append(f"weight {key} has rank {shape[-1]}, expected r={config.r}")
                    break
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{directory / WEIGHTS_NAME} cannot be read ({e}); the file is truncated or corrupt, re-save the adapter.") from e
    if recorded is not None:  # adapters saved before the record existed have none
        problems += [f"{CONFIG_NAME} was edited after saving: {k} is {now!r}, the weights were saved with {before!r}"
                     for k, before, now in config_differences(json.loads(recorded), config)]
    if problems:
        raise ValueError(f"Adapter {directory} is inconsistent:\n  - " + "\n  - ".join(problems)
                         + f"\nRestore {CONFIG_NAME} to what the weights were saved with, or re-save the adapter "
                           "with save_matryoshka().")
    return config


def fold_adapter(directory: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """`fold_p` on a saved adapter, without loading a base model: write a copy whose lora_A rows are
    multiplied by the training P. Eval, export and merge of the copy run rank k as the prefix of
    the trained product A diag(P) B (see `fold_p`); the copy equals load + fold_p + save.

    Raises:
        ValueError: see `fold_p` (DyLoRA/multirank, already folded) and `check_adapter_dir`.
    """
    directory = Path(directory)
    p, folded = fold_plan(check_adapter_dir(directory))
    tensors = load_file(str(directory / WEIGHTS_NAME))
    for key, t in tensors.items():
        parsed = peft_seam.parse_lora_key(key)
        if parsed and parsed[1] == "A":  # (R, m)
            tensors[key] = t * p.to(t.dtype)[:, None]
    with atomic_directory(out_dir, overwrite) as tmp:
        for item in directory.iterdir():
            if item.is_file() and item.name not in (WEIGHTS_NAME, CONFIG_NAME):
                shutil.copy2(item, tmp / item.name)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **config_record(folded)})
        folded.save(tmp)
    return Path(out_dir)


def config_differences(before: MatryoshkaConfig | dict, now: MatryoshkaConfig | dict) -> list[tuple[str, object, object]]:
    """(field, value before, value now) for every field where two rank schedules differ."""
    before, now = (json.loads(json.dumps(c.to_dict() if isinstance(c, MatryoshkaConfig) else c)) for c in (before, now))
    return [(k, before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


def load_matryoshka_model(base_model: torch.nn.Module, directory: str | Path, is_trainable: bool = False):
    """Load a nested adapter onto `base_model`.

    Args:
        base_model: The same base model the adapter was trained on.
        directory: A directory written by `save_matryoshka`.
        is_trainable: Keep the adapter trainable (to continue training).

    Returns:
        A PEFT model with the rank controller attached, in training-weighting mode.

    Raises:
        FileNotFoundError / ValueError: see `check_adapter_dir`; also a base model whose
            layer shapes do not match the adapter.
    """
    config = check_adapter_dir(directory)
    try:
        model = peft_seam.load(base_model, directory, is_trainable=is_trainable)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise ValueError(f"Adapter {directory} does not fit this base model (layer shapes differ); "
                             f"load it on the base model it was trained on.\n{e}") from e
        raise
    attach(model, config)
    return model
