"""vLLM serves our exports: ranks 1, 4 and 32 of one nested adapter as three LoRAs in one engine.

Run on a GPU machine with vLLM installed (`pip install vllm`), after training or with any saved
nested adapter whose base model is local or cached:

    python benchmarks/vllm_check.py --adapter runs/arith/adapter --model HuggingFaceTB/SmolLM2-135M-Instruct

It exports ranks 1, 4 and 32 (`export_rank`, the portable layout), starts one vLLM engine with
`enable_lora=True, max_loras=3, max_lora_rank=32`, generates greedily for the same prompts under
each `LoRARequest`, and compares every completion with transformers + PEFT at that rank (the same
exported directory, `PeftModel.from_pretrained`). It writes benchmarks/results/vllm.json and exits
non-zero when agreement at any rank is below --min-agreement. Not yet run: no GPU was lent so far.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="A nested adapter directory (save_matryoshka / mlora train).")
    ap.add_argument("--model", required=True, help="Its base model: a Hub id or local directory vLLM can load.")
    ap.add_argument("--ranks", default="1,4,32")
    ap.add_argument("--dataset", default="arith", help="Prompts: the first --n test problems of this dataset.")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--min-agreement", type=float, default=0.9)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm.json"))
    args = ap.parse_args(argv)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from matryoshka_lora import export_rank
    from matryoshka_lora.data.loading import DataConfig, load_examples
    from matryoshka_lora.data.prompts import build_prompt

    ranks = [int(k) for k in args.ranks.split(",")]
    work = Path(args.out).with_suffix("")
    exports = export_rank(args.adapter, ranks, work / "exports", overwrite=True, allow_untrained=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = [build_prompt(tok, e, (), False) for e in load_examples(DataConfig(dataset=args.dataset, num_eval=args.n),
                                                                      "test")]
    llm = LLM(model=args.model, enable_lora=True, max_loras=len(ranks), max_lora_rank=max(ranks), dtype="float32",
              seed=0, enforce_eager=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    result = {"model": args.model, "adapter": args.adapter, "n": len(prompts), "ranks": {}}
    for i, (k, path) in enumerate(zip(ranks, exports), start=1):
        start = time.perf_counter()
        served = [o.outputs[0].text for o in llm.generate(prompts, greedy, lora_request=LoRARequest(f"rank{k}", i, str(path)))]
        vllm_seconds = time.perf_counter() - start
        ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                                              str(path)).to("cuda").eval()
        same = 0
        for p, text in zip(prompts, served):
            ids = tok(p, return_tensors="pt").input_ids.to("cuda")
            with torch.no_grad():
                ref = ref_model.generate(input_ids=ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            same += tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip() == text.strip()
        result["ranks"][str(k)] = {"agreement": same / len(prompts), "vllm_seconds": vllm_seconds}
        print(f"rank {k}: vLLM and transformers agree on {same}/{len(prompts)} greedy completions", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if any(r["agreement"] < args.min_agreement for r in result["ranks"].values()):
        sys.exit(f"agreement below {args.min_agreement}: {result['ranks']}")
    return result


if __name__ == "__main__":
    main()
