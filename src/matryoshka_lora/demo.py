"""`mlora demo`: `compare` on the embedded default (SmolLM2-135M-Instruct, built-in arithmetic task).

It trains the default (the `MatryoshkaConfig` method saved in the `TrainConfig` deployment rule:
study v2's winner) next to plain LoRA and DyLoRA at R = 32, and scores every rank on 100 held-out
problems with completion match (greedy decoding reproduces the whole gold completion; all ranks in
one pass), so one problem is 1 point. Sized to finish within 10 minutes on a 2-core CPU (the time
measured is in the README). The learning rates are study v2's picks; the paper's MatryoshkaLoRA
would need a ~3x lower one, because its P_1 = |S| = 6 times LoRA's step.
"""

from __future__ import annotations

import time
from pathlib import Path

from .comparison import CompareConfig, compare, variant_parts
from .core.config import MatryoshkaConfig
from .evaluation.report import markdown_table
from .experiment import RunConfig
from .training import TrainConfig

DEMO = dict(
    model="smollm2-135m", dataset="arith", arith_max_digits=2, r=32, ranks=[1, 2, 4, 8, 16, 32], chat_template=False,
    max_steps=32, batch_size=6, num_train=192, learning_rate=1e-3, warmup_steps=0.1, lr_scheduler_type="linear",
    num_eval=100, eval_batch_size=64, metrics=["match"], logging_steps=8, seed=0,
)
METHOD_LRS = {"lora": 1e-3, "dylora": 1e-3, "matryoshka": 3e-4, "multirank": 1e-3}
QUICK = dict(max_steps=4, num_train=32, num_eval=8, ranks=[1, 4, 32], eval_batch_size=8)


def default_variant() -> str:
    """The default training method with the default deployment rule, as a compare name, e.g. multirank+svd."""
    method, rule = MatryoshkaConfig().method, TrainConfig().deploy_order
    return method if rule == "none" else f"{method}+{rule}"


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False) -> dict:
    """Train the default, LoRA and DyLoRA at R=32 and report accuracy at ranks 1..32.

    Args:
        out_dir: Where the runs and the combined results go. Finished runs are reused.
        quick: A much smaller run to check the setup (numbers are not meaningful).
    """
    settings = {**DEMO, **(QUICK if quick else {}), "output_dir": str(out_dir)}
    default = default_variant()
    methods = ["lora", "dylora"] + ([default] if default not in ("lora", "dylora") else [])
    lrs = {name: [METHOD_LRS[variant_parts(name)[0]]] for name in methods}
    start = time.perf_counter()
    results = compare(RunConfig.from_flat(settings), CompareConfig(methods=methods, lr=lrs), out_dir)
    minutes = (time.perf_counter() - start) / 60
    print()
    print(markdown_table(results))
    for name, m in results["methods"].items():
        tag = "  <- the default" if name == default else ""
        print(f"{name:>16}: AURAC {m['aurac']:.2f}  log-AURAC {m['log_aurac']:.2f}  (lr {m['learning_rate']:g}){tag}")
    print(f"\nTook {minutes:.1f} min. Results: {results['paths']['json']}  table: {results['paths']['table']}  "
          f"plot: {results['paths']['plot']}")
    return results
