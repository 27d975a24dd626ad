"""Packaging, environment and device helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from titans_mini import device, env_check

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import yaml


def _split_req(req: str) -> tuple[str, str]:
    """'torch>=2.4' -> ('torch', '>=2.4'); names normalised."""
    for i, ch in enumerate(req):
        if ch in "<>=!~ ;[":
            return req[:i].strip().lower().replace("_", "-"), req[i:].strip()
    return req.strip().lower(), ""


CONDA_TO_PYPI = {"pytorch": "torch"}


def test_environment_yml_agrees_with_pyproject(root):
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    # the runtime packages and the course's own (extras course + dev), all from conda-forge;
    # a requirement with an environment marker (tomli on Python < 3.11) stays with pip
    wanted = [*pyproject["project"]["dependencies"], *extras["course"], *extras["dev"]]
    runtime = dict(_split_req(r) for r in wanted if ";" not in r)
    env = yaml.safe_load((root / "environment.yml").read_text())
    conda = {}
    pip_lines = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_lines += dep.get("pip", [])
            continue
        name, spec = _split_req(dep)
        if name in {"python", "pip"}:
            continue
        conda[CONDA_TO_PYPI.get(name, name)] = spec
    assert conda == runtime, (
        "environment.yml and pyproject.toml disagree on runtime packages or their lower bounds: "
        f"environment.yml has {conda}, pyproject.toml has {runtime}"
    )
    py_req = pyproject["project"]["requires-python"]
    assert any(str(d).replace(" ", "") == f"python{py_req}" for d in env["dependencies"]), (
        f"environment.yml must pin python{py_req} like pyproject.toml"
    )
    assert any("[course,dev]" in line for line in pip_lines), "environment.yml must pip-install .[course,dev]"


def test_dependencies_are_lower_bounds_only(root):
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    deps = list(pyproject["project"]["dependencies"])
    extras = pyproject["project"]["optional-dependencies"]
    for req in deps + extras["course"] + extras["dev"]:
        name, spec = _split_req(req.split(";")[0])
        assert "==" not in spec and "<" not in spec and "~=" not in spec, f"{req}: use a lower bound only"
    assert any(_split_req(r) == ("torch", ">=2.4") for r in deps), "torch must accept Colab's 2.11"
    widgets = [r for r in extras["course"] if _split_req(r)[0] == "ipywidgets"]
    assert widgets == ["ipywidgets>=7.7"], "never require ipywidgets 8: Colab ships 7.7.1"
    assert "titans-pytorch==0.5.5" in extras["bench"]


def test_fast_mode_reads_env(monkeypatch):
    monkeypatch.setenv("TITANS_FAST", "1")
    assert device.fast_mode()
    monkeypatch.setenv("TITANS_FAST", "0")
    assert not device.fast_mode()
    monkeypatch.delenv("TITANS_FAST")
    assert not device.fast_mode()


def test_is_colab(monkeypatch):
    assert not device.is_colab()
    monkeypatch.setitem(sys.modules, "google.colab", object())
    assert device.is_colab()


@pytest.mark.parametrize(
    ("capability", "name", "scaler"),
    [((7, 5), "fp16", True), ((7, 0), "fp16", True), ((8, 0), "bf16", False), ((9, 0), "bf16", False)],
)
def test_precision_by_compute_capability(monkeypatch, capability, name, scaler):
    # A T4 (7.5) says bf16 is "supported" but emulates it: we must decide by capability.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    prec = device.pick_precision("cuda")
    assert (prec.name, prec.use_scaler) == (name, scaler)


def test_cpu_precision_is_fp32():
    prec = device.pick_precision("cpu")
    assert prec.name == "fp32" and prec.dtype is None and not prec.use_scaler
    with prec.autocast("cpu"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


def test_pick_device(monkeypatch):
    assert device.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.pick_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="Change runtime type"):
        device.pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        device.pick_device("xla")


def test_describe_table(capsys):
    rows = device.describe()
    out = capsys.readouterr().out
    for key in ("python", "torch", "device", "precision", "fast mode"):
        assert key in rows and key in out
    assert rows["torch"] == torch.__version__


def test_env_check_lines():
    proc = subprocess.run([sys.executable, "-m", "titans_mini.env_check"], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout
    for what in ("Python", "torch", "matplotlib", "ipywidgets", "jupyterlab", "nbmake"):
        assert any(line.startswith("[OK]") and what in line for line in lines), (what, lines)


def _without_nbmake(monkeypatch):
    """Make env_check see nbmake as not installed."""
    real_import = env_check.importlib.import_module

    def fake_import(name, *a, **k):
        if name == "nbmake":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(env_check.importlib, "import_module", fake_import)


def test_env_check_reports_failures(monkeypatch):
    _without_nbmake(monkeypatch)
    results = env_check.checks()
    bad = [r for r in results if not r[0]]
    assert len(bad) == 1 and "nbmake" in bad[0][1] and "pip install" in bad[0][2]
    assert env_check._version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert env_check._version_tuple("8.1.9") > env_check._version_tuple("7.7.1")


def test_env_check_on_a_colab_cpu_runtime_reports_no_false_failures(monkeypatch):
    """Colab without a GPU (no nvidia-smi) and without nbmake, a developer tool: no [FAIL]."""
    import types

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(env_check.shutil, "which", lambda name: None)
    _without_nbmake(monkeypatch)
    results = env_check.checks()
    assert [what for ok, what, _ in results if not ok] == []
    whats = [what for _, what, _ in results]
    assert "nbmake (not needed on Colab)" in whats
    assert any("no GPU on this Colab runtime" in w for w in whats)


def test_env_check_prints_the_device_and_precision_it_chose():
    results = env_check.checks()
    chosen = device.pick_device()
    line = f"device {chosen}, precision {device.pick_precision(chosen).name}"
    assert any(ok and what.startswith(line) for ok, what, _ in results), results


def test_env_check_runs_when_titans_mini_is_not_importable(root, tmp_path):
    code = (
        "import runpy, sys; sys.modules['titans_mini'] = None; "
        f"runpy.run_path({str(root / 'titans_mini' / 'env_check.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    fail = [line for line in proc.stdout.splitlines() if line.startswith("[FAIL]")]
    assert len(fail) == 1 and "titans_mini not importable" in fail[0]
    assert "pip install -e '.[course,dev]'" in fail[0] and "set-up cell" in fail[0]
