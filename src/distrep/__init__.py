"""distrep: distance vs intensity representations in neural networks (Oursland, 2025)."""

from distrep.errors import DistrepError

__version__ = "0.1.0"
__all__ = ["DistrepError", "__version__"]
