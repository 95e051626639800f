"""SVD order: re-factor any trained LoRA so that every rank prefix is its best low-rank cut.

For each layer the deployed rank-R delta is `dW = B diag(p) A` (PEFT layout: A (R, m), B (n, R)).
With `B = Qb Rb` and `A^T = Qa Ra` (thin QR) and the R x R SVD `Rb diag(p) Ra^T = U S V^T`:

    dW = (Qb U) S (Qa V)^T,   B' = Qb U S^1/2,   A' = S^1/2 (Qa V)^T

B' A' = dW exactly, and by Eckart-Young the rank-k prefix B'_k A'_k is the best rank-k
approximation of dW (squared Frobenius error = sum of the dropped sigma^2). The cost is
O((m + n) R^2); no m x n matrix is ever formed. The result is a plain nested adapter
(method lora, scaling none, alpha 1): set_rank, export, merge and allocate use it unchanged.

`p` is what the adapter deploys at full rank: the training P for fixed-P methods (matryoshka,
custom; s_R for lora), and the rank-R rule s_R for dylora and multirank. Plain PEFT LoRA
adapters come in through `read_peft_lora` (their lora_alpha / r, rslora and per-layer patterns).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core import peft_seam
from ..core.config import CONFIG_NAME, MatryoshkaConfig
from ..core.files import atomic_directory
from ..core.locking import locks_output
from ..core.model import get_controller
from ..core.saving import PEFT_CONFIG_NAME, WEIGHTS_NAME, check_adapter_dir, config_record
from ..core.weighting import NO_FIXED_P, default_ranks, prefix_weights, rank_weights


def svd_factors(A: torch.Tensor, B: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-ordered factors of `B diag(p) A`.

    Args:
        A: lora_A, shape (R, m).
        B: lora_B, shape (n, R).
        p: The vector between them, shape (R,).

    Returns:
        (A' (R, m), B' (n, R), sigma (R,)), in the dtype of A, with B' A' = B diag(p) A and
        sigma sorted descending (zero-padded when R > min(m, n)).
    """
    R = A.shape[0]
    Qa, Ra = torch.linalg.qr(A.detach().double().T)  # (m, ka), (ka, R)
    Qb, Rb = torch.linalg.qr(B.detach().double())  # (n, kb), (kb, R)
    core = (Rb * p.double()[None, :]) @ Ra.T  # (kb, ka)
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)  # (kb, k), (k,), (k, ka)
    root = S.sqrt()
    k = S.shape[0]
    A_new = torch.zeros(R, A.shape[1], dtype=torch.float64)
    B_new = torch.zeros(B.shape[0], R, dtype=torch.float64)
    A_new[:k] = root[:, None] * (Vh @ Qa.T)  # (k, m)
    B_new[:, :k] = (Qb @ U) * root[None, :]  # (n, k)
    sigma = torch.zeros(R, dtype=torch.float64)
    sigma[:k] = S
    return A_new.to(A.dtype), B_new.to(B.dtype), sigma


def deployed_weights(c: MatryoshkaConfig) -> torch.Tensor:
    """The p of `B diag(p) A` an adapter deploys at full rank (see the module docstring), shape (R,)."""
    if c.method in NO_FIXED_P:
        return prefix_weights(c.r, c.r, c.scaling, c.alpha)
    return rank_weights(c.r, c.ranks, c.method, c.scaling, c.alpha, c.weights)


def ordered_config(c: MatryoshkaConfig) -> MatryoshkaConfig:
    """The config of an SVD-ordered adapter: a plain scale-1 nested LoRA that remembers its source."""
    source = c.svd_from or (f"{c.folded_from}+fold" if c.folded_from else c.method)
    return dataclasses.replace(c, method="lora", scaling="none", alpha=1.0, weights=None, ranks_per_step=None,
                               multirank_rows=None, svd_from=source)


@torch.no_grad()
def svd_order(model: torch.nn.Module) -> MatryoshkaConfig:
    """Re-factor every layer of a matryoshka model in place so rank k is the best rank-k cut of its delta.

    The full-rank output is unchanged (up to float rounding); afterwards the model is a
    nested LoRA with scale 1 (`svd_from` names the original method).

    Returns:
        The new config (also stored on the controller).
    """
    controller = get_controller(model)
    c = controller.config
    p = deployed_weights(c)
    for _, layer in peft_seam.lora_layers(model):
        A, B = peft_seam.factors(layer)
        A_new, B_new, _ = svd_factors(A, B, p)
        A.copy_(A_new)
        B.copy_(B_new)
    controller.config = ordered_config(c)
    controller._cache.clear()
    return controller.config


# -- adapters on disk -------------------------------------------------------------------------

@dataclasses.dataclass
class LoraFactors:
    """A LoRA adapter read from disk: per layer (A (r_l, m), B (n, r_l), p (r_l,)), plus what else to copy."""

    config: MatryoshkaConfig | None  # None for a plain PEFT adapter
    peft_config: dict
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    extra: dict[str, torch.Tensor]  # modules_to_save tensors, copied as they are
    notes: list[str]


def _index(tensors: dict[str, torch.Tensor], origin: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({module: {"A": tensor, "B": tensor}}, other tensors), checked by `peft_seam.index_keys`."""
    keys, extra = peft_seam.index_keys(list(tensors), str(origin))
    return {m: {f: tensors[k] for f, k in fk.items()} for m, fk in keys.items()}, {k: tensors[k] for k in extra}


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: the first pattern that matches the module name (or a dotted suffix) wins."""
    for pattern, value in (patterns or {}).items():
        if peft_seam.matches(pattern, name):
            return value
    return default


def read_peft_lora(directory: Path, peft_cfg: dict) -> tuple[dict, list[str]]:
    """Per-layer (A, B, p) of a plain PEFT LoRA adapter, its scale alpha/r (or alpha/sqrt(r)) as p."""
    problems = []
    if peft_cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {peft_cfg.get('peft_type')!r}; only LoRA adapters can be SVD-ordered")
    if peft_cfg.get("use_dora"):
        problems.append("use_dora is set: DoRA rescales each column by a learned magnitude, so a LoRA rank prefix "
                        "of it is not a cut of the trained delta")
    if peft_cfg.get("lora_bias"):
        problems.append("lora_bias is set: the bias of lora_B has no rank prefix")
    r, alpha = peft_cfg.get("r"), peft_cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r={r!r} must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        problems.append(f"lora_alpha={alpha!r} must be a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(peft_cfg.get(key) or {}, dict):
            problems.append(f"{key} must be a mapping of layer pattern to number")
    if problems:
        raise ValueError(f"{directory / PEFT_CONFIG_NAME} cannot be SVD-ordered:\n  - " + "\n  - ".join(problems))
    layers, extra = _index(load_file(str(directory / WEIGHTS_NAME)), directory / WEIGHTS_NAME)
    rslora = bool(peft_cfg.get("use_rslora"))
    out, ranks = {}, set()
    for name, f in layers.items():
        r_l = int(_pattern_value(peft_cfg.get("rank_pattern"), name, r))
        a_l = float(_pattern_value(peft_cfg.get("alpha_pattern"), name, alpha))
        A, B = f["A"], f["B"]
        if A.shape[0] != r_l or B.shape[1] != r_l:
            raise ValueError(f"{directory}: layer {name} has factors of rank {A.shape[0]} but {PEFT_CONFIG_NAME} "
                             f"says r={r_l}; the adapter files disagree.")
        scale = a_l / math.sqrt(r_l) if rslora else a_l / r_l
        out[name] = (A, B, torch.full((r_l,), scale, dtype=torch.float64))
        ranks.add(r_l)
    notes = []
    if len(ranks) > 1:
        notes.append(f"per-layer ranks {sorted(ranks)} were padded with zeros to r={max(ranks)}; a layer of rank "
                     f"r_l is exact from prefix r_l on")
    return {"layers": out, "extra": extra}, notes


def read_lora(directory: str | Path) -> LoraFactors:
    """Read a nested adapter (save_matryoshka) or any plain PEFT LoRA adapter directory, no base model needed.

    Raises:
        FileNotFoundError: the directory or its adapter files are missing.
        ValueError: a corrupt adapter, or one SVD order cannot handle (DoRA, embedding LoRA, LoRA bias).
    """
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        config = check_adapter_dir(directory)
        peft_cfg = json.loads((directory / PEFT_CONFIG_NAME).read_text())
        layers, extra = _index(load_file(str(directory / WEIGHTS_NAME)), directory / WEIGHTS_NAME)
        p = deployed_weights(config)
        return LoraFactors(config, peft_cfg, {n: (f["A"], f["B"], p) for n, f in layers.items()}, extra, [])
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist.")
    for name in (PEFT_CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            hint = " (pickled .bin adapters are not loaded; re-save with safetensors)" if name == WEIGHTS_NAME else ""
            raise FileNotFoundError(f"{directory / name} is missing{hint}: {directory} is not a LoRA adapter directory.")
    try:
        peft_cfg = json.loads((directory / PEFT_CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / PEFT_CONFIG_NAME} is not valid JSON ({e}).") from e
    if not isinstance(peft_cfg, dict):
        raise ValueError(f"{directory / PEFT_CONFIG_NAME} must hold a JSON object (PEFT's LoraConfig).")
    found, notes = read_peft_lora(directory, peft_cfg)
    return LoraFactors(None, peft_cfg, found["layers"], found["extra"], notes)


@locks_output("svd", lambda a: a["out"])
def svd_adapter(src: str | Path, out: str | Path, overwrite: bool = False) -> tuple[Path, list[str]]:
    """`svd_order` on disk: write an SVD-ordered nested adapter of `src` to `out`, without a base model.

    Args:
        src: A nested adapter directory, or any plain PEFT LoRA adapter (adapter_config.json plus
            adapter_model.safetensors): lora_alpha / r, use_rslora, rank_pattern and alpha_pattern
            are honoured; per-layer ranks are zero-padded to the largest r.
        out: The new adapter directory (refused if it exists, unless `overwrite`).
        overwrite: Replace `out` (atomically).

    Returns:
        (out, notes): notes say what was padded.

    Raises:
        FileNotFoundError / ValueError: see `read_lora`; nothing is written then.
        FileExistsError: `out` exists and overwrite is False.
    """
    src = Path(src)
    lora = read_lora(src)
    R = max(a.shape[0] for a, _, _ in lora.layers.values())
    tensors = {}
    for name, (A, B, p) in lora.layers.items():
        r_l = A.shape[0]
        A_pad = torch.cat([A, A.new_zeros(R - r_l, A.shape[1])]) if r_l < R else A  # (R, m)
        B_pad = torch.cat([B, B.new_zeros(B.shape[0], R - r_l)], 1) if r_l < R else B  # (n, R)
        p_pad = torch.cat([p.double(), p.new_zeros(R - r_l, dtype=torch.float64)]) if r_l < R else p
        A_new, B_new, _ = svd_factors(A_pad, B_pad, p_pad)
        tensors[peft_seam.lora_key(name, "A")] = A_new.contiguous()
        tensors[peft_seam.lora_key(name, "B")] = B_new.contiguous()
    tensors.update(lora.extra)
    if lora.config is not None:
        config = ordered_config(lora.config)
    else:
        targets = lora.peft_config.get("target_modules")
        config = MatryoshkaConfig(r=R, ranks=default_ranks(R), method="lora",
                                  target_modules=targets if targets is not None else "all-linear",
                                  modules_to_save=lora.peft_config.get("modules_to_save"), svd_from="peft-lora")
    peft_cfg = dict(lora.peft_config)
    peft_cfg.update(r=R, lora_alpha=R, use_rslora=False, rank_pattern={}, alpha_pattern={}, inference_mode=True)
    with atomic_directory(out, overwrite) as tmp:
        for item in src.iterdir():  # tokenizer files, model card, ...: everything but what we rewrite
            if item.is_file() and item.name not in (WEIGHTS_NAME, CONFIG_NAME, PEFT_CONFIG_NAME):
                shutil.copy2(item, tmp / item.name)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **config_record(config)})
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")
        config.save(tmp)
    return Path(out), lora.notes
