"""RoIAlign (He et al., Mask R-CNN) with exactly the semantics of ``torchvision.ops.roi_align``, and
SCRL's pooled form.

Wiring: the ``fastdense::roi_align`` / ``fastdense::roi_align_backward`` custom ops carry every
implementation (reference, torchvision's C++ kernel, Triton) for torch.compile, tracing and opcheck.
The Triton forward groups the boxes by image once (and, for SCRL's 1x1 output, computes each box's
bilinear weights once) and hands that plan to the backward. Eager
Triton calls on plain tensors, the training loop's case, take a plain autograd.Function to the same
launchers instead: the custom op's Python autograd and redispatch layers would cost the host as much
as everything else in the call (``benchmarks/bench_roi_align.py --host`` measures it).
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

from fastdense.ops._dispatch import plain_eager, resolve
from fastdense.ops._validate import check_tensor

BoxesArg = Union[torch.Tensor, Sequence[torch.Tensor]]


def roi_align_reference(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """Reference RoIAlign on ``rois [K, 5]``; differentiable with respect to ``input``.

    Bilinear sampling is separable, so each box is a pair of interpolation matrices: ``A_y [PH, H]``
    sums the vertical weights of every sample of every output row, ``A_x [PW, W]`` the horizontal
    ones, and ``out[k, c] = A_y[k] @ input[b_k, c] @ A_x[k]^T / count_k``. Coordinates and weights are
    computed in the input's precision (float32 for float16/bfloat16), as torchvision's kernel does.
    """
    compute = _compute_dtype(input)
    with _autocast_off(input.device):
        features = input.to(compute)
        weights_y, weights_x, count = _box_weights(rois.detach().to(compute), output_size, spatial_scale, sampling_ratio, aligned, *input.shape[-2:])
        out = features.new_zeros(rois.shape[0], input.shape[1], *output_size)
        for b, rows in _rows_by_image(rois):
            pooled = torch.einsum("kph,chw,kqw->kcpq", weights_y[rows], features[b], weights_x[rows])
            out = out.index_copy(0, rows, pooled / count[rows, None, None, None])
    return out.to(input.dtype)


def roi_align_backward_reference(
    grad: torch.Tensor, input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> torch.Tensor:
    """Gradient of :func:`roi_align_reference` with respect to ``input``:
    ``grad_input[b] = sum over boxes k of image b of A_y[k]^T grad[k] A_x[k] / count_k``, in
    ``input``'s dtype and memory layout."""
    compute = _compute_dtype(input)
    with _autocast_off(input.device):
        weights_y, weights_x, count = _box_weights(rois.detach().to(compute), tuple(grad.shape[-2:]), spatial_scale, sampling_ratio, aligned, *input.shape[-2:])
        grad = grad.to(compute) / count[:, None, None, None]
        grad_input = torch.zeros(input.shape, dtype=compute, device=input.device)
        for b, rows in _rows_by_image(rois):
            grad_input[b] = torch.einsum("kph,kcpq,kqw->chw", weights_y[rows], grad[rows], weights_x[rows])
    return torch.empty_like(input).copy_(grad_input)


def _compute_dtype(input: torch.Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _autocast_off(device: torch.device):
    """The reference computes in :func:`_compute_dtype` inside an autocast region too: its einsums
    would otherwise run in the autocast dtype (bfloat16 error on float32 input)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _rows_by_image(rois: torch.Tensor):
    batch_index = rois[:, 0].long()
    for b in torch.unique(batch_index).tolist():
        yield b, (batch_index == b).nonzero().squeeze(1)


def _box_weights(rois, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool, height: int, width: int):
    """``(A_y [K, PH, H], A_x [K, PW, W], count [K])`` for ``rois`` in the compute dtype."""
    out_h, out_w = output_size
    offset = 0.5 if aligned else 0.0
    start = rois[:, 1:3] * spatial_scale - offset  # (x, y)
    size = rois[:, 3:5] * spatial_scale - offset - start
    if not aligned:
        size = size.clamp(min=1.0)
    bin_w, bin_h = size[:, 0] / out_w, size[:, 1] / out_h
    if sampling_ratio > 0:
        grid_h = torch.full_like(bin_h, sampling_ratio, dtype=torch.long)
        grid_w = torch.full_like(bin_w, sampling_ratio, dtype=torch.long)
    else:
        grid_h = torch.ceil(size[:, 1] / out_h).long()
        grid_w = torch.ceil(size[:, 0] / out_w).long()
    count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)
    weights_y = _axis_weights(start[:, 1], bin_h, grid_h, out_h, height)
    weights_x = _axis_weights(start[:, 0], bin_w, grid_w, out_w, width)
    return weights_y, weights_x, count


def _axis_weights(start, bin_size, grid, out_size: int, extent: int) -> torch.Tensor:
    """Interpolation matrix ``[K, out_size, extent]`` of one axis: for output bin ``p``, the summed
    bilinear weights that its samples give to each input row (or column)."""
    num = start.shape[0]
    max_grid = max(int(grid.max()), 1) if num else 1
    sample = torch.arange(max_grid, device=start.device, dtype=start.dtype)
    bins = torch.arange(out_size, device=start.device, dtype=start.dtype)
    grid_f = grid.to(start.dtype).clamp(min=1)[:, None, None]
    # torchvision's order of operations, so float32 results agree bit for bit where they can.
    pos = start[:, None, None] + bins[None, :, None] * bin_size[:, None, None] + (sample[None, None, :] + 0.5) * bin_size[:, None, None] / grid_f
    used = sample[None, None, :] < grid[:, None, None]
    inside = (pos >= -1.0) & (pos <= extent) & used
    # Samples outside the map weigh nothing; moving them to 0 keeps a far box's positions (1e30,
    # or inf from float overflow) from overflowing the int64 indices below.
    pos = torch.where(inside, pos, torch.zeros_like(pos)).clamp(min=0.0)
    low = pos.floor().long()
    at_edge = low >= extent - 1
    low = torch.where(at_edge, torch.full_like(low, extent - 1), low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    mask = inside.to(start.dtype)
    weights = start.new_zeros(num, out_size, extent)
    weights.scatter_add_(2, low, (1 - frac) * mask)
    weights.scatter_add_(2, high, frac * mask)
    return weights


# The Triton kernels accumulate in float32; float64 input is served by the reference.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# On the CPU the "cpp" backend is torchvision's own C++ kernel, the op this one is a drop-in for:
# rewriting it would add nothing. It has no 16-bit kernel, so those inputs go through float32.
def _torchvision_forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    out = torch.ops.torchvision.roi_align(input.to(compute), rois.to(compute), spatial_scale, *output_size, sampling_ratio, aligned)
    return out.to(input.dtype)


def _torchvision_backward(grad, input, rois, spatial_scale, sampling_ratio, aligned):
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    batch, channels, height, width = input.shape
    grad_input = torch.ops.torchvision._roi_align_backward(
        grad.to(compute).contiguous(), rois.to(compute), spatial_scale, grad.shape[2], grad.shape[3],
        batch, channels, height, width, sampling_ratio, aligned,
    )
    return grad_input.to(input.dtype)


# ``torch.library`` registration: one forward and one backward op, each carrying the implementation
# chosen by ``fastdense.ops._dispatch.resolve`` as an argument, so torch.compile traces either one and
# the backward runs on the same implementation as the forward. The Triton forward also returns its
# plan (``order``, ``offsets``: the boxes grouped by image; ``weights``: the 1x1 case's per-box
# bilinear weights; empty for the other implementations), which the backward takes instead of
# computing it again. There is no autocast rule: the op runs natively in
# the dtype it is given (float16/bfloat16 stay so, with float32 accumulation inside).
@torch.library.custom_op("fastdense::roi_align", mutates_args=())
def _roi_align_op(
    input: torch.Tensor, rois: torch.Tensor, output_height: int, output_width: int,
    spatial_scale: float, sampling_ratio: int, aligned: bool, implementation: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if implementation == "triton":
        from fastdense.kernels._launch import on_device_of
        from fastdense.kernels.roi_align import roi_align_forward

        with on_device_of(input):
            return roi_align_forward(input, rois, (output_height, output_width), spatial_scale, sampling_ratio, aligned)
    if implementation == "cpp":
        out = _torchvision_forward(input, rois, (output_height, output_width), spatial_scale, sampling_ratio, aligned)
    else:
        out = roi_align_reference(input, rois, (output_height, output_width), spatial_scale, sampling_ratio, aligned)
    return out, *_no_plan(rois)


def _no_plan(rois: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (order, offsets, weights) of implementations that keep nothing for their backward."""
    empty = rois.new_empty(0, dtype=torch.int32)
    return empty, empty.clone(), rois.new_empty(0, dtype=torch.float32)


@_roi_align_op.register_fake
def _(input, rois, output_height, output_width, spatial_scale, sampling_ratio, aligned, implementation):
    out = input.new_empty(rois.shape[0], input.shape[1], output_height, output_width)
    if implementation == "triton":
        from fastdense.kernels.roi_align import plan_shapes

        order_shape, weights_shape = plan_shapes(rois.shape[0], input.shape[0], *input.shape[-2:], output_height, output_width)
        order = rois.new_empty(order_shape, dtype=torch.int32)
        return out, order, rois.new_empty(input.shape[0] + 1, dtype=torch.int32), rois.new_empty(weights_shape, dtype=torch.float32)
    return out, *_no_plan(rois)


@torch.library.custom_op("fastdense::roi_align_backward", mutates_args=())
def _roi_align_backward_op(
    grad: torch.Tensor, input: torch.Tensor, rois: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor,
    spatial_scale: float, sampling_ratio: int, aligned: bool, implementation: str,
) -> torch.Tensor:
    if implementation == "triton":
        from fastdense.kernels.roi_align import roi_align_backward

        return roi_align_backward(grad, input, rois, order, offsets, weights, spatial_scale, sampling_ratio, aligned)
    if implementation == "cpp":
        return _torchvision_backward(grad, input, rois, spatial_scale, sampling_ratio, aligned)
    return roi_align_backward_reference(grad, input, rois, spatial_scale, sampling_ratio, aligned)


@_roi_align_backward_op.register_fake
def _(grad, input, rois, order, offsets, weights, spatial_scale, sampling_ratio, aligned, implementation):
    return torch.empty_like(input)


def _setup_context(ctx, inputs, output):
    input, rois, _, _, spatial_scale, sampling_ratio, aligned, implementation = inputs
    _, *plan = output
    ctx.save_for_backward(input, rois, *plan)
    ctx.params = (spatial_scale, sampling_ratio, aligned, implementation)


def _backward(ctx, grad, *_plan_grads):
    input, rois, *plan = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = torch.ops.fastdense.roi_align_backward(grad, input, rois, *plan, *ctx.params)
    return grad_input, None, None, None, None, None, None, None


_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerTritonRoIAlign(torch.autograd.Function):
    """The Triton implementation for eager calls on plain tensors, straight to the launchers: the custom
    op's Python autograd and redispatch layers cost the host more than the launchers' own work
    (0.13 ms per forward+backward on a 2-core CI machine, against 0.02 ms for both launchers). Same
    kernels, same reuse of the forward's plan; the custom op above serves torch.compile, tracing, tensor
    subclasses and functorch transforms."""

    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned, flat):
        from fastdense.kernels._launch import on_device_of
        from fastdense.kernels.roi_align import prepare_rois, roi_align_forward

        with on_device_of(input):
            rois = prepare_rois(rois)
            out, *plan = roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
        ctx.save_for_backward(input, rois, *plan)
        ctx.params = (spatial_scale, sampling_ratio, aligned)
        ctx.output_shape = out.shape
        # SCRL's pooled [K, C] straight from here: no flatten node of its own in the graph.
        return out.flatten(1) if flat else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from fastdense.kernels.roi_align import roi_align_backward

        input, rois, *plan = ctx.saved_tensors
        grad = grad.reshape(ctx.output_shape)
        return roi_align_backward(grad, input, rois, *plan, *ctx.params), None, None, None, None, None, None


def boxes_to_rois(boxes: BoxesArg, dtype=None, device=None) -> torch.Tensor:
    """``[K, 5]`` rois ``(batch_index, x1, y1, x2, y2)`` from a ``[K, 5]`` tensor (as it is) or a list of
    ``[k_i, 4]`` (in at least float32, where every image index is exact)."""
    if torch.is_tensor(boxes):
        check_tensor(boxes, "boxes", "[K, 5] (batch_index, x1, y1, x2, y2)", dims=2)
        if boxes.shape[1] != 5:
            raise ValueError(f"boxes must have shape [K, 5] (batch_index, x1, y1, x2, y2), got {list(boxes.shape)}")
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes must be a [K, 5] tensor or a list of [k_i, 4] tensors, got {type(boxes).__name__}")
    parts = []
    for i, b in enumerate(boxes):
        check_tensor(b, f"boxes[{i}]", "[k_i, 4] (x1, y1, x2, y2)", dims=2)
        if b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must have shape [k_i, 4] (x1, y1, x2, y2), got {list(b.shape)}")
        # At least float32: a 16-bit type holds image indices exactly only up to 256 (bfloat16)
        # or 2048 (float16), and would move the boxes of later images to another image.
        dtype_i = torch.promote_types(b.dtype, torch.float32)
        parts.append(torch.cat([torch.full((b.shape[0], 1), i, dtype=dtype_i, device=b.device), b.to(dtype_i)], dim=1))
    if not parts:
        return torch.zeros(0, 5, dtype=dtype or torch.float32, device=device)
    return torch.cat(parts, dim=0)


def check_roi_align_args(input, rois, output_size, spatial_scale, sampling_ratio) -> Tuple[int, int]:
    """Validate everything but the boxes' values (:func:`check_box_values`); return ``output_size``
    as ``(height, width)``."""
    check_tensor(input, "input", "[N, C, H, W]", dims=4)
    if input.shape[2] == 0 or input.shape[3] == 0:
        # No pixel to sample; torchvision's CPU kernel reads out of bounds (and crashes) here.
        raise ValueError(f"input must have shape [N, C, H, W] with H, W >= 1, got {list(input.shape)}")
    if rois.device != input.device:
        raise ValueError(f"boxes must be on the device of input ({input.device}), got {rois.device}")
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    if not isinstance(output_size, (tuple, list)) or len(output_size) != 2 or any(not isinstance(s, int) or s < 1 for s in output_size):
        raise ValueError(f"output_size must be a positive int or a pair of positive ints, got {output_size!r}")
    if not isinstance(sampling_ratio, int):
        raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    if not -2**31 <= sampling_ratio < 2**31:
        # torchvision's kernel truncates it to a C int (2**40 became 0: adaptive); Triton's overflows.
        raise ValueError(f"sampling_ratio must be an int in [-2**31, 2**31) (<= 0 for adaptive), got {sampling_ratio!r}")
    try:
        if isinstance(spatial_scale, (str, bytes)):
            raise TypeError
        scale = float(spatial_scale)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}") from None
    if not (scale > 0 and math.isfinite(scale)):
        # An infinite scale made every sample position infinite: the reference crashed indexing with them.
        raise ValueError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}")
    return tuple(output_size)


def check_box_values(rois: torch.Tensor, input_shape, with_kernel: bool = False) -> None:
    """Raise ``ValueError`` unless every batch index of ``rois [K, 5]`` is an integer in ``[0, N)``,
    every box has ``x1 <= x2`` and ``y1 <= y2`` and every coordinate is finite.

    One device-to-host transfer for all three checks (on a GPU it is a host sync). ``with_kernel``:
    one Triton launch computes the three flags (:func:`fastdense.kernels.roi_align.invalid_box_flags`);
    otherwise a few PyTorch ops do, a dozen launches on a GPU."""
    if not rois.numel():
        return
    num_images = input_shape[0]
    bad_index_message = f"boxes[:, 0] must hold integer batch indices in [0, {num_images - 1}] for input of shape {list(input_shape)}"
    if num_images == 0:
        raise ValueError(bad_index_message)
    if with_kernel:
        from fastdense.kernels import roi_align as kernels
        from fastdense.kernels._launch import on_device_of

        with on_device_of(rois):
            words = kernels.invalid_box_flags(rois, num_images)
        flags = 0
        for word in words.tolist():
            flags |= word
        bad_index, inverted, not_finite = (bool(flags & bit) for bit in (kernels.BAD_BATCH_INDEX, kernels.INVERTED_BOX, kernels.NOT_FINITE))
    else:
        # An integer in [0, N) is the only value that clamping to [0, N - 1] and flooring leave
        # unchanged (NaN compares unequal to itself); x * 0 is 0 for finite x and NaN for
        # infinities and NaN, so the sum is NaN exactly when a coordinate is not finite.
        index = rois[:, 0].double()  # N - 1 may round up to N in a 16-bit type, letting index N pass
        bad_index, inverted, not_finite = torch.stack([
            (index.clamp(0, num_images - 1).floor_() != index).any(),
            (rois[:, 3:5] < rois[:, 1:3]).any(),
            rois.mul(0).sum().isnan(),
        ]).tolist()
    if bad_index:
        raise ValueError(bad_index_message)
    if inverted:
        raise ValueError("boxes must satisfy x1 <= x2 and y1 <= y2 (inverted boxes are not allowed)")
    if not_finite:
        raise ValueError("boxes must be finite")


def roi_align(
    input: torch.Tensor,
    boxes: BoxesArg,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    check_boxes: bool = True,
) -> torch.Tensor:
    """Region of Interest Align: a drop-in for :func:`torchvision.ops.roi_align`.

    Each box is divided into ``output_size`` bins; every bin averages ``sampling_ratio x sampling_ratio``
    bilinear samples of ``input`` (``ceil(box / bins)`` per axis when ``sampling_ratio <= 0``). Box
    coordinates are in input pixels times ``1 / spatial_scale``; ``aligned=True`` shifts them by half
    a pixel so pixel centres sit at ``j + 0.5`` (fastdense's convention). Samples farther than one
    pixel outside the map count as zero.

    Args:
        input: ``[N, C, H, W]`` (``H, W >= 1``), float16/bfloat16/float32/float64, NCHW or channels_last.
        boxes: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a list of ``N`` tensors ``[k_i, 4]``.
        output_size: ``(height, width)`` of each pooled box, or one int.
        spatial_scale: feature-map size over box-coordinate size (1/32 for ResNet layer4 boxes in pixels).
        sampling_ratio: samples per bin and axis; ``<= 0`` for adaptive.
        aligned: half-pixel offset (see above).
        check_boxes: verify that batch indices are integers in ``[0, N)``, that ``x1 <= x2`` and
            ``y1 <= y2`` and that coordinates are finite, raising ``ValueError`` otherwise. On a GPU
            that costs a device-to-host transfer, a host sync every call (and one small kernel in
            eager calls, a dozen PyTorch ops under torch.compile); pass
            ``False`` for boxes valid by construction (SCRL's sampler) to keep the call asynchronous,
            as torchvision's is. Invalid boxes are then undefined behaviour, as in torchvision.

    Returns:
        ``[K, C, output_size[0], output_size[1]]`` in the input's dtype.

    CUDA float16/bfloat16/float32 input runs the Triton kernels of :mod:`fastdense.kernels.roi_align`
    (float32 accumulation, input strides read in place, a deterministic backward without atomics);
    CPU input runs torchvision's C++ kernel (``cpp``); anything else, or
    ``fastdense.ops.backend("reference")``, the PyTorch reference. Under autocast the
    op runs natively in the dtype it is given (a bfloat16 feature map gives bfloat16 output).
    Gradients flow to ``input`` only, as in torchvision.

    >>> import torch, fastdense.ops as ops
    >>> feats = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> ops.roi_align(feats, [torch.tensor([[0.0, 0.0, 2.0, 2.0]])], output_size=1, aligned=True)
    tensor([[[[2.5000]]]])
    """
    return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, check_boxes, flat=False)


def _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, check_boxes, flat: bool) -> torch.Tensor:
    """:func:`roi_align`, as ``[K, C * PH * PW]`` when ``flat``."""
    rois = boxes_to_rois(boxes, dtype=getattr(input, "dtype", None), device=getattr(input, "device", None))
    output_size = check_roi_align_args(input, rois, output_size, spatial_scale, sampling_ratio)
    if not torch.is_tensor(boxes):
        # Shapes only, no host sync: checked with check_boxes=False too, where a box of a missing
        # image would be read out of bounds.
        extra = [i for i, b in enumerate(boxes) if i >= input.shape[0] and b.shape[0]]
        if extra:
            raise ValueError(f"boxes[{extra[0]}] holds boxes of image {extra[0]}, but input has {input.shape[0]} images (shape {list(input.shape)})")
    available = ("triton",) if input.dtype in TRITON_DTYPES else ()
    if not input.is_cuda and _has_torchvision():
        available += ("cpp",)
    implementation = resolve("roi_align", (input, rois), available=available)
    eager_triton = implementation == "triton" and plain_eager(input, rois)
    if check_boxes:
        check_box_values(rois, input.shape, with_kernel=eager_triton)
    if eager_triton:
        return _EagerTritonRoIAlign.apply(input, rois, output_size, float(spatial_scale), int(sampling_ratio), bool(aligned), flat)
    out = torch.ops.fastdense.roi_align(input, rois, *output_size, float(spatial_scale), int(sampling_ratio), bool(aligned), implementation)[0]
    return out.flatten(1) if flat else out


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401  (registers torch.ops.torchvision)
    except ImportError:
        return False
    return True


def roi_pool_vectors(input: torch.Tensor, boxes: BoxesArg, spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
                     check_boxes: bool = True) -> torch.Tensor:
    """SCRL's pooled form: RoIAlign with a 1x1 output, as ``[K, C]`` vectors (one per box); the
    arguments are :func:`roi_align`'s.

    >>> import torch, fastdense.ops as ops
    >>> feats = torch.ones(2, 8, 7, 7)
    >>> boxes = [torch.tensor([[0.0, 0.0, 224.0, 224.0]]), torch.tensor([[32.0, 32.0, 96.0, 160.0]])]
    >>> ops.roi_pool_vectors(feats, boxes, spatial_scale=1 / 32).shape
    torch.Size([2, 8])
    """
    return _roi_align(input, boxes, 1, spatial_scale, sampling_ratio, aligned, check_boxes, flat=True)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`.

    >>> import torch, fastdense.ops as ops
    >>> pool = ops.RoIAlign(output_size=(7, 7), spatial_scale=1 / 32, sampling_ratio=2, aligned=True)
    >>> pool(torch.randn(1, 4, 7, 7), torch.tensor([[0.0, 16.0, 16.0, 200.0, 120.0]])).shape
    torch.Size([1, 4, 7, 7])
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: torch.Tensor, boxes: BoxesArg) -> torch.Tensor:
        return roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
