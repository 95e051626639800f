"""Evaluation at every rank: one sweep over S = {1..32} against |S| single-rank evaluations.

Two comparisons on one loaded matryoshka model (R = 32, S = {1, ..., 32}, random adapter):

- `sweep`: `evaluate_ranks` (held-out completion loss) over all of S in one call, against
  `singles`: |S| separate `evaluate_ranks` calls, one rank each. A sweep only switches the cached
  P vector between ranks (no reload, no re-built adapter), so the target is
  sweep / singles <= 1.05.
- `mixed`: the mixed-rank batch path (`set_row_ranks`): the batch stacked |S| times, row block k
  at rank k, one forward; against `separate`: |S| forwards of the batch, one per `set_rank(k)`.
  Both give the same logits (tests/test_mixed_ranks.py); this is the time of each.

    python -m benchmarks.rank_sweep --shape smollm2-135m
"""

from __future__ import annotations

import torch

from .common import benchmark_main, build_base, interleave, log, summarize


def build_model(shape: str, r: int, ranks, layers: int | None = None, device: str = "cpu"):
    from matryoshka_lora.core.config import MatryoshkaConfig
    from matryoshka_lora.core.model import get_matryoshka_model
    from matryoshka_lora.core.peft_seam import factors, lora_layers

    base = build_base(shape, layers=layers, device=device).eval()
    torch.manual_seed(1)
    model = get_matryoshka_model(base, MatryoshkaConfig(r=r, ranks=list(ranks))).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts B at 0; random factors make every rank a different model
        for _, layer in lora_layers(model):
            for w in factors(layer):
                w.copy_(torch.randn(w.shape, generator=g).to(w) * 0.02)
    return model


def run(shape: str = "smollm2-135m", r: int = 32, n_examples: int = 1, rounds: int = 3, warmup: int = 1,
        layers: int | None = 4, device: str = "cpu", tokenizer=None) -> dict:
    """Time the sweep and the mixed-rank batch; ratios are sweep/singles and mixed/separate.

    The default cuts SmolLM2 to its first 4 layers and scores one short example (no chat
    template): each round is 4 x |S| forwards, and a cheaper forward makes any fixed per-rank
    cost of the sweep a larger share, so the check is stricter, not looser.

    Args:
        tokenizer: Needed for config-built shapes; the embedded model brings its own.
    """
    from matryoshka_lora.core.model import set_rank, set_row_ranks
    from matryoshka_lora.data.prompts import encode_for_training
    from matryoshka_lora.data.synthetic import generate_arith
    from matryoshka_lora.evaluation.likelihood import right_pad
    from matryoshka_lora.evaluation.sweep import EvalConfig, evaluate_ranks

    ranks = list(range(1, r + 1))
    log(f"rank sweep: {shape} R={r} |S|={len(ranks)}")
    model = build_model(shape, r, ranks, layers, device)
    if tokenizer is None:
        from matryoshka_lora.core.models import load_model

        if shape != "smollm2-135m":
            raise ValueError(f"shape {shape!r} needs a tokenizer= (only smollm2-135m brings its own).")
        tokenizer = load_model("smollm2-135m")[1]
    examples = generate_arith("test", n_examples, seed=0)

    def evaluate(eval_ranks):
        config = EvalConfig(eval_ranks=eval_ranks, metrics=["loss"], include_base=False, eval_batch_size=n_examples)
        return evaluate_ranks(model, tokenizer, examples, config, chat_template=False)

    encoded = [encode_for_training(tokenizer, e, chat_template=False) for e in examples]
    ids = right_pad([e["input_ids"] for e in encoded], tokenizer.pad_token_id or 0).to(device)  # (b, T)
    mask = right_pad([e["attention_mask"] for e in encoded], 0).to(device)
    stacked_ids, stacked_mask = ids.repeat(len(ranks), 1), mask.repeat(len(ranks), 1)  # (|S| b, T)
    row_ranks = [k for k in ranks for _ in range(ids.shape[0])]

    @torch.inference_mode()
    def mixed():
        with set_row_ranks(model, row_ranks):
            return model(input_ids=stacked_ids, attention_mask=stacked_mask).logits

    @torch.inference_mode()
    def separate():
        for k in ranks:
            with set_rank(model, k):
                model(input_ids=ids, attention_mask=mask)

    cases = {"sweep": lambda: evaluate(ranks), "singles": lambda: [evaluate([k]) for k in ranks],
             "mixed": mixed, "separate": separate}
    times = interleave(cases, rounds=rounds, warmup=warmup, device=device)
    sweep = summarize({k: times[k] for k in ("sweep", "singles")}, reference="singles")
    mix = summarize({k: times[k] for k in ("mixed", "separate")}, reference="separate")
    return {
        "config": dict(shape=shape, layers=model.get_base_model().config.num_hidden_layers, r=r, ranks=ranks,
                       n_examples=n_examples, tokens=list(ids.shape), rounds=rounds, warmup=warmup, device=device,
                       metric="loss (evaluate_ranks)"),
        "sweep_vs_singles": sweep,
        "mixed_vs_separate": mix,
        "sweep_ratio": sweep["sweep"]["median_round_ratio"],
        "mixed_ratio": mix["mixed"]["median_round_ratio"],
        "single_rank_eval_s": sweep["singles"]["median_s"] / len(ranks),
    }


def table(result: dict) -> str:
    s, m = result["sweep_vs_singles"], result["mixed_vs_separate"]
    n = len(result["config"]["ranks"])
    return "\n".join([
        "| comparison | ratio (median of rounds) | ratio of medians | seconds |",
        "|---|---|---|---|",
        f"| sweep over {n} ranks / {n} single-rank evaluate_ranks | {s['sweep']['median_round_ratio']:.3f} | "
        f"{s['sweep']['ratio_of_medians']:.3f} | {s['sweep']['median_s']:.2f} vs {s['singles']['median_s']:.2f} |",
        f"| mixed-rank batch ({n} ranks, 1 forward) / {n} forwards | {m['mixed']['median_round_ratio']:.3f} | "
        f"{m['mixed']['ratio_of_medians']:.3f} | {m['mixed']['median_s']:.2f} vs {m['separate']['median_s']:.2f} |",
    ])


def add_arguments(ap) -> None:
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--examples", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)


def main(argv=None) -> dict:
    return benchmark_main(argv, __doc__, "rank_sweep", add_arguments, lambda args: run(
        args.shape, args.r, args.examples, args.rounds, args.warmup, args.layers), table)


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
