"""Save and load nested adapters: PEFT's safetensors adapter plus `matryoshka_config.json`.

Loading reads JSON and safetensors only; a directory without `adapter_model.safetensors`
is refused rather than falling back to a pickle.

Every save is written whole or not at all (`files.atomic_directory`), so a crash, a kill or a
full disk during a save leaves the previous version, never a half-written one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import peft_seam
from .config import CONFIG_NAME, MatryoshkaConfig
from .files import atomic_directory, read_json
from .locking import locks_output
from .model import attach, fold_plan, get_controller
from .models import portable_name
from .weighting import fold_factors

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
CONFIG_RECORD = "matryoshka_config"  # safetensors metadata key: the config the weights were saved with


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


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_weights_header(path: Path, config: MatryoshkaConfig, problems: list[str]) -> tuple[list[str], str | None]:
    """The adapted layer names and the recorded config of the weights file; shape problems go to `problems`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(CONFIG_RECORD)
            keys = list(f.keys())
            slices = {key: f.get_slice(key) for key in keys}
            shapes = {key: s.get_shape() for key, s in slices.items()}
            dtypes = {key: s.get_dtype() for key, s in slices.items()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} cannot be read ({e}); the file is truncated or corrupt, re-save the adapter.") from e
    layers, _ = peft_seam.index_keys(keys, str(path))
    for module, factors in layers.items():
        for factor, key in factors.items():
            shape, dtype = shapes[key], dtypes[key]
            if dtype not in _FLOAT_DTYPES or len(shape) != 2:
                problems.append(f"weight {key} is {dtype} {list(shape)}; LoRA factors are floating-point matrices")
            elif shape[0 if factor == "A" else 1] != config.r:
                problems.append(f"weight {key} has rank {shape[0 if factor == 'A' else 1]}, expected r={config.r}")
            else:
                continue
            break
    return list(layers), recorded


def check_adapter_dir(directory: str | Path) -> MatryoshkaConfig:
    """Check that a directory holds a consistent nested adapter; return its config.

    Of adapter_config.json, the fields that set the adapter's structure or scale are checked
    (r, target_modules, lora_alpha = r, no rank/alpha patterns, no rsLoRA/DoRA: see
    `peft_seam.saved_config_problems`); its other fields are not read (`adapter_lora_config`).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the files disagree (r, ranks, target modules, lora_alpha, weight shapes) or are corrupt.
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
    peft_cfg = read_json(directory / PEFT_CONFIG_NAME, "restore it or re-save the adapter")
    problems = []
    if peft_cfg.get("r") != config.r:
        problems.append(f"{CONFIG_NAME} says r={config.r} but {PEFT_CONFIG_NAME} says r={peft_cfg.get('r')}")
    layer_names, recorded = _read_weights_header(directory / WEIGHTS_NAME, config, problems)
    problems += [f"{PEFT_CONFIG_NAME}: {p}" for p in peft_seam.saved_config_problems(peft_cfg, config.r, layer_names)]
    targets, saved_targets = config.target_modules, peft_cfg.get("target_modules")
    if targets != "all-linear" and not any(PEFT_CONFIG_NAME in p and "target_modules" in p for p in problems) \
            and _normalise_targets(targets) != _normalise_targets(saved_targets):
        problems.append(f"target_modules differ: {CONFIG_NAME} has {targets}, {PEFT_CONFIG_NAME} has {saved_targets}")
    if recorded is not None:  # adapters saved before the record existed have none
        try:
            before = json.loads(recorded)
        except (json.JSONDecodeError, RecursionError):
            before = None
        if not isinstance(before, dict):
            raise ValueError(f"{directory / WEIGHTS_NAME}: the config recorded in its metadata ({CONFIG_RECORD}) is "
                             "not a JSON object; the file is corrupt, re-save the adapter.")
        problems += [f"{CONFIG_NAME} was edited after saving: {k} is {now!r}, the weights were saved with {was!r} "
                     f"(recorded in {WEIGHTS_NAME})" for k, was, now in config_differences(before, config)]
    if problems:
        raise ValueError(f"Adapter {directory} is inconsistent:\n  - " + "\n  - ".join(problems)
                         + "\nRestore the files to what the weights were saved with, or re-save the adapter "
                           "with save_matryoshka().")
    return config


def adapter_lora_config(directory: str | Path, config: MatryoshkaConfig):
    """The PEFT LoraConfig of a checked adapter directory (`check_adapter_dir`), rebuilt from its
    rank schedule and saved target modules (`peft_seam.saved_lora_config`)."""
    saved = read_json(Path(directory) / PEFT_CONFIG_NAME, "restore it or re-save the adapter")
    return peft_seam.saved_lora_config(saved, config.r, config.lora_dropout, config.modules_to_save)


@locks_output("fold", lambda a: a["out_dir"])
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
            tensors[key] = fold_factors(t, p)
    with atomic_directory(out_dir, overwrite) as tmp:
        for item in directory.iterdir():
            if item.is_file() and item.name not in (WEIGHTS_NAME, CONFIG_NAME):
                shutil.copy2(item, tmp / item.name)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **config_record(folded)})
        folded.save(tmp)
    return Path(out_dir)


def config_differences(before: MatryoshkaConfig | dict, now: MatryoshkaConfig | dict) -> list[tuple[str, object, object]]:
    """(field, value before, value now) for every field where two rank schedules differ.

    A field missing from a record (saved by a version before the field existed) counts as its default.
    """
    defaults = MatryoshkaConfig().to_dict()
    before, now = (_as_trained({**defaults, **json.loads(json.dumps(c.to_dict() if isinstance(c, MatryoshkaConfig)
                                                                     else c))}) for c in (before, now))
    return [(k, before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


def _as_trained(record: dict) -> dict:
    """`record` with the multirank options it trains with: multirank's unset ones filled in (multirank_plan);
    none for other methods, which ignore them (older versions saved multirank_rows="stack" for every method)."""
    try:
        c = MatryoshkaConfig.from_dict(record)
    except (TypeError, ValueError):
        return record  # compared as written
    rows, n = c.multirank_plan() if c.method == "multirank" else (None, None)
    return {**record, "multirank_rows": rows, "ranks_per_step": n}


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
        model = peft_seam.load(base_model, directory, adapter_lora_config(directory, config), is_trainable=is_trainable)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise ValueError(f"Adapter {directory} does not fit this base model (layer shapes differ); "
                             f"load it on the base model it was trained on.\n{e}") from e
        raise
    attach(model, config)
    return model
