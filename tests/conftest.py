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


@pytest.fixture
def root() -> Path:
    return ROOT
