"""titans_mini: a compact, paper-faithful PyTorch implementation of Titans (arXiv 2501.00663).

The heavy modules are imported lazily, so ``import titans_mini`` (and the environment check) is
fast and works even before the optional course packages are installed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "NeuralMemory": "titans_mini.memory",
    "MemoryState": "titans_mini.memory",
    "MemoryStats": "titans_mini.memory",
    "TitansConfig": "titans_mini.models",
    "TitansLM": "titans_mini.models",
    "describe": "titans_mini.device",
    "pick_device": "titans_mini.device",
    "fast_mode": "titans_mini.device",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'titans_mini' has no attribute {name!r}")


def __dir__():
    return __all__
