"""Shared pytest set-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The suite always runs the notebooks' fast path and never opens windows.
os.environ.setdefault("TITANS_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Notebook kernels inherit this: tiny tensors run fastest on one thread when tests run in parallel.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        default="solutions",
        choices=["solutions", "exercises"],
        help="which exercise notebooks tests/test_exercises.py grades: the reference solutions "
        "(default, what CI runs) or your own work in exercises/ (`make grade`)",
    )


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The library tests use tiny tensors: one intra-op thread is fastest, and several threads
    per process only spin-wait on a shared 2-core machine (measured up to 100x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def root() -> Path:
    return ROOT
