"""Export a rank prefix as a llama.cpp LoRA adapter (GGUF), next to a GGUF base model.

The file is what llama.cpp's `convert_lora_to_gguf.py` writes: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, and per adapted weight `blk.N.<tensor>.weight.lora_a`
(PEFT's lora_A, (r, in)) and `.lora_b` (lora_B, (out, r)). llama.cpp scales each product by
`alpha / r`, r read from the tensor, so the prefix is cut as `export_rank` cuts it: a uniform rank
k with `alpha = s_k k`, per-layer ranks in the portable layout (padded to one r, s_k in lora_B).
For Llama, the GGUF base stores q and k rows permuted for its rotary kernel, so the rows of those
lora_B are permuted the same way. Only the base model's config is read, never its weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..core.locking import locks_output
from ..core.models import embedded_name, resolve
from ..core.ranks import parse_rank_spec
from ..core.saving import PEFT_CONFIG_NAME, WEIGHTS_NAME
from .export import export_rank

# transformers model_type -> (llama.cpp architecture, q/k rows permuted in the GGUF base)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True)}


def base_config(model: str):
    """The base model's transformers config from a Hub id, a local directory, a .gguf file or an
    embedded name (a GGUF's config comes from its metadata; no weights are read)."""
    from transformers import AutoConfig

    source, gguf_file = resolve(embedded_name(model) or model)
    return AutoConfig.from_pretrained(source, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(source)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` on the output rows of a q/k projection (or its lora_B)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors -> llama.cpp names (`blk.N.attn_q.weight.lora_a`), q/k lora_B permuted."""
    import gguf

    from ..core import peft_seam

    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports {', '.join(ARCHITECTURES)} base models; this base is "
                         f"{config.model_type!r}. Export a PEFT adapter instead (mlora export without --format gguf).")
    arch, permuted = ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    out = {}
    for key, t in tensors.items():
        parsed = peft_seam.parse_lora_key(key)
        if parsed is None:
            raise ValueError(f"{key}: llama.cpp adapters hold LoRA factors only (no modules_to_save); export without "
                             "modules_to_save.")
        module, factor = parsed
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"{module} has no llama.cpp tensor name for {arch}; adapt only the attention and MLP "
                             "projections for a GGUF export.")
        if factor == "B" and permuted and module.endswith(("q_proj", "k_proj")):
            t = permute_rows(t, n_head if module.endswith("q_proj") else n_kv)
        out[f"{name}.lora_{factor.lower()}"] = t.float().contiguous()
    return out


@locks_output("export", lambda a: a["out_file"])
def export_gguf(source, rank, out_file: str | Path, *, base_model: str | None = None, default: int | None = None,
                overwrite: bool = False, allow_untrained: bool = False) -> Path:
    """Write the rank-k prefix of a nested adapter as a llama.cpp LoRA adapter file.

    Args:
        source: A matryoshka model or an adapter directory.
        rank: k in 1..R, or {layer pattern: k} (written in the portable layout).
        out_file: The .gguf file to write.
        base_model: Where to read the base config (Hub id, directory, .gguf file, embedded name);
            default: the adapter's base_model_name_or_path.
        default, allow_untrained: As in `export_rank`.
        overwrite: Replace an existing file.

    Returns:
        The written file. Run it with llama.cpp's `--lora FILE` next to the GGUF base model.

    Raises:
        ValueError: an architecture llama.cpp adapters are not written for here, modules_to_save,
            or the errors of `export_rank`.
        FileExistsError: `out_file` exists and overwrite is False.
    """
    import gguf
    from safetensors.torch import load_file

    out_file = Path(out_file)
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"{out_file} already exists; pass overwrite=True (--overwrite) or choose another file.")
    if isinstance(rank, str):
        rank = parse_rank_spec(rank)
    if isinstance(rank, (list, tuple)):
        raise ValueError(f"GGUF export writes one rank per file; got {list(rank)}. Export each rank separately.")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_file.name}.", dir=out_file.parent) as tmp:
        peft_dir = export_rank(source, rank, Path(tmp) / "adapter", default=default, allow_untrained=allow_untrained,
                               layout="portable")  # uniform k: alpha = s_k k; per layer: padded, scale in lora_B
        cfg = json.loads((peft_dir / PEFT_CONFIG_NAME).read_text())
        config = base_config(base_model or cfg.get("base_model_name_or_path") or "")
        tensors = gguf_tensors(load_file(str(peft_dir / WEIGHTS_NAME)), config)
        staged = Path(tmp) / out_file.name
        writer = gguf.GGUFWriter(str(staged), arch=ARCHITECTURES[config.model_type][0])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))  # scale = alpha / r per tensor
        for name, t in tensors.items():
            writer.add_tensor(name, t.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staged, out_file)
    return out_file
