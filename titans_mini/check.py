"""Exercise checks: run a learner's function against a reference and say what is wrong.

Each check is registered with :func:`register` and exposed as ``titans_mini.check.<name>``::

    from titans_mini import check
    check.l2_normalize(my_l2_normalize)   # prints one line, returns True/False

A check calls the learner's function and the reference on the same fresh random inputs and on a
few edge cases, compares the results (shapes first, then values), and prints ONE line: a pass, or
the first problem it found -- not implemented yet, an exception, a shape mismatch, or the first
mismatching index with the values and the max error -- followed by the exercise's hint.
It never raises, so a notebook keeps running while you work on it.

Tests (``tests/test_checks.py``) run every registered check on its reference (must pass), on a
stub that raises ``NotImplementedError`` (must fail cleanly) and on each registered plausible wrong
answer (must fail).

Set ``TITANS_CHECK_LOG=/path/file.jsonl`` to also append one JSON line per check result (used by
``make grade`` to grade a whole notebook).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Case", "Check", "CHECKS", "register", "run_check", "compare"]


@dataclass
class Case:
    """One set of inputs: ``fn(*args, **kwargs)``; ``label`` names it in messages."""

    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class Check:
    name: str
    reference: Callable
    make_cases: Callable[[torch.Generator], list[Case]]
    hint: str
    wrong: list[Callable] = field(default_factory=list)  # plausible wrong answers (for tests)
    atol: float = 1e-5
    rtol: float = 1e-4
    call: Callable[[Callable, Case], Any] | None = None  # how to call fn on a case (default fn(*a, **kw))

    def __call__(self, fn: Callable, *, seed: int | None = None, verbose: bool = True) -> bool:
        return run_check(self, fn, seed=seed, verbose=verbose)


CHECKS: dict[str, Check] = {}


def register(name: str, *, reference: Callable, make_cases: Callable, hint: str,
             wrong: Sequence[Callable] = (), atol: float = 1e-5, rtol: float = 1e-4,
             call: Callable | None = None) -> Check:
    """Register a check; it becomes ``titans_mini.check.<name>``."""
    if name in CHECKS:
        raise ValueError(f"check {name!r} is registered twice")
    chk = Check(name, reference, make_cases, hint, list(wrong), atol, rtol, call)
    CHECKS[name] = chk
    globals()[name] = chk
    return chk


# --------------------------------------------------------------------------- comparison


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return repr(x)


def compare(got, expected, *, atol: float, rtol: float, path: str = "output") -> str | None:
    """None if ``got`` matches ``expected``; else a one-line description of the first problem."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return f"{path}: expected a {type(expected).__name__} of {len(expected)} items, got {type(got).__name__}"
        if len(got) != len(expected):
            return f"{path}: expected {len(expected)} items, got {len(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            msg = compare(g, e, atol=atol, rtol=rtol, path=f"{path}[{i}]")
            if msg:
                return msg
        return None
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            if isinstance(got, (int, float)) and expected.numel() == 1:
                got = torch.tensor(float(got), dtype=expected.dtype)
            else:
                return f"{path}: expected a tensor of shape {tuple(expected.shape)}, got {type(got).__name__}"
        if got.shape != expected.shape:
            return f"{path}: shape {tuple(got.shape)} but expected {tuple(expected.shape)}"
        g = got.detach().to(torch.float64).cpu()
        e = expected.detach().to(torch.float64).cpu()
        if not torch.isfinite(g).all() and torch.isfinite(e).all():
            idx = tuple(int(i) for i in (~torch.isfinite(g)).nonzero()[0])
            return f"{path}: non-finite value {g[idx].item()} at index {idx}"
        bad = ~torch.isclose(g, e, atol=atol, rtol=rtol, equal_nan=True)
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            err = (g - e).abs().nan_to_num(0.0).max().item()
            where = f" at index {idx}" if idx else ""
            return (f"{path}: first mismatch{where}: got {_fmt(g[idx].item())}, expected "
                    f"{_fmt(e[idx].item())} (max abs error {err:.3g})")
        return None
    if isinstance(expected, (int, float)):
        try:
            gv = float(got)
        except (TypeError, ValueError):
            return f"{path}: expected a number, got {type(got).__name__}"
        if not math.isclose(gv, float(expected), rel_tol=rtol, abs_tol=atol):
            return f"{path}: got {_fmt(gv)}, expected {_fmt(float(expected))}"
        return None
    if got != expected:
        return f"{path}: got {got!r}, expected {expected!r}"
    return None


def _log(name: str, passed: bool, message: str) -> None:
    path = os.environ.get("TITANS_CHECK_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"check": name, "passed": passed, "message": message}) + "\n")


def run_check(chk: Check, fn: Callable, *, seed: int | None = None, verbose: bool = True) -> bool:
    """Run ``fn`` against ``chk.reference`` on every case; print one line; return pass/fail."""
    gen = torch.Generator().manual_seed(seed if seed is not None else 1234)
    cases = chk.make_cases(gen)
    call = chk.call or (lambda f, c: f(*c.args, **c.kwargs))

    def clone(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, (tuple, list)):
            return type(v)(clone(x) for x in v)
        if isinstance(v, dict):
            return {k: clone(x) for k, x in v.items()}
        return v

    message, passed = "", True
    for case in cases:
        expected = call(chk.reference, Case(case.label, clone(case.args), clone(case.kwargs)))
        try:
            got = call(fn, Case(case.label, clone(case.args), clone(case.kwargs)))
        except NotImplementedError as exc:
            detail = str(exc) or chk.hint
            message, passed = f"not implemented yet -- {detail}", False
            break
        except Exception as exc:  # report, never crash the notebook
            message = f"case '{case.label}' raised {type(exc).__name__}: {exc}. Hint: {chk.hint}"
            passed = False
            break
        problem = compare(got, expected, atol=chk.atol, rtol=chk.rtol)
        if problem:
            message, passed = f"case '{case.label}': {problem}. Hint: {chk.hint}", False
            break
    if passed:
        message = f"passed {len(cases)} cases (random inputs and edge cases)"
    line = f"{'[PASS]' if passed else '[FAIL]'} {chk.name}: {message}"
    if verbose:
        print(line, file=sys.stdout)
    _log(chk.name, passed, message)
    return passed


# --------------------------------------------------------------------------- checks
# The foundation's example check (used in 00_welcome to show how exercises work).
# Lesson checks are registered below it, one section per lesson.


def _l2_normalize_ref(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _l2_cases(gen: torch.Generator) -> list[Case]:
    return [
        Case("random (4, 8)", (torch.randn(4, 8, generator=gen),)),
        Case("random (2, 3, 5)", (torch.randn(2, 3, 5, generator=gen),)),
        Case("large values", (1e3 * torch.randn(3, 4, generator=gen),)),
        Case("a zero row (must stay finite)", (torch.zeros(2, 4),)),
    ]


register(
    "l2_normalize",
    reference=_l2_normalize_ref,
    make_cases=_l2_cases,
    hint="divide each vector (last dimension) by its Euclidean norm, clamped below at 1e-6",
    wrong=[
        lambda x: x / x.norm(),  # normalises the whole tensor, not each vector
        lambda x: x / x.norm(dim=-1, keepdim=True),  # divides by zero on a zero row
        lambda x: x / x.abs().sum(dim=-1, keepdim=True).clamp_min(1e-6),  # L1 norm
    ],
)


# Lesson checks live in their own modules (one per half of the course); importing them registers
# them here, so every check is reachable as ``titans_mini.check.<name>``.
from titans_mini import checks_basics as _checks_basics  # noqa: E402,F401  (lessons 01-04)
from titans_mini import checks_memory as _checks_memory  # noqa: E402,F401  (lessons 05-07)
