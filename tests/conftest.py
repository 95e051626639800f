"""Tiny models built from configs on the spot: nothing is downloaded."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model
from matryoshka_lora.core.peft_seam import factors, lora_layers

VOCAB = 128

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads
# contending with other processes make each matmul 10-20x slower.
torch.set_num_threads(1)

# Fuzz tests (test_fuzz.py): `quick` in the default suite (a fixed, small sample of inputs, so a
# run is reproducible and takes seconds); `make test-slow` passes --hypothesis-profile=deep.
_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("quick", max_examples=40, derandomize=True, database=None, **_FUZZ)
settings.register_profile("deep", max_examples=1000, **_FUZZ)
settings.load_profile("quick")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def randomize_adapter(model, seed: int = 1, std: float = 0.1):
    """PEFT starts B at zero; give every factor random values so all ranks differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for w in factors(layer):
                w.copy_(torch.randn(w.shape, generator=g) * std)
    return model


def make_model(arch="llama", seed=0, randomize=True, **cfg):
    cfg.setdefault("r", 8)
    cfg.setdefault("method", "matryoshka")  # the paper's P, which the equivalence tests are about
    model = get_matryoshka_model(BUILDERS[arch](seed), MatryoshkaConfig(**cfg))
    return (randomize_adapter(model) if randomize else model).eval()


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and a tiny BPE tokenizer saved as a local model directory (for the CLI)."""
    from tiny_tokenizer import tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def load_script(relative: str):
    """Import a script of the repository (e.g. benchmarks/reproduce_paper.py) as a module."""
    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
