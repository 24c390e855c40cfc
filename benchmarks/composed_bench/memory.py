"""Memory measures: the resident set of this process image (Linux ``/proc``), and how a training row measured
its peak."""

from __future__ import annotations

import contextlib

GIB = 2**30


CPU_MEMORY_MEASURE = ("peak RSS of a fresh subprocess per configuration (VmHWM from /proc/self/status, the "
                      "kernel's resident-set high-water mark of that process image, reset after imports through "
                      "/proc/self/clear_refs) minus its RSS after imports: weights, gradients, AdamW state, "
                      "activations and allocator slack of that configuration only")
CUDA_MEMORY_MEASURE = "torch.cuda.max_memory_allocated (weights + gradients + AdamW state + activations)"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def current_rss() -> int:
    """Resident set of this process in bytes."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """Resident-set high-water mark of this process image.

    Not getrusage's ru_maxrss: Linux carries that across fork + exec, so a worker started by a parent
    holding a 1.5B-parameter model would report the parent's size. VmHWM belongs to the current image.
    """
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0); harmless where unsupported."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
