"""llama.cpp against transformers on the same rank-k adapter: greedy outputs, prompt by prompt.

    .venv/bin/python benchmarks/llama_cpp_agreement.py --adapter runs/study2/arith/lora/lr0.0003/seed42/snapshots/step-150 --svd

For each rank k: transformers runs the embedded SmolLM2 (its GGUF dequantized to float32) with the
nested adapter at rank k; llama.cpp (llama-cpp-python, the `llama-cpp` extra) runs the same GGUF
file, quantized as shipped, with `mlora export --rank k --format gguf`. Both decode greedily from
each held-out arith prompt; the agreement is the share of prompts with the same completion. The
quantized base can differ slightly. Writes benchmarks/results/llama_cpp_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from matryoshka_lora import load_matryoshka_model, set_rank, svd_adapter  # noqa: E402
from matryoshka_lora.core.models import load_model, resolve  # noqa: E402
from matryoshka_lora.data.loading import DataConfig, load_examples  # noqa: E402
from matryoshka_lora.data.prompts import build_prompt  # noqa: E402
from matryoshka_lora.deploy.gguf_export import export_gguf  # noqa: E402


def greedy_agreement(adapter_dir, ranks, work_dir, n: int = 50, max_new_tokens: int = 24) -> dict[int, float]:
    """Share of `n` held-out arith prompts on which llama.cpp (embedded GGUF base + rank-k GGUF adapter)
    and transformers (dequantized base + nested adapter at rank k) give the same greedy completion."""
    import llama_cpp

    base, tok = load_model("smollm2-135m")
    model = load_matryoshka_model(base, adapter_dir).eval()
    examples = load_examples(DataConfig(dataset="arith", num_eval=n, arith_max_digits=2), "test")
    prompts = [build_prompt(tok, e, (), False) for e in examples]
    directory, filename = resolve("smollm2-135m")
    out = {}
    for k in ranks:
        lora = export_gguf(adapter_dir, k, Path(work_dir) / f"rank{k}.gguf", base_model="smollm2-135m", overwrite=True)
        llm = llama_cpp.Llama(model_path=f"{directory}/{filename}", lora_path=str(lora), n_ctx=256, n_threads=2,
                              verbose=False, seed=0)
        same = 0
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            with torch.no_grad(), set_rank(model, k):
                ref = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
            ours = llm(p, max_tokens=max_new_tokens, temperature=0.0, top_k=1)["choices"][0]["text"]
            same += tok.decode(ref, skip_special_tokens=True).strip() == ours.strip()
        out[k] = same / len(prompts)
        llm.close()  # one llama.cpp context at a time
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="A nested adapter trained on the embedded SmolLM2.")
    ap.add_argument("--svd", action="store_true", help="SVD-order the adapter first (as deployed).")
    ap.add_argument("--ranks", default="4,32")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llama_cpp_agreement.json"))
    args = ap.parse_args(argv)
    ranks = [int(k) for k in args.ranks.split(",")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlora_agree_") as tmp:
        adapter = Path(args.adapter)
        if args.svd:
            adapter = svd_adapter(adapter, Path(tmp) / "svd")[0]
        agreement = greedy_agreement(adapter, ranks, tmp, args.n, args.max_new_tokens)
    result = {"adapter": args.adapter, "svd_order": args.svd, "prompts": args.n, "max_new_tokens": args.max_new_tokens,
              "agreement": {str(k): v for k, v in agreement.items()}, "seconds": time.perf_counter() - start}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
