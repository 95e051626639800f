"""A minimal real run until the end-to-end demo lands: a tiny Llama learns a sequence, all three methods."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import MatryoshkaConfig, aurac, get_matryoshka_model, set_rank


def run_demo(steps: int = 60, r: int = 8) -> dict:
    data = torch.arange(64).remainder(29).view(4, 16)  # a fixed pattern the base model does not know
    results = {}
    for method in ("lora", "dylora", "matryoshka"):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
        model = get_matryoshka_model(base, MatryoshkaConfig(r=r, method=method)).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(steps):
            if method == "dylora":
                model._mlora_controller.draw(step)
            model(input_ids=data, labels=data).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        ranks = model._mlora_controller.config.ranks
        with torch.no_grad():
            acc = []
            for k in ranks:
                with set_rank(model, k):
                    pred = model(input_ids=data).logits[:, :-1].argmax(-1)
                acc.append(100 * (pred == data[:, 1:]).float().mean().item())
        results[method] = dict(zip(ranks, acc), aurac=aurac(ranks, acc))
        print(f"{method:>10}: " + "  ".join(f"r{k}={a:5.1f}" for k, a in zip(ranks, acc)) + f"  AURAC={results[method]['aurac']:.1f}")
    return results
