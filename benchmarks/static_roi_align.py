"""What SCRL's pooled RoIAlign kernels cost on sm_90 (H100, H200), read from their machine code.

No GPU needed: each launch of a pooled forward+backward at SCRL's shape (``[256, 2048, 7, 7]``, 10
boxes per image, 1x1 output) is compiled as the package would launch it (its constexprs, its
launch specialisation of unit strides and multiples of 16) and ptxas and cuobjdump report:
registers a thread, spills, shared memory, an estimate of the programs one SM holds at once
(registers, shared memory, warps), and the static instruction count: all, tensor-core (HMMA) and
global loads by width. Static counts are not times, and they count every branch and loop body
once, whether it runs never or many times: they show what a change does to a kernel's code between
GPU runs (``tune_roi_align.py`` times the launches when there is a GPU).

    PYTHONPATH=. python3 benchmarks/static_roi_align.py           # ten seconds on two cores
    PYTHONPATH=. python3 benchmarks/static_roi_align.py --quick   # bfloat16 channels_last only

Writes ``benchmarks/results/roi_align_static_sm-90.json`` (``_quick`` for --quick).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (before triton is imported)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import help_description, print_table, write_results  # noqa: E402
from benchmarks.sm90 import compile_like_launch, programs_per_sm, ptxas_report, sass_opcodes  # noqa: E402
from fastdense.kernels import roi_align as kernels  # noqa: E402

SHAPE, PER_IMAGE, SPATIAL_SCALE = (256, 2048, 7, 7), 10, 1 / 32
def launches(dtype: torch.dtype, layout: str, channel_blocks: int = None, shape: tuple = SHAPE):
    """``(name, kernel, args, constexprs, options)`` of a pooled forward+backward's launches on a map
    of ``shape``, the package's (``channel_blocks``: that many channel blocks a pooling program instead)."""
    num, channels, height, width = shape
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=memory_format)
    boxes = num * PER_IMAGE
    rois = torch.empty(boxes, 5, device="meta")
    order_shape, weights_shape = kernels.plan_shapes(boxes, num, height, width, 1, 1)
    order = torch.empty(order_shape, dtype=torch.int32, device="meta")
    offsets = torch.empty(num + 1, dtype=torch.int32, device="meta")
    weights = torch.empty(weights_shape, device="meta")
    out = torch.empty(boxes, channels, 1, 1, dtype=dtype, device="meta")
    geometry = dict(C=channels, H=height, W=width, **dict(zip(("stride_n", "stride_c", "stride_h", "stride_w"), x.stride())))
    plan = dict(SAMPLING=0, ALIGNED=False, **dict(zip(("TILE_H", "TILE_W"), kernels._whole_map_tile(height, width, 1))))
    yield ("plan", kernels._group_kernel,
           dict(rois_ptr=rois, order_ptr=order, offsets_ptr=offsets, weights_ptr=weights, K=boxes, num_images=num,
                rank_programs=kernels.cdiv(boxes, kernels.GROUP_BLOCK), H=height, W=width, spatial_scale=SPATIAL_SCALE),
           dict(BLOCK=kernels.GROUP_BLOCK, SCAN=kernels.GROUP_SCAN, LOADS=kernels.GROUP_LOADS, WEIGHTS=True, HEAD=kernels.POOLED_BOX_BLOCK, **plan),
           dict(num_warps=kernels.GROUP_WARPS))
    blocks = {"CHANNEL_BLOCKS": channel_blocks} if channel_blocks else {}
    _, forward, forward_options = kernels._pooled_config(channels, height, width, False, dtype)
    yield ("forward", kernels._pooled_forward_kernel,
           dict(x_ptr=x, order_ptr=order, offsets_ptr=offsets, weights_ptr=weights, out_ptr=out, **geometry), dict(forward, **blocks), forward_options)
    _, backward, backward_options = kernels._pooled_config(channels, height, width, True, dtype)
    yield ("backward", kernels._pooled_backward_kernel,
           dict(grad_ptr=out, order_ptr=order, offsets_ptr=offsets, weights_ptr=weights, grad_x_ptr=x, **geometry), dict(backward, **blocks),
           backward_options)


def describe(compiled) -> dict:
    report = ptxas_report(compiled)
    opcodes = sass_opcodes(compiled)
    num_warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
    loads = {op: count for op, count in sorted(opcodes.items()) if op.startswith(("LDG.", "LDGSTS."))}
    return dict(
        registers=report["registers"], spill_bytes=report["spill_bytes"], shared_bytes=shared, num_warps=num_warps,
        programs_per_sm=programs_per_sm(report["registers"], shared, num_warps), instructions=sum(opcodes.values()),
        tensor_core_instructions=sum(count for op, count in opcodes.items() if op.startswith("HMMA")), global_loads=loads,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    parser.add_argument("--quick", action="store_true", help="bfloat16 channels_last only (checks the script)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dtypes, args.layouts = ["bfloat16"], ["channels_last"]
    rows = []
    for dtype_name, layout in itertools.product(args.dtypes, args.layouts):
        for launch, kernel, launch_args, constexprs, options in launches(getattr(torch, dtype_name), layout):
            if launch == "plan" and rows:
                continue  # the boxes' plan does not depend on the map's dtype or layout
            row = dict(launch=launch, dtype=dtype_name if launch != "plan" else "-", layout=layout if launch != "plan" else "-",
                       BLOCK_C=constexprs.get("BLOCK_C", "-"))
            row.update(describe(compile_like_launch(kernel, launch_args, constexprs, **options)))
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    path = write_results("roi_align_static" + ("_quick" if args.quick else ""), torch.device("cpu"), rows, device_label="sm_90",
                         extra={"shape": list(SHAPE), "boxes_per_image": PER_IMAGE, "output": "1x1-pooled", "sampling": -1, "aligned": False})
    print_table(rows, ["launch", "dtype", "layout", "BLOCK_C", "num_warps", "registers", "spill_bytes", "shared_bytes", "programs_per_sm",
                       "instructions", "tensor_core_instructions"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
