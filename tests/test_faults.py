"""Faults: kill and resume, atomic saves, NaN loss, full disk, bad input, and what loading may read.

Each bad input must stop with a message that names the problem and the fix, and leave nothing
half-written behind.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from matryoshka_lora import MatryoshkaConfig, load_matryoshka_model
from matryoshka_lora.checkpoints import STAGING, check_trainer_api, latest_checkpoint
from matryoshka_lora.cli import main
from matryoshka_lora.core.files import DiskFullError, atomic_write_text
from matryoshka_lora.core.models import load_model
from matryoshka_lora.core.saving import save_matryoshka
from matryoshka_lora.experiment import RunConfig, train
from matryoshka_lora.training import MatryoshkaCallback, NonFiniteLoss

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "trainer_state.json", "matryoshka_config.json", "matryoshka_state.json"}


def args(model_dir, out, **extra):
    """16 examples, batch 4: 4 steps per epoch; 8 steps in all; a checkpoint every 2 steps."""
    flat = {"model": model_dir, "dataset": "arith", "num_train": 16, "validation_size": 4, "max_steps": 8,
            "batch_size": 4, "r": 4, "ranks": "1,2,4", "learning_rate": 3e-3, "save_steps": 2, "logging_steps": 1,
            "max_length": 1024, "seed": 5, "output_dir": out, **extra}
    argv = []
    for key, value in flat.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return [*argv, "--disable-tqdm"]


def adapter_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


# -- kill with SIGKILL, then --resume -----------------------------------------------------------

# `mlora train` with one addition: at a chosen point it writes a marker file and sleeps, so the
# test can kill it there with SIGKILL from outside (no cleanup code of ours runs).
VICTIM = """
import sys, time
from transformers import Trainer
import matryoshka_lora.training as T
from matryoshka_lora.cli import main
marker, where, at, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def block():
    open(marker, "w").close()
    time.sleep(600)

if where == "step":  # between checkpoints: at the start of optimizer step `at` + 1
    begin = T.MatryoshkaCallback.on_step_begin
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == at:
            block()
        return begin(self, args, state, control, **kw)
    T.MatryoshkaCallback.on_step_begin = on_step_begin
else:  # inside the save of checkpoint-`at`: adapter, optimizer and RNG written, trainer_state.json not yet
    save_rng = Trainer._save_rng_state
    def _save_rng_state(self, output_dir):
        save_rng(self, output_dir)
        if self.state.global_step == at:
            block()
    Trainer._save_rng_state = _save_rng_state
sys.exit(main(argv))
"""


def start_until(code: str, marker: Path, *argv) -> subprocess.Popen:
    """A Python process running `code` (argv: marker, *argv); returns once it has written `marker`."""
    path = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(marker), *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the process ended before reaching its marker:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    return proc


def run_and_kill(tmp_path, where, at, argv):
    proc = start_until(VICTIM, tmp_path / f"blocked-{where}", where, at, *argv)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("method,where,at,resume_from", [
    ("dylora", "step", 5, "checkpoint-4"),  # killed after step 5, between checkpoints 4 and 6
    ("matryoshka", "save", 4, "checkpoint-2"),  # killed while checkpoint-4 was being written
])
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tiny_model_dir, tmp_path, method, where, at, resume_from):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    argv = ["train", *args(tiny_model_dir, killed, method=method)]
    run_and_kill(tmp_path, where, at, argv)

    checkpoints = killed / "checkpoints"
    assert latest_checkpoint(checkpoints).name == resume_from
    assert not (killed / "adapter").exists() and not (killed / "train_config.json").exists()
    assert CHECKPOINT_FILES <= {p.name for p in (checkpoints / resume_from).iterdir()}
    state = json.loads((checkpoints / resume_from / "matryoshka_state.json").read_text())
    assert state["global_step"] == int(resume_from.split("-")[1]) and state["seed"] == 5
    if where == "save":
        # the interrupted save stayed in the staging directory, never under its final name
        partial = checkpoints / STAGING / f"checkpoint-{at}"
        assert (partial / "optimizer.pt").is_file() and not (partial / "trainer_state.json").exists()
        assert not (checkpoints / f"checkpoint-{at}").exists()
    base, _ = load_model(str(tiny_model_dir))
    load_matryoshka_model(base, checkpoints / resume_from)  # the previous checkpoint is a usable adapter

    assert main(["train", *args(tiny_model_dir, killed, method=method), "--resume"]) == 0
    assert main(["train", *args(tiny_model_dir, whole, method=method)]) == 0
    diff = adapter_diff(killed / "adapter", whole / "adapter")
    print(f"\n{method}, killed ({where} {at}) and resumed from {resume_from}: max |adapter difference| {diff:.3g}")
    assert diff < 1e-6
    resumed, reference = (json.loads((d / "train_config.json").read_text()) for d in (killed, whole))
    assert resumed["resumed_from"].endswith(resume_from) and reference["resumed_from"] is None
    assert resumed["dylora_draws"] == reference["dylora_draws"]
    if method == "dylora":
        assert [s for s, _ in resumed["dylora_draws"]] == list(range(8))
    curves = [[c["loss"] for c in json.loads((d / "loss_curve.json").read_text())] for d in (killed, whole)]
    assert len(curves[0]) == 8 and curves[0] == pytest.approx(curves[1], abs=1e-6)
    assert not list((checkpoints / STAGING).iterdir())  # the resumed run cleared the interrupted save


# -- resume and restart checks ------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 4-step run with checkpoints 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *args(tiny_model_dir, out, max_steps=4)]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_fresh_run_over_old_checkpoints_is_refused(tiny_model_dir, finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    assert main(["train", *args(tiny_model_dir, out, max_steps=4)]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints of a run (latest: checkpoint-4)" in err and "Pass --resume" in err


def test_resume_with_other_adapter_options_is_refused(tiny_model_dir, finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    assert main(["train", *args(tiny_model_dir, out, max_steps=6, method="lora"), "--resume"]) == 2
    err = capsys.readouterr().err
    default = MatryoshkaConfig().method  # the finished run trained the default
    assert "Cannot resume from" in err and f"method: the checkpoint has {default!r}, this run 'lora'" in err
    assert "Resume with the options of that run, or choose a new --output-dir" in err


def test_resume_from_truncated_checkpoint_names_it_and_the_fix(tiny_model_dir, finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    weights = out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["train", *args(tiny_model_dir, out, max_steps=6), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4" in err and "truncated or corrupt" in err and "resume from the checkpoint before it" in err


# -- NaN / inf -----------------------------------------------------------------------------------

def run_config(model_dir, out, **extra):
    flat = {"model": str(model_dir), "dataset": "arith", "num_train": 16, "validation_size": 4, "max_steps": 8,
            "batch_size": 4, "r": 4, "ranks": [1, 2, 4], "learning_rate": 3e-3, "save_steps": 2, "max_length": 1024,
            "seed": 5, "output_dir": str(out), "disable_tqdm": True, **extra}
    return RunConfig.from_flat(flat)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    model, tok = load_model(str(tiny_model_dir))
    calls = []

    def poison(module, inputs, output):  # the 5th training forward (step 5) gives NaN logits
        if module.training:
            calls.append(1)
            if len(calls) == 5:
                return output * float("nan")
        return output

    model.lm_head.register_forward_hook(poison)
    out = tmp_path / "run"
    # logging_steps=10: the loss is not logged at step 5, and the Trainer's own NaN filter would
    # hide it from the logs anyway; the check runs on every step's loss.
    with pytest.raises(NonFiniteLoss, match=r"Loss became nan at step 5; .*before that step's update\. "
                                            r"The last good checkpoint is .*checkpoint-4\. Lower --learning-rate"):
        train(run_config(tiny_model_dir, out, logging_steps=10), model, tok)
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint-4"
    assert not (out / "adapter").exists() and not (out / "train_config.json").exists()
    weights = load_file(str(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_weights_are_never_checkpointed(tiny_model_dir, tmp_path, monkeypatch):
    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == 4:  # right after step 4's update, before its checkpoint
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))

    monkeypatch.setattr(MatryoshkaCallback, "on_step_end", on_step_end, raising=False)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"Adapter weights became NaN/inf at step 4; checkpoint-4 was not written\. "
                                            r"The last good checkpoint is .*checkpoint-2\."):
        train(run_config(tiny_model_dir, out), *load_model(str(tiny_model_dir)))
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["checkpoint-2"]


# -- the private Trainer methods behind atomic checkpoints --------------------------------------

class _Renamed:  # what a transformers release that reshaped the private methods would look like
    def _save_checkpoint(self, model, trial, metrics=None):
        return self._get_output_dir(trial)

    def _get_output_dir(self, trial):
        return "out"


class _Unstaged:
    def _save_checkpoint(self, model, trial):
        return os.path.join(self.args.output_dir, "checkpoint-1")

    def _get_output_dir(self, trial):
        return "out"


@pytest.mark.parametrize("trainer_class,message", [
    (_Renamed, r"expected Trainer\._save_checkpoint\(self, model, trial\), found _save_checkpoint\(self, model, trial, metrics\)"),
    (_Unstaged, r"_save_checkpoint no longer calls self\._get_output_dir\(trial\)"),
    (object, r"expected Trainer\._get_output_dir\(self, trial\), found no such method"),
])
def test_a_transformers_without_the_private_save_methods_is_refused_with_the_fix(trainer_class, message):
    """checkpoints.AtomicCheckpoints overrides Trainer._save_checkpoint and _get_output_dir (no public
    hook wraps a save). The installed transformers must have them as expected; a changed one is
    named, with what to do."""
    check_trainer_api()  # the installed transformers: no error
    with pytest.raises(RuntimeError, match=message) as error:
        check_trainer_api(trainer_class)
    assert "pip install 'transformers<" in str(error.value) and "update AtomicCheckpoints" in str(error.value)


# -- full disk -----------------------------------------------------------------------------------

def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_model_dir, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save(obj, f, *a, **kw):  # the optimizer state of the second checkpoint hits a full disk half-way
        if str(f).endswith("optimizer.pt") and "checkpoint-4" in str(f):
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert main(["train", *args(tiny_model_dir, out)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"No space left on device while writing \S+checkpoint-4 .*nothing was half-written; the latest "
                     r"complete checkpoint is still \S+checkpoint-2, resume from it with --resume", err)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [STAGING, "checkpoint-2"]
    assert not list((checkpoints / STAGING).iterdir())
    assert latest_checkpoint(checkpoints).name == "checkpoint-2" and not (out / "adapter").exists()


def test_disk_full_during_the_final_save_leaves_no_adapter(tiny_model_dir, tmp_path, monkeypatch):
    import peft.peft_model

    def save_file(tensors, path, metadata=None):  # what safetensors raises on a full disk
        Path(path).write_bytes(b"\0" * 10)
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"No space left on device while writing \S+adapter \(.*os error 28\)\); "
                                            r"nothing was half-written\. Free disk space"):
        train(run_config(tiny_model_dir, out, save_steps=0, max_steps=2), *load_model(str(tiny_model_dir)))
    assert [p.name for p in out.iterdir()] == ["checkpoints"]  # no adapter, no temporary directory
    assert not list((out / "checkpoints").iterdir())


def test_disk_full_while_writing_json_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "train_config.json"
    target.write_text('{"old": true}\n')

    def fdopen(fd, *a, **kw):
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(DiskFullError, match="while writing .*train_config.json"):
        atomic_write_text(target, '{"new": true}\n')
    assert target.read_text() == '{"old": true}\n' and [p.name for p in tmp_path.iterdir()] == ["train_config.json"]


def test_a_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    from conftest import make_model

    model = make_model("llama", r=4, ranks=[1, 4])
    save_matryoshka(model, tmp_path / "ad")
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(model, "save_pretrained", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_matryoshka(model, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]


# -- bad input through `mlora train`: exit code 2, a message with the fix, nothing written -------

BAD_INPUT = [
    # (name, extra flags, file content or None, message regex)
    ("ranks do not fit r", {"ranks": "1,8"}, None, r"larger than r=4"),
    ("missing dataset", {"dataset": "{tmp}/nope.jsonl"}, None, r"nope\.jsonl does not exist; check the path"),
    ("empty dataset", {"dataset": "{tmp}/d.jsonl"}, "\n", r"No examples in \S+d\.jsonl"),
    ("malformed JSONL line", {"dataset": "{tmp}/d.jsonl"}, '{"prompt": "a", "completion": " b"}\n{"prompt": "a", \n',
     r"d\.jsonl:2: invalid JSON"),
    ("no such completion column", {"dataset": "{tmp}/d.jsonl", "completion_column": "output"},
     '{"prompt": "a", "completion": " b"}\n', r"d\.jsonl:1: missing column 'output'; available columns: prompt, completion"),
]


@pytest.mark.parametrize("name,extra,content,message", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_model_dir, tmp_path, capsys, name, extra, content, message):
    extra = {k: v.format(tmp=tmp_path) for k, v in extra.items()}
    if content is not None:
        Path(extra["dataset"]).write_text(content)
    if extra.get("dataset", "").endswith(".jsonl"):
        extra["validation_size"] = 0  # files this small have no room for a validation split
    out = tmp_path / "run"
    assert main(["train", *args(tiny_model_dir, out, **extra)]) == 2
    err = capsys.readouterr().err
    assert "mlora train: error:" in err and re.search(message, err), err
    assert ".. " not in err
    assert not out.exists()


# -- security: loading reads safetensors and JSON only -------------------------------------------

PICKLE_LOADERS = [r"torch\.load\(", r"pickle\.loads?\(", r"\bimport pickle\b", r"joblib\.load", r"allow_pickle\s*=\s*True",
                  r"weights_only\s*=\s*False", r"dill\.", r"torch\.jit\.load", r"cloudpickle"]


def test_package_never_unpickles():
    """No torch.load / pickle of user files anywhere in the package: adapters and checkpoints are
    read as safetensors + JSON. (Resuming lets the Trainer read optimizer.pt / scheduler.pt /
    rng_state*.pth with torch.load(weights_only=True), only from checkpoints the run itself wrote.)"""
    hits = []
    for path in sorted((ROOT / "src" / "matryoshka_lora").rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            hits += [f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}" for p in PICKLE_LOADERS if re.search(p, code)]
    assert not hits, "pickle-based loading found:\n" + "\n".join(hits)


def test_trust_remote_code_is_off_unless_asked():
    import inspect

    from matryoshka_lora.cli import build_parser, run_config
    from matryoshka_lora.core.models import load_model as load

    assert inspect.signature(load).parameters["trust_remote_code"].default is False
    assert run_config(build_parser().parse_args(["train"])).model.trust_remote_code is False
    assert run_config(build_parser().parse_args(["train", "--trust-remote-code"])).model.trust_remote_code is True
    for path in (ROOT / "src" / "matryoshka_lora").rglob("*.py"):
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text()), path


# -- stop early, snapshots -----------------------------------------------------------------------

@pytest.mark.parametrize("method,grouped", [("dylora", False), ("matryoshka", True)])
def test_stop_after_then_resume_equals_whole_run_and_snapshots_match(tiny_model_dir, tmp_path, method, grouped):
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    snap = ["--snapshot-steps", "3,6", *(["--group-by-length"] if grouped else [])]
    assert main(["train", *args(tiny_model_dir, stopped, method=method, save_steps=0), "--stop-after-steps", "3",
                 *snap]) == 0
    assert json.loads((stopped / "train_config.json").read_text())["global_step"] == 3
    assert latest_checkpoint(stopped / "checkpoints").name == "checkpoint-3"
    # the stopped run kept the schedule of 8 steps: its learning rate at step 3 is that of the whole run
    assert main(["train", *args(tiny_model_dir, stopped, method=method, save_steps=0), "--resume", *snap]) == 0
    assert main(["train", *args(tiny_model_dir, whole, method=method, save_steps=0), *snap]) == 0
    assert adapter_diff(stopped / "adapter", whole / "adapter") < 1e-6
    for step in (3, 6):
        assert adapter_diff(stopped / "snapshots" / f"step-{step}", whole / "snapshots" / f"step-{step}") < 1e-6
    assert adapter_diff(whole / "snapshots" / "step-3", whole / "snapshots" / "step-6") > 1e-4
    curves = [[c["learning_rate"] for c in json.loads((d / "loss_curve.json").read_text())] for d in (stopped, whole)]
    assert curves[0] == pytest.approx(curves[1])
