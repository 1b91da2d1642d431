"""Triton kernels behind :mod:`fastdense.ops` (installed as ``fastdense.kernels``).

Kernels know nothing of training. Each module holds one op's kernels and launchers; the
autograd wiring lives with the op in :mod:`fastdense.ops`.
"""
