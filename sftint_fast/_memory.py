"""Free memory on a device: the one place the engines, the plan and the AND-OR solver read it."""
from __future__ import annotations

import torch


def available_ram() -> int:
    """Bytes of RAM available to new allocations: psutil's figure, else Linux's ``MemAvailable`` (psutil is a
    dependency, but a ``--no-deps`` install, as on GPU machines, may lack it)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise RuntimeError("cannot tell the available RAM (no psutil, no /proc/meminfo): install psutil, or pass "
                       "max_memory= explicitly")


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: CUDA's free memory (``mem_get_info``), else the host's available
    RAM (:func:`available_ram`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_ram()
