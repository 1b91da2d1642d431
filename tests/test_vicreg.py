"""VICReg variance and covariance: the reference against float64 formulas, the Triton kernels against float64.

Under Triton's interpreter (no GPU) only the cheap shapes run; the full grid of the issue runs on CUDA.
"""

import struct

import pytest
import torch

import fastdense.ops as ops
from fastdense.kernels import vicreg as kernels
from fastdense.ops.vicreg import vicreg_covariance_reference, vicreg_variance_reference

HAS_CUDA = torch.cuda.is_available()
ROWS = (2, 3, 17, 256, 1000)
COLUMNS = (1, 2, 31, 512, 1025)
# Multiply-add tiles of the covariance products, in the interpreter's 64-wide blocks.
INTERPRETER_TILE_BUDGET = 20


def _tiles(n: int, dim: int) -> int:
    side, inner = min(n, dim), max(n, dim)
    return ((side + 63) // 64) ** 2 * ((inner + 63) // 64)


def _float64_terms(x: torch.Tensor, eps: float = 1e-4):
    """Variance hinge and covariance penalty from their definitions, slot by slot, in float64."""
    x = x.double()
    slots = x if x.dim() == 3 else x[:, None]
    n, num_slots, dim = slots.shape
    variances, covariances = [], []
    for s in range(num_slots):
        column = slots[:, s]
        centred = column - column.mean(dim=0)
        var = (centred * centred).sum(dim=0) / (n - 1)
        variances.append(torch.clamp(1 - torch.sqrt(var + eps), min=0).mean())
        cov = torch.einsum("na,nb->ab", centred, centred) / (n - 1)
        off = cov * (1 - torch.eye(dim, dtype=torch.float64, device=cov.device))
        covariances.append((off * off).sum() / dim)
    return torch.stack(variances).mean(), torch.stack(covariances).mean()


def _float64_gradient(x: torch.Tensor, weight_var: float, weight_cov: float, eps: float = 1e-4) -> torch.Tensor:
    x = x.detach().double().requires_grad_(True)
    variance, covariance = _float64_terms(x, eps)
    return torch.autograd.grad(weight_var * variance + weight_cov * covariance, x)[0]


def _spread(*shape, dtype=torch.float32, device="cpu", seed=0):
    """Random input whose columns range from collapsed (std 0.3, hinge active) to spread (std 1.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(0.3, 1.5, shape[-1], dtype=torch.float64) + 0.7
    return x.to(device=device, dtype=dtype)


def _assert_rel(out, ref, tol, what, rounding_dtype=None):
    """``‖out − ref‖ ≤ tol ‖ref‖``; plus, given ``rounding_dtype``, the error of ``ref`` rounded to it:
    a float16 gradient of 1e-6 entries sits among subnormals 6e-8 apart, a floor no kernel goes below."""
    out, ref = torch.as_tensor(out).double().cpu(), torch.as_tensor(ref).double().cpu()
    err = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    floor = 0.0 if rounding_dtype is None else torch.linalg.vector_norm(ref.to(rounding_dtype).double() - ref).item()
    assert err <= tol * scale + floor + 1e-12, f"{what}: relative error {err / max(scale, 1e-300):.3g} > {tol} (+ rounding {floor / max(scale, 1e-300):.3g})"


# Products run in TF32 (operands rounded explicitly, so the interpreter computes the same numbers):
# CONVENTIONS' 1e-3 for TF32 kernels; the loss itself stays near 5e-5. Half-precision gradients
# are stored in their dtype.
LOSS_TOL = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def _check_triton(x: torch.Tensor, weights=(1.0, 0.5), eps: float = 1e-4):
    """Triton loss and gradient against float64 on the same (already rounded) input values."""
    ref_var, ref_cov = _float64_terms(x, eps)
    ref_grad = _float64_gradient(x, *weights, eps=eps)
    x = x.detach().requires_grad_(True)
    with ops.backend("triton"):
        variance, covariance = ops.vicreg_variance_covariance(x, eps=eps)
    (weights[0] * variance + weights[1] * covariance).backward()
    dtype = x.dtype
    _assert_rel(variance, ref_var, LOSS_TOL[dtype], "variance")
    _assert_rel(covariance, ref_cov, LOSS_TOL[dtype], "covariance")
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    _assert_rel(x.grad, ref_grad, GRAD_TOL[dtype], "gradient", rounding_dtype=dtype)


# ----------------------------------------------------------------------------- reference vs float64


@pytest.mark.parametrize("shape", [(2, 1), (3, 7), (17, 31), (40, 5), (9, 4, 6)])
def test_reference_matches_float64_definition(shape):
    x = _spread(*shape, dtype=torch.float64).requires_grad_(True)
    variance, covariance = ops.vicreg_variance_covariance(x)
    ref_var, ref_cov = _float64_terms(x.detach())
    _assert_rel(variance, ref_var, 1e-13, "variance")
    _assert_rel(covariance, ref_cov, 1e-13, "covariance")
    (variance + 0.5 * covariance).backward()
    _assert_rel(x.grad, _float64_gradient(x, 1.0, 0.5), 1e-12, "gradient")
    assert ops.vicreg_variance(x.detach()).item() == pytest.approx(variance.item())
    assert ops.vicreg_covariance(x.detach()).item() == pytest.approx(covariance.item())


def test_reference_float32_on_the_issue_grid():
    """The CPU path (the reference) in float32, loss and gradient, at every n x D of the issue."""
    for n in ROWS:
        for dim in COLUMNS:
            x = _spread(n, dim, seed=n + dim).requires_grad_(True)
            variance, covariance = ops.vicreg_variance_covariance(x)
            (variance + 0.5 * covariance).backward()
            ref_var, ref_cov = _float64_terms(x.detach())
            _assert_rel(variance, ref_var, 1e-5, f"variance n={n} D={dim}")
            _assert_rel(covariance, ref_cov, 1e-5, f"covariance n={n} D={dim}")
            _assert_rel(x.grad, _float64_gradient(x, 1.0, 0.5), 1e-5, f"gradient n={n} D={dim}")


def test_reference_known_values():
    x = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    # var = [2, 2, 0]: hinge = [0, 0, 1 - sqrt(eps)]; cov off-diagonal = 2 at (0,1) and (1,0).
    assert ops.vicreg_variance(x, eps=1e-4).item() == pytest.approx((1 - 0.01) / 3)
    assert ops.vicreg_covariance(x).item() == pytest.approx(8.0 / 3)
    assert ops.vicreg_invariance(x, torch.zeros_like(x)).item() == pytest.approx(4.0 / 6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 2e-2)])
def test_reference_covariance_does_not_cancel(dtype, tol):
    # One column's std 1000 times the others': the off-diagonal sum is about 1e-6 of the diagonal's,
    # so "all squares minus the diagonal's" in float32 leaves nothing of it.
    x = (_spread(256, 8) * torch.tensor([1000.0] + [1.0] * 7)).to(dtype)
    _assert_rel(ops.vicreg_covariance(x), _float64_terms(x)[1], tol, "covariance")


@pytest.mark.parametrize("shape", [(6, 11), (9, 4, 6)])
def test_reference_matches_lightly(shape):
    # lightly is the dev extra's oracle (installed by scripts/install.sh); its terms take [n, ..., D].
    lightly_vicreg = pytest.importorskip("lightly.loss.vicreg_loss")
    x = _spread(*shape, dtype=torch.float64)
    y = _spread(*shape, dtype=torch.float64, seed=1)
    _assert_rel(ops.vicreg_variance(x), lightly_vicreg.variance_loss(x, eps=1e-4), 1e-12, "variance")
    _assert_rel(ops.vicreg_covariance(x), lightly_vicreg.covariance_loss(x), 1e-12, "covariance")
    _assert_rel(ops.vicreg_invariance(x, y), lightly_vicreg.invariance_loss(x, y), 1e-12, "invariance")


def test_reference_gradcheck():
    x = _spread(5, 2, 3, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.vicreg_variance_covariance(t, eps=1e-3), (x,))


# ----------------------------------------------------------------------------- Triton vs float64

CHEAP = [(n, d) for n in ROWS for d in COLUMNS if _tiles(n, d) <= INTERPRETER_TILE_BUDGET]


@pytest.mark.parametrize("n, dim", CHEAP)
def test_triton_float32_matches_float64(n, dim, device):
    _check_triton(_spread(n, dim, device=device, seed=n * 7 + dim))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n, dim", [(3, 31), (256, 2), (17, 512)])
def test_triton_other_dtypes_match_float64(n, dim, dtype, device):
    _check_triton(_spread(n, dim, dtype=dtype, device=device, seed=dim))


@pytest.mark.parametrize("shape", [(17, 5, 31), (70, 3, 12), (2, 4, 1)])
def test_triton_per_slot_matches_float64(shape, device):
    _check_triton(_spread(*shape, device=device))


# Triton's interpreter warns (numpy) on the non-finite values these tests feed it on purpose.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_triton_non_finite_input_gives_nan_like_the_reference(value, device):
    # The hinge's max(1 - std, 0) must propagate NaN: Triton's default maximum returns 0 for a NaN
    # std, which hid NaN/Inf features behind a finite variance loss.
    x = _spread(6, 5, device=device)
    x[2, 1] = value
    with ops.backend("triton"):
        variance = ops.vicreg_variance(x)
        both = ops.vicreg_variance_covariance(x)
    assert vicreg_variance_reference(x.cpu()).isnan()
    assert variance.isnan() and both[0].isnan() and both[1].isnan()


@pytest.mark.parametrize("layout", ["transposed", "strided_slots", "sliced_columns"])
def test_triton_non_contiguous_input(layout, device):
    if layout == "transposed":
        x = _spread(40, 23, device=device).t().contiguous().t()
    elif layout == "strided_slots":
        x = _spread(3, 9, 20, device=device).permute(2, 0, 1)  # [20, 3, 9], no unit stride on the last axis
    else:
        x = _spread(19, 80, device=device)[:, 5:70:2]
    assert not x.is_contiguous()
    _check_triton(x)


@pytest.mark.parametrize("n, dim", [(70, 100), (100, 70)])
def test_triton_backward_recomputes_in_chunks(n, dim, device, monkeypatch):
    # With no room to keep A·Aᵀ, the backward recomputes it 64 rows at a time (two chunks here; the
    # budget is read when the chunks are cut, not when the module is imported).
    monkeypatch.setattr(kernels, "SAVED_PRODUCT_BYTES", 64 * 100 * 4)
    monkeypatch.setattr(kernels, "SAVED_PRODUCT_FRACTION", 0.0)
    applies = _RecordLaunches(kernels._apply_product_kernel)
    monkeypatch.setattr(kernels, "_apply_product_kernel", applies)
    _check_triton(_spread(n, dim, device=device))
    assert len(applies.launches) == 2


@pytest.mark.parametrize("eps", [1e-4, 0.0, 0.5, 1e-30, 3.0e-7])
def test_eps_reaches_the_kernels_in_float64(eps):
    # Triton passes a Python float as float32: the kernels get eps as two float32 halves whose sum
    # in float64 is eps to 1e-14 of itself (float32 alone moves 1e-4 by 2.5e-12).
    as_float32 = lambda value: struct.unpack("f", struct.pack("f", value))[0]  # noqa: E731
    hi, lo = kernels.eps_halves(eps)
    assert as_float32(hi) == hi
    assert abs(hi + as_float32(lo) - eps) <= 1e-14 * eps


@pytest.mark.parametrize("eps", [0.1, 1 / 3])
@pytest.mark.parametrize("shape", [(9, 12), (12, 2, 5)])
def test_triton_float64_takes_eps_in_float64(eps, shape, device):
    # The caller's eps, not the default, reaches the kernels' forward and backward (Gram and direct
    # form, both terms and the variance alone), in float64: 0.1 and 1/3 are not float32 numbers.
    x = _spread(*shape, dtype=torch.float64, device=device, seed=3)
    _check_triton(x, eps=eps)
    with ops.backend("triton"):
        _assert_rel(ops.vicreg_variance(x, eps=eps), _float64_terms(x, eps)[0], LOSS_TOL[torch.float64], "variance alone")


def test_saved_product_budget(monkeypatch):
    """Kept: up to 12 MiB, or up to a quarter of x (in float32) when that is more."""
    monkeypatch.setattr(kernels, "_tile_config", lambda x: (128, 128, 32, 8, 3, True))  # the GPU's 128-wide tiles
    target, local, wide = torch.empty(2048, 1, 8192), torch.empty(2048, 49, 512), torch.empty(4096, 1, 8192)
    assert kernels.packed_product_shape(target, 2048) == (1, 136, 128, 128) and kernels.packed_product_fits(target, 2048)  # 8.5 MiB
    assert kernels.packed_product_shape(local, 512) == (49, 10, 128, 128) and kernels.packed_product_fits(local, 512)  # 31 of 49 MiB
    assert not kernels.packed_product_fits(wide, 4096)  # 33 MiB, a quarter of x is 32


def _interpreter_tiles(monkeypatch):
    """On a GPU too, the tile sizes of the interpreter, which the shapes of a test count tiles in
    (the GPU's own are in test_triton_gpu_tile_sizes)."""
    if HAS_CUDA:
        monkeypatch.setattr(kernels, "_tile_config", lambda x: kernels.tiles_for(x.dtype, on_gpu=False))
        monkeypatch.setattr(kernels, "_apply_blocks", lambda x: kernels.tiles_for(x.dtype, on_gpu=False)[:3])


@pytest.mark.parametrize("shape, dtype", [((150, 190), torch.float32), ((190, 150), torch.float32), ((130, 2, 140), torch.float32), ((70, 90), torch.float64)])
def test_triton_backward_reads_the_packed_product(shape, dtype, device, monkeypatch):
    # Three tiles a side: the backward reads tiles left of the diagonal transposed, the rest as
    # stored, and computes no product of its own.
    _interpreter_tiles(monkeypatch)
    x = _spread(*shape, dtype=dtype, device=device)
    x3 = x if x.dim() == 3 else x[:, None]
    side = min(x3.shape[0], x3.shape[2])
    assert kernels.packed_product_shape(x3, side)[1] == 6 and kernels.packed_product_fits(x3, side)
    calls = []
    product_tile_squares = kernels.product_tile_squares
    monkeypatch.setattr(kernels, "product_tile_squares", lambda *a, **k: calls.append(k.get("product")) or product_tile_squares(*a, **k))
    _check_triton(x)
    assert len(calls) == 1 and calls[0].shape == kernels.packed_product_shape(x3, side), "forward keeps the tiles, backward reuses them"


@pytest.mark.parametrize("shape", [(300, 320), (320, 300)])
def test_triton_gpu_tile_sizes(shape, device, monkeypatch):
    # The GPU's 128-wide tiles with 32-deep (product) and 16-deep (backward) steps: the backward
    # walks each packed tile in several steps (the interpreter's own 64-wide tiles take one), left
    # of the diagonal and right of it.
    if not HAS_CUDA:
        monkeypatch.setattr(kernels, "_tile_config", lambda x: (128, 128, 32, 8, 3, True))
        monkeypatch.setattr(kernels, "_apply_blocks", lambda x: tuple(kernels.GPU_APPLY_BLOCKS.values()))
    x = _spread(*shape, device=device)
    assert kernels.packed_product_shape(x[:, None], min(shape))[1:] == (6, 128, 128)
    _check_triton(x)


class _RecordLaunches:
    """Wraps a ``@triton.jit`` kernel: records each launch's keyword arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("shape, even", [((192, 256), True), ((256, 192), True), ((128, 3, 64), True), ((190, 256), False), ((192, 250), False)])
def test_triton_even_tiles_drop_the_masks(shape, even, device, monkeypatch):
    # Blocks that divide the shape take the unmasked loads; anything else keeps them. Same results.
    _interpreter_tiles(monkeypatch)
    products = _RecordLaunches(kernels._product_tiles_kernel)
    applies = _RecordLaunches(kernels._apply_product_kernel)
    monkeypatch.setattr(kernels, "_product_tiles_kernel", products)
    monkeypatch.setattr(kernels, "_apply_product_kernel", applies)
    _check_triton(_spread(*shape, device=device))
    assert [launch["EVEN"] for launch in products.launches] == [even]
    assert [launch["EVEN"] for launch in applies.launches] == [even]


@pytest.mark.parametrize("shape, recompute", [((70, 300), False), ((300, 70), False), ((90, 2, 200), False), ((70, 300), True), ((300, 70), True)])
def test_triton_inner_splits(shape, recompute, device, monkeypatch):
    # Fewer tiles than multiprocessors and a long inner axis: each tile's inner axis is cut into ranges
    # (the last one partial here), summed by separate programs and added up in order by a second
    # launch; in the forward (packed product kept) and in the backward's chunked recompute (dense rows).
    if not HAS_CUDA:
        monkeypatch.setattr(kernels, "INTERPRETER_MULTIPROCESSORS", 16)
    monkeypatch.setattr(kernels, "SPLIT_MIN_INNER", 128)
    monkeypatch.setattr(kernels, "SPLIT_MIN_DEPTH", 64)
    if recompute:
        monkeypatch.setattr(kernels, "SAVED_PRODUCT_BYTES", 64 * 70 * 4)  # 64 rows of the 70x70 product at a time
        monkeypatch.setattr(kernels, "SAVED_PRODUCT_FRACTION", 0.0)
    combines = _RecordLaunches(kernels._combine_splits_kernel)
    monkeypatch.setattr(kernels, "_combine_splits_kernel", combines)
    _check_triton(_spread(*shape, device=device))
    assert len(combines.launches) == (3 if recompute else 1)  # the forward, then each of two row chunks


def test_triton_even_tiles_last_inner_split_stops_at_the_data(device, monkeypatch):
    # Blocks that divide the shape take unmasked loads, and 12 multiprocessors over the Gram form's 3
    # active tiles cut the 320-long inner axis into 128 + 128 + 64: the last range must end at 320,
    # not read 64 columns past each row.
    _interpreter_tiles(monkeypatch)
    monkeypatch.setattr(kernels, "multiprocessors", lambda device: 12)
    monkeypatch.setattr(kernels, "SPLIT_MIN_INNER", 128)
    monkeypatch.setattr(kernels, "SPLIT_MIN_DEPTH", 64)
    cuts = []
    inner_splits = kernels.inner_splits
    monkeypatch.setattr(kernels, "inner_splits", lambda *args: cuts.append(inner_splits(*args)) or cuts[-1])
    products = _RecordLaunches(kernels._product_tiles_kernel)
    monkeypatch.setattr(kernels, "_product_tiles_kernel", products)
    _check_triton(_spread(128, 320, device=device))
    assert cuts[0] == (3, 128)
    assert products.launches[0]["EVEN"] and products.launches[0]["SPLIT"]


def test_inner_splits_fill_the_gpu(monkeypatch):
    """On an H100 (132 multiprocessors) with 128x128x32 float32 tiles."""
    def splits(side_a, side_b, inner, symmetric=True):
        active = side_a * (side_a + 1) // 2 if symmetric else side_a * side_b
        return kernels.inner_splits(active, side_a * side_b, inner, 32, 128 * 128 * 4, torch.device("cpu"))

    monkeypatch.setattr(kernels, "INTERPRETER_MULTIPROCESSORS", 132)
    assert splits(2, 2, 8192) == (32, 256)  # n 256, D 8192: 96 programs instead of 3
    assert splits(4, 4, 8192) == (12, 704)  # n 512: the split sums' 12 MiB budget binds
    assert splits(8, 8, 8192) == (3, 2752)  # n 1024
    assert splits(2, 16, 8192, symmetric=False) == (4, 2048)  # one rank's 256 rows against 2048 gathered ones
    assert splits(16, 16, 8192) == (1, 8192)  # n 2048: already more tiles than multiprocessors
    assert splits(2, 2, 512) == (1, 512)  # too short to be worth a second launch


@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_triton_float32_precision_modes_reach_1e5(precision, device, monkeypatch):
    monkeypatch.setattr(kernels, "FP32_DOT_PRECISION", precision)
    x = _spread(150, 80, device=device)  # direct form: n >= D
    for sample in (x, x[:40].clone()):  # and the Gram form
        ref_var, ref_cov = _float64_terms(sample)
        ref_grad = _float64_gradient(sample, 1.0, 0.5)
        xg = sample.clone().requires_grad_(True)
        with ops.backend("triton"):
            variance, covariance = ops.vicreg_variance_covariance(xg)
        (variance + 0.5 * covariance).backward()
        _assert_rel(variance, ref_var, 1e-5, "variance")
        _assert_rel(covariance, ref_cov, 1e-5, "covariance")
        _assert_rel(xg.grad, ref_grad, 1e-5, "gradient")


def test_triton_single_terms_and_saved_product(device):
    x = _spread(30, 50, device=device)
    ref_var, ref_cov = _float64_terms(x)
    with ops.backend("triton"):
        _assert_rel(ops.vicreg_variance(x), ref_var, LOSS_TOL[torch.float32], "variance")
        _assert_rel(ops.vicreg_covariance(x), ref_cov, LOSS_TOL[torch.float32], "covariance")
    # variance alone: the gradient path without a product
    xg = x.clone().requires_grad_(True)
    with ops.backend("triton"):
        ops.vicreg_variance(xg).backward()
    _assert_rel(xg.grad, _float64_gradient(x, 1.0, 0.0), GRAD_TOL[torch.float32], "variance gradient")


def test_triton_gradcheck_custom_autograd(device):
    with ops.backend("triton"):
        for shape in [(3, 4), (4, 2, 2)]:  # Gram form, then direct form per slot
            x = _spread(*shape, dtype=torch.float64, device=device).requires_grad_(True)
            assert torch.autograd.gradcheck(lambda t: ops.vicreg_variance_covariance(t, eps=1e-3), (x,))


@pytest.mark.parametrize(
    "shape, with_covariance, dtype",
    [((9, 2, 12), True, torch.float32), ((12, 1, 5), True, torch.float32), ((12, 1, 5), False, torch.float32), ((9, 2, 12), True, torch.float64), ((12, 1, 5), True, torch.bfloat16)],
)
def test_opcheck_triton(device, shape, with_covariance, dtype):
    """The custom op (torch.compile's and tracing's path, on [n, S, D]): schema, fake shapes and
    dtypes (float64 accumulates in float64, half precision in float32), autograd registration."""
    x = _spread(*shape, dtype=dtype, device=device).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastdense.vicreg_variance_covariance, (x, 1e-4, with_covariance))


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (9, 3, 12)])
def test_eager_path_equals_the_custom_op(shape, device):
    """Plain eager calls skip the custom ops' Python layers (an autograd.Function over the same
    launchers): same loss and gradient, bit for bit."""
    x = _spread(*shape, device=device)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with ops.backend("triton"):
        variance, covariance = ops.vicreg_variance_covariance(xe)
    assert type(variance.grad_fn).__name__ == "_EagerTritonVarianceCovarianceBackward"
    (25 * variance + covariance).backward()
    slots = xc if xc.dim() == 3 else xc.unsqueeze(1)
    op_variance, op_covariance, *_ = torch.ops.fastdense.vicreg_variance_covariance(slots, 1e-4, True)
    (25 * op_variance + op_covariance).backward()
    assert torch.equal(variance, op_variance) and torch.equal(covariance, op_covariance)
    assert torch.equal(xe.grad, xc.grad)


def test_triton_under_torch_compile(device):
    x = _spread(12, 20, device=device)

    def loss(t):
        variance, covariance = ops.vicreg_variance_covariance(t)
        return 25 * variance + covariance

    with ops.backend("triton"):
        compiled = torch.compile(loss, backend="aot_eager")
        xc = x.clone().requires_grad_(True)
        out = compiled(xc)
        out.backward()
        xe = x.clone().requires_grad_(True)
        expected = loss(xe)
        expected.backward()
    _assert_rel(out, expected, 1e-6, "compiled loss")
    _assert_rel(xc.grad, xe.grad, 1e-6, "compiled gradient")


def test_triton_under_autocast(device):
    layer = torch.nn.Linear(16, 24).to(device)
    x = torch.randn(10, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16), ops.backend("triton"):
        y = layer(x)
        variance, covariance = ops.vicreg_variance_covariance(y)
    assert y.dtype == torch.bfloat16 and variance.dtype == torch.float32
    (variance + covariance).backward()
    ref_var, ref_cov = _float64_terms(y.detach())
    _assert_rel(covariance, ref_cov, 1e-4, "covariance")
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_triton_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(8, 3, 5)
        outputs = torch.ops.fastdense.vicreg_variance_covariance(x, 1e-4, True)
    assert outputs[0].shape == () and outputs[2].shape == (3, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, dim", [(n, d) for n in ROWS for d in COLUMNS])
def test_triton_full_grid_cuda(n, dim, dtype):
    _check_triton(_spread(n, dim, dtype=dtype, device="cuda", seed=n + dim))


@pytest.mark.gpu
@pytest.mark.parametrize("n, dim", [(2048, 8192), (4096, 512)])
def test_triton_large_cuda_error_and_memory(n, dim):
    x = _spread(n, dim, device="cuda")
    ref_var, ref_cov = _float64_terms(x)
    x.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with ops.backend("triton"):
        variance, covariance = ops.vicreg_variance_covariance(x)
        (variance + covariance).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - x.numel() * 4  # the gradient itself is not extra
    assert extra <= 16 << 20, f"extra memory {extra / 2**20:.1f} MiB"
    _assert_rel(variance, ref_var, 1e-3, "variance")
    _assert_rel(covariance, ref_cov, 1e-3, "covariance")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.zeros(5), ValueError, r"\[n, D\] or \[n, S, D\]"),
        (torch.zeros(2, 2, 2, 2), ValueError, r"\[n, D\] or \[n, S, D\]"),
        (torch.zeros(4, 3, dtype=torch.int64), TypeError, "floating-point"),
        (torch.zeros(1, 3), ValueError, "n >= 2"),
        (torch.zeros(4, 0), ValueError, "at least one"),
        (torch.zeros(4, 0, 3), ValueError, r"at least one slot.*\[4, 0, 3\]"),
        (torch.zeros(4, 2, 0), ValueError, r"at least one slot.*\[4, 2, 0\]"),
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(bad, error, match):
    for fn in (ops.vicreg_variance, ops.vicreg_covariance, ops.vicreg_variance_covariance):
        with pytest.raises(error, match=match):
            fn(bad)


@pytest.mark.parametrize("eps", [-1.0, -1e-30, float("nan"), True, "1e-4", None])
def test_bad_eps_is_rejected(eps):
    # Non-negative numbers only: a bool is an int to isinstance, and NaN compares false with 0.
    for fn in (ops.vicreg_variance, ops.vicreg_variance_covariance):
        with pytest.raises(ValueError, match="eps must be a non-negative number"):
            fn(torch.zeros(4, 3), eps=eps)


@pytest.mark.parametrize("eps", [0, 0.0])
def test_eps_zero_is_accepted(eps):
    # eps = 0 is the plain hinge relu(1 - std): allowed, and exactly the float64 definition.
    x = _spread(7, 5, dtype=torch.float64)
    ref_var, ref_cov = _float64_terms(x, eps=0.0)
    _assert_rel(ops.vicreg_variance(x, eps=eps), ref_var, 1e-13, "variance")
    variance, covariance = ops.vicreg_variance_covariance(x, eps=eps)
    _assert_rel(variance, ref_var, 1e-13, "variance")
    _assert_rel(covariance, ref_cov, 1e-13, "covariance")


def test_bad_invariance_arguments():
    with pytest.raises(ValueError, match="same shape"):
        ops.vicreg_invariance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same device"):
        ops.vicreg_invariance(torch.zeros(4, 3), torch.zeros(4, 3, device="meta"))
    with pytest.raises(TypeError, match="floating-point"):
        ops.vicreg_invariance(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"at least one element.*\[0, 3\]"):
        ops.vicreg_invariance(torch.zeros(0, 3), torch.zeros(0, 3))


def test_forcing_an_absent_backend_is_an_error():
    with ops.backend("cpp"), pytest.raises(RuntimeError, match="no cpp implementation"):
        ops.vicreg_variance_covariance(torch.zeros(4, 3))


# ----------------------------------------------------------------------------- sm_90 lowering

_SM90_COMPILE_SCRIPT = r"""
import triton.language as tl
from benchmarks.sm90 import compile_for_sm90, spill_bytes
from fastdense.kernels import vicreg as kernels

def types(pointers, ints, floats=()):
    return {p: "*fp32" for p in pointers} | {i: "i32" for i in ints} | {f: "fp32" for f in floats}

block_m, block_n, block_k, warps, stages = 128, 128, 32, 8, 3  # _tile_config on a GPU, float32
common = dict(ACC=tl.float32, USE_DOT=True, DOT_PRECISION="tf32", ROUND_TF32=True, MEAN_ON_ROWS=False)
products = ["a_ptr", "b_ptr", "mean_ptr", "partial_ptr", "product_ptr", "split_ptr"]
product_ints = ["rows_a", "rows_b", "inner", "row_offset", "mean_s", "splits", "split_depth", "sa_s", "sa_r", "sa_k", "sb_s", "sb_r", "sb_k", "sp_s", "sp_r", "sp_c"]
for packed, even, split in ((True, True, False), (False, False, False), (True, True, True)):
    constants = dict(common, SYMMETRIC=True, MASK_DIAGONAL=False, STORE_PRODUCT=True, PACKED=packed, SPLIT=split, EVEN=even, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    compiled = compile_for_sm90(kernels._product_tiles_kernel, types(products, product_ints), constants, num_warps=warps, num_stages=stages)
    assert "wgmma" in compiled.asm["ptx"] and spill_bytes(compiled) == 0, "product tiles: no tensor-core MMA, or spills"
combine = types(["split_ptr", "partial_ptr", "product_ptr"], ["splits", "rows_a", "rows_b", "row_offset", "sp_s", "sp_r", "sp_c"])
for packed in (True, False):
    constants = dict(SYMMETRIC=True, MASK_DIAGONAL=False, STORE_PRODUCT=True, PACKED=packed, BLOCK_M=block_m, BLOCK_N=block_n, ACC=tl.float32)
    assert spill_bytes(compile_for_sm90(kernels._combine_splits_kernel, combine, constants, num_warps=warps)) == 0, "combine: spills"
applies = ["a_ptr", "b_ptr", "product_ptr", "mean_ptr", "sumsq_ptr", "grad_variance_ptr", "grad_covariance_ptr", "out_ptr"]
apply_ints = ["rows_a", "rows_b", "inner", "row_offset", "mean_s", "batch_rows", "dim", "sa_s", "sa_r", "sa_k", "sb_s", "sb_r", "sb_k", "sp_s", "sp_r", "sp_c", "so_s", "so_r", "so_k"]
for packed_block, even in ((block_m, True), (0, False)):
    constants = dict(common, HAS_PRODUCT=True, PACKED_BLOCK=packed_block, EVEN=even, **kernels.GPU_APPLY_BLOCKS)
    compiled = compile_for_sm90(kernels._apply_product_kernel, types(applies, apply_ints, ['eps_hi', 'eps_lo']), constants, num_warps=warps, num_stages=stages)
    assert "wgmma" in compiled.asm["ptx"] and spill_bytes(compiled) == 0, "apply: no tensor-core MMA, or spills"
finish = types(["partial_ptr", "sumsq_ptr", "hinge_ptr", "out_ptr"], ["tiles", "slots_dim", "batch_rows"])
for gram in (True, False):
    assert compile_for_sm90(kernels._finish_forward_kernel, finish, dict(WITH_COVARIANCE=True, GRAM=gram, BLOCK=1024), num_warps=4).asm["cubin"]
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernels run for real in the tests above")
def test_kernels_compile_for_h100():
    """The GPU configuration of the product and apply kernels lowers to sm_90 tensor-core code
    without register spills, and the finishing kernel's float64 sums lower too (see benchmarks/sm90.py)."""
    from benchmarks.sm90 import run_compile_script

    result = run_compile_script(_SM90_COMPILE_SCRIPT)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(HAS_CUDA, reason="counts the launches of the CPU run, whose kernels are stubbed")
def test_host_work_per_call(tmp_path):
    """``bench_vicreg.py --host``: a forward is three launches (column statistics, product tiles,
    the finishing sums), a forward+backward four, with few aten ops around them. Counts, not times."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FASTDENSE_BENCH_OUT=str(tmp_path), PYTHONPATH=str(root))
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_vicreg.py"), "--host", "--quick"], env=env, check=True, capture_output=True, timeout=300)
    (row,) = json.loads(next(tmp_path.glob("vicreg_host_quick_*.json")).read_text())["rows"]
    assert (row["fwd_launches"], row["fwdbwd_launches"]) == (3, 4)
    assert row["fwd_aten_ops"] <= 25 and row["fwdbwd_aten_ops"] <= 50, row
