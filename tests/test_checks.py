"""The check framework, and every registered exercise check against its reference, a stub and
the plausible wrong answers registered with it."""

from __future__ import annotations

import pytest
import torch

from titans_mini import check
from titans_mini.check import CHECKS, Case, compare

NAMES = sorted(CHECKS)


def test_checks_are_registered():
    assert "l2_normalize" in CHECKS
    for name in NAMES:
        assert getattr(check, name) is CHECKS[name], f"check.{name} is not reachable"


@pytest.mark.parametrize("name", NAMES)
def test_reference_passes(name, capsys):
    assert CHECKS[name](CHECKS[name].reference) is True
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"[PASS] {name}"), out


@pytest.mark.parametrize("name", NAMES)
def test_stub_fails_cleanly(name, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError("write the exercise first")

    assert CHECKS[name](stub) is False
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, f"one line, no traceback wall: {out}"
    assert out[0].startswith(f"[FAIL] {name}: not implemented yet"), out[0]


@pytest.mark.parametrize("name", NAMES)
def test_plausible_wrong_answers_fail(name, capsys):
    chk = CHECKS[name]
    assert chk.wrong, f"check {name!r} registers no plausible wrong answer"
    for i, wrong in enumerate(chk.wrong):
        assert chk(wrong) is False, f"wrong answer #{i} of {name!r} passes the check"
        line = capsys.readouterr().out.strip().splitlines()
        assert len(line) == 1 and line[0].startswith(f"[FAIL] {name}:"), line
        assert "Hint" in line[0] or "not implemented" in line[0]


def test_crashing_function_is_reported_not_raised(capsys):
    assert check.l2_normalize(lambda x: x.undefined_method()) is False
    out = capsys.readouterr().out
    assert "raised AttributeError" in out and "Hint" in out


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


def test_log_file(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("TITANS_CHECK_LOG", str(log))
    check.l2_normalize(CHECKS["l2_normalize"].reference, verbose=False)
    check.l2_normalize(lambda x: x, verbose=False)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and '"passed": true' in lines[0] and '"passed": false' in lines[1]


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="twice"):
        check.register("l2_normalize", reference=lambda x: x, make_cases=lambda g: [Case("a", (1,))], hint="")
