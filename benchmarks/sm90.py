"""Compiling Triton kernels to sm_90 (H100, H200) machine code on a machine without a GPU.

The interpreter is lenient about types (a loop-carried value changing type, for instance) and never
lowers ``tl.dot``; compiling for sm_90 catches what it lets through (the tests), and tells what a
kernel costs before any GPU runs it: registers and shared memory a program takes, instructions, load
widths (``benchmarks/static_roi_align.py``). It must run in a fresh process without
``TRITON_INTERPRET``, so that the kernels are ordinary compilable functions:
:func:`run_compile_script` runs a script that imports from here.
"""

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for_sm90(kernel, types, constants, divisible=(), **options):
    """``types``: the Triton type of each runtime parameter (``"*fp32"``, ``"i32"``); ``constants``:
    the constexprs' values. Parameters are matched by name, so neither needs the kernel's order.
    Pointers are taken as 16-byte aligned, as a launch specializes them, and so are the integer
    parameters named in ``divisible``."""
    names = list(kernel.arg_names)
    missing = [name for name in names if name not in constants and not types.get(name)]
    if missing:
        raise ValueError(f"{kernel.__name__}: no type or constant for {missing}")
    signature = {name: "constexpr" if name in constants else types[name] for name in names}
    constexprs = {(names.index(name),): value for name, value in constants.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items()) if kind.startswith("*") or name in divisible}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options)


BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
                  torch.int32: "*i32", torch.int64: "*i64"}


def compile_like_launch(kernel, args: dict, constants: dict, **options):
    """Compile ``kernel`` as a launch with these argument values would be: tensors (any device,
    ``meta`` included) as 16-byte aligned pointers to their dtype, integers equal to 1 as constants
    and multiples of 16 marked as such (Triton's launch specialisation, which decides vector widths),
    floats as fp32."""
    types, constants, divisible = {}, dict(constants), []
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            types[name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: a tensor, int or float, not {type(value).__name__}")
        elif isinstance(value, float):
            types[name] = "fp32"
        elif value == 1:
            constants[name] = 1
        else:
            types[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(name)
    return compile_for_sm90(kernel, types, constants, divisible=divisible, **options)


def ptxas_report(compiled) -> dict:
    """``registers`` a thread and ``spill_bytes`` (stores) of ``compiled``'s sm_90 code. ptxas, not
    Triton, allocates registers, so neither shows in the PTX: assemble it again, verbose."""
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "kernel.ptx"
        source.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(BIN / "ptxas"), "-arch=sm_90a", "-v", str(source), "-o", str(Path(scratch) / "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    spills = re.findall(r"(\d+) bytes spill stores", report)
    registers = re.findall(r"Used (\d+) registers", report)
    if not spills or not registers:
        raise RuntimeError(f"no register report from ptxas: {report[-500:]}")
    return {"registers": max(int(count) for count in registers), "spill_bytes": sum(int(count) for count in spills)}


def spill_bytes(compiled) -> int:
    """Bytes of register spill stores in ``compiled``'s sm_90 code (:func:`ptxas_report`)."""
    return ptxas_report(compiled)["spill_bytes"]


# sm_90: per SM 65536 registers (allocated per warp, 8 a thread at a time), 64 warps, 32 programs,
# 228 KiB of shared memory with 1 KiB reserved per program.
SM_REGISTERS, SM_WARPS, SM_PROGRAMS, SM_SHARED, SHARED_RESERVED = 65536, 64, 32, 228 * 1024, 1024
# The most shared memory one program may take (opt-in): a kernel that needs more cannot launch.
MAX_SHARED_PER_PROGRAM = 227 * 1024


def programs_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Programs of one kernel an sm_90 SM holds at once: the tightest of its four limits (an estimate:
    the register file's allocation granularity is approximated by 8 registers a thread)."""
    per_program = -(-registers // 8) * 8 * 32 * num_warps
    return min(SM_WARPS // num_warps, SM_PROGRAMS, SM_REGISTERS // per_program, SM_SHARED // (shared + SHARED_RESERVED))


def sass_opcodes(compiled) -> Counter:
    """How many of each opcode (``LDG.E.128``, ``HMMA.1684.F32.TF32``, ...) ``compiled``'s machine
    code holds: static counts, not executions (a loop body counts once)."""
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return Counter(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M))


def run_compile_script(script: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
