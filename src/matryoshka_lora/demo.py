"""`mlora demo`: `compare` on the embedded default (SmolLM2-135M-Instruct, built-in arithmetic task).

Sized to finish within 15 minutes on a 2-core CPU (the time measured is in the README). The
learning rates differ per method because P changes the effective step size: MatryoshkaLoRA's
first entry is |S| = 6 times LoRA's.
"""

from __future__ import annotations

import time
from pathlib import Path

from .comparison import CompareConfig, compare
from .evaluation.report import markdown_table
from .experiment import RunConfig

DEMO = dict(
    model="smollm2-135m", dataset="arith", arith_max_digits=2, r=32, ranks=[1, 2, 4, 8, 16, 32], chat_template=False,
    max_steps=24, batch_size=8, num_train=192, learning_rate=1e-3, warmup_steps=0.1, lr_scheduler_type="linear",
    num_eval=40, eval_batch_size=40, max_new_tokens=48, metrics=["generate", "loss"], logging_steps=4, seed=0,
)
DEMO_LRS = {"lora": [1e-3], "dylora": [1e-3], "matryoshka": [3e-4]}
QUICK = dict(max_steps=4, num_train=32, num_eval=8, ranks=[1, 4, 32], eval_batch_size=8, max_new_tokens=48)


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False) -> dict:
    """Train LoRA, DyLoRA and MatryoshkaLoRA at R=32 and report accuracy at ranks 1..32.

    Args:
        out_dir: Where the runs and the combined results go. Finished runs are reused.
        quick: A much smaller run to check the setup (numbers are not meaningful).
    """
    settings = {**DEMO, **(QUICK if quick else {}), "output_dir": str(out_dir)}
    start = time.perf_counter()
    results = compare(RunConfig.from_flat(settings), CompareConfig(methods=["lora", "dylora", "matryoshka"], lr=DEMO_LRS),
                      out_dir)
    minutes = (time.perf_counter() - start) / 60
    print()
    print(markdown_table(results))
    for name, m in results["methods"].items():
        print(f"{name:>11}: AURAC {m['aurac']:.2f}  log-AURAC {m['log_aurac']:.2f}  (lr {m['learning_rate']:g})")
    print(f"\nTook {minutes:.1f} min. Results: {results['paths']['json']}  table: {results['paths']['table']}  "
          f"plot: {results['paths']['plot']}")
    return results
