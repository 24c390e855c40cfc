"""Where a run happened: the machine (and its GPU's peak FLOP/s, for MFU) and the code's commit."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess

import torch

from .memory import GIB
from .plan import Plan


# Dense bf16 / fp32 (TF32 off) peak FLOP/s of GPUs we know, for MFU; matched on the device name.
GPU_PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12},
                  "A100": {"bfloat16": 312e12, "float32": 19.5e12}}


def gpu_peak_flops(plan: Plan) -> float | None:
    """The GPU's dense peak FLOP/s at the plan's dtype, if known (None on CPU)."""
    if not plan.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((table[plan.dtype] for key, table in GPU_PEAK_FLOPS.items() if key in name), None)


def machine_description(device: str) -> dict:
    """Platform, versions, CPU, cores, threads, memory, load average (and the GPU on CUDA)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "load_average_1_5_15_min_at_end": os.getloadavg()}
    import transformers

    info["transformers"] = transformers.__version__
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def git_commit() -> str:
    """HEAD's commit, with the files that differ from it when the tree has changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    changed = git("diff", "--name-only", "HEAD").split()
    return commit + (f" (uncommitted changes in: {', '.join(changed)})" if changed else "")
