"""Compiling Triton kernels to sm_90 (H100) machine code on a machine without a GPU.

The interpreter is lenient about types (a loop-carried value changing type, for instance) and never
lowers ``tl.dot``; compiling for sm_90 catches what it lets through. It must run in a fresh process
without ``TRITON_INTERPRET``, so that the kernels are ordinary compilable functions:
:func:`run_compile_script` runs a script that imports :func:`compile_for_sm90` from here.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for_sm90(kernel, types, constants, **options):
    """``types``: the Triton type of each runtime parameter (``"*fp32"``, ``"i32"``); ``constants``:
    the constexprs' values. Parameters are matched by name, so neither needs the kernel's order.
    Pointers are taken as 16-byte aligned, as a launch specializes them."""
    names = list(kernel.arg_names)
    missing = [name for name in names if name not in constants and not types.get(name)]
    if missing:
        raise ValueError(f"{kernel.__name__}: no type or constant for {missing}")
    signature = {name: "constexpr" if name in constants else types[name] for name in names}
    constexprs = {(names.index(name),): value for name, value in constants.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def spill_bytes(compiled) -> int:
    """Bytes of register spill stores in ``compiled``'s sm_90 code. ptxas, not Triton, allocates
    registers, so spills never show in the PTX: assemble it again with the bundled ptxas, verbose."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "kernel.ptx"
        source.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(source), "-o", str(Path(scratch) / "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    found = re.findall(r"(\d+) bytes spill stores", report)
    if not found:
        raise RuntimeError(f"no spill report from ptxas: {report[-500:]}")
    return sum(int(count) for count in found)


def run_compile_script(script: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
