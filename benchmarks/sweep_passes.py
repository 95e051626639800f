"""A full rank sweep in one pass against one rank at a time, on a trained adapter.

`evaluate_ranks` scores the base model plus every rank of S = {1, 2, 4, 8, 16, 32} (7 models),
with each metric two ways, in the same process, interleaved round by round:

- `one_pass`: EvalConfig(one_pass=True, draft_generation=True). loss and mc stack rows x ranks
  into the same batches; generate decodes once at rank 32 and checks each rank against the rank
  above it in one teacher-forced pass (evaluation/rank_generation.py); match is always one pass.
- `by_rank`: one rank after another (EvalConfig(one_pass=False); for match, `completion_match`
  called once per rank).

Both must give the same numbers (checked here, and in tests/test_one_pass.py). How much the
draft saves depends on how often the ranks agree, so the adapter is a trained one: `--adapter DIR`
(a `mlora train` output), or by default a short run on the built-in arith task, trained here.

    python -m benchmarks.sweep_passes --steps 60 --problems 32
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import benchmark_main, interleave, log, summarize

RANKS = [1, 2, 4, 8, 16, 32]
METRICS = ("generate", "match", "loss", "mc")


def trained_adapter(out: Path, steps: int, model: str = "smollm2-135m", batch_size: int = 8, lr: float = 1e-3) -> Path:
    """A short `mlora train` run (matryoshka, R = 32) on the built-in arith task."""
    from matryoshka_lora.experiment import RunConfig, train

    run = RunConfig.from_flat(dict(model=model, dataset="arith", r=32, ranks=RANKS, chat_template=False,
                                   max_steps=steps, batch_size=batch_size, num_train=steps * batch_size,
                                   learning_rate=lr, warmup_steps=0, seed=42, output_dir=str(out), save_steps=0,
                                   disable_tqdm=True, metrics=["loss"], num_eval=4,
                                   deploy_order="none"))
    train(run)
    return out / "adapter"


def with_choices(examples):
    """arith problems as 4-way multiple choice: the gold final answer and three wrong numbers."""
    from dataclasses import replace

    out = []
    for i, e in enumerate(examples):
        gold = int(e.answer)
        options = [gold + d for d in (0, 1, -2, 10)]
        label = i % 4
        options[0], options[label] = options[label], options[0]
        out.append(replace(e, choices=[f" {v}" for v in options], label=label))
    return out


def run(adapter: str | None = None, steps: int = 60, problems: int = 32, max_new_tokens: int = 48,
        batch_size: int = 32, rounds: int = 2, warmup: int = 0, metrics=METRICS, order: str = "none",
        model_name: str = "smollm2-135m") -> dict:
    """`order`: the deployment rule applied after loading: none | fold (`fold_p`) | svd (`svd_order`).
    `model_name`: the base model (tests pass a tiny local one)."""
    from matryoshka_lora import fold_p, load_matryoshka_model, svd_order
    from matryoshka_lora.core.models import load_model
    from matryoshka_lora.data.prompts import encode_examples
    from matryoshka_lora.data.synthetic import generate_arith
    from matryoshka_lora.evaluation.match import completion_match
    from matryoshka_lora.evaluation.sweep import EvalConfig, evaluate_ranks

    trained_here = adapter is None
    with tempfile.TemporaryDirectory() as tmp:
        if trained_here:
            log(f"sweep passes: training a matryoshka adapter for {steps} steps on arith")
            adapter = str(trained_adapter(Path(tmp) / "run", steps, model_name))
        base, tok = load_model(model_name, dtype="float32")
        model = load_matryoshka_model(base, adapter).eval()
    if order != "none":
        {"fold": fold_p, "svd": svd_order}[order](model)
    examples = with_choices(generate_arith("test", problems, seed=0))
    todo = [0] + RANKS
    results: dict = {}

    def case(metric: str, one_pass: bool):
        config = EvalConfig(eval_ranks=RANKS, metrics=[metric], eval_batch_size=batch_size,
                            max_new_tokens=max_new_tokens, one_pass=one_pass, draft_generation=one_pass)
        if metric == "match" and not one_pass:
            encoded = encode_examples(tok, examples, chat_template=False, max_length=1024)

            def by_rank():
                results[(metric, one_pass)] = {k: completion_match(model, encoded, [k], batch_size)[k] for k in todo}
            return by_rank

        def score():
            res = evaluate_ranks(model, tok, examples, config, chat_template=False,
                                 keep_items=metric in ("generate", "match"))
            if metric == "match":
                results[(metric, one_pass)] = {int(k): v for k, v in res["match_hits"].items()}
            else:
                results[(metric, one_pass)] = ({"base": res["base"], **res["per_rank"]}, res.get("items"),
                                               res["timings"].get("generation_draft"))
        return score

    out = {"config": dict(model=model_name, adapter="matryoshka, trained here on arith" if trained_here else adapter,
                          train_steps=steps if trained_here else None, order=order, problems=problems, ranks=todo, max_new_tokens=max_new_tokens,
                          eval_batch_size=batch_size, rounds=rounds, warmup=warmup, threads=torch.get_num_threads()),
           "per_metric": {}}
    for metric in metrics:
        log(f"sweep passes: {metric}")
        times = interleave({"one_pass": case(metric, True), "by_rank": case(metric, False)}, rounds=rounds,
                           warmup=warmup)
        a, b = results[(metric, True)], results[(metric, False)]
        same = a == b if metric == "match" else same_scores(a[0], b[0]) and a[1] == b[1]
        out["per_metric"][metric] = {"time": summarize(times, "by_rank"), "same_numbers": same,
                                     **({"draft": a[2]} if metric == "generate" else {})}
        if metric == "generate":
            out["per_metric"][metric]["accuracy"] = {str(k): v["exact_match_strict"] for k, v in a[0].items()}
    out["ratios"] = {m: r["time"]["one_pass"]["median_round_ratio"] for m, r in out["per_metric"].items()}
    out["all_same"] = all(r["same_numbers"] for r in out["per_metric"].values())
    return out


def same_scores(a: dict, b: dict, rel: float = 1e-5) -> bool:
    """Equal scores, losses up to float summation order."""
    if a.keys() != b.keys():
        return False
    for k in a:
        for name, x in a[k].items():
            y = b[k][name]
            if name in ("loss", "perplexity"):
                if abs(x - y) > rel * max(abs(x), abs(y), 1e-12):
                    return False
            elif x != y:
                return False
    return True


def table(result: dict) -> str:
    rows = ["| metric | one pass / rank by rank (median of rounds) | seconds (one pass vs by rank) | same numbers |",
            "|---|---|---|---|"]
    for metric, r in result["per_metric"].items():
        t = r["time"]
        rows.append(f"| {metric} | {t['one_pass']['median_round_ratio']:.3f} | {t['one_pass']['median_s']:.1f} vs "
                    f"{t['by_rank']['median_s']:.1f} | {r['same_numbers']} |")
    return "\n".join(rows)


def add_arguments(ap) -> None:
    ap.add_argument("--adapter", default=None, help="A trained adapter directory (default: train one here).")
    ap.add_argument("--steps", type=int, default=60, help="Training steps of the adapter trained here.")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    ap.add_argument("--order", default="none", choices=["none", "fold", "svd"],
                    help="Deployment rule applied to the adapter before the sweep.")


def main(argv=None) -> dict:
    return benchmark_main(argv, __doc__, "sweep_passes", add_arguments, lambda args: run(
        args.adapter, args.steps, args.problems, args.max_new_tokens, args.batch_size, args.rounds,
        metrics=args.metrics, order=args.order), table)


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
