"""Files written whole or not at all, and read with errors that name them.

Every write goes to a temporary sibling of its target, `.NAME.<host>-<pid>-<random>.tmp`, and
is renamed into place when complete (`atomic_directory`, `atomic_write_text`), so a crash, a
kill or a full disk during a save leaves the previous version, never a half-written one. A
kill does leave the temporary behind: the next write to the same target removes those whose
process is gone (`remove_stale_temporaries`); a temporary of a live process, or of another
host, is never touched.

`read_json` turns every way a JSON file can be unreadable (not UTF-8, not JSON, nested too
deeply, the wrong kind of value) into a `ValueError` that names the file and the fix.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]


# -- temporaries --------------------------------------------------------------------------------

def _prefix(target: Path) -> str:
    return f".{target.name}.{_HOST}-{os.getpid()}-"


def new_temporary(target: Path, suffix: str = ".tmp") -> Path:
    """A new temporary directory `.NAME.<host>-<pid>-<random><suffix>` next to `target`.

    Stale temporaries of `target` are removed first (see `remove_stale_temporaries`).
    """
    remove_stale_temporaries(target)
    return Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=suffix, dir=target.parent))


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporaries that killed writes of `target` left next to it; return them.

    A temporary is stale when the process that made it (named in it) is gone. Those of a live
    process (a writer still at work, the lock holder of the directory) and those made on another
    host are kept. `.old` copies of a replaced directory are removed only once `target` exists
    again, since while it is missing the `.old` copy is the only complete version.
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?P<host>\w*)-(?P<pid>\d+)-\w+\.(?P<kind>tmp|old)$")
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        m = pattern.match(path.name)
        if not m or m["host"] != _HOST or process_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not target.exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.warning("Removed %d temporar%s left by killed writes of %s: %s", len(removed), "y" if len(removed) == 1 else "ies",
                    target, ", ".join(p.name for p in removed))
    return removed


# -- atomic writes ------------------------------------------------------------------------------

def check_target(target: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output directory unless overwrite is set; refuse a file either way."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory; choose another output path.")
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it, "
                                  "or choose another output directory.")
    return target


def replace_directory(new: Path, target: Path) -> None:
    """Rename the complete directory `new` to `target`, replacing an existing `target`.

    The old directory is moved aside first and deleted only once `new` is in place; a kill
    between the two renames leaves `target` missing and the old copy in a hidden `.old`
    directory next to it, never a mix of both.
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = new_temporary(target, suffix=".old")
    os.replace(target, old / "dir")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "dir", target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; rename it to `target` once the block completes.

    On an error the temporary directory is removed and `target` is untouched. With `overwrite`
    the old directory is moved aside, the new one renamed in, and only then the old one deleted.
    A full disk is reported as `DiskFullError` naming `target`.
    """
    target = check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temporary(target)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result normal permissions
        with explain_disk_full(target):
            yield tmp
        check_target(target, overwrite)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary file and a rename (never a half-written file)."""
    path = Path(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with explain_disk_full(path), os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class DiskFullError(OSError):
    """The disk filled up during a save; the message names what was being written."""


def is_disk_full(error: BaseException, directory: Path) -> bool:
    """Whether `error` came from a full disk.

    Writers report it differently: Python raises OSError(ENOSPC), safetensors a SafetensorError
    saying "No space left on device (os error 28)", torch.save a RuntimeError about a failed
    write; for the last, look at the free space left.
    """
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(error) or "os error 28" in str(error):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        probe = next(p for p in (directory, *directory.parents) if p.exists())
        return shutil.disk_usage(probe).free < 16 * 2**20
    except (OSError, StopIteration):
        return False


@contextmanager
def explain_disk_full(target: Path, note: str = ""):
    """Turn a full-disk error from any writer into a `DiskFullError` that names `target`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e, Path(target).parent):
            raise
        raise DiskFullError(errno.ENOSPC, f"No space left on device while writing {target} ({e}); nothing was "
                            f"half-written{note}. Free disk space or choose another output directory, then run again.") from e


# -- reading ------------------------------------------------------------------------------------

def read_json(path: str | Path, fix: str, kind: type | None = dict):
    """The JSON value in `path`; a `ValueError` naming the file and `fix` if it cannot be read.

    Args:
        path: The file (a missing file raises FileNotFoundError naming it).
        fix: What the user should do, e.g. "re-save the adapter".
        kind: The type the value must have (default: a JSON object); None accepts any.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {fix}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start + 1}); {fix}.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); {fix}.") from None
    except RecursionError:
        raise ValueError(f"{path}: invalid JSON (nested too deeply); {fix}.") from None
    if kind is not None and not isinstance(data, kind):
        what = {dict: "a JSON object", list: "a JSON list"}.get(kind, kind.__name__)
        raise ValueError(f"{path} must hold {what}, not {type(data).__name__}; {fix}.")
    return data
