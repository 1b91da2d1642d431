"""The package as a whole: every runnable example in its docstrings gives what it shows, its import
path holds the package alone, and its import graph runs one way."""

import ast
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
    """``{module name: examples doctest must run}`` of the source files that hold a ``>>>`` example,
    read from disk (no import); an example marked ``+SKIP`` is not run."""
    names = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            if package == "fastdense" and parts and parts[0] in ("kernels", "pipelines"):
                continue  # an installed layout's copies: named by their own folder above
            examples = [line for line in path.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith(">>> ")]
            if examples:
                names[".".join((package, *parts))] = sum("doctest: +SKIP" not in line for line in examples)
    return names


def test_examples_are_found_in_every_part_of_the_package():
    names = modules_with_examples()
    for expected in ("fastdense.ops.roi_align", "fastdense.methods.scrl", "fastdense.pipelines.crops", "fastdense.training.optim"):
        assert expected in names


@pytest.mark.parametrize("name, runnable", list(modules_with_examples().items()))
def test_docstring_examples_run(name, runnable):
    # sys.modules, not the attribute: fastdense.ops exports functions named as their modules.
    importlib.import_module(name)
    result = doctest.testmod(sys.modules[name], report=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (python3 -m doctest -v on its file shows which)"
    # doctest finds examples only where it looks (module, class and function docstrings): one it
    # cannot see, in a triton.jit or lru_cache function's docstring, would otherwise pass unrun
    assert result.attempted >= runnable, f"{name}: doctest ran {result.attempted} of the {runnable} examples in its file"


def test_package_path_holds_the_package_alone():
    """kernels/ and pipelines/ resolve beside the package in a checkout, and nothing else there does:
    the files beside the package (setup.py, tests/, benchmarks/) are not submodules of it."""
    assert Path(importlib.import_module("fastdense.kernels").__file__).parent in (SOURCES["fastdense.kernels"], SOURCES["fastdense"] / "kernels")
    assert Path(importlib.import_module("fastdense.pipelines").__file__).parent in (SOURCES["fastdense.pipelines"], SOURCES["fastdense"] / "pipelines")
    for stranger in ("fastdense.setup", "fastdense.tests", "fastdense.benchmarks", "fastdense.fastdense"):
        assert importlib.util.find_spec(stranger) is None, stranger
    walked = [info.name for info in pkgutil.walk_packages(fastdense.__path__, "fastdense.", onerror=lambda name: None)]
    assert "fastdense.ops.roi_align" in walked and len(walked) == len(set(walked)) < 200


# What each part may import of fastdense (the guide: ops and kernels know nothing of training,
# pipelines nothing of methods). A part may always import itself.
MAY_IMPORT = {
    "fastdense.kernels": (),
    "fastdense.ops": ("fastdense.kernels",),
    "fastdense.pipelines": ("fastdense.geometry",),
    "fastdense.geometry": (),
    "fastdense.boxes": ("fastdense.geometry", "fastdense.ops", "fastdense._C"),
}


def _fastdense_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        yield node.lineno, [name for name in names if name == "fastdense" or name.startswith("fastdense.")]


@pytest.mark.parametrize("part", list(MAY_IMPORT))
def test_import_graph_runs_one_way(part):
    package = part if part in SOURCES else "fastdense"
    folder = SOURCES[package] if part in SOURCES else SOURCES["fastdense"] / part.split(".")[1]
    files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
    allowed = (part, *MAY_IMPORT[part])
    wrong = []
    for path in files:
        for line, names in _fastdense_imports(path):
            # "from fastdense.ops import x" names fastdense.ops and fastdense.ops.x: one allowed name is enough
            if names and not any(name == a or name.startswith(a + ".") for name in names for a in allowed):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {names[0]}")
    assert not wrong, f"{part} may import only {allowed}: " + "; ".join(wrong)


_OTHER_CHECKOUT = r"""
import importlib.machinery, importlib.util, json, sys
other = sys.argv[1]

class OtherEditableInstall:  # setuptools' editable finder for another checkout, appended by its .pth file
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname in ("fastdense.kernels", "fastdense.pipelines"):
            home = f"{other}/{fullname.split('.')[1]}"
            return importlib.util.spec_from_file_location(fullname, f"{home}/__init__.py", submodule_search_locations=[home])
        return None

sys.meta_path.append(OtherEditableInstall)
import fastdense, fastdense.kernels, fastdense.pipelines
importlib.reload(fastdense)
finders = sum(1 for f in sys.meta_path if type(f).__name__ == "SourceCheckoutFinder" or getattr(f, "__name__", "") == "SourceCheckoutFinder")
print(json.dumps({"files": [m.__file__ for m in (fastdense, fastdense.kernels, fastdense.pipelines)], "finders": finders}))
"""


def test_checkout_beside_an_editable_install_of_another_uses_its_own_kernels(tmp_path):
    """PYTHONPATH=<this checkout> while ``pip install -e`` of another checkout is in the environment
    (a second worktree, a review clone): fastdense.kernels and fastdense.pipelines are this
    checkout's, as fastdense is, and a reload does not stack finders."""
    import json
    import os
    import subprocess

    for name in ("kernels", "pipelines"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _OTHER_CHECKOUT, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [Path(f).parent for f in result["files"]] == [SOURCES[name] for name in ("fastdense", "fastdense.kernels", "fastdense.pipelines")]
    assert result["finders"] == 1
