"""TF32 rounding shared by the kernels whose products run in one TF32 pass.

Tensor cores read a float32 operand's top 19 bits and drop the rest: truncation, which biases every
product towards zero (up to 2^-10 relative an operand). Rounding first makes it 2^-11 and unbiased.
"""

import triton
import triton.language as tl


@triton.jit
def round_to_tf32(tile):
    """Round float32 to TF32's 10-bit mantissa, to nearest (ties away from zero), as PTX's
    ``cvt.rna.tf32.f32`` does for finite values; bit arithmetic, so Triton's interpreter computes it too."""
    bits = tile.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
