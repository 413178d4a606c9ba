"""distrep: distance vs intensity representations in neural networks (Oursland, 2025)."""

import os

# PyTorch's CPU allocator backs large tensors with transparent huge pages when this is set (it
# reads it once, at its first allocation). The engine's first layer returns a fresh
# [runs, width, n] tensor every step on the CPU; with 4 KiB pages its page faults cost ~8 ms per
# run and step, with huge pages ~1 ms (measured, full MNIST). A user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from distrep.errors import DistrepError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DistrepError", "__version__"]
