"""Device and precision choice for the course.

Lessons: every lesson calls :func:`describe` and :func:`fast_mode` in its first code cell; the
trainer uses the rest.

One place decides where tensors live and in which precision we train, so every notebook and the
trainer behave the same on a laptop CPU, a Colab T4 and an H100:

* device: CUDA when available, else CPU. Apple's MPS is used only when asked for
  (``pick_device("mps")``), with a warning, because some ops the memory needs are slow or missing.
* precision: bf16 autocast on compute capability >= 8.0 (A100, H100, RTX 30xx+); fp16 autocast
  with a gradient scaler below that (T4, V100) -- a T4 *reports* bf16 as supported but emulates it
  slowly, so we decide by compute capability, never by ``torch.cuda.is_bf16_supported()``;
  fp32 on the CPU.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "Precision",
    "pick_device",
    "pick_precision",
    "is_colab",
    "fast_mode",
    "describe",
    "torch_version",
    "MIN_TORCH_FOR_COMPILE",
    "compile_supported",
]

# torch.compile of the memory's chunk update (with its hand-written backward) is verified against
# the eager path on torch 2.11 (Colab's version) and 2.13; older versions are not tested.
MIN_TORCH_FOR_COMPILE = (2, 11)


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch, e.g. (2, 11) for "2.11.0+cu126"."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def compile_supported() -> bool:
    """True when this torch is one on which compiled memory updates are verified (>= 2.11)."""
    return torch_version() >= MIN_TORCH_FOR_COMPILE


def is_colab() -> bool:
    """True inside a Google Colab kernel."""
    return "google.colab" in sys.modules


def fast_mode() -> bool:
    """True when ``TITANS_FAST`` is set to a true value (the tests set ``TITANS_FAST=1``).

    Notebooks then run the same code path with tiny sizes and few steps.
    """
    return os.environ.get("TITANS_FAST", "").strip().lower() in {"1", "true", "yes", "on"}


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the device to use.

    ``prefer=None`` (default): CUDA if available, else CPU. ``"cuda"``, ``"cpu"`` or ``"mps"``
    force a choice; asking for an unavailable device raises ``ValueError`` with what to do.
    """
    if prefer is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(prefer)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was requested but torch.cuda.is_available() is False. "
            "On Colab choose Runtime > Change runtime type > GPU; locally use device='cpu'."
        )
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' was requested but MPS is not available; use 'cpu'.")
        warnings.warn(
            "Using Apple MPS on request: some operations fall back to the CPU or are slower; "
            "results may differ slightly from CPU/CUDA.",
            stacklevel=2,
        )
    elif dev.type not in {"cpu", "cuda"}:
        raise ValueError(f"unknown device {prefer!r}; use 'cpu', 'cuda' or 'mps'.")
    return dev


@dataclass(frozen=True)
class Precision:
    """How to train on a device: ``dtype`` for autocast (None = fp32, no autocast) and whether a
    gradient scaler is needed (fp16 only)."""

    name: str  # "fp32", "bf16" or "fp16"
    dtype: torch.dtype | None
    use_scaler: bool

    def autocast(self, device: torch.device | str):
        """A context manager: autocast in ``dtype`` on ``device`` (a no-op for fp32)."""
        device_type = torch.device(device).type
        if self.dtype is None:
            return torch.autocast(device_type=device_type, enabled=False)
        return torch.autocast(device_type=device_type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device | str):
        """A ``torch.amp.GradScaler`` that is enabled only for fp16."""
        return torch.amp.GradScaler(torch.device(device).type, enabled=self.use_scaler)


FP32 = Precision("fp32", None, False)
BF16 = Precision("bf16", torch.bfloat16, False)
FP16 = Precision("fp16", torch.float16, True)


def pick_precision(device: torch.device | str | None = None) -> Precision:
    """Training precision for ``device``: bf16 on CUDA compute capability >= 8.0, fp16 + scaler
    below (T4 = 7.5 emulates bf16), fp32 on CPU and MPS."""
    dev = pick_device() if device is None else torch.device(device)
    if dev.type != "cuda":
        return FP32
    major, _minor = torch.cuda.get_device_capability(dev)
    return BF16 if major >= 8 else FP16


def describe(device: torch.device | str | None = None, *, show: bool = True) -> dict[str, str]:
    """A small table of the environment for the top of each notebook.

    Returns the rows as a dict and, with ``show=True``, prints them aligned.
    """
    dev = pick_device() if device is None else torch.device(device)
    rows: dict[str, str] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dev),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        rows["gpu"] = f"{props.name} (cc {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        rows["cpu threads"] = str(torch.get_num_threads())
    rows["precision"] = pick_precision(dev).name
    try:
        import numpy

        rows["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover - numpy is a dependency
        rows["numpy"] = "missing"
    try:
        import ipywidgets

        rows["ipywidgets"] = ipywidgets.__version__
    except ImportError:
        rows["ipywidgets"] = "not installed"
    rows["colab"] = "yes" if is_colab() else "no"
    rows["fast mode"] = "on (TITANS_FAST)" if fast_mode() else "off"
    if show:
        width = max(len(k) for k in rows)
        for key, value in rows.items():
            print(f"{key:<{width}}  {value}")
    return rows
