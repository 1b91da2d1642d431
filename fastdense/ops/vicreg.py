"""VICReg's three terms (Bardes et al.): invariance, variance hinge and covariance penalty."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from fastdense.ops._dispatch import plain_eager, resolve
from fastdense.ops._validate import check_same_device, check_tensor


def vicreg_invariance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean((x - y)^2)`` over every element, for ``x`` and ``y`` of the same shape.

    One PyTorch op (``F.mse_loss``) on every device: there is no kernel of its own, so a backend
    forced with :func:`fastdense.ops.backend` or ``FASTDENSE_BACKEND`` does not change it (nor raise).

    >>> import torch, fastdense.ops as ops
    >>> float(ops.vicreg_invariance(torch.zeros(2, 3), torch.full((2, 3), 2.0)))
    4.0
    """
    check_tensor(x, "x", "[n, D] or [n, S, D]", dims=(2, 3))
    check_tensor(y, "y", "the shape of x", dims=(2, 3))
    check_same_device("x", x, "y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {list(x.shape)} and {list(y.shape)}")
    if x.numel() == 0:  # the mean of nothing: NaN, which would reach the loss unannounced
        raise ValueError(f"x and y need at least one element to compare, got shape {list(x.shape)}")
    return F.mse_loss(x, y)


def _reference_dtype(x: torch.Tensor) -> torch.Tensor:
    # Half-precision inputs are reduced in float32, like the Triton kernels: a covariance sum of
    # squares overflows float16 easily.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def vicreg_variance_reference(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Reference variance hinge (the specification; see :func:`vicreg_variance`)."""
    x = _reference_dtype(x)
    std = torch.sqrt(x.var(dim=0, unbiased=True) + eps)
    return F.relu(1 - std).mean()


def vicreg_covariance_reference(x: torch.Tensor) -> torch.Tensor:
    """Reference covariance penalty (the specification; see :func:`vicreg_covariance`)."""
    x = _reference_dtype(x)
    n, dim = x.shape[0], x.shape[-1]
    slots = x.reshape(n, -1, dim).transpose(0, 1)  # [S, n, D]
    centred = slots - slots.mean(dim=1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (n - 1)  # [S, D, D]
    # Zero the diagonal rather than subtract its squares from the total: when one column's variance
    # dominates, ‖cov‖² − Σ diag² cancels to nothing in float32.
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
    return (off_diagonal.pow(2).sum(dim=(1, 2)) / dim).mean()


# ----------------------------------------------------------------------------- Triton, as custom ops


def _as_slots(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 2 else x


def _saved_product_shape(x: torch.Tensor):
    """Shape of the packed ``A Aᵀ`` tiles the forward keeps for the backward, or None when they
    would not fit the memory budget (the backward then recomputes the product)."""
    from fastdense.kernels import vicreg as kernels

    n, slots, dim = x.shape
    side = n if kernels.use_gram_form(n, dim) else dim
    return kernels.packed_product_shape(x, side) if kernels.packed_product_fits(x, side) else None


def _operand(x: torch.Tensor):
    from fastdense.kernels import vicreg as kernels

    return kernels.Operand(x, transposed=not kernels.use_gram_form(x.shape[0], x.shape[2]))


def _triton_forward(x: torch.Tensor, eps: float, with_covariance: bool):
    """Triton forward on ``x [n, S, D]``: ``(variance, covariance, mean, sumsq, product)``; the last
    three are kept for the backward (``product`` is empty unless ``A Aᵀ`` is small enough to keep)."""
    from fastdense.kernels import vicreg as kernels
    from fastdense.kernels._launch import on_device_of

    with on_device_of(x):
        mean, sumsq, hinge = kernels.column_stats(x, eps)
        a = _operand(x)
        product, partial = None, None
        if with_covariance:
            saved_shape = _saved_product_shape(x)
            if saved_shape is not None:
                product = torch.empty(saved_shape, device=x.device, dtype=mean.dtype)
            partial = kernels.product_tile_squares(a, a, mean, symmetric=True, product=product)
        variance, covariance = kernels.finish_forward(partial, sumsq, hinge, x.shape[0], gram=not a.transposed).unbind()
    return variance, covariance, mean, sumsq, product if product is not None else x.new_empty(0, dtype=mean.dtype)


def _triton_backward(x, mean, sumsq, product, grad_variance, grad_covariance, eps: float, with_covariance: bool) -> torch.Tensor:
    """``∂L/∂x`` for ``x [n, S, D]`` from the forward's kept tensors and the two terms' gradients."""
    from fastdense.kernels import vicreg as kernels

    a = _operand(x)
    terms = kernels.GradientTerms(sumsq, grad_variance, grad_covariance, x.shape[0], eps)
    grad = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    out = kernels.Operand(grad, a.transposed)
    if not with_covariance:
        kernels.apply_product(a, None, None, mean, terms, out)
    else:
        kernels.covariance_gradient(a, a, product if product.numel() else None, mean, terms, out)
    return grad


# The custom ops serve torch.compile, tracing, tensor subclasses and functorch transforms; eager calls
# on plain tensors (the training loop's case) take _EagerTritonVarianceCovariance to the same code.
@torch.library.custom_op("fastdense::vicreg_variance_covariance", mutates_args=())
def _variance_covariance_op(x: torch.Tensor, eps: float, with_covariance: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    variance, covariance, mean, sumsq, product = _triton_forward(x, eps, with_covariance)
    # A custom op's outputs may not share storage: the scalars and the statistics are views of one buffer each.
    return variance.clone(), covariance.clone(), mean.clone(), sumsq.clone(), product


@_variance_covariance_op.register_fake
def _(x, eps, with_covariance):
    n, slots, dim = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    saved_shape = _saved_product_shape(x) if with_covariance else None
    product = x.new_empty(saved_shape if saved_shape is not None else (0,), dtype=acc)
    scalar = x.new_empty((), dtype=acc)
    return scalar, scalar.clone(), x.new_empty(slots, dim, dtype=acc), x.new_empty(slots, dim, dtype=acc), product


@torch.library.custom_op("fastdense::vicreg_variance_covariance_backward", mutates_args=())
def _variance_covariance_backward_op(
    x: torch.Tensor, mean: torch.Tensor, sumsq: torch.Tensor, product: torch.Tensor,
    grad_variance: torch.Tensor, grad_covariance: torch.Tensor, eps: float, with_covariance: bool,
) -> torch.Tensor:
    return _triton_backward(x, mean, sumsq, product, grad_variance, grad_covariance, eps, with_covariance)


@_variance_covariance_backward_op.register_fake
def _(x, mean, sumsq, product, grad_variance, grad_covariance, eps, with_covariance):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, eps, with_covariance = inputs
    _, _, mean, sumsq, product = output
    ctx.save_for_backward(x, mean, sumsq, product)
    ctx.eps = eps
    ctx.with_covariance = with_covariance


def _backward(ctx, grad_variance, grad_covariance, *unused):
    x, mean, sumsq, product = ctx.saved_tensors
    grad = _variance_covariance_backward_op(x, mean, sumsq, product, grad_variance, grad_covariance, ctx.eps, ctx.with_covariance)
    return grad, None, None


_variance_covariance_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerTritonVarianceCovariance(torch.autograd.Function):
    """The Triton forward and backward for eager calls on plain tensors, without the custom ops'
    Python autograd and redispatch layers (a fifth of the host's time per forward+backward, 0.1 ms
    of 0.57 on one CPU core: ``benchmarks/bench_vicreg.py --host``). Takes ``[n, D]`` or ``[n, S, D]``."""

    @staticmethod
    def forward(ctx, x, eps, with_covariance):
        slots = _as_slots(x)
        variance, covariance, mean, sumsq, product = _triton_forward(slots, eps, with_covariance)
        ctx.save_for_backward(slots, mean, sumsq, product)
        ctx.eps, ctx.with_covariance, ctx.input_shape = eps, with_covariance, x.shape
        return variance, covariance

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_variance, grad_covariance):
        slots, mean, sumsq, product = ctx.saved_tensors
        grad = _triton_backward(slots, mean, sumsq, product, grad_variance, grad_covariance, ctx.eps, ctx.with_covariance)
        return grad.view(ctx.input_shape), None, None


def _triton_variance_covariance(x: torch.Tensor, eps: float, with_covariance: bool):
    if plain_eager(x):
        return _EagerTritonVarianceCovariance.apply(x, float(eps), with_covariance)
    variance, covariance, *_ = _variance_covariance_op(_as_slots(x), float(eps), with_covariance)
    return variance, covariance


# ----------------------------------------------------------------------------- public functions


def vicreg_variance(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Variance hinge ``mean_d relu(1 - sqrt(var_d + eps))`` with the unbiased variance over rows.

    For ``x [n, D]`` the mean runs over the ``D`` columns; for ``x [n, S, D]`` each of the ``S`` slots
    is regularised on its own and the slots are averaged. Half-precision inputs are reduced in
    float32 and give a float32 result.

    >>> import torch, fastdense.ops as ops
    >>> x = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    >>> round(float(ops.vicreg_variance(x, eps=0.0)), 4)  # column 0 collapsed, column 1 spread
    0.5
    """
    _check_rows(x, "x")
    _check_eps(eps)
    if resolve("vicreg_variance", (x,), available=("triton",)) == "triton":
        return _triton_variance_covariance(x, eps, with_covariance=False)[0]
    return vicreg_variance_reference(x, eps)


def vicreg_covariance(x: torch.Tensor) -> torch.Tensor:
    """Covariance penalty: the sum of squared off-diagonal entries of ``Xc^T Xc / (n - 1)``, over ``D``.

    ``Xc`` is ``x`` centred over its ``n`` rows. For ``x [n, S, D]`` the penalty is computed per slot
    and averaged over the ``S`` slots. The Triton path never forms the ``D x D`` matrix when
    ``n < D`` (it reduces ``‖Xc Xcᵀ‖² − Σ d²`` instead: accurate to about 1e-4 for columns of
    comparable variance, less where a few columns' variances dominate the others', see
    :mod:`fastdense.kernels.vicreg`).

    >>> import torch, fastdense.ops as ops
    >>> x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # perfectly correlated columns
    >>> float(ops.vicreg_covariance(x))  # cov = [[2, 2], [2, 2]]: (2^2 + 2^2) / 2
    4.0
    """
    _check_rows(x, "x")
    if resolve("vicreg_covariance", (x,), available=("triton",)) == "triton":
        return _triton_variance_covariance(x, 1e-4, with_covariance=True)[1]
    return vicreg_covariance_reference(x)


def vicreg_variance_covariance(x: torch.Tensor, eps: float = 1e-4, group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(vicreg_variance(x, eps), vicreg_covariance(x))`` from one pass of column statistics.

    With ``group`` (a ``torch.distributed`` process group, or ``"world"`` for the default one), ``x``
    is this rank's block of rows and both terms are those of the whole batch gathered over the
    group. Only this rank's rows' share of the covariance is computed, two ``D``-vectors and a few
    scalars are all-reduced (and, only when the gathered batch has at least ``D`` rows, the ``D x D``
    covariance instead of gathering ``x``), and the backward needs no communication: the gradient
    of ``x`` equals the rows of the full-batch gradient (see :mod:`fastdense.ops.vicreg_distributed`).
    A rank may hold any number of rows, none included; the gathered batch needs at least two.

    >>> import torch, fastdense.ops as ops
    >>> x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    >>> [round(float(t), 4) for t in ops.vicreg_variance_covariance(x, eps=0.0)]
    [0.0, 4.0]
    """
    # A rank may hold fewer than two rows, even none: the gathered batch's count is checked on every rank
    # alike once the ranks' row counts are exchanged (raising here on one rank would hang the others).
    _check_rows(x, "x", min_rows=0 if group is not None else 2)
    _check_eps(eps)
    if group is not None:
        from fastdense.ops.vicreg_distributed import row_block_variance_covariance

        chosen = resolve("vicreg_variance_covariance", (x,), available=("triton",))
        return row_block_variance_covariance(x, eps, group, use_triton=chosen == "triton")
    if resolve("vicreg_variance_covariance", (x,), available=("triton",)) == "triton":
        return _triton_variance_covariance(x, eps, with_covariance=True)
    return vicreg_variance_reference(x, eps), vicreg_covariance_reference(x)


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def _check_rows(x, name: str, min_rows: int = 2) -> None:
    check_tensor(x, name, "[n, D] or [n, S, D]", dims=(2, 3))
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs n >= 2 rows for an unbiased variance, got shape {list(x.shape)}")
    if x.shape[-1] < 1 or (x.dim() == 3 and x.shape[1] < 1):
        raise ValueError(f"{name} must have at least one slot and one column, got shape {list(x.shape)}")
