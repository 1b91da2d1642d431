"""Host-side launch arithmetic.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` objects in recent Triton:
each call from Python goes through the JIT's call machinery (about 5 us on a slow core), and a
launcher computes several per call. These plain functions give the same integers.
"""


def cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def next_power_of_2(value: int) -> int:
    """The smallest power of two ``>= value`` for ``value >= 1`` (0 for 0, as Triton's)."""
    return 1 << (int(value) - 1).bit_length() if value > 0 else 0
