"""Packaging: `models/` and `pallas_kernels/` install as jaxdec.models / jaxdec.pallas_kernels,
in a built wheel and in the installed (editable) package, and no top-level `models` package
ever gets installed."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "setup.py", "README.md", "jaxdec", "models", "pallas_kernels")


def _python_files(folder):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        for name in files:
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(root, name), os.path.join(REPO, folder))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Build from a copy so the checkout gets no build/ or egg-info folders.
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        check=True, capture_output=True,
    )
    (path,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    return path


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"jaxdec"}
    for folder, package in (("models", "jaxdec/models/"), ("pallas_kernels", "jaxdec/pallas_kernels/")):
        for rel in _python_files(folder):
            assert package + rel.replace(os.sep, "/") in names
    for rel in _python_files("jaxdec"):
        assert "jaxdec/" + rel.replace(os.sep, "/") in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "jaxdec = jaxdec.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _import_check(cwd, env=None):
    code = (
        "import importlib.util, jaxdec.models.llama, jaxdec.pallas_kernels;"
        "print(jaxdec.models.llama.__file__);"
        "print(importlib.util.find_spec('models'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    return out[0], out[1]


def test_installed_wheel_imports(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    assert not (target / "models").exists() and not (target / "pallas_kernels").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    llama_file, models_spec = _import_check(tmp_path, env)
    assert llama_file.startswith(str(target)) and models_spec == "None"


def test_current_install_imports(tmp_path):
    """The environment's own install (editable in development and CI)."""
    llama_file, models_spec = _import_check(tmp_path)
    assert llama_file.endswith(os.path.join("models", "llama.py")) and models_spec == "None"


def test_console_script():
    out = subprocess.run([sys.executable, "-m", "jaxdec.cli", "--help"], check=True,
                         capture_output=True, text=True).stdout
    assert "generate" in out
    script = shutil.which("jaxdec", path=os.path.dirname(sys.executable))
    assert script is not None, "the jaxdec console script is not installed"
