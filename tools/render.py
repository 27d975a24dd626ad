"""Store the lesson notebooks with the outputs of a real full-size run (``make render``).

A learner browsing the repository, or a Colab preview, sees the figures without running anything.
Each lesson in ``notebooks/`` is executed top to bottom in a fresh kernel **without**
``TITANS_FAST``, and written back with its outputs and a record in the notebook's metadata::

    "titans_mini": {"outputs_from_full_run": {"code_sha256": ..., "machine": ..., "date": ...,
                                              "seconds": ..., "torch": ...}}

plus a short markdown cell under the title that names the machine and the date. ``code_sha256``
is the hash of the code cells that produced the outputs (:func:`code_hash`);
``tests/test_notebook_conventions.py`` fails when a stored notebook's code differs from it, so
stored outputs never go stale: change a lesson, run ``make render`` (or
``python -m tools.render notebooks/NN_name.ipynb`` for one lesson) and commit the result.

Exercises and solutions are never stored with outputs. Outputs are kept lean: figures as PNG at a
modest resolution, progress-bar widgets reduced to their final text, and no execution timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ROOT / "notebooks"
NOTE_ID = "rendered-run"
FIGURE_DPI = 72  # small PNGs: the repository stays lean
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _is_setup_cell(cell: dict) -> bool:
    """The shared set-up cell (tools/notebook_setup.py): it does nothing outside Colab, so it
    cannot change a local run's outputs; a new release tag in it needs no re-render."""
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return cell["cell_type"] == "code" and src.startswith("# Set-up: on Google Colab")


def code_hash(nb: dict) -> str:
    """sha256 of the notebook's code cells, in order (what produced the stored outputs), except
    the shared set-up cell."""
    sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
               for c in nb["cells"] if c["cell_type"] == "code" and not _is_setup_cell(c)]
    return hashlib.sha256(json.dumps(sources, ensure_ascii=False).encode("utf-8")).hexdigest()


def machine_description() -> str:
    """The machine in words: CPU model and cores, or the GPU when one is used."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, CPU only"


def _lean_outputs(cell: dict) -> None:
    """Drop widget views (no widget state is stored) and execution timing from a code cell."""
    kept = []
    for out in cell.get("outputs", []):
        data = out.get("data")
        if data and WIDGET_MIME in data:
            data.pop(WIDGET_MIME)
            if not data:
                continue
        kept.append(out)
    cell["outputs"] = kept
    cell.get("metadata", {}).pop("execution", None)


def _note(machine: str, date: str, seconds: float) -> dict:
    return {
        "cell_type": "markdown",
        "id": NOTE_ID,
        "metadata": {},
        "source": (f"*The outputs stored in this notebook come from a full-size run (without "
                   f"`TITANS_FAST`) on {machine}, {date}, {seconds / 60:.1f} min. Your numbers "
                   "will differ a little on another machine; the figures' shapes should not.*"),
    }


def render(path: Path, timeout: int = 3600) -> float:
    """Execute ``path`` at full size in a fresh kernel and store it with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if c.get("id") != NOTE_ID]
    env_backup = dict(os.environ)
    os.environ.pop("TITANS_FAST", None)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend: figures become outputs
    t0 = time.perf_counter()
    # a small figure resolution for the inline backend (read by matplotlib in the kernel), in a
    # folder of this render's own, so that renders running side by side do not share it
    with tempfile.TemporaryDirectory(prefix="titans-render-") as tmp:
        rc = Path(tmp) / "matplotlibrc"
        rc.write_text(f"figure.dpi: {FIGURE_DPI}\n")
        os.environ["MATPLOTLIBRC"] = str(rc)
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        finally:
            os.environ.clear()
            os.environ.update(env_backup)
    seconds = time.perf_counter() - t0
    for cell in nb.cells:
        if cell.cell_type == "code":
            _lean_outputs(cell)
    machine = machine_description()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    nb.cells.insert(2, nbformat.from_dict(_note(machine, date, seconds)))  # after title and set-up
    import torch

    nb.metadata.setdefault("titans_mini", {})["outputs_from_full_run"] = {
        "code_sha256": code_hash(nb), "machine": machine, "date": date,
        "seconds": round(seconds), "torch": torch.__version__,
    }
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="lesson notebooks to render (default: every notebook in notebooks/)")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted(LESSONS.glob("*.ipynb"))
    for path in paths:
        if path.parent != LESSONS:
            parser.error(f"{path}: only the lessons in notebooks/ are stored with outputs")
        print(f"rendering {path.relative_to(ROOT)} ...", flush=True)
        seconds = render(path)
        print(f"  done in {seconds / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
