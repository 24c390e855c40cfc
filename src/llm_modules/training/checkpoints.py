"""Sealed checkpoints: a checkpoint counts only once a seal listing its files' sizes and sha256 is written.

``Trainer`` writes ``checkpoint-N/`` file by file. A run killed meanwhile leaves a folder that
looks like a checkpoint but holds a truncated ``model.safetensors`` or no ``optimizer.pt``
(``Trainer`` then resumes without optimizer state and says nothing). Here every model file is
moved into place atomically, and after all ranks have written their parts the main process writes
``llm_modules_seal.json`` (atomically, last). Resuming verifies the seal: a folder without one is
incomplete and skipped (``resume: auto``) or refused (an explicit folder); a file whose size or
sha256 differs is named in the error. Model weights must be safetensors: a checkpoint holding
pickled weights (``pytorch_model.bin``) is refused. Optimizer, scheduler and RNG states are
``Trainer``'s ``.pt``/``.pth`` files, which it reads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..errors import LLMModulesError
from ..model.loading import PICKLED_WEIGHTS, check_safetensors
from .atomic import atomic_folder_write, atomic_write_json, file_sha256, is_temporary

SEAL = "llm_modules_seal.json"
# A checkpoint's weights: the model's, or a PEFT adapter's (SemAlign's LoRA).
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


class CorruptCheckpointError(LLMModulesError):
    """A checkpoint folder is incomplete or one of its files differs from what was written."""


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SEAL and not is_temporary(p))


def seal(folder: str | Path) -> None:
    """Record every file of ``folder`` (relative path, bytes, sha256) in its seal, written atomically last."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(folder)}
    atomic_write_json(folder / SEAL, {"version": 1, "files": files})


def verify(folder: str | Path) -> int:
    """Raise CorruptCheckpointError naming the file unless ``folder`` is a whole sealed checkpoint; return its file count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorruptCheckpointError(f"{folder} is not a checkpoint folder")
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).exists()]
    if pickled:
        raise CorruptCheckpointError(f"{folder / pickled[0]} holds pickled weights; llm-modules loads safetensors only "
                                     "(a pickle can run code when loaded). Re-save the model with safetensors")
    seal_file = folder / SEAL
    if not seal_file.is_file():
        raise CorruptCheckpointError(f"{folder} is incomplete: it has no {SEAL} (the run was stopped while writing it)")
    try:
        files = json.loads(seal_file.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(f"{seal_file} is damaged ({error})") from error
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing from the checkpoint its seal describes")
        if path.stat().st_size != record["bytes"]:
            raise CorruptCheckpointError(f"{path} has {path.stat().st_size} bytes, its seal says {record['bytes']} "
                                         "(truncated or overwritten)")
        if path.suffix == ".safetensors":
            check_safetensors(path)
        if file_sha256(path) != record["sha256"]:
            raise CorruptCheckpointError(f"{path} does not match the sha256 recorded in {seal_file} (damaged)")
    if not set(WEIGHTS) & set(files):
        raise CorruptCheckpointError(f"{folder} holds no model.safetensors")
    return len(files)


def _step(folder: Path) -> int:
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def checkpoint_folders(output: str | Path) -> list[Path]:
    """``checkpoint-N`` folders of a run, newest (largest N) first."""
    output = Path(output)
    if not output.is_dir():
        return []
    return sorted((p for p in output.iterdir() if p.is_dir() and _step(p) >= 0), key=_step, reverse=True)


def last_good_checkpoint(output: str | Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint of ``output`` whose seal verifies; each newer one skipped is reported to ``log``."""
    for folder in checkpoint_folders(output):
        try:
            verify(folder)
            return folder
        except LLMModulesError as error:
            if log is not None:
                log(f"skipping {folder}: {error}")
    return None


def resume_checkpoint(resume: str | None, output: str | Path, log: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint a run resumes from: ``auto``, the newest of ``output`` whose seal verifies (refused if none);
    a folder, once verified; None, none. ``log`` hears what was skipped and what is resumed."""
    if resume == "auto":
        found = last_good_checkpoint(output, log=log)
        if found is None:
            raise LLMModulesError(f"resume: auto found no complete checkpoint-* folder in {output}; "
                                  "start again without resume")
        resume = str(found)
    elif resume is not None:
        verify(resume)  # names the damaged or missing file; an unsealed (incomplete) checkpoint is refused
    if resume is not None and log is not None:
        log(f"resuming from {resume} (seal verified)")
    return resume


class SealedCheckpoints:
    """``Trainer`` mixin: model files moved into place atomically; every checkpoint sealed before older ones rotate out."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return super()._save(output_dir, state_dict)
        with atomic_folder_write(output_dir or self.args.output_dir) as scratch:
            super()._save(str(scratch), state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        run = Path(self._get_output_dir(trial=trial))
        folder = run / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():  # an unsealed leftover of a killed run at this very step
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate only once this one is sealed
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            seal(folder)
            rotate_checkpoints(str(run), limit, self.state.best_model_checkpoint, use_mtime=False)
