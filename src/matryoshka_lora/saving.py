"""Save and load nested adapters: PEFT's safetensors adapter plus `matryoshka_config.json`.

Loading reads JSON and safetensors only; a directory without `adapter_model.safetensors`
is refused rather than falling back to a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import peft_seam
from .config import CONFIG_NAME, MatryoshkaConfig
from .model import attach, get_controller

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"


def save_matryoshka(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write the adapter (PEFT format, safetensors) and its rank schedule to `directory`."""
    directory = Path(directory)
    config = get_controller(model).config
    model.save_pretrained(str(directory), safe_serialization=True)
    config.save(directory)
    return directory


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
    if problems:
        raise ValueError(f"Adapter {directory} is inconsistent:\n  - " + "\n  - ".join(problems)
                         + "\nRe-save it with save_matryoshka() or fix matryoshka_config.json.")
    return config


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
