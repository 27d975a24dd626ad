"""Check the environment: ``python -m titans_mini.env_check``.

Lessons: 00 runs it as the set-up check.

Prints one ``[OK]`` / ``[FAIL]`` line per requirement, with what to do when something fails, and
exits with status 1 if anything required is missing. The README's troubleshooting section points
here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
import sys

MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 4)


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _on_colab() -> bool:
    return "google.colab" in sys.modules


def _cuda_expected() -> bool:
    """A CUDA GPU is expected wherever nvidia-smi lists one (on Colab too: a CPU runtime has
    none, and that is fine for lessons 00-10)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def checks() -> list[tuple[bool, str, str]]:
    """(ok, what, advice) for every requirement."""
    results: list[tuple[bool, str, str]] = []
    py = sys.version_info
    results.append((
        py[:2] >= MIN_PYTHON,
        f"Python {py.major}.{py.minor}.{py.micro} (need >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]})",
        "install Python 3.10-3.13, then re-run `make lab` (or the README's route without make)",
    ))
    try:
        import torch

        ok = _version_tuple(torch.__version__) >= MIN_TORCH
        results.append((ok, f"torch {torch.__version__} (need >= {MIN_TORCH[0]}.{MIN_TORCH[1]})",
                        "run `make lab` (installs the CPU build without a GPU), or pip install "
                        "'torch>=2.4' (CPU only: add --index-url https://download.pytorch.org/whl/cpu); "
                        "on Colab keep its torch"))
        if _cuda_expected():
            cuda = torch.cuda.is_available()
            what = f"CUDA available ({torch.cuda.get_device_name(0)})" if cuda else "CUDA available"
            results.append((cuda, what,
                            "a GPU is present but this torch cannot use it: install a CUDA build of "
                            "torch (pip install 'torch>=2.4'); on Colab choose Runtime > Change runtime type > GPU"))
        elif _on_colab():
            results.append((True, "no GPU on this Colab runtime (fine for lessons 00-10)",
                            "for a GPU: Runtime > Change runtime type > GPU"))
    except ImportError:
        results.append((False, "torch", "run `make lab`, or `pip install torch` (CPU: torch==2.13.0)"))
    for module, need, advice in [
        ("numpy", None, "pip install numpy"),
        ("matplotlib", None, "pip install matplotlib"),
        ("tqdm", None, "pip install tqdm"),
        ("ipywidgets", (7, 7), "pip install 'ipywidgets>=7.7' (on Colab keep the preinstalled 7.7.1)"),
        ("jupyterlab", (4, 0), "run `make lab` or pip install -e '.[course]' (not needed on Colab)"),
        ("nbmake", None, "pip install -e '.[dev]' (only needed to run the tests)"),
    ]:
        try:
            mod = importlib.import_module(module)
            version = getattr(mod, "__version__", None)
            if version is None:
                try:
                    version = importlib.metadata.version(module)
                except importlib.metadata.PackageNotFoundError:
                    version = "?"
            ok = need is None or _version_tuple(version) >= need
            bound = f" (need >= {'.'.join(map(str, need))})" if need else ""
            results.append((ok, f"{module} {version}{bound}", advice))
        except ImportError:
            if module in ("jupyterlab", "nbmake") and _on_colab():
                results.append((True, f"{module} (not needed on Colab)", advice))
            else:
                results.append((False, f"{module} not installed", advice))
    try:
        import titans_mini

        results.append((True, f"titans_mini {titans_mini.__version__}", ""))
    except ImportError:
        results.append((False, "titans_mini not importable",
                        "run `make lab`, or pip install -e '.[course,dev]' in the repository folder; "
                        "on Colab re-run the notebook's set-up cell"))
    else:
        results.append(_device_choice())
    return results


def _device_choice() -> tuple[bool, str, str]:
    """The device and precision the lessons and the trainer will use here."""
    try:
        from titans_mini import device as device_mod

        dev = device_mod.pick_device()
        precision = device_mod.pick_precision(dev)
    except Exception as err:  # any failure here is the answer to report
        return (False, f"device and precision ({type(err).__name__}: {err})",
                "fix the failures above first (torch)")
    return (True, f"device {dev}, precision {precision.name} (what the lessons and the trainer use)", "")


def main() -> int:
    failed = 0
    for ok, what, advice in checks():
        if ok:
            print(f"[OK]   {what}")
        else:
            failed += 1
            print(f"[FAIL] {what} -> {advice}")
    print("all good" if not failed else f"{failed} problem(s): fix them and run this again")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
