"""Shared benchmark machinery: model shapes, interleaved timing, peak memory, the JSON record.

Timing. Every comparison runs its cases in the same process, interleaved round by round
(A B C, B C A, C A B, ...: the order rotates so no case always runs first), after warm-up.
We report each case's median and spread, the ratio of medians against the reference, the
ratio of minimums (interference only ever slows a run down), and the median of per-round
ratios (each ratio taken between runs a few seconds apart, so slow drifts in machine load
cancel): the headline. Targets are about systematic overhead, so read the per-round ratios,
not single runs, and the exact op counts next to them (training_step.py).

Memory. On CUDA, `torch.cuda.max_memory_allocated`. On CPU torch has no allocator counter,
and tracemalloc / RSS do not see torch's allocations exactly (RSS also counts the Python heap,
glibc arenas and every other model in the process). We run one extra step under
`torch.profiler` with `profile_memory=True`: it records every allocation and free of torch's
CPU allocator in order, so the running sum gives the peak of live torch bytes during the step.
Both devices report the same quantity:

    peak = (bytes of the model's parameters, buffers, grads and optimizer state at step start,
            each storage counted once)
         + (highest live-bytes level reached during one step, above its start)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Llama-3.2-1B(-Instruct) as in its config.json, built with random weights (nothing is downloaded).
# The llama3 RoPE frequency scaling is left out: it changes no shape or cost, and its config key
# differs between transformers 4 (rope_scaling) and 5 (rope_parameters).
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
SHAPES = ("smollm2-135m", "llama-3.2-1b", "tiny")


def build_base(shape: str, layers: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> torch.nn.Module:
    """A frozen causal LM of the named shape, in train mode (dropout is 0 in all of them).

    `smollm2-135m` is the embedded checkpoint (real weights); `llama-3.2-1b` and `tiny` are built
    from a config with random weights, `layers` overriding the depth.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if shape == "smollm2-135m":
        from matryoshka_lora.core.models import load_model

        model = load_model("smollm2-135m")[0]
        if layers is not None:
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
        model = model.to(device=device, dtype=dtype)
    elif shape in ("llama-3.2-1b", "tiny"):
        fields = dict(LLAMA_32_1B if shape == "llama-3.2-1b" else TINY)
        if layers is not None:
            fields["num_hidden_layers"] = layers
        config = LlamaConfig(**fields)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    else:
        raise ValueError(f"Unknown shape {shape!r}. Available: {', '.join(SHAPES)}")
    model.config.use_cache = False  # one forward per step: no KV cache
    model.requires_grad_(False)
    return model.train()


def share_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the *same* frozen weight tensors (so five variants cost one model).

    Only for variants that never write the base weights (not for merging).
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleave(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
               device: str = "cpu") -> dict[str, list[float]]:
    """Run every case `warmup` times, then `rounds` interleaved rounds; return seconds per case.

    Round i runs the cases in the order rotated by i, so each case takes every position equally.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            cases[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def summarize(times: dict[str, list[float]], reference: str, scale: dict[str, float] | None = None) -> dict:
    """Per case: median, min, max, the ratio of medians against `reference` and per-round ratios.

    `scale` divides a case's times before the ratio (e.g. |S| single-rank runs against one sweep).
    """
    scale = scale or {}
    ref = times[reference]
    out = {}
    for name, ts in times.items():
        per_round = [t / (r * scale.get(name, 1.0) / scale.get(reference, 1.0)) for t, r in zip(ts, ref)]
        quartiles = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else per_round * 3
        out[name] = {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "ratio_of_medians": statistics.median(ts) / statistics.median(ref) * scale.get(reference, 1.0) / scale.get(name, 1.0),
            # Load from other processes only ever slows a run down, so the fastest run is the least disturbed.
            "ratio_of_mins": min(ts) / min(ref) * scale.get(reference, 1.0) / scale.get(name, 1.0),
            "median_round_ratio": statistics.median(per_round),
            "round_ratio_quartiles": [round(quartiles[0], 4), round(quartiles[2], 4)],
            "round_ratios": [round(x, 4) for x in per_round],
            "times_s": [round(t, 5) for t in ts],
        }
    return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or shared weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """What a training step starts from: parameters, buffers, grads and optimizer state."""
    out = list(model.parameters()) + list(model.buffers())
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def _op_counts(events) -> Counter:
    return Counter(e.name() for e in events if e.name() != "[memory]")


def profile_step(step: Callable[[], object], device: str) -> tuple[int, Counter]:
    """Run `step` once, measured: (highest live torch bytes above its start level, ops dispatched by name).

    The op counts (aten ops and autograd nodes, from torch.profiler) are exact where timings are
    noisy: two variants with the same counts run the same kernels on the same shapes.
    """
    from torch.profiler import ProfilerActivity, profile

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:  # a second step, for the op counts only
            step()
            torch.cuda.synchronize()
        return peak, _op_counts(prof.profiler.kineto_results.events())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    level = peak = 0
    for e in memory:
        level += e.nbytes()  # + for an allocation, - for a free
        peak = max(peak, level)
    return peak, _op_counts(events)


def step_peak_bytes(step: Callable[[], object], device: str) -> int:
    """Highest live torch bytes reached while `step` runs, above the level when it starts."""
    return profile_step(step, device)[0]


def op_difference(counts: Counter, reference: Counter) -> dict[str, int]:
    """Ops whose count differs from the reference's: {name: count - reference count}."""
    return {name: counts[name] - reference[name] for name in sorted(set(counts) | set(reference))
            if counts[name] != reference[name]}


def memory_method(device: str) -> str:
    if str(device).startswith("cuda"):
        return ("torch.cuda.max_memory_allocated() - memory_allocated() at step start, after reset_peak_memory_stats(), "
                "plus the model's parameters, buffers, grads and optimizer state (distinct storages)")
    return ("peak of the running sum of torch CPU allocator events ([memory] events of torch.profiler with "
            "profile_memory=True) during one step, above its start level, plus the model's parameters, buffers, grads "
            "and optimizer state at step start (distinct storages). tracemalloc and RSS do not see torch's allocator "
            "exactly, and RSS would also count the other variants built in the same process")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    """How this process was started, as `python -m module args` when run as a module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return " ".join(head + sys.argv[1:])


def git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str = "cpu") -> dict:
    import peft
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    if str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def benchmark_main(argv, doc: str, key: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                   run: Callable[[argparse.Namespace], dict], table: Callable[[dict], str]) -> dict:
    """The command line of a benchmark module: its own flags (`add_arguments`), then --threads and --out.

    Runs `run(args)` and returns {"environment": environment(device), key: its result}, also
    written to --out as JSON; prints `table(result)` to stderr. The device is the module's
    --device where it has one, else cpu.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    ap.add_argument("--out", default=None, help="Also write the JSON here.")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"environment": environment(getattr(args, "device", "cpu")), key: run(args)}
    if args.out:
        write_json(args.out, result)
    print(table(result[key]), file=sys.stderr)
    return result


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
