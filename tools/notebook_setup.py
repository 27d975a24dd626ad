"""The one source of truth for what every course notebook starts with.

Every notebook in ``notebooks/``, ``solutions/`` and ``exercises/`` opens with

1. a title cell (markdown) whose first lines are the ``# Title`` and an Open-in-Colab badge that
   points at the notebook's own path in the repository, and
2. the set-up cell below, verbatim: it does nothing locally; on Colab it installs this package
   normally (not editable -- editable installs do not import in a running Colab kernel) from the
   repository URL, without touching Colab's torch or ipywidgets (pip keeps already-satisfied
   dependencies and only adds what is missing).

The repository is named once, here (``GITHUB_REPO``). Badges and the install both point at the
release tag ``RELEASE`` = ``v<version>`` (the version in ``pyproject.toml``), so a notebook opened
from a badge installs the library of the same release: the notebook and the code it imports always
match (a release is: bump the version, ``make exercises``, commit, ``git tag v<version>``, push the
tag). ``python -m tools.notebook_setup`` rewrites the badge and set-up cell of every notebook and
the Colab links of the README to match; ``tests/test_notebook_conventions.py`` fails when one
drifts.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_ROOT = Path(__file__).resolve().parent.parent
GITHUB_REPO = "titans-mini/titans_mini"
VERSION = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]["version"]
RELEASE = f"v{VERSION}"  # the git tag that badges and the Colab install point at
REPO_URL = f"https://github.com/{GITHUB_REPO}"

ROOT_DIRS = NOTEBOOK_DIRS = ("notebooks", "solutions", "exercises")

SOURCE_SETTING = "TITANS_MINI_SOURCE"
DEFAULT_SOURCE = f"titans_mini @ git+{REPO_URL}@{RELEASE}"

SETUP_CELL = f'''# Set-up: on Google Colab, install titans_mini; locally this cell does nothing.
# (Colab's own torch and ipywidgets are kept: pip only adds what is missing.)
# It installs release {RELEASE}, the one this notebook belongs to. From a fork or a wheel
# instead: run  %env {SOURCE_SETTING}=<pip source>  first (see the README).
import os
import sys

if "google.colab" in sys.modules:
    import subprocess

    source = os.environ.get("{SOURCE_SETTING}", "{DEFAULT_SOURCE}")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], capture_output=True, text=True)
    if pip.returncode != 0:
        reason = (pip.stderr.strip().splitlines() or ["pip failed"])[-1]
        print(f"Could not install titans_mini from {{source!r}} ({{reason}}). To use another repository or a "
              "wheel, run  %env {SOURCE_SETTING}=git+https://github.com/<you>/titans_mini@<branch>  (or a wheel's "
              "path or URL) and run this cell again.")'''

_BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")


def colab_url(relpath: str) -> str:
    """Colab link for a notebook path relative to the repository root."""
    return f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{RELEASE}/{relpath}"


def badge(relpath: str) -> str:
    """Markdown for the Open-in-Colab badge of the notebook at ``relpath``."""
    return (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"({colab_url(relpath)})"
    )


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def problems(nb: dict, relpath: str) -> list[str]:
    """What is wrong with a notebook's title/badge/set-up cells (empty list = fine)."""
    out = []
    cells = nb.get("cells", [])
    if len(cells) < 2:
        return ["a notebook needs at least a title cell and the set-up cell"]
    title = _source(cells[0])
    if cells[0].get("cell_type") != "markdown" or not title.lstrip().startswith("# "):
        out.append("first cell must be a markdown title starting with '# '")
    if badge(relpath) not in title:
        out.append(f"title cell must carry the Colab badge for its own path {relpath!r}")
    if cells[1].get("cell_type") != "code" or _source(cells[1]).strip() != SETUP_CELL.strip():
        out.append("second cell must be the shared set-up cell (tools/notebook_setup.py: SETUP_CELL)")
    return out


def fix(nb: dict, relpath: str) -> dict:
    """Make the badge and set-up cell of ``nb`` match the canonical ones (in place)."""
    cells = nb["cells"]
    title = _source(cells[0])
    lines = title.split("\n")
    if _BADGE_RE.search(title):
        title = _BADGE_RE.sub(badge(relpath), title)
    else:
        title = "\n".join([lines[0], "", badge(relpath), *lines[1:]])
    cells[0]["source"] = title
    setup = {
        "cell_type": "code",
        "execution_count": None,
        "id": "setup",
        "metadata": {},
        "outputs": [],
        "source": SETUP_CELL,
    }
    if len(cells) > 1 and cells[1].get("cell_type") == "code" and "google.colab" in _source(cells[1]):
        cells[1]["source"] = SETUP_CELL
    else:
        cells.insert(1, setup)
    return nb


def all_notebooks(root: Path) -> list[Path]:
    return sorted(p for d in NOTEBOOK_DIRS for p in (root / d).glob("*.ipynb"))


_README_COLAB_RE = re.compile(
    r"https://colab\.research\.google\.com/github/" + re.escape(GITHUB_REPO) + r"/blob/[^/]+/")


def fix_readme(text: str) -> str:
    """The README's Colab links, pointed at ``RELEASE``."""
    return _README_COLAB_RE.sub(colab_url(""), text)


def main(argv: list[str] | None = None) -> int:
    root = _ROOT
    changed = 0
    readme = root / "README.md"
    if readme.exists() and fix_readme(readme.read_text()) != readme.read_text():
        readme.write_text(fix_readme(readme.read_text()))
        print("fixed README.md Colab links")
    for path in all_notebooks(root):
        rel = path.relative_to(root).as_posix()
        nb = json.loads(path.read_text())
        if problems(nb, rel):
            fix(nb, rel)
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            changed += 1
            print(f"fixed {rel}")
    print(f"{changed} notebook(s) updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
