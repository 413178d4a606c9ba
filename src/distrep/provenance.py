"""What produced a result: software versions and the device, recorded beside every result.

The device is resolved, checked and described by the process that trains on it. A sweep whose
chunks train on Ray workers asks one of them (:func:`device_facts` there) and lends the answer
to its driver (:func:`lent_device`), so that a head node without the workers' GPUs checks,
plans and records the sweep as they will train it.
"""

from __future__ import annotations

import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

import distrep
from distrep.errors import DistrepError


@dataclass(frozen=True)
class DeviceFacts:
    """A device as the process that trains on it sees it: the name asked for (``auto``, ``cpu``,
    ``cuda:1``), what it resolved to there, :func:`describe_device`'s line, why the fused step
    cannot run there (None: it can; :func:`distrep.fused.unavailable`) and the shared memory a
    block may take there (bytes; None off CUDA or without the fused step)."""

    requested: str
    device: str
    description: str
    fused_unavailable: str | None
    shared_memory: int | None


_lent: DeviceFacts | None = None


def device_facts(requested: str) -> DeviceFacts:
    """This process's facts of the device ``requested`` (resolved and checked here: a
    :class:`DistrepError` if it cannot be used here)."""
    from distrep import fused
    device = resolve_device(requested)
    why = fused.unavailable(device)
    shared = fused.max_shared_memory(device) if device.type == "cuda" and why is None else None
    return DeviceFacts(requested, str(device), describe_device(device), why, shared)


@contextmanager
def lent_device(facts: DeviceFacts):
    """Within it, ``facts.requested`` resolves to ``facts.device`` unchecked, and that device is
    described, and the fused step's availability and room on it read, from ``facts`` instead of
    this process's hardware (a driver whose chunks train elsewhere; nothing trains here)."""
    global _lent
    before, _lent = _lent, facts
    try:
        yield facts
    finally:
        _lent = before


def lent(device: torch.device | str) -> DeviceFacts | None:
    """The facts lent for ``device`` (:func:`lent_device`), or None where this process answers."""
    if _lent is not None and torch.device(_lent.device) == torch.device(device):
        return _lent
    return None


def lent_as(requested: str) -> DeviceFacts | None:
    """The facts lent for the device named ``requested`` (as asked for: ``auto``, ``cuda``), or None."""
    return _lent if _lent is not None and _lent.requested == requested else None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cpu``; ``cuda`` / ``cuda:N`` (checked: a GPU this
    process sees, N below their count; or as a device lent to this process resolved it)."""
    if _lent is not None and name == _lent.requested:
        return torch.device(_lent.device)
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
    if facts := lent(device):
        return facts.description
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
