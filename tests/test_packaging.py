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


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def start(cmd, cwd):
    """Start ``cmd`` without this checkout on the path; :func:`finish` collects it."""
    cmd = [str(c) for c in cmd]
    return cmd, subprocess.Popen(cmd, cwd=cwd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(job, timeout=300):
    cmd, process = job
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0, f"{' '.join(cmd)} failed ({process.returncode}):\n{output[-5000:]}"
    return output


def run(cmd, cwd, timeout=300):
    return finish(start(cmd, cwd), timeout)


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
def installs(tmp_path_factory):
    """The wheel, built from one copy of the sources, and an editable install of another copy into
    a fresh venv. Both compile csrc/, so they run side by side (CI has two cores)."""
    root = tmp_path_factory.mktemp("packaging")
    wheel_source, editable_source = copy_sources(root / "wheel-src"), copy_sources(root / "editable-src")
    editable_python = fresh_venv(root / "editable-venv")
    editable = start([sys.executable, "-m", "pip", "--python", editable_python, "install", "--no-deps", "--no-build-isolation", "-e", editable_source], cwd=root)
    wheel_build = start([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", wheel_source], cwd=root)
    outcomes = {}
    for name, job in (("wheel", wheel_build), ("editable", editable)):
        try:
            finish(job)
            outcomes[name] = None
        except AssertionError as failure:
            outcomes[name] = str(failure)
    wheels = list((root / "dist").glob("fastdense-*.whl"))
    return {"outcomes": outcomes, "wheel": wheels[0] if wheels else None, "editable_source": editable_source, "editable_python": editable_python, "root": root}


def test_wheel_installs_into_fresh_venv(installs, tmp_path):
    assert installs["outcomes"]["wheel"] is None, installs["outcomes"]["wheel"]
    wheel = installs["wheel"]
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


def test_editable_install_maps_kernels_and_pipelines(installs):
    # The editable install compiled csrc/ (setuptools builds editable extensions in a temporary
    # build_lib and copies them in-tree), which is what scripts/install.sh relies on.
    assert installs["outcomes"]["editable"] is None, installs["outcomes"]["editable"]
    source = installs["editable_source"]
    files = smoke(installs["editable_python"], installs["root"])
    assert Path(files["fastdense.kernels"]).resolve() == (source / "kernels" / "__init__.py").resolve()
    assert Path(files["fastdense.pipelines"]).resolve() == (source / "pipelines" / "__init__.py").resolve()
    assert Path(files["fastdense._C"]).resolve().parent == (source / "fastdense").resolve()
