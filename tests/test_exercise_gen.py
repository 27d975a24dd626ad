"""The exercise generator and the sync between solutions/ and exercises/."""

from __future__ import annotations

import json

import pytest

from tools import exercise_gen as eg
from tools import notebook_setup as ns

SOLUTION_CELL = '''import torch

def delta_write(W, k, v, lr):
    """One delta-rule write."""
    # BEGIN SOLUTION
    # HINT: the gradient of 1/2 ||Wk - v||^2 is (Wk - v) k^T
    err = W @ k - v
    return W - lr * torch.outer(err, k)
    # END SOLUTION

class Gate(torch.nn.Module):
    def forward(self, x):
        # BEGIN SOLUTION
        return torch.sigmoid(x)
        # END SOLUTION'''


def test_stub_replaces_each_block_with_its_hint():
    out = eg.stub_source(SOLUTION_CELL)
    assert "err = W @ k - v" not in out and "torch.sigmoid" not in out
    assert '    raise NotImplementedError("the gradient of 1/2 ||Wk - v||^2 is (Wk - v) k^T")' in out
    assert f'        raise NotImplementedError("{eg.DEFAULT_HINT}")' in out
    assert '"""One delta-rule write."""' in out  # text outside the blocks is kept
    ns_ = {}
    exec(out, ns_)  # the generated code still defines everything
    with pytest.raises(NotImplementedError, match="gradient"):
        ns_["delta_write"](None, None, None, None)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("# BEGIN SOLUTION\nx = 1\n# END SOLUTION", "indented"),
        ("def f():\n    # BEGIN SOLUTION\n    return 1", "without a matching"),
        ("def f():\n    return 1\n    # END SOLUTION", "without a matching"),
    ],
)
def test_malformed_blocks_are_rejected(source, message):
    with pytest.raises(eg.ExerciseFormatError, match=message):
        eg.stub_source(source)


def _solution_nb(rel):
    nb = {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": "# 02 · Solutions\n\nText"},
            {"cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": [], "execution_count": None},
            {"cell_type": "code", "metadata": {}, "source": SOLUTION_CELL,
             "outputs": [{"output_type": "stream", "name": "stdout", "text": "hi"}], "execution_count": 3},
            {"cell_type": "markdown", "metadata": {"tags": ["solution-only"]}, "source": "the answer is 42"},
        ],
        "metadata": {"kernelspec": {"name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return ns.fix(nb, rel)


def test_generate_notebook():
    nb = _solution_nb("solutions/02_x_solutions.ipynb")
    ex = eg.generate(nb, "exercises/02_x_exercises.ipynb")
    sources = [eg._src(c) for c in ex["cells"]]
    assert sources[0].startswith("# 02 · Exercises")
    assert ns.problems(ex, "exercises/02_x_exercises.ipynb") == []
    assert all("the answer is 42" not in s for s in sources)
    code = [c for c in ex["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert any("NotImplementedError" in eg._src(c) for c in code)
    with pytest.raises(eg.ExerciseFormatError, match="no"):
        nb2 = _solution_nb("solutions/03_y_solutions.ipynb")
        nb2["cells"][3]["source"] = "y = 2"
        eg.generate(nb2, "exercises/03_y_exercises.ipynb")


def test_exercises_are_in_sync_with_solutions(root):
    expected = eg.expected_exercises(root)
    on_disk = set((root / "exercises").glob("*_exercises.ipynb"))
    assert on_disk == set(expected), "run `make exercises`: exercises/ and solutions/ list different notebooks"
    for path, text in expected.items():
        assert path.read_text() == text, f"{path.name} is out of date: run `make exercises` (never edit by hand)"
    for path in expected:
        assert json.loads(path.read_text())["cells"], path
