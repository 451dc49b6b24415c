"""The wheel and the sdist hold the whole package: every module and every data file of the source tree.

The source layout has three folders that install as one import package: ``morph/`` as ``morph``, ``cli/`` as
``morph.cli`` and ``recipes/`` as ``morph.recipes`` (setup.py). A regular install (``pip install .``, ``pip install
git+URL``, a wheel from an index) gets only what the wheel holds, unlike the editable install, which finds any
folder on disk; so this test builds the sdist, builds the wheel from the unpacked sdist (what ``python -m build``
does), and compares both with the files on disk. It builds offline with the setuptools of the running
environment (``pip wheel --no-build-isolation``; the ``dev`` extra brings a setuptools that builds wheels by
itself) in a copy of the tree, so the checkout gets no ``build/`` or ``*.egg-info``. ``.ci/wheel_smoke.sh``
installs the wheel into a fresh environment and runs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"morph": "morph", "cli": "morph/cli", "recipes": "morph/recipes"}  # source folder -> path in the wheel
COPY = ("morph", "cli", "recipes", "tests", "docs", "benchmarks", ".ci")
NOT_SOURCE = ("__pycache__", "*.pyc", "*.pyo", "*.so", "build", "dist", "*.egg-info", ".pytest_cache", "*.safetensors")


def _source_files(folder: str) -> set[str]:
    """Files under a source folder, relative to the repository root, without caches and build outputs."""
    ignored = shutil.ignore_patterns(*NOT_SOURCE)
    out: set[str] = set()

    def walk(d: Path) -> None:
        names = sorted(p.name for p in d.iterdir())
        skip = ignored(str(d), names)
        for n in names:
            if n in skip:
                continue
            p = d / n
            if p.is_dir():
                walk(p)
            else:
                out.add(p.relative_to(ROOT).as_posix())

    walk(ROOT / folder)
    return out


def _in_wheel(path: str) -> str:
    """Where a source file lands in the wheel (``cli/main.py`` -> ``morph/cli/main.py``)."""
    top, _, rest = path.partition("/")
    return f"{FOLDERS[top]}/{rest}"


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[set[str], set[str], str]:
    """(files in the sdist relative to its top folder, files in the wheel, the wheel's entry_points.txt)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in COPY:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    dist = tmp / "dist"
    _run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r})"], src)
    (sdist,) = dist.glob("morph-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        tf.extractall(tmp / "unpacked", filter="data")
    top = names[0].split("/")[0]
    sdist_files = {n.split("/", 1)[1] for n in names if "/" in n and (tmp / "unpacked" / n).is_file()}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
          str(tmp / "unpacked" / top)], tmp)
    (wheel,) = dist.glob("morph-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        wheel_files = set(zf.namelist())
        (ep,) = [n for n in wheel_files if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(ep).decode()
    return sdist_files, wheel_files, entry_points


def test_every_python_folder_is_a_package():
    """setup.py finds packages by their ``__init__.py``: a folder of modules without one would be left out."""
    missing = sorted(
        str(d.relative_to(ROOT)) for top in FOLDERS for d in [ROOT / top, *(ROOT / top).rglob("*")]
        if d.is_dir() and "__pycache__" not in d.parts and any(d.glob("*.py")) and not (d / "__init__.py").is_file()
    )
    assert not missing, f"folders with Python modules but no __init__.py (not packaged): {missing}"


def test_wheel_holds_every_module_and_data_file(built):
    """Every file under morph/, cli/ and recipes/ (modules, configs, the kernels' source, py.typed) is in the
    wheel at its import path, and the wheel holds nothing else but its metadata."""
    _, wheel_files, entry_points = built
    want = {_in_wheel(f) for top in FOLDERS for f in _source_files(top)}
    have = {f for f in wheel_files if ".dist-info/" not in f}
    assert sorted(want - have) == [], "missing from the wheel"
    assert sorted(have - want) == [], "in the wheel but not in the source tree"
    assert {f.split("/")[0] for f in wheel_files} == {"morph", "morph-0.1.0.dist-info"}
    # what the features that read package data look for
    for f in ("morph/py.typed", "morph/csrc/grid.cpp", "morph/recipes/configs/cifar10-smoke.yaml",
              "morph/growth/__init__.py", "morph/graph/rules.py", "morph/cli/main.py", "morph/recipes/run.py"):
        assert f in have
    assert "morph = morph.cli.main:app" in entry_points


def test_sdist_holds_the_source_tests_and_docs(built):
    """The sdist builds the same wheel (checked above: the wheel is built from it) and carries the tests and
    docs, so that an unpacked sdist can be tested."""
    sdist_files, _, _ = built
    want = {f for top in FOLDERS for f in _source_files(top)}
    want |= {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md"}
    want |= {f for top in ("tests", "docs") for f in _source_files(top)}
    assert sorted(want - sdist_files) == [], "missing from the sdist"
    assert not [f for f in sdist_files if f.endswith((".pyc", ".safetensors")) or "__pycache__" in f]


# What ships speaks to users: the configs find their data relative to where the user runs them, and the docs
# name no folder of one particular machine.
USER_TEXT = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))),
             *(f"recipes/configs/{p.name}" for p in sorted((ROOT / "recipes" / "configs").glob("*.yaml")))]
MACHINE_PATHS = ("/work/", "/root/", "/home/", "shared/data", "/data/")


@pytest.mark.parametrize("path", USER_TEXT)
def test_user_docs_name_no_machine_path(path):
    text = (ROOT / path).read_text()
    found = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if any(m in line for m in MACHINE_PATHS)]
    assert not found, f"{path} names a folder of one machine: {found}"


def test_shipped_configs_read_a_relative_data_root():
    """Every shipped config that reads a data set has a relative ``data.root`` default (``--data-dir`` replaces
    it); the smoke config alone makes its data."""
    from morph.recipes.config import list_configs, load_config

    for name in list_configs():
        data = load_config(name).data
        if data.synthetic:
            assert data.root is None, name
            continue
        assert data.root and not Path(data.root).is_absolute() and not data.root.startswith("~"), (name, data.root)
        assert Path(data.root).parts[0] == "data", (name, data.root)


def test_a_missing_data_root_is_one_error_line(tmp_path, monkeypatch):
    """Run from a folder without the data, a recipe stops before it trains: exit 2, one line naming the folder
    and how to point elsewhere, and no run directory."""
    from morph.cli.main import app
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train", "cifar10-wrn10-2-cpu"])
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines() == ["error: data root data/cifar10 does not exist (from --data-dir or data.root)"]
    r = CliRunner().invoke(app, ["train", "cifar10-wrn10-2-cpu", "--data-dir", str(tmp_path / "elsewhere")])
    assert r.stderr.splitlines() == [f"error: data root {tmp_path / 'elsewhere'} does not exist (from --data-dir or data.root)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
