"""RoIAlign: the reference against torchvision, the Triton kernels against torchvision, determinism,
autograd/compile/autocast integration and bad input.

On a machine without a GPU the kernels run in Triton's interpreter on a small, representative subset
of the parameter grid (few channels, small maps); with a GPU the whole grid runs.
"""

import itertools

import pytest
import torch
import torchvision
import triton
import triton.language as tl

import fastdense.ops as ops
from fastdense.kernels.roi_align import _box_block
from fastdense.ops.roi_align import boxes_to_rois, roi_align_backward_reference, roi_align_reference
from conftest import HAS_CUDA

OUTPUT_SIZES = [(1, 1), (7, 7), (3, 5)]
SAMPLING = [-1, 1, 2]
ALIGNED = [False, True]
SCALES = [1.0, 1 / 32, 0.7]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def random_rois(num_images: int, height: int, width: int, spatial_scale: float, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """``[K, 5]`` rois in box coordinates, shuffled across images: most boxes inside the map, some
    partly outside it, some of zero size, and image 1 (when there is one) with no boxes at all."""
    rows = []
    extent = torch.tensor([width, height], dtype=torch.float64) / spatial_scale
    for image in range(num_images):
        if image == 1:
            continue
        start = (torch.rand(per_image, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.3) * extent
        size = torch.rand(per_image, 2, generator=generator, dtype=torch.float64) * 0.8 * extent
        size[0] = 0.0  # a degenerate box: a single point
        size[1, 0] = 0.0  # and a zero-width one
        rows.append(torch.cat([torch.full((per_image, 1), float(image), dtype=torch.float64), start, start + size], dim=1))
    rois = torch.cat(rows)
    return rois[torch.randperm(rois.shape[0], generator=generator)]


def assert_most_boxes_reach_the_map(expected: torch.Tensor) -> None:
    """Guards a test's boxes: pooled outputs that are all zero would agree with anything."""
    reached = (expected.flatten(1).abs().sum(1) > 0).double().mean().item()
    assert reached >= 0.5, f"only {reached:.0%} of the boxes reach the map: check the map size given to random_rois"


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if name == "channels_last" else x


def torchvision_forward_backward(x, rois, grad, output_size, spatial_scale, sampling_ratio, aligned):
    """torchvision in float64 on the same (already rounded) values: the oracle."""
    x64 = x.detach().double().requires_grad_()
    out = torchvision.ops.roi_align(x64, rois.double(), output_size, spatial_scale, sampling_ratio, aligned)
    (grad_x,) = torch.autograd.grad(out, x64, grad.double())
    return out, grad_x


def check_against_torchvision(backend, device, output_size, sampling_ratio, aligned, spatial_scale, dtype, memory, shape=(3, 4, 6, 7), per_image=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num, channels, height, width = shape
    x = layout(torch.randn(shape, generator=generator).to(device=device, dtype=dtype), memory).requires_grad_()
    rois = random_rois(num, height, width, spatial_scale, per_image, generator).to(device=device, dtype=torch.float32)
    with ops.backend(backend):
        out = ops.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
        grad = torch.randn(out.shape, generator=generator).to(device=device, dtype=dtype)
        (grad_x,) = torch.autograd.grad(out, x, grad)
    expected, expected_grad = torchvision_forward_backward(x, rois, grad, output_size, spatial_scale, sampling_ratio, aligned)
    assert out.dtype == dtype and out.shape == expected.shape
    assert grad_x.dtype == dtype and grad_x.stride() == x.stride()
    assert relative_error(out, expected) <= TOLERANCE[dtype]
    assert relative_error(grad_x, expected_grad) <= TOLERANCE[dtype]


# ---------------------------------------------------------------------------------------------------
# The reference against torchvision (float64: the reference is the specification)


# 0 is adaptive like -1; 3: an odd sample count, so a bin's middle sample sits on its centre.
@pytest.mark.parametrize("output_size, sampling_ratio, aligned, spatial_scale", list(itertools.product(OUTPUT_SIZES, SAMPLING + [0, 3], ALIGNED, SCALES)))
def test_reference_matches_torchvision(output_size, sampling_ratio, aligned, spatial_scale):
    check_against_torchvision("reference", torch.device("cpu"), output_size, sampling_ratio, aligned, spatial_scale, torch.float64, "nchw", shape=(3, 5, 9, 11))


def test_reference_gradcheck():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    rois = random_rois(2, 5, 6, 0.7, 3, generator)
    for aligned in (False, True):
        assert torch.autograd.gradcheck(lambda t: roi_align_reference(t, rois, (2, 3), 0.7, -1, aligned), (x,))
        # The registered op's backward (reference implementation) against finite differences.
        with ops.backend("reference"):
            assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, (2, 3), 0.7, 2, aligned), (x,))


def test_reference_backward_is_the_adjoint_of_forward():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, generator=generator)
    rois = random_rois(3, 4, 5, 1.0, 3, generator)
    grad = torch.randn(rois.shape[0], 2, 3, 2, dtype=torch.float64, generator=generator)
    forward = roi_align_reference(x, rois, (3, 2), 1.0, -1, False)
    backward = roi_align_backward_reference(grad, x, rois, 1.0, -1, False)
    assert torch.allclose((forward * grad).sum(), (x * backward).sum(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# The Triton kernels against torchvision

FULL_GRID = list(itertools.product(OUTPUT_SIZES, SAMPLING, ALIGNED, SCALES, DTYPES, LAYOUTS))
# Interpreter subset: every (output_size, sampling, aligned) once, scales, dtypes and layouts rotating.
SMALL_GRID = [(o, s, a, SCALES[i % 3], DTYPES[(i // 3 + i) % 3], LAYOUTS[i % 2]) for i, (o, s, a) in enumerate(itertools.product(OUTPUT_SIZES, SAMPLING, ALIGNED))]


@pytest.mark.parametrize("output_size, sampling_ratio, aligned, spatial_scale, dtype, memory", FULL_GRID if HAS_CUDA else SMALL_GRID)
def test_triton_matches_torchvision_small_map(device, output_size, sampling_ratio, aligned, spatial_scale, dtype, memory):
    shape = (5, 37, 7, 7) if HAS_CUDA else (3, 3, 6, 7)
    check_against_torchvision("triton", device, output_size, sampling_ratio, aligned, spatial_scale, dtype, memory, shape=shape, per_image=4 if HAS_CUDA else 2)


@pytest.mark.parametrize("output_size, sampling_ratio, aligned, dtype, memory", [((3, 5), 2, False, torch.float32, "nchw"), ((1, 1), -1, True, torch.bfloat16, "channels_last")])
def test_triton_matches_torchvision_large_map(device, output_size, sampling_ratio, aligned, dtype, memory):
    """Maps over the whole-map limit: per-box forward, tiled backward (tiles at the map's edges too).
    Four boxes an image: random_rois makes the first two degenerate, and with aligned those sample once."""
    shape = (3, 70, 53, 75) if HAS_CUDA else (2, 2, 33, 19)
    check_against_torchvision("triton", device, output_size, sampling_ratio, aligned, 0.5, dtype, memory, shape=shape, per_image=5 if HAS_CUDA else 4)


@pytest.mark.parametrize("aligned, sampling_ratio", [(False, 1), (True, 2)])
def test_large_map_backward_tests_boxes_in_blocks(device, aligned, sampling_ratio):
    """A large map's backward tiles test SCAN_BOXES boxes at a time and visit those that reach them:
    more boxes per image than two blocks (the last one partial), most of them far from a given tile,
    some outside the map or degenerate; then bit-identical gradients run after run."""
    from fastdense.kernels.roi_align import SCAN_BOXES

    per_image = 2 * SCAN_BOXES + 7
    shape = (2, 2, 17, 40)  # 32 x 64 padded: over the whole-map limit, so tiled
    check_against_torchvision("triton", device, (2, 3), sampling_ratio, aligned, 0.5, torch.float32, "nchw", shape=shape, per_image=per_image)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_()
    rois = random_rois(2, 17, 40, 0.5, per_image, generator).to(device=device, dtype=torch.float32)
    grad = torch.randn(rois.shape[0], 2, 2, 3, generator=generator).to(device)
    with ops.backend("triton"):
        grads = [torch.autograd.grad(ops.roi_align(x, rois, (2, 3), 0.5, sampling_ratio, aligned), x, grad)[0] for _ in range(2)]
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


@pytest.mark.parametrize("aligned", [False, True])
def test_large_map_backward_boxes_ending_just_before_a_tile(device, aligned):
    """A box whose samples end less than a pixel before a backward tile gives weight to the tile's
    first column (row) through its samples' upper neighbours: the tile must not leave it out. And a
    point box on the map's last edge (y = H, a tile's end; aligned, so sampled there) gives its last row."""
    import fastdense.kernels.roi_align as kernels

    tile_h, tile_w = kernels.LARGE_TILE
    height = 2 * tile_h
    offset = 0.5 if aligned else 0.0
    rois = torch.tensor([[0.0, tile_w - 5.0, 2.0, tile_w - 0.4, 5.0],  # x ends 0.4 before the second column of tiles
                         [0.0, 1.0, tile_h - 4.0, 5.0, tile_h - 0.4],
                         [0.0, 3.0, height, 9.0, height]], dtype=torch.float64) + offset * torch.tensor([0, 1, 1, 1, 1])
    x = torch.randn(1, 2, height, 2 * tile_w + 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64).float().to(device)
    x.requires_grad_()
    rois = rois.float().to(device)
    grad = torch.ones(3, 2, 2, 3, device=device)
    with ops.backend("triton"):
        (grad_x,) = torch.autograd.grad(ops.roi_align(x, rois, (2, 3), 1.0, 2, aligned), x, grad)
    expected = torchvision_forward_backward(x, rois, grad, (2, 3), 1.0, 2, aligned)[1]
    assert expected[0, :, :, tile_w].abs().sum() > 0 and expected[0, :, tile_h, :].abs().sum() > 0
    assert (expected[0, :, -1].abs().sum() > 0) == aligned
    assert relative_error(grad_x, expected) <= 1e-6


def test_large_map_backward_settings_change_who_sums_not_the_sums(monkeypatch, device):
    """LARGE_TILE, LARGE_TILE_CHANNELS and LARGE_TILE_LAUNCH (which the tuning script sweeps) give the
    same gradient bit for bit: each pixel sums its boxes and bins in the same order whoever holds it."""
    import fastdense.kernels.roi_align as kernels

    generator = torch.Generator().manual_seed(6)
    x = torch.randn(1, 40, 17, 40, generator=generator).to(device).requires_grad_()
    rois = random_rois(1, 17, 40, 0.5, 6, generator).to(device)
    grad = torch.randn(rois.shape[0], 40, 2, 3, generator=generator).to(device)

    def gradient():
        kernels._backward_config.cache_clear()
        with ops.backend("triton"):
            return torch.autograd.grad(ops.roi_align(x, rois, (2, 3), 0.5, 2, True), x, grad)[0]

    try:
        default = gradient()
        monkeypatch.setattr(kernels, "LARGE_TILE", (16, 16))
        monkeypatch.setattr(kernels, "LARGE_TILE_CHANNELS", 32)
        monkeypatch.setattr(kernels, "LARGE_TILE_LAUNCH", {"num_warps": 8})
        kernels._backward_config.cache_clear()
        _, _, _, constexprs = kernels._backward_config(40, 17, 40, 2, 3, torch.float32, 2, True)
        assert (constexprs["BLOCK_C"], constexprs["TILE_H"], constexprs["TILE_W"], constexprs["PER_BIN"]) == (32, 16, 16, True)
        assert torch.equal(gradient(), default)
    finally:
        kernels._backward_config.cache_clear()
    expected = torchvision_forward_backward(x, rois, grad, (2, 3), 0.5, 2, True)[1]
    assert relative_error(default, expected) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 2, 40, 40), (1, 2, 7, 7)], ids=["tiled map", "whole map"])
def test_inverted_boxes_unchecked_follow_torchvision_both_ways(device, shape):
    """check_boxes=False lets inverted boxes through (undefined, as in torchvision, but the kernels
    still follow its arithmetic): their samples run backwards from the start, and the backward
    must find the pixels they reach, on tiled and whole maps alike."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_()
    extent = shape[-1]
    rois = torch.tensor([[0, 0.15, 0.75, 0.75, 0.05], [0, 0.7, 0.1, 0.2, 0.6]]).mul(torch.tensor([1.0] + [extent] * 4)).to(device)
    grad = torch.randn(2, 2, 2, 2, generator=generator).to(device)
    with ops.backend("triton"):
        out = ops.roi_align(x, rois, (2, 2), 1.0, 2, True, check_boxes=False)
        (grad_x,) = torch.autograd.grad(out, x, grad)
    expected, expected_grad = torchvision_forward_backward(x, rois, grad, (2, 2), 1.0, 2, True)
    assert expected_grad.abs().sum() > 0  # the inverted boxes do reach pixels
    assert relative_error(out, expected) <= TOLERANCE[torch.float32]
    assert relative_error(grad_x, expected_grad) <= TOLERANCE[torch.float32]


def test_triton_non_contiguous_input_and_box_list(device):
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(2, 6, 5, 9, generator=generator).to(device)
    x = base[:, ::2, :, 1:8].requires_grad_()  # strided channels and columns
    boxes = [torch.tensor([[0.5, 0.5, 4.0, 3.5], [1.0, 0.0, 6.0, 5.0]], device=device), torch.zeros(0, 4, device=device)]
    with ops.backend("triton"):
        out = ops.roi_align(x, boxes, (2, 2), 1.0, -1, True)
        (grad_x,) = torch.autograd.grad(out.sum(), x)
    expected = torchvision.ops.roi_align(x, boxes, (2, 2), 1.0, -1, True)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    assert relative_error(out, expected) <= 1e-5 and relative_error(grad_x, expected_grad) <= 1e-5


def test_triton_no_boxes(device):
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    with ops.backend("triton"):
        out = ops.roi_align(x, torch.zeros(0, 5, device=device), (7, 7))
        assert out.shape == (0, 3, 7, 7)
        (grad_x,) = torch.autograd.grad(out.sum(), x)
        pooled = ops.roi_pool_vectors(x, torch.zeros(0, 5, device=device))
        assert pooled.shape == (0, 3)
        (grad_pooled,) = torch.autograd.grad(pooled.sum(), x)
    assert torch.equal(grad_x, torch.zeros_like(x)) and torch.equal(grad_pooled, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (2, 2, 33, 19)])
def test_triton_backward_is_bit_identical_across_runs(device, shape):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_()
    # Many overlapping boxes on one image: the order of their contributions is what could vary.
    rois = random_rois(shape[0], shape[2], shape[3], 1.0, 6, generator).to(device=device, dtype=torch.float32)
    with ops.backend("triton"):
        out = ops.roi_align(x, rois, (2, 3), 1.0, 2, False)
        grad = torch.randn(out.shape, generator=generator).to(device)
        first = torch.autograd.grad(out, x, grad, retain_graph=True)[0]
        for _ in range(2 if not HAS_CUDA else 20):
            assert torch.equal(torch.autograd.grad(out, x, grad, retain_graph=True)[0], first)


def test_pooled_form_and_module(device):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 7, 7, generator=generator).to(device).requires_grad_()
    boxes = [torch.tensor([[0.0, 0.0, 224.0, 224.0], [40.0, 60.0, 150.0, 100.0]], device=device), torch.tensor([[10.0, 20.0, 30.0, 200.0]], device=device)]
    expected = torchvision.ops.roi_align(x, boxes, 1, 1 / 32, -1, False).flatten(1)
    grad = torch.randn(5, 3, generator=generator).to(device).t()  # non-contiguous
    with ops.backend("triton"):
        pooled = ops.roi_pool_vectors(x, boxes, 1 / 32)
        (grad_x,) = torch.autograd.grad(pooled, x, grad)
        module_out = ops.RoIAlign(1, 1 / 32)(x, boxes)
    assert pooled.shape == (3, 5)
    assert relative_error(pooled, expected) <= 1e-5
    assert relative_error(grad_x, torch.autograd.grad(expected, x, grad)[0]) <= 1e-5
    assert relative_error(module_out.flatten(1), expected) <= 1e-5


@pytest.mark.parametrize("dtype, memory", [(torch.float32, "nchw"), (torch.bfloat16, "channels_last")])
def test_pooled_form_takes_boxes_in_blocks(device, dtype, memory):
    # More boxes on an image than one product takes (a full block and a partial one), shuffled
    # across images, one image without boxes, a 3x3 map (padded to 16 pixels for tl.dot) beside 7x7.
    from fastdense.kernels.roi_align import POOLED_BOX_BLOCK

    for height, width in ((7, 7), (3, 3)):
        generator = torch.Generator().manual_seed(height)
        x = layout(torch.randn(3, 20, height, width, generator=generator).to(device, dtype), memory).requires_grad_()
        rois = random_rois(3, height, width, 1 / 32, POOLED_BOX_BLOCK + 5, generator).to(device)
        grad = torch.randn(rois.shape[0], 20, generator=generator).to(device, dtype)
        with ops.backend("triton"):
            # two samples a side: the interpreter pays per sample, and this test is about the blocks
            pooled = ops.roi_pool_vectors(x, rois, 1 / 32, sampling_ratio=2, aligned=True)
            (grad_x,) = torch.autograd.grad(pooled, x, grad)
        expected, expected_grad = torchvision_forward_backward(x, rois, grad[:, :, None, None], (1, 1), 1 / 32, 2, True)
        assert_most_boxes_reach_the_map(expected)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert relative_error(pooled, expected.flatten(1)) <= tol
        assert relative_error(grad_x, expected_grad) <= tol


@pytest.mark.parametrize("height, width, memory", [(1, 3, "nchw"), (5, 11, "channels_last"), (16, 16, "nchw"), (9, 2, "channels_last")])
def test_pooled_form_sums_every_pixel_chunk(device, height, width, memory):
    """The pooled forward sums the padded map ``POOLED_CHUNK`` pixels a step: maps of one step (1x3:
    16 pixels), of several (5x11: 128; 9x2: 16x2 padded, 32), and of the largest whole map (16x16)."""
    check_against_torchvision("triton", device, (1, 1), -1, height % 2 == 1, 1.0, torch.float32, memory, shape=(2, 37, height, width), per_image=3,
                              seed=height * width)


@pytest.mark.parametrize("channel_blocks, chunk", [(2, None), (3, None), (3, 64)])
@pytest.mark.parametrize("dtype, memory", [(torch.float32, "channels_last"), (torch.bfloat16, "nchw")])
def test_pooled_kernels_take_several_channel_blocks_a_program(device, channel_blocks, chunk, dtype, memory):
    """``POOLED_FORWARD_CHANNEL_BLOCKS`` and ``POOLED_BACKWARD_CHANNEL_BLOCKS`` (which the tuning
    script sweeps, also with the whole map a product: ``CHUNK`` 64, where the channel-block loop is
    the one pipelined) change only who computes what: 100 channels in blocks of 32 (the last
    program's blocks partly and wholly past the channels), an image with more boxes than one product
    takes (beyond its head rows), one with none. Set through ``apply_settings``, as a tuning result is."""
    import fastdense.kernels.roi_align as kernels

    settings = {"POOLED_FORWARD_CHANNEL_BLOCKS": channel_blocks, "POOLED_BACKWARD_CHANNEL_BLOCKS": channel_blocks}
    if chunk:  # and launch options as tuning would set them
        settings.update(POOLED_CHUNK=chunk, POOLED_FORWARD_LAUNCH={"num_stages": 3}, POOLED_BACKWARD_LAUNCH={"num_warps": 8, "num_stages": 3})
    package = kernels.current_settings()
    kernels.apply_settings(settings)
    try:
        generator = torch.Generator().manual_seed(channel_blocks)
        x = layout(torch.randn(3, 100, 7, 7, generator=generator).to(device, dtype), memory).requires_grad_()
        many = random_rois(1, 7, 7, 1 / 32, kernels.POOLED_BOX_BLOCK + 3, generator)
        few = random_rois(1, 7, 7, 1 / 32, 4, generator)
        few[:, 0] = 2.0
        rois = torch.cat([many, few])[torch.randperm(many.shape[0] + few.shape[0], generator=generator)].to(device)
        grad = torch.randn(rois.shape[0], 100, generator=generator).to(device, dtype)
        for backward in (False, True):
            grid_channels, constexprs, _ = kernels._pooled_config(100, 7, 7, backward, dtype)
            assert (constexprs["BLOCK_C"], constexprs["CHANNEL_BLOCKS"], grid_channels) == (32, channel_blocks, -(-4 // channel_blocks))
        with ops.backend("triton"):
            pooled = ops.roi_pool_vectors(x, rois, 1 / 32, sampling_ratio=2, aligned=True)
            (grad_x,) = torch.autograd.grad(pooled, x, grad)
        expected, expected_grad = torchvision_forward_backward(x, rois, grad[:, :, None, None], (1, 1), 1 / 32, 2, True)
        assert_most_boxes_reach_the_map(expected)
        assert relative_error(pooled, expected.flatten(1)) <= TOLERANCE[dtype]
        assert relative_error(grad_x, expected_grad) <= TOLERANCE[dtype]
        assert torch.all(grad_x[1] == 0)
    finally:
        kernels.apply_settings(package)


def test_pooled_settings_larger_than_the_shape_are_cut_to_it(device):
    """A tuning result applied to a smaller shape than it was tuned on: the channel block no wider
    than the channels (a power of two, at least 16), no more channel blocks a program than there are,
    a chunk no longer than the padded map; the results stay torchvision's."""
    import fastdense.kernels.roi_align as kernels

    package = kernels.current_settings()
    kernels.apply_settings(dict(POOLED_FORWARD_BLOCK_C=128, POOLED_BACKWARD_BLOCK_C=128, POOLED_FORWARD_CHANNEL_BLOCKS=8,
                                POOLED_BACKWARD_CHANNEL_BLOCKS=8, POOLED_CHUNK=1024))
    try:
        for backward in (False, True):
            grid_channels, constexprs, _ = kernels._pooled_config(20, 7, 7, backward, torch.float32)
            assert (grid_channels, constexprs["BLOCK_C"], constexprs["CHANNEL_BLOCKS"], constexprs.get("CHUNK", 64)) == (1, 32, 1, 64)
        assert kernels.pooled_forward_chunk(3, 3) == 16  # 4x4 padded
        check_against_torchvision("triton", device, (1, 1), 2, True, 1 / 32, torch.float32, "nchw", shape=(2, 20, 7, 7), per_image=4)
    finally:
        kernels.apply_settings(package)


class RecordedLaunches:
    """Stands in for a Triton kernel: records each launch's grid and keyword arguments, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_tuned_settings_reach_every_launch_they_name(monkeypatch, device):
    """``apply_settings`` (how a tuning result is tried: ``bench_roi_align.py --tuned``) sets each
    pass's channel block, channel blocks, chunk and launch options, the grouping launch's four and
    the large-map backward's three, and each pass's float32 product, for the launches that follow; the results stay torchvision's.
    A setting read when its function is defined (a default argument) would not follow, nor one kept
    in a launch configuration cached before: both shapes run once under the package's settings first."""
    import json

    import fastdense.kernels.roi_align as kernels

    package = kernels.current_settings()
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 100, 7, 7, generator=generator).to(device).requires_grad_()
    rois = random_rois(2, 7, 7, 1 / 32, 5, generator).to(device)
    grad = torch.randn(rois.shape[0], 100, generator=generator).to(device)
    large = torch.randn(1, 40, 17, 40, generator=generator).to(device).requires_grad_()
    large_rois = random_rois(1, 17, 40, 0.5, 6, generator).to(device)
    large_grad = torch.randn(large_rois.shape[0], 40, 2, 3, generator=generator).to(device)

    def pooled_gradient():
        with ops.backend("triton"):
            pooled = ops.roi_pool_vectors(x, rois, 1 / 32, sampling_ratio=2, aligned=True)
            return pooled, torch.autograd.grad(pooled, x, grad)[0]

    def large_map_gradient():
        with ops.backend("triton"):
            return torch.autograd.grad(ops.roi_align(large, large_rois, (2, 3), 0.5, 2, True), large, large_grad)[0]

    pooled_gradient(), large_map_gradient()
    settings = dict(POOLED_FORWARD_BLOCK_C=16, POOLED_BACKWARD_BLOCK_C=64, POOLED_FORWARD_CHANNEL_BLOCKS=2, POOLED_BACKWARD_CHANNEL_BLOCKS=1,
                    POOLED_CHUNK=16, POOLED_FORWARD_LAUNCH={"num_warps": 2}, POOLED_BACKWARD_LAUNCH={"num_warps": 8},
                    POOLED_FORWARD_PRECISION="ieee", POOLED_BACKWARD_PRECISION="tf32x3",
                    GROUP_BLOCK=16, GROUP_SCAN=256, GROUP_LOADS=2, GROUP_WARPS=8,
                    LARGE_TILE=[16, 16], LARGE_TILE_CHANNELS=32, LARGE_TILE_LAUNCH={"num_warps": 2})
    with pytest.raises(ValueError, match="POOLED_CHANNEL_BLOCKS"):
        kernels.apply_settings({"POOLED_CHANNEL_BLOCKS": 2})
    with pytest.raises(ValueError, match="POOLED_BACKWARD_PRECISION must be one of"):
        kernels.apply_settings({"POOLED_BACKWARD_PRECISION": "tf32"})
    assert kernels.current_settings() == package
    recorded = {name: RecordedLaunches(getattr(kernels, name)) for name in ("_group_kernel", "_pooled_forward_kernel", "_pooled_backward_kernel",
                                                                             "_image_backward_kernel")}
    for name, recorder in recorded.items():
        monkeypatch.setattr(kernels, name, recorder)
    kernels.apply_settings(json.loads(json.dumps(settings)))  # as read back from a tuning result
    try:
        assert kernels.current_settings() == dict(settings, LARGE_TILE=(16, 16))
        pooled, grad_x = pooled_gradient()
        expected, expected_grad = torchvision_forward_backward(x, rois, grad[:, :, None, None], (1, 1), 1 / 32, 2, True)
        assert relative_error(pooled, expected.flatten(1)) <= TOLERANCE[torch.float32]
        assert relative_error(grad_x, expected_grad) <= TOLERANCE[torch.float32]
        (grid, group), = recorded["_group_kernel"].launches
        assert (group["BLOCK"], group["SCAN"], group["LOADS"], group["num_warps"]) == (16, 256, 2, 8)
        (grid, forward), = recorded["_pooled_forward_kernel"].launches
        assert (grid, forward["BLOCK_C"], forward["CHANNEL_BLOCKS"], forward["CHUNK"], forward["num_warps"], forward["PRODUCT"]) == ((2, 4), 16, 2, 16, 2, "ieee")
        (grid, backward), = recorded["_pooled_backward_kernel"].launches
        assert (grid, backward["BLOCK_C"], backward["CHANNEL_BLOCKS"], backward["num_warps"], backward["PRODUCT"]) == ((2, 2), 64, 1, 8, "tf32x3")
        grad_large = large_map_gradient()
        (grid, tiles), = recorded["_image_backward_kernel"].launches
        assert (tiles["BLOCK_C"], tiles["TILE_H"], tiles["TILE_W"], tiles["num_warps"]) == (32, 16, 16, 2)
        assert relative_error(grad_large, torchvision_forward_backward(large, large_rois, large_grad, (2, 3), 0.5, 2, True)[1]) <= 1e-5
    finally:
        kernels.apply_settings(package)
    assert kernels.current_settings() == package


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to TF32 (10 mantissa bits) to nearest, ties away from zero, as the tensor
    cores' ``cvt.rna.tf32.f32`` does (finite values)."""
    bits = x.float().contiguous().view(torch.int32)
    magnitude = ((bits & 0x7FFFFFFF) + 0x1000) & 0x7FFFE000
    return (magnitude | (bits & -0x80000000)).view(torch.float32)


def pooled_rows_by_box(order: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, num_images: int) -> torch.Tensor:
    """Each box's row of a pooled plan's ``weights`` (``pooled_weights``' layout), by box index (NaN for
    a box of no image, whose row no kernel reads), checking on the way that an image's head rows list
    its first boxes, the grouped rows hold every box's weights, and head rows left over hold box -1
    and zero weights."""
    from fastdense.kernels.roi_align import POOLED_BOX_BLOCK as HEAD

    order, offsets, weights = order.cpu().long(), offsets.cpu().tolist(), weights.cpu()
    heads = num_images * HEAD
    assert order.shape[0] == weights.shape[0] == heads + len(order[heads:])
    rows = torch.full((order.shape[0] - heads, weights.shape[1]), float("nan"))
    for b in range(num_images):
        for within, slot in enumerate(range(offsets[b], offsets[b + 1])):
            box = order[heads + slot]
            rows[box] = weights[heads + slot]
            if within < HEAD:
                assert order[b * HEAD + within] == box and torch.equal(weights[b * HEAD + within], rows[box]), (b, within)
        unused = range(b * HEAD + offsets[b + 1] - offsets[b], (b + 1) * HEAD)
        assert all(order[row] == -1 and not weights[row].any() for row in unused), b
    return rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pooled_product_in_16_bit_needs_one_tf32_pass(dtype):
    """The premise of the pooled kernels' one TF32 product for 16-bit input (``_pooled_product``),
    which Triton's interpreter cannot show (it multiplies in float32): 16-bit values are exact in
    TF32, and weights rounded to TF32 keep forward and backward within the dtype's tolerance of
    torchvision. The products here are emulated in float64 on TF32-rounded weights."""
    from fastdense.kernels.roi_align import PooledMap, group_by_image

    assert round_to_tf32(torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11)])).tolist() == [1 + 2**-10, 1 + 2**-9, -(1 + 2**-10)]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, 7, 7, generator=generator).to(dtype)
    values = torch.cat([x.flatten().float(), torch.tensor([6e-8, 65504.0, -1e-40, 3.3e38]).to(dtype).float()])
    assert torch.equal(round_to_tf32(values), values)  # subnormal, largest and tiny values included
    rois = random_rois(4, 7, 7, 1 / 32, 10, generator)
    order, offsets, weights = group_by_image(rois, 4, PooledMap(7, 7, 1 / 32, -1, False))
    rows = round_to_tf32(pooled_rows_by_box(order, offsets, weights, 4)).double()
    pixels = torch.zeros(4, 64, 64, dtype=torch.float64)  # [image, channel, padded 8x8 pixel]
    pixels.view(4, 64, 8, 8)[:, :, :7, :7] = x.double()
    image = rois[:, 0].long()
    pooled = torch.einsum("kp,kcp->kc", rows, pixels[image]).to(dtype)
    grad = torch.randn(rois.shape[0], 64, generator=generator).to(dtype)
    grad_pixels = torch.zeros(4, 64, 64, dtype=torch.float64).index_add_(0, image, grad.double()[:, :, None] * rows[:, None, :])
    grad_x = grad_pixels.view(4, 64, 8, 8)[:, :, :7, :7].to(dtype)
    expected, expected_grad = torchvision_forward_backward(x, rois, grad[:, :, None, None], (1, 1), 1 / 32, -1, False)
    assert_most_boxes_reach_the_map(expected)
    assert relative_error(pooled, expected.flatten(1)) <= TOLERANCE[dtype] / 4
    assert relative_error(grad_x, expected_grad) <= TOLERANCE[dtype] / 4


@triton.jit
def _read_box_block(order_ptr, weights_ptr, boxes_ptr, out_ptr, last, BOX_BLOCK: tl.constexpr, PIXELS: tl.constexpr, PRODUCT: tl.constexpr):
    boxes, real, weights = _box_block(order_ptr, weights_ptr, 0, last, BOX_BLOCK, PIXELS, PRODUCT)
    tl.store(boxes_ptr + tl.arange(0, BOX_BLOCK), tl.where(real, boxes, -1))
    tl.store(out_ptr + tl.arange(0, BOX_BLOCK)[:, None] * PIXELS + tl.arange(0, PIXELS)[None, :], weights)


@pytest.mark.parametrize("product", ["tf32x3", "ieee", "tf32"])
def test_box_block_rounds_the_weights_for_one_tf32_pass(device, product):
    """The other half of that premise: the weights a pooled kernel multiplies 16-bit values with (one
    TF32 pass) are rounded to TF32 first (the tensor cores would truncate them); float32 values'
    products (three TF32 passes, or CUDA-core FMAs) take them as they are. Past ``last``: no box,
    zero weights."""
    generator = torch.Generator().manual_seed(5)
    weights = torch.rand(16, 64, generator=generator).to(device)
    weights[0, :3] = torch.tensor([1 + 2**-11, 1 - 2**-12, 0.0])  # a tie rounds up; 1 - 2^-12 rounds to 1
    order = torch.randperm(16, generator=generator).to(device=device, dtype=torch.int32)
    boxes = torch.empty(16, dtype=torch.int64, device=device)
    read = torch.empty_like(weights)
    _read_box_block[(1,)](order, weights, boxes, read, 11, BOX_BLOCK=16, PIXELS=64, PRODUCT=product)
    expected = (round_to_tf32(weights) if product == "tf32" else weights)[:11]
    assert torch.equal(read[:11], expected) and torch.all(read[11:] == 0)
    assert torch.equal(boxes[:11], order[:11].long()) and torch.all(boxes[11:] == -1)
    if product == "tf32":
        assert read[0, :3].tolist() == [1 + 2**-10, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------------
# Grouping the boxes by image: one ranking launch (up to GROUP_KERNEL_MAX_BOXES boxes), else torch.sort


def grouping_cases():
    """``(name, image column, num_images)``: awkward box counts around the kernel's blocks, images
    without boxes, unsorted and non-integer (truncated) batch indices, one image holding everything."""
    generator = torch.Generator().manual_seed(7)
    shuffled = torch.randint(0, 5, (70,), generator=generator).float()
    return [
        ("no boxes", torch.zeros(0), 3),
        ("one box", torch.tensor([2.0]), 3),
        ("one image, many boxes", torch.zeros(45), 1),
        ("unsorted, empty images", shuffled, 9),
        ("fractional indices", torch.tensor([1.9, 0.2, 1.0, -0.5, 2.99, 0.0, 1.5]), 3),
        ("more offsets than a block", torch.randint(0, 40, (33,), generator=generator).float(), 40),
        ("several scan steps", torch.randint(0, 3, (300,), generator=generator).float(), 3),
        ("several scan loops", torch.randint(0, 6, (1100,), generator=generator).float(), 6),
        # check_boxes=False lets these through: still a permutation, the images' boxes still found.
        ("indices outside the images", torch.tensor([float("nan"), 3.0, -2.0, float("inf"), 1.0, -float("inf"), 1e10, 0.0, 2.0, -1e10, 5.0, 0.7]), 3),
    ]


@pytest.mark.parametrize("name, image, num_images", grouping_cases(), ids=[case[0] for case in grouping_cases()])
def test_grouping_kernel_matches_stable_sort(device, name, image, num_images):
    from fastdense.kernels.roi_align import group_by_rank, group_by_sort

    rois = torch.cat([image[:, None], torch.rand(image.shape[0], 4)], dim=1).to(device)
    expected_order, expected_offsets, no_weights = group_by_sort(rois, num_images)
    assert no_weights.numel() == 0
    # The sort against its definition: each image's boxes, in their original order.
    assert sorted(expected_order.tolist()) == list(range(image.shape[0]))
    truncated = [int(value) if -1 < value < num_images else None for value in image.tolist()]
    for b in range(num_images):
        assert expected_order[expected_offsets[b]:expected_offsets[b + 1]].tolist() == [j for j, t in enumerate(truncated) if t == b]
    # The package's launch, and the other shapes the tuning script tries (blocks, scan widths, warps).
    for config in ({}, dict(block=16, scan=256, loads=1, num_warps=8), dict(block=64, scan=128, loads=3, num_warps=8)):
        order, offsets, weights = group_by_rank(rois, num_images, **config)
        assert order.dtype == offsets.dtype == torch.int32 and weights.numel() == 0
        assert torch.equal(order, expected_order) and torch.equal(offsets, expected_offsets), config


@pytest.mark.parametrize("sampling_ratio, aligned", [(-1, False), (2, True), (3, False)])
@pytest.mark.parametrize("height, width", [(7, 7), (5, 11), (1, 3)])
def test_grouping_launch_writes_the_pooled_weights_of_the_separate_kernel(device, sampling_ratio, aligned, height, width):
    """The plan's one launch (ranks and weights) gives the rows that the sort fallback's own weights
    launch gives, bit for bit, and the reference's interpolation matrices give to rounding: boxes of
    every size in a block (sample grids of 1 to many, partly outside the map, degenerate), blocks
    partly filled, an image with more boxes than its head rows hold followed by one with none (whose
    head rows stay unused), boxes of no image."""
    from fastdense.kernels.roi_align import POOLED_BOX_BLOCK, PooledMap, group_by_rank, group_by_sort
    from fastdense.ops.roi_align import _box_weights

    generator = torch.Generator().manual_seed(height * 31 + width)
    boxes = 45
    image = torch.randint(0, 4, (boxes,), generator=generator).float()
    image[image == 2.0] = 3.0
    image[: POOLED_BOX_BLOCK + 2] = 1.0
    image[-3:] = torch.tensor([-1.0, 4.0, float("nan")])
    corner = torch.rand(boxes, 2, generator=generator) * torch.tensor([width * 1.6, height * 1.6]) - torch.tensor([width * 0.3, height * 0.3])
    size = torch.rand(boxes, 2, generator=generator) * torch.tensor([width * 1.5, height * 1.5])
    size[::7] = 0.0  # degenerate boxes
    rois = torch.cat([image[:, None], corner, corner + size], dim=1).to(device)
    pooled = PooledMap(height, width, 1.0, sampling_ratio, aligned)
    expected_order, expected_offsets, expected_weights = group_by_sort(rois, 4, pooled)
    expected_rows = pooled_rows_by_box(expected_order, expected_offsets, expected_weights, 4)
    tile_h, tile_w = 1 << (height - 1).bit_length(), max(1 << (width - 1).bit_length(), 16 // (1 << (height - 1).bit_length()))
    weights_y, weights_x, count = _box_weights(rois.cpu()[:-3], (1, 1), 1.0, sampling_ratio, aligned, height, width)
    reference = torch.zeros(boxes - 3, tile_h, tile_w)
    reference[:, :height, :width] = weights_y[:, 0, :, None] * weights_x[:, 0, None, :] / count[:, None, None]
    assert torch.allclose(expected_rows[:-3], reference.flatten(1), rtol=1e-6, atol=1e-7)
    assert torch.isnan(expected_rows[-3:]).all()
    heads = 4 * POOLED_BOX_BLOCK
    for config in ({}, dict(block=16, scan=256, num_warps=8)):
        order, offsets, weights = group_by_rank(rois, 4, pooled, **config)
        assert torch.equal(order[heads:], expected_order[heads:]) and torch.equal(offsets, expected_offsets), config
        assert weights.shape == expected_weights.shape, config
        rows = pooled_rows_by_box(order, offsets, weights, 4)
        assert torch.equal(rows[:-3], expected_rows[:-3]) and torch.isnan(rows[-3:]).all(), config


def test_grouping_falls_back_to_sort_above_the_limit(monkeypatch, device):
    import fastdense.kernels.roi_align as kernels

    calls = []
    monkeypatch.setattr(kernels, "group_by_rank", lambda *args: calls.append("rank") or kernels.group_by_sort(*args))
    rois = torch.cat([torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None], torch.rand(4, 4)], dim=1).to(device)
    monkeypatch.setattr(kernels, "GROUP_KERNEL_MAX_BOXES", 4)
    kernels.group_by_image(rois, 2)
    assert calls == ["rank"]
    monkeypatch.setattr(kernels, "GROUP_KERNEL_MAX_BOXES", 3)
    order, offsets, _ = kernels.group_by_image(rois, 2)
    assert calls == ["rank"]
    assert order.tolist() == [1, 3, 0, 2] and offsets.tolist() == [0, 2, 4]
    # The whole op on the fallback, the pooled form's plan too.
    check_against_torchvision("triton", device, (2, 3), 2, True, 1.0, torch.float32, "nchw", shape=(3, 2, 6, 7), per_image=2)
    check_against_torchvision("triton", device, (1, 1), -1, False, 1.0, torch.float32, "channels_last", shape=(3, 2, 6, 7), per_image=2)


@pytest.mark.parametrize("output", [2, 1])
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_backward_reuses_the_forward_plan(monkeypatch, device, path, output):
    """One plan per forward+backward (for a 1x1 output the box weights too, in the grouping's launch),
    on the eager path and through the custom op's autograd."""
    import fastdense.kernels.roi_align as kernels

    groupings, weights = [], []
    real_group_by_image, real_pooled_weights = kernels.group_by_image, kernels.pooled_weights
    monkeypatch.setattr(kernels, "group_by_image", lambda *args: groupings.append((args[0].shape[0], args[2] is not None)) or real_group_by_image(*args))
    monkeypatch.setattr(kernels, "pooled_weights", lambda *args: weights.append(args[0].shape[0]) or real_pooled_weights(*args))
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 6, 7, generator=generator).to(device).requires_grad_()
    rois = random_rois(3, 6, 7, 1.0, 2, generator).to(device=device, dtype=torch.float32)
    with ops.backend("triton"):
        if path == "eager":
            out = ops.roi_align(x, rois, (output, output), check_boxes=False)
        else:
            out = torch.ops.fastdense.roi_align(x, rois, output, output, 1.0, -1, False, "triton")[0]
        (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert groupings == [(rois.shape[0], output == 1)]
    assert weights == []  # no launch of its own below GROUP_KERNEL_MAX_BOXES
    assert ("EagerTritonRoIAlign" in type(out.grad_fn).__name__) == (path == "eager")
    expected, expected_grad = torchvision_forward_backward(x, rois, torch.ones_like(out), (output, output), 1.0, -1, False)
    assert relative_error(out, expected) <= 1e-5 and relative_error(grad_x, expected_grad) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# torch.library integration


def test_opcheck_reference():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 3.5, 4.0], [1, 1.0, 0.0, 5.0, 2.0]], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastdense.roi_align, (x, rois, 2, 2, 1.0, -1, False, "reference"))


@pytest.mark.parametrize("output", [2, 1])
def test_opcheck_triton(device, output):
    """The Triton implementation's fake (output, order, offsets, weights) and autograd registrations;
    the 1x1 output keeps per-box weights for its backward."""
    x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    rois = torch.tensor([[1, 0.5, 0.5, 3.5, 4.0], [0, 1.0, 0.0, 5.0, 2.0], [1, 0.0, 1.0, 2.0, 2.0]], device=device)
    torch.library.opcheck(torch.ops.fastdense.roi_align, (x, rois, output, output, 1.0, -1, False, "triton"))


def test_torch_compile_matches_eager():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 3.5, 4.0], [1, 1.0, 0.0, 5.0, 2.0]])
    fn = lambda t: torch.ops.fastdense.roi_align(t, rois, 2, 2, 1.0, -1, False, "reference")[0].square().sum()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    (grad_eager,) = torch.autograd.grad(fn(x), x)
    (grad_compiled,) = torch.autograd.grad(compiled(x), x)
    assert torch.allclose(grad_eager, grad_compiled)


@pytest.mark.parametrize("pooled", [False, True])
def test_torch_compile_of_the_triton_path_matches_eager(device, pooled):
    """Eager calls take the autograd.Function straight to the launchers; compiled ones the custom op
    (with its fake plan outputs): same kernels, bit-identical results."""
    x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    rois = torch.tensor([[1, 0.5, 0.5, 3.5, 4.0], [0, 1.0, 0.0, 5.0, 2.0], [1, 0.0, 1.0, 2.0, 2.0]], device=device)
    if pooled:
        fn = lambda t: ops.roi_pool_vectors(t, rois, check_boxes=False).square().sum()  # noqa: E731
    else:
        fn = lambda t: ops.roi_align(t, rois, 2, check_boxes=False).square().sum()  # noqa: E731
    with ops.backend("triton"):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        eager_loss, compiled_loss = fn(x), compiled(x)
        (grad_eager,) = torch.autograd.grad(eager_loss, x)
        (grad_compiled,) = torch.autograd.grad(compiled_loss, x)
    assert torch.equal(eager_loss, compiled_loss) and torch.equal(grad_eager, grad_compiled)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_autocast_runs_natively_in_the_input_dtype(device, backend):
    """Under autocast a float32 map keeps float32 precision, forward and backward, whichever
    implementation serves it (the reference's einsums once ran in bfloat16 there)."""
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 5, 6, generator=generator).to(device).requires_grad_()
    rois = torch.tensor([[1, 0.25, 0.5, 4.5, 3.75], [0, 1.0, 0.0, 5.0, 4.5]], device=device)
    grad = torch.randn(2, 3, 2, 3, generator=generator).to(device)
    with ops.backend(backend), torch.autocast(device.type, dtype=torch.bfloat16):
        out = ops.roi_align(x, rois, (2, 3), 1.0, -1, True)
        (grad_x,) = torch.autograd.grad(out, x, grad)
        low = ops.roi_align(x.detach().bfloat16(), rois, (2, 3), 1.0, -1, True)
    expected, expected_grad = torchvision_forward_backward(x, rois, grad, (2, 3), 1.0, -1, True)
    assert out.dtype == grad_x.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert relative_error(out, expected) <= TOLERANCE[torch.float32] and relative_error(grad_x, expected_grad) <= TOLERANCE[torch.float32]
    assert relative_error(low, torchvision.ops.roi_align(x.detach().bfloat16().double(), rois.double(), (2, 3), 1.0, -1, True)) <= 2e-2


def test_forcing_triton_on_float64_is_an_error():
    with ops.backend("triton"), pytest.raises(RuntimeError, match="triton"):
        ops.roi_align(torch.randn(1, 1, 3, 3, dtype=torch.float64), torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64), 1)


# ---------------------------------------------------------------------------------------------------
# Bad input

GOOD_X = torch.randn(2, 3, 5, 5)
GOOD_ROIS = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(input=torch.randn(3, 5, 5)), ValueError, r"input.*\[N, C, H, W\]"),
        (dict(input=torch.zeros(2, 3, 5, 5, dtype=torch.int32)), TypeError, "input.*floating-point"),
        (dict(input=[[1.0]]), TypeError, "input.*torch.Tensor"),
        (dict(input=torch.randn(2, 3, 0, 5)), ValueError, r"input.*H, W >= 1"),
        (dict(input=torch.randn(2, 3, 5, 0), boxes=torch.zeros(0, 5)), ValueError, r"input.*H, W >= 1"),
        (dict(boxes=torch.zeros(3, 4)), ValueError, r"boxes.*\[K, 5\]"),
        (dict(boxes=torch.zeros(5)), ValueError, r"boxes.*\[K, 5\]"),
        (dict(boxes=[torch.zeros(2, 5)]), ValueError, r"boxes\[0\].*\[k_i, 4\]"),
        (dict(boxes="boxes"), TypeError, "boxes"),
        (dict(boxes=torch.tensor([[2, 0.0, 0.0, 1.0, 1.0]])), ValueError, r"batch indices in \[0, 1\]"),
        (dict(boxes=torch.tensor([[-1, 0.0, 0.0, 1.0, 1.0]])), ValueError, "batch indices"),
        (dict(boxes=torch.tensor([[0.5, 0.0, 0.0, 1.0, 1.0]])), ValueError, "integer batch indices"),
        (dict(boxes=torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [float("nan"), 0.0, 0.0, 1.0, 1.0]])), ValueError, "integer batch indices"),
        (dict(input=torch.randn(0, 3, 5, 5), boxes=torch.tensor([[-1, 0.0, 0.0, 1.0, 1.0]])), ValueError, r"batch indices in \[0, -1\]"),
        (dict(boxes=torch.tensor([[0, 2.0, 0.0, 1.0, 1.0]])), ValueError, "x1 <= x2"),
        (dict(boxes=torch.tensor([[0, 0.0, 2.0, 1.0, 1.0]])), ValueError, "y1 <= y2"),
        (dict(boxes=torch.tensor([[0, 0.0, 0.0, float("inf"), 1.0]])), ValueError, "finite"),
        (dict(boxes=torch.tensor([[0, float("nan"), 0.0, 1.0, 1.0]])), ValueError, "finite"),
        (dict(boxes=torch.tensor([[1, 0.0, 0.0, 1.0, 1.0], [0, float("-inf"), 0.0, 1.0, 1.0]])), ValueError, "finite"),
        (dict(output_size=0), ValueError, "output_size"),
        (dict(output_size=(2, 2, 2)), ValueError, "output_size"),
        (dict(output_size=(2.0, 2)), ValueError, "output_size"),
        (dict(sampling_ratio=1.5), TypeError, "sampling_ratio"),
        (dict(spatial_scale=0.0), ValueError, "spatial_scale"),
        (dict(spatial_scale=float("nan")), ValueError, "spatial_scale"),
        (dict(spatial_scale=float("inf")), ValueError, "spatial_scale must be a positive finite number"),
        (dict(spatial_scale="0.5"), TypeError, "spatial_scale"),
        (dict(output_size=2.0), ValueError, "output_size"),
        (dict(output_size=None), ValueError, "output_size"),
        (dict(sampling_ratio=2**40), ValueError, "sampling_ratio"),
        (dict(sampling_ratio=1 - 2**40), ValueError, "sampling_ratio"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_bad_input(device, backend, kwargs, error, message):
    """Every backend refuses the same input with the same message (the Triton path checks the
    boxes' values with a kernel of its own)."""
    args = dict(input=GOOD_X, boxes=GOOD_ROIS, output_size=2, spatial_scale=1.0, sampling_ratio=-1)
    args.update(kwargs)
    to_device = lambda value: value.to(device) if torch.is_tensor(value) else [to_device(v) for v in value] if isinstance(value, list) else value  # noqa: E731
    args = {name: to_device(value) for name, value in args.items()}
    with ops.backend(backend), pytest.raises(error, match=message):
        ops.roi_align(**args)


def box_value_cases(generator: torch.Generator):
    """``(name, rois, num_images)``: valid boxes and every kind of bad value, alone and together."""
    good = random_rois(5, 7, 7, 1 / 32, 6, generator).float()
    last_of_many = good.clone()
    last_of_many[0, 0] = 511.0  # 512 images: in bfloat16 index 511 rounds to 512, one past the last
    past_many = good.clone()
    past_many[0, 0] = 512.0
    cases = [("valid", good, 5), ("no image for index 4", good, 4), ("last of 512 images", last_of_many, 512),
             ("one past 512 images", past_many, 512)]
    for name, column, value in [("fractional index", 0, 2.5), ("negative index", 0, -1.0), ("nan index", 0, float("nan")),
                                ("inf index", 0, float("inf")), ("inverted x", 1, 1e4), ("inverted y", 2, 1e4),
                                ("nan x1", 1, float("nan")), ("inf y2", 4, float("inf")), ("-inf x2", 3, float("-inf"))]:
        bad = good.clone()
        bad[int(torch.randint(good.shape[0], (), generator=generator)), column] = value
        cases.append((name, bad, 5))
    several = good.clone()
    several[0, 0], several[1, 3], several[2, 2] = 7.0, -1e4, float("nan")
    cases.append(("three faults", several, 5))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_box_check_kernel_matches_the_pytorch_check(monkeypatch, device, dtype):
    """The Triton check's flags against the three conditions computed here in float64, on every
    dtype, on a non-contiguous view of the boxes, and over several programs (a bad box in the last
    one); and the Triton and PyTorch paths of check_box_values refuse the same boxes alike."""
    from fastdense.kernels import roi_align as kernels
    from fastdense.ops.roi_align import check_box_values

    monkeypatch.setattr(kernels, "CHECK_BOXES_PER_PROGRAM", 8)
    monkeypatch.setattr(kernels, "CHECK_BLOCK", 4)
    for name, rois, num_images in box_value_cases(torch.Generator().manual_seed(3)):
        rois = rois.to(dtype)
        strided = torch.zeros(rois.shape[0], 9, dtype=dtype)[:, ::2]
        strided.copy_(rois)
        flags = kernels.invalid_box_flags(strided.to(device), num_images)
        assert flags.shape == (-(-rois.shape[0] // 8),), name
        found = 0
        for word in flags.tolist():
            found |= word
        index = rois[:, 0].double()
        expected = (kernels.BAD_BATCH_INDEX * bool(((index < 0) | (index > num_images - 1) | (index != index.floor()) | index.isnan()).any())
                    + kernels.INVERTED_BOX * bool(((rois[:, 3:5] < rois[:, 1:3])).any())
                    + kernels.NOT_FINITE * bool((~rois[:, 1:].isfinite()).any()))
        assert found == expected, name
        outcomes = []
        for with_kernel in (True, False):
            try:
                check_box_values(strided.to(device), (num_images, 1, 7, 7), with_kernel=with_kernel)
                outcomes.append(None)
            except ValueError as error:
                outcomes.append(str(error))
        assert outcomes[0] == outcomes[1] and (outcomes[0] is None) == (expected == 0), (name, outcomes)


def test_box_check_is_one_launch_and_one_transfer_on_the_triton_path(monkeypatch, device):
    """The Triton path checks the boxes with one kernel and reads back its flags once (on a GPU,
    the call's only host sync), instead of a dozen PyTorch ops; other backends keep the PyTorch check."""
    from fastdense.kernels import roi_align as kernels

    calls, transfers = [], []
    real_flags, real_tolist = kernels.invalid_box_flags, torch.Tensor.tolist
    monkeypatch.setattr(kernels, "invalid_box_flags", lambda *args: calls.append(args[0].shape) or real_flags(*args))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: transfers.append(tuple(self.shape)) or real_tolist(self))
    x, rois = GOOD_X.to(device), torch.tensor([[0, 0.0, 0.0, 2.0, 2.0], [1, 1.0, 0.5, 4.0, 3.0]], device=device)
    with ops.backend("triton"):
        ops.roi_pool_vectors(x, rois)
    assert calls == [(2, 5)] and transfers == [(1,)]
    with ops.backend("reference"):
        ops.roi_align(x.cpu(), rois.cpu(), 2)
    assert calls == [(2, 5)] and transfers[1] == (3,)  # the PyTorch check's three flags


def test_check_boxes_false_skips_only_the_value_checks(monkeypatch):
    """``check_boxes=False`` (SCRL's call) reads no box value on the host: no ``.tolist()`` on the
    boxes, so no host sync on a GPU; shapes and arguments are still checked, and valid boxes give
    the same result."""
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0], [1, 1.0, 0.5, 4.0, 3.0]])
    expected = ops.roi_align(GOOD_X, rois, 2, aligned=True)
    synced = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: synced.append(self.shape) or real_tolist(self))
    torch.testing.assert_close(ops.roi_align(GOOD_X, rois, 2, aligned=True, check_boxes=False), expected)
    torch.testing.assert_close(ops.roi_pool_vectors(GOOD_X, rois, check_boxes=False), ops.roi_align(GOOD_X, rois, 1, check_boxes=False).flatten(1))
    assert synced == []
    ops.roi_align(GOOD_X, rois, 2)
    assert synced, "the default call checks the boxes' values"
    with pytest.raises(ValueError, match=r"boxes.*\[K, 5\]"):
        ops.roi_align(GOOD_X, torch.zeros(3, 4), 2, check_boxes=False)
    with pytest.raises(ValueError, match="output_size"):
        ops.roi_align(GOOD_X, rois, 0, check_boxes=False)
    # A list of boxes for more images than input holds: its length is a shape, checked too.
    with pytest.raises(ValueError, match=r"boxes\[2\] holds boxes of image 2, but input has 2 images"):
        ops.roi_align(GOOD_X, [rois[:1, 1:], rois[1:, 1:], rois[1:, 1:]], 2, check_boxes=False)
    ops.roi_align(GOOD_X, [rois[:1, 1:], rois[1:, 1:], torch.zeros(0, 4)], 2, check_boxes=False)  # empty: as torchvision


# Triton's interpreter warns (numpy) on the non-finite values these tests feed it on purpose.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_boxes_far_outside_the_map_pool_zeros_like_torchvision(device, backend):
    """Finite boxes that pass check_boxes but reach 1e30 pixels: the reference turned those sample
    positions into int64 indices that overflowed (RuntimeError: index -9223372036854775808 is out of
    bounds); their samples lie outside the map and weigh nothing, as in torchvision."""
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 1e30, 1e30], [1, -1e20, 2.0, 3.0, 1e19], [1, 1e30, 1e30, 1e30, 1e30], [0, 1.0, 1.0, 6.0, 5.0]])
    expected = torchvision.ops.roi_align(x, rois, 2, sampling_ratio=2)
    with ops.backend(backend):
        out = ops.roi_align(x.to(device), rois.to(device), 2, sampling_ratio=2)
    torch.testing.assert_close(out.cpu(), expected)


def test_bad_device():
    meta_boxes = GOOD_ROIS.to("meta")
    with pytest.raises(ValueError, match="boxes must be on the device of input"):
        ops.roi_align(GOOD_X, meta_boxes, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_list_of_16_bit_boxes_keeps_every_image_index(dtype):
    """bfloat16 holds integers exactly only up to 256 (float16: 2048): the rois built from a list
    get their image indices in float32, so image 2999's box stays image 2999's."""
    boxes = [torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=dtype) for _ in range(3000)]
    rois = boxes_to_rois(boxes)
    assert rois.dtype == torch.float32 and torch.equal(rois[:, 0], torch.arange(3000, dtype=torch.float32))


def test_boxes_to_rois_keeps_image_order():
    rois = boxes_to_rois([torch.ones(2, 4), torch.zeros(0, 4), torch.full((1, 4), 2.0)])
    assert rois[:, 0].tolist() == [0, 0, 2]


def test_boxes_to_rois_of_no_images_takes_the_given_dtype_and_device():
    rois = boxes_to_rois([], dtype=torch.float64, device="meta")
    assert rois.shape == (0, 5) and rois.dtype == torch.float64 and rois.device.type == "meta"
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    assert ops.roi_align(x, [], (2, 2)).shape == (0, 3, 2, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, memory", [(torch.float32, "nchw"), (torch.bfloat16, "channels_last")])
def test_detection_shape_matches_torchvision_and_is_deterministic(dtype, memory):
    """A detection-like map (per-box forward, per-bin tiled backward) with many overlapping boxes."""
    generator = torch.Generator().manual_seed(6)
    x = layout(torch.randn(2, 64, 100, 152, generator=generator).cuda().to(dtype), memory).requires_grad_()
    rois = random_rois(3, 100, 152, 0.25, 64, generator)
    rois = rois[rois[:, 0] < 2].cuda().float()
    out = ops.roi_align(x, rois, (7, 7), 0.25, 2, True)
    grad = torch.randn(out.shape, generator=generator).cuda().to(dtype)
    grads = [torch.autograd.grad(ops.roi_align(x, rois, (7, 7), 0.25, 2, True), x, grad)[0] for _ in range(5)]
    expected, expected_grad = torchvision_forward_backward(x, rois, grad, (7, 7), 0.25, 2, True)
    assert relative_error(out, expected) <= TOLERANCE[dtype]
    assert relative_error(grads[0], expected_grad) <= TOLERANCE[dtype]
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpp_backend_is_torchvision_on_cpu(dtype):
    """On the CPU, automatic dispatch serves torchvision's C++ kernel, forward and backward, and it
    agrees with the reference."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 11, generator=g).to(dtype).requires_grad_()
    rois = torch.tensor([[0, 0.5, 1.0, 7.0, 6.0], [1, -2.0, 3.0, 12.0, 9.5], [1, 4.0, 4.0, 4.0, 4.0]], dtype=dtype)
    with ops.backend("cpp"):
        out = ops.roi_align(x, rois, (3, 2), 0.8, -1, True)
    with ops.backend("reference"):
        ref = ops.roi_align(x, rois, (3, 2), 0.8, -1, True)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out.double() - ref.double()).norm() <= tol * ref.double().norm()
    (g_out,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    assert (g_out.double() - g_ref.double()).norm() <= tol * g_ref.double().norm()
    from fastdense.ops._dispatch import resolve

    assert resolve("roi_align", (x,), available=("triton", "cpp")) == "cpp"


# ----------------------------------------------------------------------------- sm_90 lowering

_SM90_COMPILE_SCRIPT = r"""
import torch
from benchmarks.sm90 import compile_for_sm90, compile_like_launch, spill_bytes
from benchmarks.static_roi_align import launches
from fastdense.kernels import roi_align as kernels

# SCRL's pooled form on [256, 2048, 7, 7] as the package launches it (and with four channel blocks a
# program, which the tuning script tries), then the 7x7 output.
for dtype, layout, channel_blocks in ((torch.float32, "nchw", None), (torch.float32, "channels_last", 4), (torch.bfloat16, "nchw", 4),
                                      (torch.bfloat16, "channels_last", None), (torch.float16, "channels_last", None)):
    for name, kernel, args, constexprs, options in launches(dtype, layout, channel_blocks):
        if name == "plan":
            continue  # below, with and without weights
        compiled = compile_like_launch(kernel, args, constexprs, **options)
        # The package's configurations spill nothing; the tried ones need only lower (their cost is timed).
        assert channel_blocks or spill_bytes(compiled) == 0, f"{name} {dtype} {layout}: register spills"
        if constexprs["PRODUCT"] == "ieee":  # float32 on CUDA cores (POOLED_*_PRECISION)
            assert "mma" not in compiled.asm["ptx"] and "fma.rn.f32" in compiled.asm["ptx"], f"{name} {dtype} {layout}: not CUDA-core FMAs"
            continue
        assert "mma" in compiled.asm["ptx"], f"{name} {dtype} {layout} {channel_blocks}: no tensor-core MMA"
        # float32 takes 3xTF32 (operands split with cvt.rna); 16-bit one pass on weights rounded in bits
        assert ("cvt.rna.tf32" in compiled.asm["ptx"]) == (dtype == torch.float32), f"{name} {dtype}: TF32 passes"
        if dtype == torch.float32:  # the other float32 product, which the tuning script tries: exact, CUDA-core FMAs, no spills
            ieee = compile_like_launch(kernel, args, dict(constexprs, PRODUCT="ieee"), **options)
            assert "mma" not in ieee.asm["ptx"] and "fma.rn.f32" in ieee.asm["ptx"] and spill_bytes(ieee) == 0, f"{name} {layout}: ieee product"
# Several channel blocks a program (configurations the tuning script sweeps; the forward with the whole
# map a product): the channel-block loop over the head rows is the first loop, and Triton pipelines
# it (its loads wait for all but the newest blocks), not only the further boxes' loop.
import re
for name, kernel, args, constexprs, options in launches(torch.float32, "channels_last", 4):
    if name in ("forward", "backward"):
        ttgir = compile_like_launch(kernel, args, dict(constexprs, **({"CHUNK": 64} if name == "forward" else {})), num_stages=3).asm["ttgir"]
        loops = [m.start() for m in re.finditer(r"scf\.for", ttgir)]
        waits = [m.start() for m in re.finditer(r"async_wait[^\n]*num = [1-9]", ttgir)]
        assert len(loops) >= 2 and any(loops[0] < w < loops[1] for w in waits), f"{name}: the head rows' channel-block loop is not pipelined"
# The largest map that one program holds whole (kernels.MAX_TILE pixels): every such launch must fit
# an SM's shared memory, or it cannot start.
from benchmarks.sm90 import MAX_SHARED_PER_PROGRAM
side = int(kernels.MAX_TILE ** 0.5)
for dtype in (torch.float32, torch.bfloat16):
    for name, kernel, args, constexprs, options in launches(dtype, "channels_last", shape=(8, 2048, side, side)):
        shared = compile_like_launch(kernel, args, constexprs, **options).metadata.shared
        assert shared <= MAX_SHARED_PER_PROGRAM, f"{name} {dtype} {side}x{side}: {shared} bytes of shared memory"
# A launch passes integers equal to 1 as constants (Python ints in the kernel, where .to() fails):
# one image, one channel, a map one pixel high; the sort fallback's weights launch too.
for name, kernel, args, constexprs, options in launches(torch.float32, "nchw", shape=(1, 1, 1, 3)):
    compile_like_launch(kernel, args, constexprs, **options)
meta = {name: torch.empty(size, dtype=dtype, device="meta") for name, size, dtype in (
    ("rois_ptr", (10, 5), torch.float32), ("order_ptr", (26,), torch.int32), ("offsets_ptr", (2,), torch.int32), ("weights_ptr", (26, 16), torch.float32))}
compile_like_launch(kernels._pooled_weights_kernel, meta | dict(K=10, num_images=1, H=1, W=3, spatial_scale=1.0),
                    dict(BOXES=kernels.POOLED_WEIGHT_BOXES, HEAD=kernels.POOLED_BOX_BLOCK, SAMPLING=0, ALIGNED=False, TILE_H=1, TILE_W=16))
geometry = {name: "i32" for name in ("C", "H", "W", "stride_n", "stride_c", "stride_h", "stride_w")} | {"spatial_scale": "fp32"}
grouping = {"rois_ptr": "*fp32", "order_ptr": "*i32", "offsets_ptr": "*i32"}
for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    _, _, forward = kernels._forward_config(2048, side, side, 7, 7, torch_dtype, -1, False)
    types = geometry | grouping | {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
    shared = compile_for_sm90(kernels._image_forward_kernel, types, forward).metadata.shared
    assert shared <= MAX_SHARED_PER_PROGRAM, f"forward {dtype} {side}x{side}: {shared} bytes of shared memory"
    _, _, forward = kernels._forward_config(2048, 7, 7, 7, 7, torch_dtype, -1, False)
    types = geometry | grouping | {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
    compiled = compile_for_sm90(kernels._image_forward_kernel, types, forward)
    assert spill_bytes(compiled) == 0, f"forward {dtype} 7x7: register spills"
    assert "mma" in compiled.asm["ptx"], f"forward {dtype} 7x7: no tensor-core MMA"
    _, _, _, backward = kernels._backward_config(2048, 7, 7, 7, 7, torch_dtype, -1, False)
    types = geometry | grouping | {"grad_ptr": f"*{dtype}", "grad_x_ptr": f"*{dtype}", "tiles_w": "i32"}
    compiled = compile_for_sm90(kernels._image_backward_kernel, types, backward)
    assert spill_bytes(compiled) == 0, f"backward {dtype} 7x7: register spills"
    assert "mma" in compiled.asm["ptx"], f"backward {dtype} 7x7: no tensor-core MMA"
types = {"rois_ptr": "*fp32", "order_ptr": "*i32", "offsets_ptr": "*i32", "weights_ptr": "*fp32", "K": "i32", "num_images": "i32", "H": "i32", "W": "i32",
         "spatial_scale": "fp32"}
weights = dict(SAMPLING=0, ALIGNED=False, TILE_H=8, TILE_W=8, HEAD=kernels.POOLED_BOX_BLOCK)
compiled = compile_for_sm90(kernels._pooled_weights_kernel, types, weights | {"BOXES": kernels.POOLED_WEIGHT_BOXES}, num_warps=4)
assert spill_bytes(compiled) == 0, "pooled weights: register spills"
for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):  # the detection shape's tiled backward
    _, _, _, backward = kernels._backward_config(256, 200, 304, 7, 7, torch_dtype, 2, True)
    types = geometry | grouping | {"grad_ptr": f"*{dtype}", "grad_x_ptr": f"*{dtype}", "tiles_w": "i32"}
    compiled = compile_for_sm90(kernels._image_backward_kernel, types, backward)
    assert spill_bytes(compiled) == 0, f"detection backward {dtype}: register spills"
types = grouping | {"weights_ptr": "*fp32", "K": "i32", "num_images": "i32", "rank_programs": "i32", "H": "i32", "W": "i32", "spatial_scale": "fp32"}
for with_weights in (False, True):  # the plan's one launch, with SCRL's weights and without
    constants = weights | {"BLOCK": kernels.GROUP_BLOCK, "SCAN": kernels.GROUP_SCAN, "LOADS": kernels.GROUP_LOADS, "WEIGHTS": with_weights}
    assert spill_bytes(compile_for_sm90(kernels._group_kernel, types, constants)) == 0, f"grouping (weights {with_weights}): register spills"
for dtype in ("fp32", "fp64", "bf16", "fp16"):
    types = {"rois_ptr": f"*{dtype}", "flags_ptr": "*i32", "K": "i32", "stride_k": "i32", "stride_col": "i32", "last_image": "i32"}
    constants = {"BOXES_PER_PROGRAM": kernels.CHECK_BOXES_PER_PROGRAM, "BLOCK": kernels.CHECK_BLOCK, "IN_FLOAT64": dtype == "fp64"}
    assert compile_for_sm90(kernels._box_check_kernel, types, constants, num_warps=4).asm["cubin"], f"box check {dtype}"
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernels run for real in the tests above")
def test_kernels_compile_for_h100():
    """SCRL's launch configurations lower to sm_90 code without register spills, on tensor cores
    (float32 as 3xTF32; the pooled form's box blocks too) (see benchmarks/sm90.py)."""
    from benchmarks.sm90 import run_compile_script

    result = run_compile_script(_SM90_COMPILE_SCRIPT)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_benchmark_refuses_to_time_a_kernel_that_disagrees_with_torchvision():
    from benchmarks.bench_roi_align import check_agreement

    check_agreement("scrl", torch.float32, 2e-7, 5e-4)
    check_agreement("scrl", torch.bfloat16, 3e-3, 1e-2)
    for dtype, fwd, bwd in ((torch.float32, 2e-3, 0.0), (torch.bfloat16, 0.0, 0.05), (torch.float32, float("nan"), 0.0)):
        with pytest.raises(AssertionError, match="differs from torchvision"):
            check_agreement("scrl", dtype, fwd, bwd)


# ---------------------------------------------------------------------------------------------------
# Gaps a mutation audit found: border samples, the reference's layout, the module's arguments and defaults, float64 box checks


@pytest.mark.parametrize("output", [1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 5, 6), (1, 2, 17, 40)], ids=["whole map", "tiled map"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_samples_exactly_on_the_border_count(device, backend, shape, aligned, output):
    """A sample at exactly -1 or exactly H (W) still counts, as in torchvision (``y < -1 || y > H``
    skip it): it weighs on the first or last row. Boxes that reach the map only through such
    samples, one sample a bin (sampling_ratio 1)."""
    num, channels, height, width = shape
    generator = torch.Generator().manual_seed(height)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_()
    shift = 0.5 if aligned else 0.0  # aligned: pixel coordinates minus 0.5
    low, high_w, high_h = -1.0 + shift, width + shift, height + shift  # the bins' centres, in box coordinates
    # one-pixel bins, the box's border bin centred on the border, any other bin outside the map
    span = 0.5 + (output - 1)
    rows = []
    for image in range(num):
        rows += [[image, low - span, 1.0, low + 0.5, 3.0],  # x at -1
                 [image, 1.0, low - span, 4.0, low + 0.5],  # y at -1
                 [image, high_w - 0.5, 1.0, high_w + 0.5 + (output - 1), 3.0],  # x at W
                 [image, 2.0, high_h - 0.5, 5.0, high_h + 0.5 + (output - 1)],  # y at H
                 [image, low - span, high_h - 0.5, low + 0.5, high_h + 0.5 + (output - 1)]]  # both: the corner
    rois = torch.tensor(rows, dtype=torch.float32, device=device)
    grad = torch.randn(rois.shape[0], channels, output, output, generator=generator).to(device)
    with ops.backend(backend):
        out = ops.roi_align(x, rois, output, 1.0, 1, aligned)
        (grad_x,) = torch.autograd.grad(out, x, grad)
    expected, expected_grad = torchvision_forward_backward(x, rois, grad, (output, output), 1.0, 1, aligned)
    assert (expected.flatten(1).abs().sum(1) > 0).all()  # every box reaches the map, through its border samples
    assert relative_error(out, expected) <= 1e-6 and relative_error(grad_x, expected_grad) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_reference_gradient_keeps_the_input_layout(dtype):
    """The reference's backward returns ``grad_input`` in the input's memory layout (channels_last
    stays channels_last) and dtype, as the Triton and C++ paths do."""
    check_against_torchvision("reference", torch.device("cpu"), (3, 5), -1, True, 0.7, dtype, "channels_last", shape=(3, 5, 9, 11))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_module_and_defaults_are_torchvision(device, backend):
    """``RoIAlign`` passes on every argument it was built with, and the functional forms' defaults
    (spatial_scale 1, adaptive sampling, aligned False) are torchvision's: boxes of 5 to 9 pixels,
    whose adaptive grids (3 to 5 samples a bin) differ from any fixed one."""
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 11, 12, generator=generator).to(device)
    rois = torch.tensor([[0, 0.3, 1.2, 9.3, 8.1], [1, 2.5, 0.0, 7.5, 10.0], [1, 1.0, 1.0, 10.0, 6.5]], device=device)
    with ops.backend(backend):
        module = ops.RoIAlign((2, 3), 0.5, 2, True)
        assert repr(module) == "RoIAlign(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True)"
        built = module(x, rois)
        defaults = ops.roi_align(x, rois, (2, 2))
        pooled = ops.roi_pool_vectors(x, rois)
        module_defaults = ops.RoIAlign(2)(x, rois)
    for actual, expected in ((built, torchvision.ops.roi_align(x, rois, (2, 3), 0.5, 2, True)),
                             (defaults, torchvision.ops.roi_align(x, rois, (2, 2), 1.0, -1, False)),
                             (pooled, torchvision.ops.roi_align(x, rois, (1, 1), 1.0, -1, False).flatten(1)),
                             (module_defaults, torchvision.ops.roi_align(x, rois, (2, 2), 1.0, -1, False))):
        assert relative_error(actual, expected) <= 1e-6
    # the arguments matter here: each changed alone moves the output (the test would catch one dropped)
    for changed in (dict(spatial_scale=1.0), dict(sampling_ratio=-1), dict(aligned=False)):
        args = dict(spatial_scale=0.5, sampling_ratio=2, aligned=True) | changed
        assert relative_error(torchvision.ops.roi_align(x, rois, (2, 3), **args), built) > 1e-3
    for changed in (dict(sampling_ratio=2), dict(aligned=True)):
        args = dict(spatial_scale=1.0, sampling_ratio=-1, aligned=False) | changed
        assert relative_error(torchvision.ops.roi_align(x, rois, (2, 2), **args), defaults) > 1e-3


def test_box_check_kernel_reads_float64_boxes_in_float64(device):
    """float64 boxes are checked in float64: values that float32 would round onto valid ones (an index
    a hair off an integer, a box inverted by 1e-9) or onto invalid ones (1e300, finite, overflows
    to inf) get the verdict of their own value, the PyTorch check's."""
    from fastdense.kernels import roi_align as kernels
    from fastdense.ops.roi_align import check_box_values

    good = torch.tensor([[0, 1.0, 1.0, 3.0, 4.0], [2, 0.5, 0.0, 6.0, 2.0]], dtype=torch.float64)
    cases = [(0, 2 + 1e-9, kernels.BAD_BATCH_INDEX), (0, 1e-12, kernels.BAD_BATCH_INDEX), (3, 1.0 - 1e-9, kernels.INVERTED_BOX),
             (4, 1.0 - 1e-12, kernels.INVERTED_BOX), (3, 1e300, 0), (2, -1e300, 0)]
    for column, value, flag in cases:
        rois = good.clone()
        rois[0, column] = value
        found = 0
        for word in kernels.invalid_box_flags(rois.to(device), 3).tolist():
            found |= word
        assert found == flag, (column, value)
        outcomes = []
        for with_kernel in (True, False):
            try:
                check_box_values(rois.to(device), (3, 1, 7, 7), with_kernel=with_kernel)
                outcomes.append(None)
            except ValueError as error:
                outcomes.append(str(error))
        assert outcomes[0] == outcomes[1] and (outcomes[0] is None) == (flag == 0), (column, value, outcomes)
