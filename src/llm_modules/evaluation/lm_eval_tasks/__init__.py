"""lm-evaluation-harness tasks over the offline JSONL files: ARC-Challenge and MMLU (letter format), GSM8K.

The YAMLs in this folder name their data files with placeholders; :func:`write_tasks` writes them with
absolute paths into a folder that lm-eval reads as an ``include_path``. No task downloads anything.

Where the data is (first that is given):
- ARC-Challenge, MMLU: ``data_dir`` / ``$LLM_MODULES_DATASETS`` / ``~/.cache/offline-datasets`` (the folder
  ``offline-datasets.py --out`` wrote: ``arc_challenge/test.jsonl``, ``mmlu/test.jsonl``);
- GSM8K: ``gsm8k_dir`` / ``$LLM_MODULES_GSM8K`` / ``DATA_DIR/gsm8k`` (``train.jsonl``, ``test.jsonl``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ...errors import LLMModulesError

HERE = Path(__file__).parent
DATASETS_ENV = "LLM_MODULES_DATASETS"
GSM8K_ENV = "LLM_MODULES_GSM8K"
TAG = "llm_modules"  # every task below
# task -> (its YAML here, the data files it reads: (folder kind, path inside it))
TASKS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "llm_modules_arc_challenge": ("arc_challenge.yaml", (("datasets", "arc_challenge/test.jsonl"),)),
    "llm_modules_mmlu": ("mmlu.yaml", (("datasets", "mmlu/test.jsonl"),)),
    "llm_modules_gsm8k": ("gsm8k.yaml", (("gsm8k", "train.jsonl"), ("gsm8k", "test.jsonl"))),
}
SUPPORT_FILES = ("_letters_template_yaml", "utils.py")
HOW_TO_GET = {
    "datasets": "write it with `python offline-datasets.py --out DIR --tasks arc_challenge mmlu` "
                "(the project's shared/tools) and pass --data-dir DIR or set $LLM_MODULES_DATASETS",
    "gsm8k": "pass --gsm8k-dir with GSM8K's train.jsonl and test.jsonl (shared/data/gsm8k) or set $LLM_MODULES_GSM8K",
}


def data_folders(data_dir: str | os.PathLike | None = None, gsm8k_dir: str | os.PathLike | None = None
                 ) -> dict[str, Path]:
    """The absolute data folders the tasks read: {"datasets": ..., "gsm8k": ...} (see the module docstring)."""
    datasets = Path(data_dir or os.environ.get(DATASETS_ENV) or Path.home() / ".cache" / "offline-datasets")
    gsm8k = Path(gsm8k_dir or os.environ.get(GSM8K_ENV) or datasets / "gsm8k")
    return {"datasets": datasets.expanduser().resolve(), "gsm8k": gsm8k.expanduser().resolve()}


def selected_tasks(names: Iterable[str]) -> list[str]:
    """Our task names among ``names`` (the tag ``llm_modules`` stands for all of them); others are lm-eval's."""
    chosen: list[str] = []
    for name in names:
        for task in TASKS if name == TAG else [name] if name in TASKS else []:
            if task not in chosen:
                chosen.append(task)
    return chosen


def write_tasks(folder: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                gsm8k_dir: str | os.PathLike | None = None, check: Iterable[str] = ()) -> Path:
    """Write every task YAML (data paths absolute) and its support files into ``folder``; return it.

    check: task names (or the tag) whose data files must exist; a missing one raises an error that says
    which file and how to produce it.
    """
    places = data_folders(data_dir, gsm8k_dir)
    for task in selected_tasks(check):
        for kind, relative in TASKS[task][1]:
            path = places[kind] / relative
            if not path.is_file():
                raise LLMModulesError(f"task {task} reads {path}, which does not exist; {HOW_TO_GET[kind]}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name in SUPPORT_FILES:
        shutil.copyfile(HERE / name, out / name)
    for yaml_name, _ in TASKS.values():
        text = (HERE / yaml_name).read_text()
        text = text.replace("@DATASETS@", places["datasets"].as_posix()).replace("@GSM8K@", places["gsm8k"].as_posix())
        (out / yaml_name).write_text(text)
    return out
