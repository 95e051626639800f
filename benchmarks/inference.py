"""Inference at rank k: unmerged and merged rank-k forwards against the base model.

Cases, all batched forwards under `torch.inference_mode()` on the same input:

- `base`: the fresh transformers model, no PEFT anywhere (the reference);
- `unmerged`: the matryoshka model (R = 32, random adapter) at `set_rank(k)`: the LoRA
  bottleneck runs at full R, masked to the prefix by the cached s_k P_k;
- `merged`: `merge_rank(model, k)`: the prefix is added into W0 and PEFT runs the base layers
  alone (its LoRA wrappers stay, so `unmerge` can undo it);
- `merged_unloaded`: `merge_rank(model, k, unload=True)`: a plain transformers model again.

Targets: merged / base = 1 within noise (no adapter cost left after merging).

    python -m benchmarks.inference --shape smollm2-135m --ks 8 32
"""

from __future__ import annotations

import copy

import torch

from .common import benchmark_main, build_base, interleave, log, share_copy, summarize


def run(shape: str = "smollm2-135m", r: int = 32, ks=(8, 32), batch: int = 2, seq: int = 64, rounds: int = 5,
        warmup: int = 1, layers: int | None = None, device: str = "cpu") -> dict:
    """Time base / unmerged / merged / merged_unloaded forwards at each k; ratios against base."""
    from matryoshka_lora.core.config import MatryoshkaConfig
    from matryoshka_lora.core.model import get_matryoshka_model, set_rank
    from matryoshka_lora.core.peft_seam import factors, lora_layers
    from matryoshka_lora.deploy.merge import merge_rank

    base = build_base(shape, layers=layers, device=device).eval()
    torch.manual_seed(1)
    adapted = get_matryoshka_model(share_copy(base), MatryoshkaConfig(r=r)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(adapted):
            for w in factors(layer):
                w.copy_(torch.randn(w.shape, generator=g).to(w) * 0.02)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2)).to(device)

    def forward(model):
        @torch.inference_mode()
        def call():
            return model(input_ids=ids).logits

        return call

    out = {"config": dict(shape=shape, layers=base.config.num_hidden_layers, r=r, ks=list(ks), batch=batch, seq=seq,
                          rounds=rounds, warmup=warmup, device=device, reference="base"),
           "per_k": {}}
    for k in ks:
        log(f"inference: {shape} k={k}")
        merged = merge_rank(copy.deepcopy(adapted), k)  # own weights: merging writes W0
        unloaded = merge_rank(copy.deepcopy(adapted), k, unload=True)
        with set_rank(adapted, k):
            times = interleave({"base": forward(base), "unmerged": forward(adapted), "merged": forward(merged),
                                "merged_unloaded": forward(unloaded)}, rounds=rounds, warmup=warmup, device=device)
        out["per_k"][str(k)] = summarize(times, reference="base")
        del merged, unloaded
    return out


def table(result: dict) -> str:
    rows = ["| k | case | time / base (median of rounds) | time / base (of medians) | median s |", "|---|---|---|---|---|"]
    for k, res in result["per_k"].items():
        for case, t in res.items():
            rows.append(f"| {k} | {case} | {t['median_round_ratio']:.3f} | {t['ratio_of_medians']:.3f} | {t['median_s']:.3f} |")
    return "\n".join(rows)


def add_arguments(ap) -> None:
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)


def main(argv=None) -> dict:
    return benchmark_main(argv, __doc__, "inference", add_arguments, lambda args: run(
        args.shape, ks=args.ks, batch=args.batch, seq=args.seq, rounds=args.rounds, warmup=args.warmup), table)


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
