"""Grade exercise notebooks with their checks.

By default (CI) this runs every notebook in ``solutions/`` and requires every check to pass.
Learners grade their own work with ``make grade``
(= ``pytest tests/test_exercises.py --impl exercises``): each exercise notebook is executed
top to bottom and the test lists the checks that do not pass yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def pytest_generate_tests(metafunc):
    if "notebook" in metafunc.fixturenames:
        impl = metafunc.config.getoption("impl")
        paths = sorted((ROOT / impl).glob(f"*_{impl}.ipynb"))
        metafunc.parametrize("notebook", paths, ids=[p.name for p in paths])


def test_notebook_checks_pass(notebook, tmp_path, monkeypatch):
    log = tmp_path / "checks.jsonl"
    monkeypatch.setenv("TITANS_CHECK_LOG", str(log))
    monkeypatch.setenv("TITANS_FAST", "1")
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}})
    client.execute()
    assert log.exists(), f"{notebook.name} ran no checks"
    results = [json.loads(line) for line in log.read_text().splitlines()]
    failed = [f"{r['check']}: {r['message']}" for r in results if not r["passed"]]
    assert not failed, f"{len(failed)} of {len(results)} checks do not pass yet:\n" + "\n".join(failed)
