"""Data-free rank allocation: keep the singular values with the most energy per parameter.

After SVD order (svd.py) the rank-k prefix of layer l is the best rank-k cut of its deployed
delta `dW_l = B_l diag(p) A_l`, and leaving out its i-th singular value costs exactly
sigma_{l,i}^2 of squared Frobenius error (Eckart-Young). One unit of rank of layer l costs
m_l + n_l adapter parameters, so under a parameter budget the allocation keeps, across all
layers, the singular values with the largest

    sigma_{l,i}^2 / (m_l + n_l)

(PARA's global threshold, measured per parameter). `allocation.allocation_curve(by="spectrum")`
walks the same greedy path and fills the budget the same way as the calibration allocation, with
these gains in place of the first-order loss drop. The gains never change along the path, so no
data and no forward pass are needed: only the adapter's factors (a directory is read without the
base model). Singular values come from `svd.svd_factors`, O((m + n) R^2) per layer; no m x n
matrix is formed. A move whose singular values are all 0 (a padded or rank-deficient layer) is
never taken: it would add parameters that change nothing.

The chosen k_l are prefixes of the SVD-ordered factors, so the rule takes an SVD-ordered adapter
(`svd_order(model)`, `svd_adapter(src, out)`, `mlora svd`). `mlora allocate --by spectrum` orders
an adapter that is not, writes the ordered copy, and allocates on that copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import peft_seam
from ..core.config import CONFIG_NAME, MatryoshkaConfig
from ..core.model import get_controller
from .svd import deployed_weights, read_lora, svd_factors


@dataclass
class Spectrum:
    """The singular values of every adapted layer's deployed delta."""

    config: MatryoshkaConfig
    names: list[str]  # adapted module names, sorted (ties between layers break the same way for a model and a file)
    sizes: torch.Tensor  # (L,) float64: m_l + n_l, the parameters of one unit of rank
    sigma: torch.Tensor  # (L, R) float64: descending per layer, zero-padded past min(m_l, n_l)

    def gains(self, choices: list[int]) -> torch.Tensor:
        """(L, C-1) float64: the squared Frobenius error that moving each layer from rank choices[c] to choices[c+1] removes."""
        kept = torch.cat([self.sigma.new_zeros(len(self.names), 1), (self.sigma ** 2).cumsum(1)], 1)  # (L, R+1): energy of prefix k
        ks = torch.tensor(choices)
        return kept[:, ks[1:]] - kept[:, ks[:-1]]


def is_svd_ordered(config: MatryoshkaConfig | None) -> bool:
    """Whether an adapter's rank prefixes are its best low-rank cuts (it was written by svd_order / svd_adapter)."""
    return config is not None and config.svd_from is not None


def unordered_error(where: str, fix: str) -> ValueError:
    return ValueError(f"{where} is not SVD-ordered, so its rank-k prefix is not its top-k singular directions and a "
                      f"spectrum allocation would keep the wrong ones. {fix}")


def layer_spectra(source: torch.nn.Module | str | Path) -> Spectrum:
    """The singular values of every layer of an SVD-ordered adapter.

    Args:
        source: A matryoshka model after `svd_order`, or an adapter directory written by
            `svd_adapter` / `mlora svd` (read without a base model).

    Returns:
        A `Spectrum`: sorted layer names, m_l + n_l (L,), sigma (L, R).

    Raises:
        ValueError: the adapter is not SVD-ordered (the message says how to order it).
        FileNotFoundError: see `svd.read_lora`.
    """
    if isinstance(source, torch.nn.Module):
        config = get_controller(source).config
        if not is_svd_ordered(config):
            raise unordered_error(f"The model (method {config.method})",
                                  "Call svd_order(model) first: it keeps the full-rank output and makes every "
                                  "prefix the best cut of its rank.")
        p = deployed_weights(config)
        layers = {name: (*peft_seam.factors(layer), p) for name, layer in peft_seam.lora_layers(source)}
    else:
        lora = read_lora(source)
        if not is_svd_ordered(lora.config):
            what = "a plain PEFT LoRA adapter" if lora.config is None else f"a {lora.config.method} adapter"
            raise unordered_error(f"{source} ({what})",
                                  f"Run `mlora svd {source} --out DIR` (svd_adapter) and allocate on DIR, or run "
                                  "`mlora allocate --by spectrum`, which writes the ordered copy for you.")
        config, layers = lora.config, lora.layers
    names = sorted(layers)
    sigma = torch.stack([svd_factors(*layers[n])[2].cpu() for n in names])  # (L, R)
    sizes = torch.tensor([layers[n][0].shape[1] + layers[n][1].shape[0] for n in names], dtype=torch.float64)
    return Spectrum(config, names, sizes, sigma)


def adapter_is_svd_ordered(directory: str | Path) -> bool:
    """Whether an adapter directory holds an SVD-ordered nested adapter (plain PEFT adapters never are)."""
    path = Path(directory) / CONFIG_NAME
    return path.is_file() and is_svd_ordered(MatryoshkaConfig.load(Path(directory)))
