"""Every runnable example in the package's docstrings gives what it shows, and the package's import
path holds the package alone."""

import doctest
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import pytest

import fastdense

ROOT = Path(__file__).resolve().parents[1]
# Where each importable name's sources live in this checkout (setup.py's package_dir).
SOURCES = {"fastdense": ROOT / "fastdense", "fastdense.kernels": ROOT / "kernels", "fastdense.pipelines": ROOT / "pipelines"}


def modules_with_examples():
    """Module names of the source files that hold a ``>>>`` example, read from disk (no import)."""
    names = []
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            if package == "fastdense" and parts and parts[0] in ("kernels", "pipelines"):
                continue  # an installed layout's copies: named by their own folder above
            if ">>> " in path.read_text(encoding="utf-8"):
                names.append(".".join((package, *parts)))
    return names


def test_examples_are_found_in_every_part_of_the_package():
    names = modules_with_examples()
    for expected in ("fastdense.ops.roi_align", "fastdense.methods.scrl", "fastdense.pipelines.crops", "fastdense.training.optim"):
        assert expected in names


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_run(name):
    # sys.modules, not the attribute: fastdense.ops exports functions named as their modules.
    importlib.import_module(name)
    result = doctest.testmod(sys.modules[name], report=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (python3 -m doctest -v on its file shows which)"


def test_package_path_holds_the_package_alone():
    """kernels/ and pipelines/ resolve beside the package in a checkout, and nothing else there does:
    the files beside the package (setup.py, tests/, benchmarks/) are not submodules of it."""
    assert Path(importlib.import_module("fastdense.kernels").__file__).parent in (SOURCES["fastdense.kernels"], SOURCES["fastdense"] / "kernels")
    assert Path(importlib.import_module("fastdense.pipelines").__file__).parent in (SOURCES["fastdense.pipelines"], SOURCES["fastdense"] / "pipelines")
    for stranger in ("fastdense.setup", "fastdense.tests", "fastdense.benchmarks", "fastdense.fastdense"):
        assert importlib.util.find_spec(stranger) is None, stranger
    walked = [info.name for info in pkgutil.walk_packages(fastdense.__path__, "fastdense.", onerror=lambda name: None)]
    assert "fastdense.ops.roi_align" in walked and len(walked) == len(set(walked)) < 200
