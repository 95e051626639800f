"""Training step cost: plain PEFT LoRA against our lora / dylora / matryoshka / multirank-split2, and
the base-only floor.

Ours run the fused LoRA forward (core/fused.py, the default); `matryoshka_unfused` runs PEFT's
forward plus the P hook, the path before it. The optimizer is the Trainer's default,
AdamW(fused=True) (`adamw_torch_fused`). `multirank-split2` is the study's candidate
`multirank@split2` (`ranks_per_step=2, multirank_rows="split"`): the batch's rows are dealt over
rank R and one drawn rank, one masked forward/backward, as `MultirankLoss.training_step` runs it.

One step = forward with labels + backward + AdamW step + zero_grad, at the same model, batch,
sequence length, target modules ("all-linear") and R. All variants share the frozen base
weights (one copy in memory) and start from the same adapter init (`torch.manual_seed` before
each wrap). PEFT LoRA uses lora_alpha = R, so its scale alpha/R = 1 = our s_R (scaling "none").

The base-only floor is the same model with no adapter: every weight frozen, the embedding output
made to require grad (`enable_input_require_grads`), so backward runs through every layer and
computes activation gradients but no weight gradient, and there is no optimizer (nothing to
update). No adapter method can be cheaper.

    python -m benchmarks.training_step --shape smollm2-135m --ranks 8 32 128
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from .common import (
    benchmark_main,
    build_base,
    interleave,
    log,
    memory_method,
    op_difference,
    profile_step,
    share_copy,
    state_tensors,
    storage_bytes,
    summarize,
)

VARIANTS = ("peft_lora", "lora", "dylora", "matryoshka", "matryoshka_unfused", "multirank-split2", "base_only")
REFERENCE = "peft_lora"
ADAPTER_SEED = 1


def build_variant(base: torch.nn.Module, variant: str, r: int, batch: int = 1):
    """(model, optimizer or None, per-step hook or None) for one variant over `base`'s shared weights.

    The hook runs before each step; a hook that returns a context manager has the step run inside it.
    """
    from peft import LoraConfig, get_peft_model

    from matryoshka_lora.core.config import MatryoshkaConfig
    from matryoshka_lora.core.model import draw_rank, get_controller, get_matryoshka_model, set_row_ranks

    model = share_copy(base)
    before_step = None
    if variant == "base_only":
        model.enable_input_require_grads()
        return model, None, None
    torch.manual_seed(ADAPTER_SEED)
    if variant == "peft_lora":
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", lora_dropout=0.0,
                                                 bias="none"))
    elif variant == "multirank-split2":
        model = get_matryoshka_model(model, MatryoshkaConfig(r=r, method="multirank", ranks_per_step=2,
                                                             multirank_rows="split", target_modules="all-linear"))
        controller, steps = get_controller(model), itertools.count()
        # the step's row ranks, as MultirankLoss.training_step deals them (a new draw every step)
        before_step = lambda: set_row_ranks(model, controller.split_rows(next(steps), 0, batch))  # noqa: E731
    else:  # ours: the fused forward (the default), or PEFT's forward plus the P hook ("_unfused")
        method, _, unfused = variant.partition("_")
        model = get_matryoshka_model(model, MatryoshkaConfig(r=r, method=method, target_modules="all-linear"),
                                     fused=not unfused)
        if variant == "dylora":
            before_step = lambda: draw_rank(model)  # noqa: E731 - one draw per optimizer step, as in training
        prime_vectors(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)  # the Trainer's default optim, adamw_torch_fused
    init_state(optimizer)
    return model, optimizer, before_step


def prime_vectors(model) -> None:
    """Build the cached training P vectors (every DyLoRA draw too), as the first steps of a run would.

    The measured first step then shows the steady state: no vector is built inside it.
    """
    from matryoshka_lora.core.model import get_controller
    from matryoshka_lora.core.peft_seam import factors, lora_layers

    controller = get_controller(model)
    name, layer = next(iter(lora_layers(model)))
    like = factors(layer)[0].new_empty(0, controller.config.r)  # lora_A's output: (..., R), its dtype and device
    previous = controller.training_k
    for k in controller.config.ranks if controller.config.method == "dylora" else [None]:
        controller.training_k = k
        controller.vector(name, like)
    controller.training_k = previous


def init_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's moment buffers now (a step on zero grads changes no weight beyond its tiny decay).

    So the first measured step already starts from the steady state: parameters, moments, no grads.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_step(model, optimizer, before_step, input_ids):
    def step():
        context = before_step() if before_step is not None else None
        with context if hasattr(context, "__enter__") else contextlib.nullcontext():
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def run(shape: str = "smollm2-135m", ranks=(8, 32, 128), batch: int = 1, seq: int = 64, layers: int | None = None,
        rounds: int = 6, warmup: int = 0, device: str = "cpu", dtype: str = "float32",
        variants=VARIANTS) -> dict:
    """Time and measure every variant at each R; ratios are against PEFT LoRA at the same R.

    Per variant, the first step runs under the memory profiler (CPU) or peak counter (CUDA; after
    one plain step of every variant) and doubles as warm-up; `warmup` more untimed steps follow,
    then `rounds` interleaved rounds.

    Returns:
        {"config", "memory_method", "per_r": {R: {"time": summarize(...), "peak_bytes": {...},
        "memory_ratio": {...}, "trainable_params": {...}}}}.
    """
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    base = build_base(shape, layers=layers, device=device, dtype=torch_dtype)
    vocab = base.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(2)).to(device)
    out = {
        "config": dict(shape=shape, layers=base.config.num_hidden_layers, hidden=base.config.hidden_size,
                       batch=batch, seq=seq, ranks=list(ranks), rounds=rounds, warmup=warmup, device=device,
                       dtype=dtype, target_modules="all-linear", optimizer="AdamW(fused=True)", reference=REFERENCE,
                       variants=list(variants)),
        "memory_method": memory_method(device),
        "per_r": {},
    }
    for r in ranks:
        log(f"training step: {shape} R={r}")
        built = {v: build_variant(base, v, r, batch) for v in variants}
        steps = {v: make_step(m, opt, hook, input_ids) for v, (m, opt, hook) in built.items()}
        if str(device).startswith("cuda"):
            for step in steps.values():  # cuBLAS workspaces are allocated once per process: not by one variant
                step()
        peaks, trainable, ops = {}, {}, {}
        for v, (m, opt, hook) in built.items():  # AdamW state exists, grads are cleared: the steady state
            state = storage_bytes(state_tensors(m, opt))
            in_step, ops[v] = profile_step(steps[v], device)
            peaks[v] = state + in_step
            trainable[v] = sum(p.numel() for p in m.parameters() if p.requires_grad)
        times = interleave(steps, rounds=rounds, warmup=warmup, device=device)
        timing = summarize(times, REFERENCE)
        out["per_r"][str(r)] = {
            "time": timing,
            "tokens_per_s": {v: batch * seq / timing[v]["median_s"] for v in variants},
            "peak_bytes": peaks,
            "memory_ratio": {v: peaks[v] / peaks[REFERENCE] for v in variants} if REFERENCE in peaks else {},
            "trainable_params": trainable,
            "adapted_layers": sum(1 for name, _ in built[REFERENCE][0].named_modules() if name.endswith(".lora_A"))
            if REFERENCE in built else None,
            "ops_per_step": {v: sum(c.values()) for v, c in ops.items()},
            "ops_vs_reference": {v: op_difference(c, ops[REFERENCE]) for v, c in ops.items() if v != REFERENCE}
            if REFERENCE in ops else {},
        }
        del built, steps
    return out


def table(result: dict) -> str:
    """Markdown rows: step time and peak memory of each variant relative to PEFT LoRA."""
    cfg = result["config"]
    rows = []
    for r, res in result["per_r"].items():
        for v, t in res["time"].items():
            mem = res["memory_ratio"].get(v, float("nan"))
            rows.append(f"| {cfg['shape']} ({cfg['layers']} layers) | {r} | {v} | {t['median_round_ratio']:.3f} | "
                        f"{t['ratio_of_medians']:.3f} | {t['median_s']:.3f} | {mem:.4f} | "
                        f"{res['peak_bytes'][v] / 2**20:.0f} |")
    head = ("| shape | R | variant | time / PEFT (median of rounds) | time / PEFT (of medians) | median s | "
            "peak mem / PEFT | peak MiB |\n|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def add_arguments(ap) -> None:
    ap.add_argument("--shape", default="smollm2-135m", help="smollm2-135m | llama-3.2-1b | tiny")
    ap.add_argument("--layers", type=int, default=None, help="Override the number of layers (default: the shape's).")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=0, help="Untimed steps after the (also untimed) memory step.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def main(argv=None) -> dict:
    return benchmark_main(argv, __doc__, "training_step", add_arguments, lambda args: run(
        args.shape, args.ranks, args.batch, args.seq, args.layers, args.rounds, args.warmup, args.device, args.dtype),
        table)


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
