"""Load a base model by local path or Hugging Face id (a stand-in until the shared model loader lands)."""

from __future__ import annotations

import torch


def load_base_model(name: str, dtype: str | torch.dtype = "auto") -> torch.nn.Module:
    """A causal LM from a local directory or a Hugging Face id, in its checkpoint dtype by default."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()


def load_tokenizer(name: str):
    """The tokenizer stored with `name`, or None when it has none (a bare model directory)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        return None
