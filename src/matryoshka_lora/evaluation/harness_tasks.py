"""lm-evaluation-harness setup: its optional import, the shipped local tasks, and finding tasks.

Local tasks ship in `matryoshka_lora/tasks/` as templates: `${GSM8K_DIR}` and `${TASK_DIR}`
in their `data_files` are filled in by `write_local_tasks` (lm-eval resolves relative data
paths against the working directory, so the written copies get absolute paths). `gsm8k_local` is
lm-eval's `gsm8k` with only the data source changed; its folder comes from `gsm8k_dir`, else
`$MLORA_GSM8K_DIR`, else the nearest `shared/data/gsm8k` in the working directory or a parent
(`gsm8k.find_gsm8k`, the same lookup the training data uses).
To run the same tasks with the plain `lm_eval` CLI, write them once with `write_local_tasks`
and pass that folder as `--include_path`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

from ..data.gsm8k import DEFAULT_GSM8K_DIR, find_gsm8k, gsm8k_missing

INSTALL_HINT = "lm-eval is not installed: pip install 'matryoshka-lora[harness]'"
TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"


class HarnessNotInstalled(ImportError):
    """lm-eval (the `harness` extra) is missing; the message is the one-line install hint."""

    def __init__(self):
        super().__init__(INSTALL_HINT)


def import_lm_eval():
    """Import lm-eval lazily (it is an optional extra): `(lm_eval, HFLM, TaskManager)`.

    Raises:
        HarnessNotInstalled: lm-eval is missing.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise HarnessNotInstalled() from e
    return lm_eval, HFLM, TaskManager


def resolve_gsm8k_dir(gsm8k_dir: str | Path | None = None) -> Path:
    """The GSM8K folder for `gsm8k_local`, as an absolute path.

    `find_gsm8k`'s lookup (the argument, $MLORA_GSM8K_DIR, the nearest `shared/data/gsm8k`);
    when it finds nothing, `../shared/data/gsm8k` (missing; `check_local_data` names the fix).
    """
    return Path(find_gsm8k(gsm8k_dir) or DEFAULT_GSM8K_DIR).expanduser().resolve()


def write_local_tasks(directory: str | Path, gsm8k_dir: str | Path | None = None) -> Path:
    """Write the shipped task YAMLs into `directory` with absolute data paths filled in.

    `${GSM8K_DIR}` becomes `resolve_gsm8k_dir(gsm8k_dir)`; `${TASK_DIR}` becomes the shipped
    task folder, so data shipped with the package is read in place (a stable path, which keeps
    the `datasets` cache from growing a new entry per run).

    Args:
        directory: Where to write one sub-folder per task (created if missing).
        gsm8k_dir: Folder with GSM8K's train.jsonl and test.jsonl (see `resolve_gsm8k_dir`).

    Returns:
        `directory`, ready to pass to lm-eval as an include path.
    """
    directory = Path(directory)
    gsm8k = resolve_gsm8k_dir(gsm8k_dir).as_posix()
    for task_dir in sorted(p for p in TASKS_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml"))):
        out = directory / task_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for src in sorted(task_dir.glob("*.yaml")):
            text = src.read_text().replace("${GSM8K_DIR}", gsm8k).replace("${TASK_DIR}", task_dir.as_posix())
            (out / src.name).write_text(text)
    return directory


def check_local_data(tasks: Sequence[str], gsm8k_dir: str | Path | None) -> None:
    """Fail fast when `gsm8k_local` is among `tasks` but its GSM8K files are missing.

    Raises:
        FileNotFoundError: train.jsonl or test.jsonl is not in the GSM8K folder; the message names the fix.
    """
    if "gsm8k_local" not in tasks:
        return
    folder = resolve_gsm8k_dir(gsm8k_dir)
    missing = [n for n in ("train.jsonl", "test.jsonl") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(gsm8k_missing(f"gsm8k_local needs {', '.join(missing)} in {folder}"))


def build_task_manager(TaskManager, tasks: Sequence[str], include_paths: list[str]):
    """lm-eval's `TaskManager` for `tasks`, indexing only the include paths when they hold every
    task (lm-eval's full index takes ~15-30 s).

    Raises:
        ValueError: an unknown task; the message suggests close names.
    """
    tm = TaskManager(include_path=include_paths, include_defaults=False)
    if not all(t in tm.all_tasks for t in tasks):
        tm = TaskManager(include_path=include_paths)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=5) for t in unknown}
        lines = [f"  - {t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items()]
        raise ValueError("Unknown lm-eval task(s):\n" + "\n".join(lines)
                         + "\nList tasks with `lm_eval ls tasks`; for local YAMLs pass include_path (--include-path DIR).")
    return tm
