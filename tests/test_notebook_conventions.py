"""Every notebook opens with a title + its own Colab badge and the one shared set-up cell."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from tools import notebook_setup as ns
from tools import render
from tools.notebook_setup import ROOT_DIRS, all_notebooks

_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
NOTEBOOKS = all_notebooks(_ROOT)


def test_there_are_notebooks():
    assert (_ROOT / "notebooks" / "00_welcome.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(_ROOT).as_posix())
def test_title_badge_and_setup_cell(path):
    rel = path.relative_to(_ROOT).as_posix()
    nb = json.loads(path.read_text())
    assert ns.problems(nb, rel) == [], f"{rel}: run `make exercises` (python -m tools.notebook_setup) to fix"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", f"{rel}: kernelspec python3"


LESSONS = [p for p in NOTEBOOKS if p.parent.name == "notebooks"]
WORKBOOKS = [p for p in NOTEBOOKS if p.parent.name != "notebooks"]


@pytest.mark.parametrize("path", WORKBOOKS, ids=lambda p: p.relative_to(_ROOT).as_posix())
def test_exercises_and_solutions_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    with_outputs = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and c.get("outputs")]
    assert not with_outputs, f"cells {with_outputs} carry outputs; clear them (make exercises) before committing"
    assert "titans_mini" not in nb["metadata"], "only lessons carry a render record"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.relative_to(_ROOT).as_posix())
def test_lesson_outputs_come_from_a_full_run_of_this_code(path):
    """A lesson is stored with the outputs of `make render`; its code must be the code that ran."""
    rel = path.relative_to(_ROOT).as_posix()
    nb = json.loads(path.read_text())
    record = nb["metadata"].get("titans_mini", {}).get("outputs_from_full_run")
    assert record, f"{rel} has no stored full run: run `make render` (python -m tools.render {rel})"
    assert record["code_sha256"] == render.code_hash(nb), (
        f"{rel}: its code changed since its outputs were made; re-run `python -m tools.render {rel}`")
    assert {"machine", "date", "seconds"} <= record.keys()
    note = [c for c in nb["cells"] if c.get("id") == render.NOTE_ID]
    assert len(note) == 1 and record["machine"] in "".join(note[0]["source"]), "the notebook names its machine"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), f"{rel}: not every code cell ran"
    errors = [o for c in code for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, f"{rel}: the stored run raised {errors[0].get('ename')}"


def test_code_hash_sees_code_but_not_outputs_or_markdown():
    nb = {"cells": [{"cell_type": "markdown", "source": "# T"},
                    {"cell_type": "code", "source": "x = 1", "outputs": []}], "metadata": {}}
    h = render.code_hash(nb)
    with_output = json.loads(json.dumps(nb))
    with_output["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1"}]
    with_output["cells"][0]["source"] = "# Another title"
    assert render.code_hash(with_output) == h
    edited = json.loads(json.dumps(nb))
    edited["cells"][1]["source"] = "x = 2"
    assert render.code_hash(edited) != h


def test_problems_detects_drift():
    rel = "notebooks/99_x.ipynb"
    good = {"cells": [{"cell_type": "markdown", "source": "# T\n\n" + ns.badge(rel)},
                      {"cell_type": "code", "source": ns.SETUP_CELL}], "metadata": {}}
    assert ns.problems(good, rel) == []
    assert ns.problems(good, "notebooks/98_other.ipynb")  # badge for another path
    drifted = json.loads(json.dumps(good))
    drifted["cells"][1]["source"] = ns.SETUP_CELL.replace("-q", "-q -e")
    assert ns.problems(drifted, rel)
    no_title = json.loads(json.dumps(good))
    no_title["cells"][0]["source"] = ns.badge(rel)
    assert ns.problems(no_title, rel)


def _fake_pip(calls, returncode=0, stderr=""):
    def run(*a, **k):
        calls.append((a, k))
        return types.SimpleNamespace(returncode=returncode, stderr=stderr)
    return types.SimpleNamespace(run=run)


def test_setup_cell_installs_only_on_colab(monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "subprocess", _fake_pip(calls))
    monkeypatch.delenv(ns.SOURCE_SETTING, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(ns.SETUP_CELL, {})
    assert calls == [], "locally the set-up cell must do nothing"
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(ns.SETUP_CELL, {})
    assert len(calls) == 1
    cmd = calls[0][0][0]
    assert cmd[1:4] == ["-m", "pip", "install"]
    assert "-e" not in cmd and "--editable" not in cmd, "editable installs do not import on Colab"
    assert any(arg.endswith(f"git+{ns.REPO_URL}@{ns.RELEASE}") for arg in cmd)
    assert not any(re.search(r"\b(torch|ipywidgets)\b", arg) for arg in cmd), "never reinstall torch/ipywidgets"
    assert capsys.readouterr().out == "", "a successful install prints nothing"


def test_setup_cell_failure_says_how_to_point_elsewhere(monkeypatch, capsys):
    """A failed install prints one line naming the source, pip's reason and the setting to change."""
    calls = []
    err = "ERROR: Repository not found.\nfatal: could not read from remote repository"
    monkeypatch.setitem(sys.modules, "subprocess", _fake_pip(calls, returncode=1, stderr=err))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setenv(ns.SOURCE_SETTING, "git+https://github.com/someone/fork@dev")
    exec(ns.SETUP_CELL, {})
    assert calls[0][0][0][-1] == "git+https://github.com/someone/fork@dev", "the setting picks the source"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    assert "someone/fork@dev" in out[0] and "could not read from remote repository" in out[0]
    assert ns.SOURCE_SETTING in out[0]


def test_readme_documents_the_install_source_setting():
    assert ns.SOURCE_SETTING in (_ROOT / "README.md").read_text()


def test_repository_url_is_defined_once():
    """The repo URL is written literally only in notebook_setup.py; everything else derives it."""
    hits = []
    for path in [*_ROOT.glob("titans_mini/**/*.py"), *_ROOT.glob("tests/**/*.py"),
                 *_ROOT.glob("tools/**/*.py")]:
        if ns.GITHUB_REPO in path.read_text() and path.name != "notebook_setup.py":
            hits.append(path.relative_to(_ROOT).as_posix())
    assert hits == []
    assert set(ROOT_DIRS) == {"notebooks", "solutions", "exercises"}


def test_readme_links_every_lesson_with_its_colab_badge():
    readme = (_ROOT / "README.md").read_text()
    for path in sorted((_ROOT / "notebooks").glob("*.ipynb")):
        rel = path.relative_to(_ROOT).as_posix()
        assert f"]({rel})" in readme, f"README course map does not link {rel}"
        assert ns.colab_url(rel) in readme, f"README has no Colab link for {rel}"


def test_lessons_run_on_the_titans_mini_kernel_too():
    """Notebooks declare ``python3`` (Colab and any Jupyter open them without a prompt); a learner
    whose Jupyter runs outside the course environment picks the ``titans-mini`` kernel that
    ``make lab`` registers. Run the welcome lesson on that kernel (nbmake runs every notebook on
    ``python3``)."""
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager

    if "titans-mini" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("the titans-mini kernel is not registered (make setup registers it)")
    nb = json.loads((_ROOT / "notebooks" / "00_welcome.ipynb").read_text())
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.from_dict(nb)
    client = nbclient.NotebookClient(nb, kernel_name="titans-mini", timeout=300,
                                     resources={"metadata": {"path": str(_ROOT / "notebooks")}})
    client.execute()  # raises CellExecutionError on any error
    assert client.kernel_name == "titans-mini"


def test_readme_says_which_kernel_to_use():
    readme = (_ROOT / "README.md").read_text()
    assert "titans-mini" in readme and "python3" in readme and "Change kernel" in readme


def test_badges_and_install_point_at_the_release_of_this_version():
    """A notebook opened from a badge installs the library of the same release tag, so the code it
    imports matches it (not whatever ``main`` holds by then)."""
    import titans_mini

    assert ns.RELEASE == f"v{titans_mini.__version__}", "pyproject.toml and titans_mini.__version__ differ"
    assert f"@{ns.RELEASE}" in ns.SETUP_CELL and "@main" not in ns.SETUP_CELL
    assert f"/blob/{ns.RELEASE}/" in ns.badge("notebooks/00_welcome.ipynb")
    readme = (_ROOT / "README.md").read_text()
    assert ns.fix_readme(readme) == readme, "README Colab links: run python -m tools.notebook_setup"
    assert "/blob/main/" not in ns.fix_readme("https://colab.research.google.com/github/"
                                              f"{ns.GITHUB_REPO}/blob/main/notebooks/x.ipynb")


def test_code_hash_ignores_only_the_setup_cell():
    nb = json.loads((_ROOT / "notebooks" / "00_welcome.ipynb").read_text())
    before = render.code_hash(nb)
    nb["cells"][1]["source"] = ns.SETUP_CELL.replace(ns.RELEASE, "v9.9.9")
    assert render.code_hash(nb) == before, "a new release tag in the set-up cell needs no re-render"
    code = [c for c in nb["cells"][2:] if c["cell_type"] == "code"][0]
    code["source"] = "".join(code["source"]) + "\n# changed"
    assert render.code_hash(nb) != before
