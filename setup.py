"""Build script: maps kernels/ and pipelines/ into the package and compiles csrc/ into fastdense._C.

The C++ sources are plain CPU code built with pybind11 through torch's extension helper, so they
compile on a machine with no GPU. A ``.cu`` file in csrc/ joins the build only when both a CUDA
toolkit and a CUDA build of torch are present.
"""

import glob
import os

from setuptools import find_packages, setup

# No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.14).
# -ffp-contract=off keeps the C++ box sampler's arithmetic bit-identical to its Python reference
# (no fused multiply-adds on targets that have them, such as aarch64). No OpenMP needed.
# -g0 drops the debug info Python's default CFLAGS ask for, which triples the build time.
CXX_FLAGS = ["-O3", "-g0", "-ffp-contract=off"]
# kernels/ and pipelines/ live at the top of the repository but ship inside the package.
PACKAGE_DIR = {"fastdense": "fastdense", "fastdense.kernels": "kernels", "fastdense.pipelines": "pipelines"}


def _packages():
    names = []
    for package, root in PACKAGE_DIR.items():
        names.append(package)
        names += [f"{package}.{sub}" for sub in find_packages(root)]
    return names


def _extensions():
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    use_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and _torch_has_cuda()
    ext_cls = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    define_macros = [("FASTDENSE_WITH_CUDA", None)] if use_cuda else []
    ext = ext_cls(
        "fastdense._C",
        sources + (cuda_sources if use_cuda else []),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3"]} if use_cuda else CXX_FLAGS,
        define_macros=define_macros,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}


def _torch_has_cuda():
    import torch

    return torch.version.cuda is not None


ext_modules, cmdclass = _extensions()
setup(
    packages=_packages(),
    package_dir=PACKAGE_DIR,
    package_data={"fastdense": ["configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
