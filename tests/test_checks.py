"""The exercise checks: every check on its reference (passes), on a stub (fails cleanly) and on each
of its plausible wrong answers (fails and names that mistake); hints, references of earlier
exercises, the one-line output in a notebook, and the package layout (no cycle, no registration
into ``globals()``)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from titans_mini import check
from titans_mini.checks import CHECKS, LESSONS
from titans_mini.checks.framework import CheckResult, compare

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "titans_mini" / "checks"
NAMES = list(CHECKS)


def _one_line(capsys) -> str:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, f"a check prints exactly one line: {lines}"
    return lines[0]


# --------------------------------------------------------------------------- every check


@pytest.mark.parametrize("name", NAMES)
def test_reference_passes(name, capsys):
    result = CHECKS[name](CHECKS[name].reference)
    assert isinstance(result, CheckResult) and bool(result) is True
    assert _one_line(capsys).startswith(f"[PASS] {name}: passed")


@pytest.mark.parametrize("name", NAMES)
def test_stub_fails_cleanly(name, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError("write the exercise first")

    assert bool(CHECKS[name](stub)) is False
    assert _one_line(capsys) == f"[FAIL] {name}: not implemented yet -- write the exercise first"


@pytest.mark.parametrize("name", NAMES)
def test_every_wrong_answer_fails_and_is_named(name, capsys):
    chk = CHECKS[name]
    assert chk.mistakes, f"check {name!r} has no plausible wrong answer"
    cases = chk.make_cases(torch.Generator().manual_seed(1234))
    call = chk.call or (lambda f, c: f(*c.args, **c.kwargs))
    for mistake in chk.mistakes:
        for case in cases:  # a wrong answer that crashes would test nothing
            call(mistake.answer, case)
        result = chk(mistake.answer)
        line = _one_line(capsys)
        assert not result, f"the wrong answer '{mistake.message}' passes {name}"
        assert result.mistake == mistake.message, f"{name}: named '{result.mistake}' for '{mistake.message}'"
        assert line.startswith(f"[FAIL] {name}: {mistake.message} (case '")
        assert line.endswith(f" — for the formula: check.hint('{name}', 2)")


def test_a_wrong_answer_that_is_not_registered_gets_the_idea(capsys):
    result = check.l2_normalize(lambda x: 2 * x)
    line = _one_line(capsys)
    assert not result and result.mistake is None
    assert "case 'random (4, 8)': output: first mismatch at index (0, 0)" in line
    assert f"Idea: {check.l2_normalize.idea} — for the formula: check.hint('l2_normalize', 2)" in line
    assert check.l2_normalize.formula not in line


def test_crashing_function_is_reported_not_raised(capsys):
    assert not check.l2_normalize(lambda x: x.undefined_method())
    line = _one_line(capsys)
    assert "case 'random (4, 8)' raised AttributeError" in line and "Idea: " in line


# --------------------------------------------------------------------------- hints


@pytest.mark.parametrize("name", NAMES)
def test_hint_levels(name, capsys):
    chk = CHECKS[name]
    assert chk.idea and chk.formula and chk.idea != chk.formula
    check.hint(name)
    assert _one_line(capsys) == f"{name}, hint 1 (the idea): {chk.idea}"
    check.hint(name, level=2)
    assert _one_line(capsys) == f"{name}, hint 2 (the formula): {chk.formula}"


def test_hint_errors():
    with pytest.raises(ValueError, match="level must be 1"):
        check.hint("l2_normalize", 3)
    with pytest.raises(ValueError, match="no check named 'l2_norm'"):
        check.hint("l2_norm")


# --------------------------------------------------------------------------- earlier exercises

_LESSON_05 = '''
import math
import torch
import torch.nn.functional as F

def layer_norm_backward(z, grad_u):
    return grad_u  # wrong: this exercise's own check fails

def gelu_derivative(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

def deep_memory_grads(W1, W2, K, V):
    Z1 = K @ W1.T
    H = F.gelu(Z1)
    Z2 = H @ W2.T
    E = K + F.layer_norm(Z2, (Z2.shape[-1],), eps=1e-5) - V
    delta_2 = layer_norm_backward(Z2, E)
    delta_1 = (delta_2 @ W2) * gelu_derivative(Z1)
    return delta_1.T @ K, delta_2.T @ H
'''

_LESSON_06 = '''
def chunk_coefficients(theta, eta, alpha):
    raise NotImplementedError("not written yet")

def linear_chunk_update(W, S, K, V, theta, eta, alpha):
    c, d, A, B, E = chunk_coefficients(theta, eta, alpha)
    R = K @ W.T - V
    return A * W + B * S - (c[:, None] * R).T @ K, E * S - (d[:, None] * R).T @ K
'''


@pytest.mark.parametrize("source, earlier, later", [
    (_LESSON_05, "layer_norm_backward", "deep_memory_grads"),
    (_LESSON_06, "chunk_coefficients", "linear_chunk_update"),
])
def test_a_later_exercise_is_graded_with_the_reference_of_an_earlier_one(source, earlier, later, capsys):
    namespace: dict = {}
    exec(compile(source, "<notebook>", "exec"), namespace)
    learners_earlier = namespace[earlier]
    assert not CHECKS[earlier](learners_earlier)
    capsys.readouterr()
    assert CHECKS[later](namespace[later])
    assert f"your code ran with the reference {earlier})" in _one_line(capsys)
    assert namespace[earlier] is learners_earlier, "the notebook's own function is put back"


def test_the_reference_is_swapped_in_only_while_the_check_runs(capsys):
    namespace: dict = {}
    exec(compile(_LESSON_05, "<notebook>", "exec"), namespace)
    del namespace["layer_norm_backward"]  # the learner never ran that cell
    assert check.deep_memory_grads(namespace["deep_memory_grads"])
    assert "layer_norm_backward" not in namespace


def _exercises(notebook: Path) -> dict[str, tuple[str, set[str]]]:
    """Each exercise function of a solutions notebook -> (its check, the global names it reads)."""
    cells = [c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    checked = dict(re.findall(r"\bcheck\.(\w+)\((\w+)\)", "\n".join(cells)))
    exercises = {}
    for source in cells:
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name in checked.values():
                reads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
                exercises[node.name] = (next(c for c, f in checked.items() if f == node.name), reads)
    return exercises


@pytest.mark.parametrize("notebook", sorted(ROOT.glob("solutions/*_solutions.ipynb")), ids=lambda p: p.name)
def test_every_exercise_that_calls_another_is_graded_with_its_reference(notebook):
    exercises = _exercises(notebook)
    for name, (check_name, reads) in exercises.items():
        earlier = (reads & exercises.keys()) - {name}
        assert earlier <= CHECKS[check_name].uses.keys(), (
            f"{notebook.name}: {name} calls {sorted(earlier)}: list them in {check_name}'s uses")
        for used in earlier:
            assert CHECKS[check_name].uses[used] is CHECKS[exercises[used][0]].reference


# --------------------------------------------------------------------------- results and the log


def test_result_is_a_bool_that_jupyter_does_not_display():
    from IPython.core.formatters import DisplayFormatter

    passed = check.l2_normalize(CHECKS["l2_normalize"].reference, verbose=False)
    failed = check.l2_normalize(lambda x: x, verbose=False)
    assert passed and not failed
    assert str(passed).startswith("[PASS] l2_normalize") and str(failed).startswith("[FAIL] l2_normalize")
    assert DisplayFormatter().format(passed) == ({}, {}), "no Out[...] for a check's result"


def test_log_file(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("TITANS_CHECK_LOG", str(log))
    check.l2_normalize(CHECKS["l2_normalize"].reference, verbose=False)
    check.l2_normalize(lambda x: x / x.norm(), verbose=False)
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert first["check"] == "l2_normalize" and first["passed"] is True and first["mistake"] is None
    assert second["passed"] is False and second["mistake"] == check.l2_normalize.mistakes[0].message


def test_check_cell_prints_one_line_in_a_notebook():
    cells = [
        "from titans_mini import check",
        "def l2_normalize(x):\n    return x / x.norm()",
        "check.l2_normalize(l2_normalize)",
        "check.l2_normalize(lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))",
        "check.hint('l2_normalize', 2)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    for cell, start in zip(nb.cells[2:], ["[FAIL] l2_normalize: you divided by the norm of the whole",
                                          "[PASS] l2_normalize: passed",
                                          "l2_normalize, hint 2 (the formula): x / x.norm"]):
        assert [o["output_type"] for o in cell.outputs] == ["stream"], cell.outputs
        lines = cell.outputs[0]["text"].splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), lines


# --------------------------------------------------------------------------- layout


def test_every_check_is_reachable_by_name():
    for name, chk in CHECKS.items():
        assert chk.name == name
        assert getattr(check, name) is chk, f"titans_mini.check.{name} is missing"
    assert set(check.__all__) == set(CHECKS) | {"CHECKS", "hint"}
    import titans_mini.checks as checks

    assert set(checks.__all__) == set(CHECKS) | {"CHECKS", "hint"}
    assert len(NAMES) == len({*NAMES}) == sum(len(m.__all__) for m in LESSONS), "a name twice"


@pytest.mark.parametrize("module", LESSONS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_checks_are_plain_module_level_names(module):
    source = Path(module.__file__).read_text()
    tree = ast.parse(source)
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    assert set(module.__all__) <= assigned, "each check is assigned at module level"
    for name in module.__all__:
        assert getattr(module, name).name == name, f"{name} = Check({name!r}, ...)"


def test_no_registration_into_globals():
    for path in [*PACKAGE.glob("*.py"), ROOT / "titans_mini" / "check.py"]:
        assert "globals()" not in path.read_text(), path.name


MODULES = {"titans_mini.check", "titans_mini.checks", "titans_mini.checks.framework",
           *(m.__name__ for m in LESSONS)}


def _checks_imports(path: Path) -> set[str]:
    """The modules of the checks (``MODULES``) that a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & MODULES
            found |= submodules or ({node.module} & MODULES)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & MODULES
    return found


def test_import_graph_has_no_cycle():
    """framework <- lessonNN <- checks/__init__ <- check.py, and nothing imports back up."""
    assert _checks_imports(PACKAGE / "framework.py") == set()
    for module in LESSONS:
        assert _checks_imports(Path(module.__file__)) == {"titans_mini.checks.framework"}, module.__name__
    assert _checks_imports(PACKAGE / "__init__.py") == MODULES - {"titans_mini.check", "titans_mini.checks"}
    assert _checks_imports(ROOT / "titans_mini" / "check.py") == {"titans_mini.checks"}


_IMPORT_EACH_ALONE = """
import importlib, sys
import torch  # imported once: the point is the order of titans_mini's own modules
failed = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "titans_mini" or m.startswith("titans_mini.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = repr(exc)
print(failed)
"""


def test_each_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module imported first, with no other module of titans_mini loaded: an import cycle
    would fail for at least one of them."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, *sorted(MODULES)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "{}", out.stdout + out.stderr[-2000:]


def test_every_check_is_used_by_a_notebook():
    called = set()
    for path in [*ROOT.glob("solutions/*_solutions.ipynb"), *ROOT.glob("notebooks/*.ipynb")]:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                called |= set(re.findall(r"\bcheck\.(\w+)\(", cell.source))
    assert called - {"hint"} <= set(CHECKS), f"unknown checks: {called - set(CHECKS)}"
    assert set(CHECKS) <= called, f"checks no notebook calls: {set(CHECKS) - called}"


# --------------------------------------------------------------------------- compare


def test_compare_messages():
    assert compare(torch.ones(2, 3), torch.ones(2, 3), atol=1e-6, rtol=0) is None
    assert "shape (3, 2) but expected (2, 3)" in compare(torch.ones(3, 2), torch.ones(2, 3), atol=1e-6, rtol=0)
    e = torch.zeros(2, 3)
    g = e.clone()
    g[1, 2] = 0.5
    msg = compare(g, e, atol=1e-6, rtol=0)
    assert "first mismatch at index (1, 2)" in msg and "max abs error 0.5" in msg
    assert "expected 2 items" in compare((e,), (e, e), atol=1e-6, rtol=0)
    assert compare(1.0, 1.0 + 1e-9, atol=1e-6, rtol=0) is None
    assert "non-finite" in compare(torch.tensor([float("nan")]), torch.tensor([1.0]), atol=1e-6, rtol=0)


def test_cases_are_fresh_copies():
    """A learner's function that writes into its inputs cannot change the reference's inputs."""
    def in_place(x):
        return x.div_(x.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    assert check.l2_normalize(in_place, verbose=False)
