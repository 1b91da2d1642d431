"""Packaging: the wheel and an editable install both ship kernels/ and pipelines/ as
fastdense.kernels and fastdense.pipelines, with the compiled fastdense._C.

Each install goes into a fresh virtual environment that sees the system torch
(``--system-site-packages``) but nothing of this checkout: PYTHONPATH is dropped and the smoke
script runs outside the repository, so imports can only resolve to the installed package.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

SMOKE = """
import json, torch
import fastdense, fastdense._C, fastdense.kernels, fastdense.pipelines
from fastdense import boxes, geometry
from fastdense.ops import backend
from fastdense.pipelines.batch import ViewBatch
views = [geometry.crop_matrix(0.0, 0.0, 300.0, 300.0, 224, 224), geometry.crop_matrix(50.0, 40.0, 300.0, 300.0, 224, 224, True)]
with backend("cpp"):
    out = boxes.sample_scrl_boxes(torch.stack(views)[None], random=torch.tensor([3]))
files = {m.__name__: m.__file__ for m in (fastdense, fastdense._C, fastdense.kernels, fastdense.pipelines)}
print(json.dumps({"files": files, "counts": out.counts.tolist(), "rois": [list(r.shape) for r in out.rois]}))
"""


def run(cmd, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def copy_sources(dst: Path) -> Path:
    """The checkout's sources (tracked and untracked, not ignored ones such as build/ or *.so)."""
    try:
        listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        files = [f for f in listing.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "build", "dist", "__pycache__", ".pytest_cache"}
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts) and p.suffix not in (".so", ".pyc")]
    for name in files:
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    return dst


def fresh_venv(path: Path) -> Path:
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path], cwd=path.parent)
    return path / "bin" / "python"


def smoke(python: Path, cwd: Path) -> dict:
    report = json.loads(run([python, "-c", SMOKE], cwd=cwd).strip().splitlines()[-1])
    assert report["counts"] == [10] and report["rois"] == [[10, 5], [10, 5]]
    return report["files"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A copy of the sources with its wheel built (the one compilation of csrc/ in this module)."""
    root = tmp_path_factory.mktemp("packaging")
    source = copy_sources(root / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source], cwd=root)
    (wheel,) = (root / "dist").glob("fastdense-*.whl")
    return source, wheel


def test_wheel_installs_into_fresh_venv(built, tmp_path):
    source, wheel = built
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("fastdense/kernels/__init__.py", "fastdense/pipelines/batch.py", "fastdense/boxes.py"):
        assert expected in names
    assert any(n.startswith("fastdense/_C") and n.endswith(".so") for n in names)
    assert not any(n.startswith(("kernels/", "pipelines/", "tests/", "csrc/")) for n in names)

    python = fresh_venv(tmp_path / "venv")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--force-reinstall", wheel], cwd=tmp_path)
    files = smoke(python, tmp_path)
    site = (tmp_path / "venv").resolve()
    for module, path in files.items():
        assert Path(path).resolve().is_relative_to(site), f"{module} imported from {path}, not from the venv"
    assert Path(files["fastdense.kernels"]).parent.name == "kernels"
    assert Path(files["fastdense.pipelines"]).parent.name == "pipelines"


def test_editable_install_maps_kernels_and_pipelines(built, tmp_path):
    source, _ = built
    # Compiles csrc/ again (setuptools builds editable extensions in a temporary build_lib and
    # copies them in-tree), which is what scripts/install.sh relies on.
    assert not list((source / "fastdense").glob("_C*.so"))
    python = fresh_venv(tmp_path / "venv")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation", "-e", source], cwd=tmp_path)
    files = smoke(python, tmp_path)
    assert Path(files["fastdense.kernels"]).resolve() == (source / "kernels" / "__init__.py").resolve()
    assert Path(files["fastdense.pipelines"]).resolve() == (source / "pipelines" / "__init__.py").resolve()
    assert Path(files["fastdense._C"]).resolve().parent == (source / "fastdense").resolve()
