"""Data-parallel training with Accelerate (2 CPU processes, gloo) and the shipped Accelerate configs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from matryoshka_lora.cli import main

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
METHODS = ("lora", "matryoshka", "dylora")

# One launch (the interpreter and its imports are the slow part on a small CPU): `mlora train`
# once per method, then the FSDP2 check below on the same 2-process gloo group.
DRIVER = """
import json, sys
import torch, torch.distributed as dist
from matryoshka_lora.cli import main
tests, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
for method in {methods!r}:
    assert main(["train", *args, "--method", method, "--output-dir", f"{{out}}/{{method}}"]) == 0
# DyLoRA with a draw per micro-batch (2 per optimizer step), as the official code draws
assert main(["train", *args, "--method", "dylora", "--dylora-draw", "micro_batch", "--gradient-accumulation-steps", "2",
             "--output-dir", f"{{out}}/dylora_micro"]) == 0
print(f"RANK {{dist.get_rank()}} OF {{dist.get_world_size()}} BACKEND {{dist.get_backend()}}", flush=True)

# FSDP2 (torch's fully_shard, what Accelerate's fsdp_version 2 applies): shard every decoder layer
# and the root, as TRANSFORMER_BASED_WRAP does, and compare with the same model unwrapped.
sys.path.insert(0, tests)
from conftest import make_model
from torch.distributed.fsdp import fully_shard
from matryoshka_lora import set_rank
ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))  # the same batch on both processes
ref, model = make_model("llama", r=4, ranks=[1, 2, 4]), make_model("llama", r=4, ranks=[1, 2, 4])
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
report = {{"lora_params_sharded": all(type(p).__name__ == "DTensor" for n, p in model.named_parameters() if "lora_" in n),
          "logits": {{}}}}
for k in (None, 1, 2, 4):  # None: training weighting P; k: set_rank prefix
    with set_rank(model, k), set_rank(ref, k), torch.no_grad():
        report["logits"][str(k)] = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
for m in (model, ref):  # one AdamW step with P in the forward (P scales the gradients, Eq. 12-13)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m(input_ids=ids, labels=ids).loss.backward()
    opt.step()
full = {{n: p.full_tensor() for n, p in model.named_parameters() if "lora_" in n}}
report["after_step"] = max((full[n] - p).abs().max().item() for n, p in ref.named_parameters() if "lora_" in n)
with open(f"{{out}}/fsdp2_rank{{dist.get_rank()}}.json", "w") as f:
    json.dump(report, f)
"""


def train_args(model_dir, batch_size):
    # 16 examples, 6 optimizer steps: the run crosses an epoch boundary (4 steps per epoch).
    return ["--model", str(model_dir), "--dataset", "arith", "--num-train", "16", "--validation-size", "4",
            "--max-steps", "6", "--batch-size", str(batch_size), "--r", "4", "--ranks", "1,2,4",
            "--learning-rate", "3e-3", "--logging-steps", "1", "--save-steps", "3", "--disable-tqdm",
            "--max-length", "1024", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    """One `accelerate launch` of 2 CPU processes: the three trainings and the FSDP2 check."""
    tmp = tmp_path_factory.mktemp("ddp")
    driver = tmp / "driver.py"
    driver.write_text(DRIVER.format(methods=METHODS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # `accelerate launch --cpu` runs a single process (multi-CPU needs MPI); `--multi_gpu` starts
    # torchrun workers and ACCELERATE_USE_CPU=1 makes them form a gloo process group on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(driver), str(ROOT / "tests"), str(tmp / "ddp"),
           *train_args(tiny_model_dir, 2)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return tmp, run.stdout


def test_two_process_ddp_equals_one_process_with_same_global_batch(launched, tiny_model_dir):
    """2 processes x batch 2 (DDP, gloo) against 1 process x batch 4, same seed and data.

    The global batches are the same examples: Accelerate's seedable sampler draws one permutation
    from the data seed for any number of processes, and with 2 processes process i takes the
    i-th half of each global batch. The Trainer divides the loss by the token count of the whole
    global batch (`average_tokens_across_devices`), so the averaged DDP gradient equals the
    single-process gradient up to float rounding.
    """
    tmp_path, stdout = launched
    assert "RANK 0 OF 2 BACKEND gloo" in stdout and "RANK 1 OF 2 BACKEND gloo" in stdout
    diffs = {}
    for method in METHODS:
        assert main(["train", *train_args(tiny_model_dir, 4), "--method", method,
                     "--output-dir", str(tmp_path / "single" / method)]) == 0
        ddp, single = tmp_path / "ddp" / method, tmp_path / "single" / method
        meta = json.loads((ddp / "train_config.json").read_text())
        assert meta["world_size"] == 2 and json.loads((single / "train_config.json").read_text())["world_size"] == 1
        diffs[method] = max_abs_diff(ddp / "adapter", single / "adapter")
        ddp_loss = [c["loss"] for c in json.loads((ddp / "loss_curve.json").read_text())]
        single_loss = [c["loss"] for c in json.loads((single / "loss_curve.json").read_text())]
        assert ddp_loss == pytest.approx(single_loss, abs=1e-4)
        # the checkpoints hold the rank schedule and the draws too
        assert (ddp / "checkpoints" / "checkpoint-6" / "matryoshka_config.json").is_file()
    print(f"\nDDP (2 x batch 2) vs single process (batch 4), max |adapter difference|: {diffs}")
    for method, diff in diffs.items():
        assert diff < 1e-5, f"{method}: DDP adapter differs from single-process by {diff}"
    # lora_B starts at zero: a trained one is not, so the comparison is not trivially 0 == 0
    trained = load_file(str(tmp_path / "ddp" / "lora" / "adapter" / "adapter_model.safetensors"))
    assert min(t.abs().max().item() for k, t in trained.items() if "lora_B" in k) > 1e-3

    # DyLoRA: each process recorded the rank it drew at every step (gathered into
    # train_config.json by process 0). They must be identical: the draw is
    # random.Random(f"{seed}:{global_step}").choice(ranks), a pure function of the seed and the
    # optimizer step, which all processes share; no process-local RNG state enters it. A
    # mismatch would train different prefixes on different processes and average their gradients.
    meta = json.loads((tmp_path / "ddp" / "dylora" / "train_config.json").read_text())
    per_process = meta["dylora_draws_per_process"]
    print(f"DyLoRA draws (step, rank) per process: {per_process}")
    assert len(per_process) == 2 and per_process[0] == per_process[1]
    assert [step for step, _ in per_process[0]] == list(range(6))
    single = json.loads((tmp_path / "single" / "dylora" / "train_config.json").read_text())
    assert single["dylora_draws"] == per_process[0]
    assert len({k for _, k in per_process[0]}) > 1  # the draws do vary over steps

    # A draw per micro-batch: a pure function of (seed, step, micro-batch index), so the two
    # processes (each running micro-batches 0 and 1 of every step) agree on all 12 draws too.
    micro = json.loads((tmp_path / "ddp" / "dylora_micro" / "train_config.json").read_text())["dylora_draws_per_process"]
    assert len(micro) == 2 and micro[0] == micro[1]
    assert [(s, m) for s, m, _ in micro[0]] == [(s, m) for s in range(6) for m in range(2)]
    assert len({k for *_, k in micro[0]}) > 1


def test_fsdp2_sharded_model_keeps_p_and_set_rank(launched):
    """Under FSDP2 the LoRA factors are sharded DTensors, but the bottleneck hook on lora_A still
    runs (fully_shard keeps the module tree and its hooks; lora_A's output is an ordinary,
    unsharded activation), and set_rank finds the controller on the wrapped model: outputs at the
    training weighting and at every rank, and one AdamW step, match the unwrapped model."""
    tmp_path, _ = launched
    for rank in (0, 1):
        report = json.loads((tmp_path / "ddp" / f"fsdp2_rank{rank}.json").read_text())
        print(f"\nFSDP2 process {rank}: {report}")
        assert report["lora_params_sharded"]
        assert max(report["logits"].values()) < 1e-5 and report["after_step"] < 1e-5


def test_launch_without_process_group_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """WORLD_SIZE=2 but no process group (e.g. `--multi_gpu` on a CPU box without ACCELERATE_USE_CPU):
    each process would train alone and overwrite the same files, so refuse and name the fix."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    if torch.cuda.is_available():
        pytest.skip("with a GPU the processes would try to form a group")
    assert main(["train", *train_args(tiny_model_dir, 2), "--method", "lora", "--output-dir", str(tmp_path / "x")]) == 2
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_accelerate_configs_exist():
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    """Each config loads with Accelerate's own config class and passes `accelerate launch`'s checks."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file configs/accelerate/" + path.name)
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig) and config.num_processes >= 2 and config.mixed_precision == "bf16"
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED"}[path.name]
    assert str(config.distributed_type).split(".")[-1] == expected
    if expected == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2  # fully_shard: frozen and trainable parameters in one unit
    if expected == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "matryoshka_lora.cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes == config.num_processes
    assert {"FSDP": args.use_fsdp, "DEEPSPEED": args.use_deepspeed, "MULTI_GPU": args.multi_gpu}[expected]
