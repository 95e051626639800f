"""One writer per output directory: an advisory lock with the holder's PID and command.

Every command that writes an output directory holds its lock while it runs:

    with output_lock(out_dir, "svd"):
        ...

or, on a library function whose argument names the directory,

    @locks_output("export", lambda args: args["out_dir"])
    def export_rank(source, rank, out_dir, ...): ...

The lock is a `flock` on `.NAME.lock` next to the directory (so it survives the directory being
replaced by an atomic rename), and the file says who holds it (PID, host, command line, start
time). A second writer is refused with `OutputLocked`, which names the holder. The kernel drops
a flock when its process dies, even by SIGKILL: the file such a process leaves behind is noticed
and taken over. The file is removed when the lock is released.

Under `accelerate launch` every process of one run calls the same command on the same
directory; only the main process (RANK 0, the one that writes) takes the lock, so a run never
refuses its own processes. Within one process the lock is re-entrant.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_held: dict[Path, list] = {}  # lock file -> [fd, depth], for the locks this process holds


class OutputLocked(OSError):
    """Another process is writing the same output directory; the message names it."""


def lock_file(directory: str | Path) -> Path:
    """The lock file of an output directory: `.NAME.lock` next to it (symlinks resolved)."""
    d = Path(directory).expanduser().resolve()
    if not d.name:
        raise ValueError(f"{directory} cannot be an output directory; choose a directory below it.")
    return d.parent / f".{d.name}.lock"


def is_main_process() -> bool:
    """False in the non-main processes of a distributed launch (torchrun / accelerate set RANK)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def _holder(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(holder: dict | None) -> str:
    """`mlora train` (PID 123 on host h, since 12:00:01: mlora train --output-dir x), or a fallback."""
    if not holder:
        return "another process (it has only just started)"
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    line = " ".join(map(str, holder.get("argv") or []))
    line = line if len(line) <= 200 else line[:197] + "..."
    return (f"`mlora {holder.get('command', '?')}` (PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {since}" + (f": {line}" if line else "") + ")")


def _open_locked(path: Path, directory: Path, command: str) -> int | None:
    """An fd holding the flock of `path`, or None where the file system has no locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputLocked(f"{directory} is being written by {describe(holder)}. Wait for it to finish (or stop "
                               f"it), or choose another output directory for this `mlora {command}`.") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("The file system of %s has no file locks (%s); %s runs without its output lock.",
                            directory, e, command)
                return None
            raise
        try:  # the holder may have released (and removed) the file between our open and flock
            st, now = os.fstat(fd), os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _acquire(directory: Path, command: str) -> Path:
    path = lock_file(directory)
    if path in _held:
        _held[path][1] += 1
        return path
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, directory, command)
    if fd is not None:
        previous = _holder(fd)
        if previous:
            log.warning("Took over the lock of %s left by %s, which is no longer running.", directory, describe(previous))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "argv": sys.argv,
                "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info, default=str) + "\n").encode(), 0)
    _held[path] = [fd, 1, created]
    return path


def _release(path: Path) -> None:
    entry = _held[path]
    entry[1] -= 1
    if entry[1]:
        return
    del _held[path]
    fd, _, created = entry
    if fd is not None:
        path.unlink(missing_ok=True)  # while still held: a waiting process then sees the file is gone
        os.close(fd)
    for d in created:  # directories made only to hold the lock, if nothing else went there
        try:
            d.rmdir()
        except OSError:
            break


@contextmanager
def output_lock(directory: str | Path, command: str) -> Iterator[Path]:
    """Hold the lock of the output directory `directory` for the block.

    Args:
        directory: The output directory the block writes (it need not exist yet).
        command: The command name shown to a refused second writer, e.g. "train".

    Yields:
        The lock file path.

    Raises:
        OutputLocked: another live process holds the lock (the message names it).
    """
    if not is_main_process():
        yield lock_file(directory)
        return
    path = _acquire(Path(directory), command)
    try:
        yield path
    finally:
        _release(path)


def locks_output(command: str, where: Callable[[dict], str | Path | None]):
    """Decorator: run the function under `output_lock(where(arguments), command)`.

    `where` gets the call's arguments by name (defaults filled in) and returns the output
    directory, or None when the call writes nothing.
    """
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            target = where(bound.arguments)
            if target is None:
                return fn(*args, **kwargs)
            with output_lock(target, command):
                return fn(*args, **kwargs)
        return wrapper
    return decorate
