"""Exercise checks for lessons 05-07 (registered into :mod:`titans_mini.check`)."""

from __future__ import annotations

import torch  # noqa: F401

from titans_mini.check import Case, register  # noqa: F401
