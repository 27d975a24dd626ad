"""The check framework: run a learner's function against a reference and say what is wrong.

A :class:`Check` calls the learner's function and the reference on the same random inputs and
edge cases (its :class:`Case` list), compares the results with :func:`compare` (shapes first, then
values) and prints ONE line:

* ``[PASS] name: passed N cases ...``;
* ``[FAIL] name: not implemented yet -- <the exercise's hint>`` for an unfinished exercise;
* ``[FAIL] name: <the mistake> (case '...': <where the output differs>) — for the formula:
  check.hint('name', 2)`` when the output equals one of the check's plausible wrong answers
  (:class:`Mistake`): each wrong answer is run on the same inputs, and a match names the mistake;
* ``[FAIL] name: case '...': <where the output differs>. Idea: <the idea> — for the formula:
  check.hint('name', 2)`` otherwise (an exception is reported the same way, never raised).

Hints are graduated: a failure line gives the idea (level 1); ``check.hint('name', 2)`` prints the
formula (level 2).

A later exercise that calls an earlier one (``deep_memory_grads`` calls the learner's
``layer_norm_backward``) is graded on its own: :attr:`Check.uses` names those earlier functions,
and while the check runs, the names that the learner's code reads from the notebook point to the
references (the notebook's own functions are put back afterwards).

A check returns a :class:`CheckResult`: true when the check passed, and shown as nothing by
Jupyter, so a check cell prints exactly its one line. Set ``TITANS_CHECK_LOG=/path/file.jsonl``
to also append one JSON line per check result (``make grade`` grades a whole notebook with it).
"""

from __future__ import annotations

import dis
import json
import math
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Case", "Check", "CheckResult", "Mistake", "compare", "run_check"]


@dataclass
class Case:
    """One set of inputs: ``fn(*args, **kwargs)``; ``label`` names it in messages."""

    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class Mistake:
    """A plausible wrong answer and the message that names it.

    ``answer`` takes the same arguments as the reference; a learner whose outputs equal its
    outputs on every case gets ``message`` (e.g. "you decayed the fresh write too: ...")."""

    message: str
    answer: Callable


@dataclass
class CheckResult:
    """What a check found. ``bool(result)`` is pass/fail; Jupyter displays nothing for it (the
    check has already printed its line)."""

    name: str
    passed: bool
    message: str
    mistake: str | None = None  # the named mistake when the output matched a wrong answer

    def __bool__(self) -> bool:
        return self.passed

    @property
    def line(self) -> str:
        return f"{'[PASS]' if self.passed else '[FAIL]'} {self.name}: {self.message}"

    def __str__(self) -> str:
        return self.line

    def _ipython_display_(self) -> None:
        """Show nothing as a cell's last value: the line was printed when the check ran."""


@dataclass
class Check:
    """One exercise check, called as ``check.<name>(learner_fn)``.

    ``reference`` is the correct answer, ``make_cases(generator)`` returns the inputs (random ones
    and edge cases), ``idea`` (hint level 1) says what to compute in words, ``formula`` (hint
    level 2) gives it in code, ``mistakes`` are plausible wrong answers with their messages, and
    ``uses`` maps the notebook names of earlier exercises that the learner's function may call to
    their references. ``call(fn, case)`` says how to call ``fn`` on a case when it is not
    ``fn(*case.args, **case.kwargs)`` (e.g. to build a module from a class).
    """

    name: str
    reference: Callable
    make_cases: Callable[[torch.Generator], list[Case]]
    idea: str
    formula: str
    mistakes: list[Mistake] = field(default_factory=list)
    uses: dict[str, Callable] = field(default_factory=dict)
    atol: float = 1e-5
    rtol: float = 1e-4
    call: Callable[[Callable, Case], Any] | None = None

    def __call__(self, fn: Callable, *, seed: int | None = None, verbose: bool = True) -> CheckResult:
        return run_check(self, fn, seed=seed, verbose=verbose)

    def hint_text(self, level: int = 1) -> str:
        """Level 1: the idea; level 2: the formula."""
        if level == 1:
            return self.idea
        if level == 2:
            return self.formula
        raise ValueError(f"hint level must be 1 (the idea) or 2 (the formula), not {level!r}")


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


# --------------------------------------------------------------------------- running a check


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_clone(x) for x in v)
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    return v


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _outcomes(chk: Check, fn: Callable, cases: list[Case]) -> list[tuple[Any, BaseException | None]]:
    """``(output, None)`` or ``(None, exception)`` for each case; stops after NotImplementedError."""
    call = chk.call or (lambda f, c: f(*c.args, **c.kwargs))
    results = []
    for case in cases:
        try:
            results.append((call(fn, Case(case.label, _clone(case.args), _clone(case.kwargs))), None))
        except Exception as exc:  # reported, never raised: the notebook keeps running
            results.append((None, exc))
            if isinstance(exc, NotImplementedError):
                break
    return results


def _same(chk: Check, mine, other) -> bool:
    """Whether two outcome lists agree on every case (the same outputs, or the same exception)."""
    if len(mine) != len(other):
        return False
    for (out_a, exc_a), (out_b, exc_b) in zip(mine, other):
        if exc_a is not None or exc_b is not None:
            if type(exc_a) is not type(exc_b):
                return False
        elif compare(out_a, out_b, atol=chk.atol, rtol=chk.rtol) is not None:
            return False
    return True


def _global_reads(code: types.CodeType) -> set[str]:
    """The global names that ``code`` (and the functions nested in it) reads."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL"}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_reads(const)
    return names


def _functions(fn) -> list[types.FunctionType]:
    if isinstance(fn, type):
        return [v for v in vars(fn).values() if isinstance(v, types.FunctionType)]
    return [fn] if isinstance(fn, types.FunctionType) else []


@contextmanager
def _references_for(fn: Callable, uses: dict[str, Callable]) -> Iterator[list[str]]:
    """Point the earlier exercises that ``fn`` calls by name to their references, then restore.

    Yields the names that were swapped (those of ``uses`` that ``fn``'s code reads)."""
    swaps = {}  # (id of a globals dict, name) -> (that dict, name)
    for f in _functions(fn):
        for name in _global_reads(f.__code__) & uses.keys():
            swaps[id(f.__globals__), name] = (f.__globals__, name)
    missing = object()
    saved = [(g, name, g.get(name, missing)) for g, name in swaps.values()]
    try:
        for g, name in swaps.values():
            g[name] = uses[name]
        yield sorted({name for _, name in swaps.values()})
    finally:
        for g, name, old in saved:
            if old is missing:
                g.pop(name, None)
            else:
                g[name] = old


def _log(result: CheckResult) -> None:
    path = os.environ.get("TITANS_CHECK_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"check": result.name, "passed": result.passed,
                                "message": result.message, "mistake": result.mistake}) + "\n")


def run_check(chk: Check, fn: Callable, *, seed: int | None = None, verbose: bool = True) -> CheckResult:
    """Run ``fn`` against ``chk.reference`` on every case; print one line; return the result."""
    cases = chk.make_cases(torch.Generator().manual_seed(seed if seed is not None else 1234))
    with _references_for(fn, chk.uses) as swapped:
        mine = _outcomes(chk, fn, cases)
    expected = _outcomes(chk, chk.reference, cases)
    ran_with = f"your code ran with the reference {', '.join(swapped)}" if swapped else ""
    formula = f" — for the formula: check.hint('{chk.name}', 2)"

    where = None
    for case, (got, exc), (want, _) in zip(cases, mine, expected):
        if isinstance(exc, NotImplementedError):
            detail = _one_line(exc) or chk.idea
            result = CheckResult(chk.name, False, f"not implemented yet -- {detail}")
            break
        if exc is not None:
            where = f"case '{case.label}' raised {type(exc).__name__}: {_one_line(exc)}"
        elif problem := compare(got, want, atol=chk.atol, rtol=chk.rtol):
            where = f"case '{case.label}': {problem}"
        if where:
            mistake = next((m.message for m in chk.mistakes
                            if _same(chk, mine, _outcomes(chk, m.answer, cases))), None)
            if mistake:
                message = f"{mistake} ({where}{'; ' + ran_with if ran_with else ''}){formula}"
            else:
                message = f"{where}{' (' + ran_with + ')' if ran_with else ''}. Idea: {chk.idea}{formula}"
            result = CheckResult(chk.name, False, message, mistake)
            break
    else:
        result = CheckResult(chk.name, True, f"passed {len(cases)} cases (random inputs and edge "
                             f"cases{'; ' + ran_with if ran_with else ''})")
    if verbose:
        print(result.line, file=sys.stdout)
    _log(result)
    return result
