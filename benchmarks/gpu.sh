#!/usr/bin/env bash
# Training-step benchmark on CUDA at the Llama-3.2-1B shape: random weights, bf16, all 16 layers.
# Plain PEFT LoRA vs matryoshka-lora's lora / dylora / matryoshka (the fused forward, the default),
# matryoshka_unfused (PEFT's forward plus the P hook) and the base-only floor, R in {8, 32, 128},
# interleaved rounds after warm-up; step time ratios and tokens/s per variant. Prints the JSON
# (also written to benchmarks/results/gpu.json). Sized for well under 8 minutes on one recent GPU.
#
# Needs only torch, transformers and peft (and what they install: safetensors, accelerate, tqdm,
# pyyaml) plus this repository's source; downloads nothing (the model is built from its config).
#
#   benchmarks/gpu.sh                         # defaults below
#   benchmarks/gpu.sh --batch 4 --seq 1024    # any benchmarks.training_step option overrides them
#   PYTHON=/path/to/python benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" - "$@" <<'PYCHECK'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh needs {', '.join(missing)} installed (pip install torch transformers peft).")
import torch
if "cpu" not in sys.argv[1:] and not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device (torch " + torch.__version__ + "); pass --device cpu to try it on CPU.")
PYCHECK

exec "$PY" -m benchmarks.training_step \
    --shape llama-3.2-1b --device cuda --dtype bfloat16 \
    --ranks 8 32 128 --batch 8 --seq 512 --rounds 20 --warmup 3 \
    --out benchmarks/results/gpu.json "$@"
