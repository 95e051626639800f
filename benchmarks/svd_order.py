"""The same trained adapter before and after SVD order, scored at every rank on one split.

    .venv/bin/python benchmarks/svd_order.py --adapter runs/study2/arith/lora/lr0.0001/seed42/snapshots/step-150

Loads the adapter once, scores it with the paper's rule (rank k = s_k A_k B_k), applies
`svd_order` (rank k = the best rank-k cut of the trained delta) and scores it again on the same
problems. Metric: teacher-forced completion match (greedy decoding reproduces the whole
completion), all ranks in one pass. Writes benchmarks/results/svd_order.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from matryoshka_lora import load_matryoshka_model, svd_order  # noqa: E402
from matryoshka_lora.core.models import load_model  # noqa: E402
from matryoshka_lora.evaluation.report import markdown_table  # noqa: E402
from matryoshka_lora.experiment import RunConfig, evaluate  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="arith")
    ap.add_argument("--n", type=int, default=400, help="Problems of the split (the first n).")
    ap.add_argument("--split", default="test", choices=["validation", "test"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "svd_order.json"))
    args = ap.parse_args(argv)
    run = RunConfig.from_flat(dict(model=args.model, dataset=args.dataset, arith_max_digits=2, chat_template=False,
                                   num_eval=args.n, metrics=["match"], eval_batch_size=64))
    base, tok = load_model(args.model)
    model = load_matryoshka_model(base, args.adapter)
    start = time.perf_counter()
    before = evaluate(run, None, args.split, model=model, tokenizer=tok, method_name="as trained")
    source = svd_order(model).svd_from
    after = evaluate(run.replace(include_base=False), None, args.split, model=model, tokenizer=tok,
                     method_name=f"{source}+svd")
    combined = dict(before, methods={**before["methods"], **after["methods"]})
    combined.update(adapter=args.adapter, n=args.n, seconds=time.perf_counter() - start)
    Path(args.out).write_text(json.dumps(combined, indent=1, default=str) + "\n")
    print(markdown_table(combined))
    return combined


if __name__ == "__main__":
    main()
