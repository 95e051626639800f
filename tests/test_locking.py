"""Concurrent writers and killed saves: one writer per output directory, and no temporaries left.

A second writer is refused with a message that names the holder; the lock of a process that was
killed is taken over; the processes of one `accelerate launch` never refuse each other; the next
write to a target removes the temporaries that killed saves left next to it, and only those.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import make_model
from test_faults import ROOT, VICTIM, args, start_until

from matryoshka_lora import save_matryoshka
from matryoshka_lora.cli import main
from matryoshka_lora.core.files import atomic_write_text, remove_stale_temporaries
from matryoshka_lora.core.locking import OutputLocked, lock_file, output_lock

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}

# Holds the locks of the given directories (as `mlora <command>` would) until it is killed.
HOLDER = """
import contextlib, sys, time
from matryoshka_lora.core.locking import output_lock
marker, command, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
with contextlib.ExitStack() as stack:
    for d in dirs:
        stack.enter_context(output_lock(d, command))
    open(marker, "w").close()
    time.sleep(600)
"""


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


# -- two real `mlora train` processes on one output directory -----------------------------------

def test_second_train_is_refused_and_a_killed_holders_lock_is_taken_over(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "run"
    argv = ["train", *args(tiny_model_dir, out, save_steps=0)]
    holder = start_until(VICTIM, tmp_path / "blocked", "step", 1, *argv)  # `mlora train`, paused inside step 2
    try:
        started = time.perf_counter()
        second = subprocess.run([sys.executable, "-m", "matryoshka_lora.cli", *argv], env=ENV, capture_output=True,
                                text=True, timeout=300)
        seconds = time.perf_counter() - started
        assert second.returncode == 2, second.stderr[-3000:]
        assert re.search(rf"mlora train: error: \S*run is being written by `mlora train` \(PID {holder.pid} on host "
                         rf"{re.escape(socket.gethostname())}, since .*\)\. Wait for it to finish", second.stderr)
        print(f"\nsecond `mlora train` refused in {seconds:.1f} s (interpreter start included)")
    finally:
        kill(holder)
    assert json.loads(lock_file(out).read_text())["pid"] == holder.pid  # SIGKILL left the file behind
    assert not (out / "adapter").exists()

    with caplog.at_level(logging.WARNING, logger="matryoshka_lora.core.locking"):
        assert main(["train", *args(tiny_model_dir, out, save_steps=0, max_steps=2)]) == 0
    assert f"left by `mlora train` (PID {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not lock_file(out).exists()


# -- every command that writes an output directory takes its lock --------------------------------

@pytest.fixture(scope="module")
def nested_adapter(tmp_path_factory):
    return save_matryoshka(make_model("llama", r=4, ranks=[1, 2, 4]), tmp_path_factory.mktemp("locked") / "adapter")


COMMANDS = {  # command -> argv writing into {out}
    "train": ["train", "--output-dir", "{out}", "--model", "{model}"],
    "eval": ["eval", "--adapter", "{adapter}", "--out", "{out}", "--model", "{model}"],
    "eval --harness": ["eval", "--harness", "--adapter", "{adapter}", "--out", "{out}", "--model", "{model}"],
    "compare": ["compare", "--out", "{out}", "--model", "{model}"],
    "demo": ["demo", "--out", "{out}"],
    "export": ["export", "{adapter}", "--rank", "2", "--out", "{out}"],
    "merge": ["merge", "--model", "{model}", "--adapter", "{adapter}", "--rank", "2", "--out", "{out}"],
    "fold": ["fold", "{adapter}", "--out", "{out}"],
    "allocate": ["allocate", "--adapter", "{adapter}", "--budget", "avg-rank:2", "--out", "{out}", "--model", "{model}"],
}


@pytest.fixture(scope="module")
def holder(tmp_path_factory):
    """One process holding the lock of one output directory per command."""
    tmp = tmp_path_factory.mktemp("held")
    outs = {name: tmp / name.replace(" ", "_").replace("-", "") for name in COMMANDS}
    proc = start_until(HOLDER, tmp / "holding", "compare", *outs.values())
    yield proc, outs
    kill(proc)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_writing_command_is_refused_while_another_process_writes_its_output(
        command, holder, nested_adapter, tiny_model_dir, capsys):
    proc, outs = holder
    argv = [a.format(out=outs[command], model=tiny_model_dir, adapter=nested_adapter) for a in COMMANDS[command]]
    started = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"is being written by `mlora compare` (PID {proc.pid} on host" in err, err
    assert not outs[command].exists()
    assert time.perf_counter() - started < 5  # refused before anything is loaded


# -- the lock itself ------------------------------------------------------------------------------

def test_processes_of_one_launch_share_the_lock(holder, monkeypatch):
    """Under torchrun / accelerate only RANK 0 takes the lock: the other ranks of the run write
    into the same directory and must not be refused (the real 2-process launch in
    test_distributed.py trains with the lock in place)."""
    _, outs = holder
    monkeypatch.setenv("RANK", "1")
    with output_lock(outs["train"], "train"):
        pass
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(OutputLocked, match="is being written by `mlora compare`"), output_lock(outs["train"], "train"):
        pass


def test_lock_is_reentrant_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with output_lock(out, "export") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "export"
        assert path == tmp_path / "a" / "b" / ".out.lock"
        with output_lock(tmp_path / "a" / "b" / "." / "out", "export"):  # the same directory, nested: no refusal
            pass
        assert path.exists()
    assert list(tmp_path.iterdir()) == []  # the lock file and the folders made for it are gone


# -- stale temporaries of killed saves -----------------------------------------------------------

# save_matryoshka into argv[2], killed while the adapter is being written into its temporary
KILLED_SAVE = """
import sys, time
from conftest import make_model
from matryoshka_lora import save_matryoshka
marker, target = sys.argv[1], sys.argv[2]
model = make_model("llama", r=4, ranks=[1, 2, 4])
save = model.save_pretrained
def save_pretrained(directory, **kw):
    save(directory, **kw)
    open(marker, "w").close()
    time.sleep(600)
model.save_pretrained = save_pretrained
save_matryoshka(model, target)
"""


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path, caplog):
    target = tmp_path / "adapter"
    proc = start_until(KILLED_SAVE, tmp_path / "saving", target)
    kill(proc)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter.")]
    assert len(left) == 1 and re.fullmatch(rf"\.adapter\.\w+-{proc.pid}-\w+\.tmp", left[0]), left
    assert (tmp_path / left[0] / "adapter_model.safetensors").is_file() and not target.exists()

    with caplog.at_level(logging.WARNING, logger="matryoshka_lora.core.files"):
        save_matryoshka(make_model("llama", r=4, ranks=[1, 2, 4]), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "saving"]
    assert f"left by killed writes of {target}: {left[0]}" in caplog.text


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    target = tmp_path / "train_config.json"
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]
    dead, live = dead_pid(), os.getppid()
    names = {
        f".train_config.json.{host}-{dead}-abc.tmp": False,  # a killed write: removed
        f".train_config.json.{host}-{live}-abc.tmp": True,  # a writer at work (the lock holder, say): kept
        f".train_config.json.otherhost-{dead}-abc.tmp": True,  # another machine's process: cannot tell, kept
        f".train_config.json.{host}-{dead}-abc.old": True,  # the only copy while the target is missing: kept
        ".train_config.json.abc.tmp": True,  # not ours (no process named in it): kept
        f".other.json.{host}-{dead}-abc.tmp": True,  # another target's: kept
    }
    for name in names:
        (tmp_path / name).write_text("partial")
    atomic_write_text(target, "{}\n")
    assert {p.name for p in tmp_path.iterdir()} == {"train_config.json", *(n for n, kept in names.items() if kept)}
    remove_stale_temporaries(target)  # now the target exists, the old copy is stale too
    assert f".train_config.json.{host}-{dead}-abc.old" not in {p.name for p in tmp_path.iterdir()}
