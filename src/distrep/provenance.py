"""What produced a result: software versions and the device, recorded beside every result."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import torch

import distrep
from distrep.errors import DistrepError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cpu``; ``cuda`` / ``cuda:N`` (checked: a GPU this
    process sees, N below their count)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DistrepError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise DistrepError(f"unsupported device {name!r}; use auto, cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistrepError("device cuda requested but this PyTorch build sees no CUDA GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            # else the first CUDA call fails, after the data is loaded, with "invalid device ordinal"
            seen = ", ".join(f"cuda:{i}" for i in range(count))
            raise DistrepError(f"device {name} requested but this process sees only {seen}")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_memory() -> int:
    """Physical memory of this machine in bytes (0 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def software_versions() -> dict[str, str]:
    return {"distrep": distrep.__version__, "python": sys.version.split()[0],
            "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform()}
