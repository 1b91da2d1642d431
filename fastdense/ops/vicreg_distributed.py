"""VICReg's variance and covariance over a batch split by rows across ranks, without a gradient all-reduce.

The reference recipe all-gathers the embeddings, has every rank compute the full ``D x D``
covariance, and all-reduces the whole stacked gradient in the backward. The row-block form instead:

1. all-reduces two ``D``-vectors: the column sums (for the mean) and then the centred column sums of
   squares ``d`` (for the variance and the diagonal of the covariance), after all-gathering every
   rank's shape and dtype (a mismatch then raises the same error on every rank);
2. all-gathers ``X`` (outside autograd) and computes only this rank's rows of ``K = Xc Xcᵀ``:
   ``‖K‖² = Σ_r ‖Xc_r Xc_gᵀ‖²``, one scalar per slot all-reduced;
3. in the backward, the gradient of this rank's rows is ``4 s (K_r Xc_g) + coef ⊙ Xc_r``: every
   quantity in it is already local, so nothing is communicated and the result equals the rows of
   the single-process full-batch gradient.

That is the form for ``n < D`` (the gathered batch has fewer rows than columns, VICReg's case). When
``n >= D`` the subtraction in ``‖K‖² − Σ d²`` cancels (``Σ d²`` dominates), so the direct form runs
instead: every rank computes ``Xc_rᵀ Xc_r`` (``D x D``, centred on the global mean, diagonal
zeroed) and these are all-reduced; that moves no more than gathering ``X`` would, and ``X`` is not
gathered. Its backward, ``4 s Xc_r C_off + coef ⊙ Xc_r``, again needs nothing from other ranks.

Every rank returns the full-batch loss and receives the full-batch gradient for its own rows; a
caller whose ranks each back-propagate that loss under DDP (which averages gradients over ranks)
gets ``1/world`` of the full-batch parameter gradient, while the reference recipe (whose gather's
backward sums every rank's contribution) gets ``world`` times what one rank computes here.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

from fastdense.ops._validate import FLOAT_DTYPES


def _group(group):
    return dist.group.WORLD if isinstance(group, str) and group == "world" else group


def exchange_device(group, device: torch.device) -> torch.device:
    """Where numbers the host knows (row counts, shapes) travel among ``group``'s ranks: the CPU when
    the group carries CPU tensors (gloo, or a ``"cpu:gloo,cuda:nccl"`` group, as fastdense-train
    starts on GPUs), else ``device``. Read back from a GPU, such a number waits for every kernel
    queued before it, so the host stops queueing ahead of the device; from the CPU it does not."""
    config = dist.get_backend_config(group)
    kinds = {part.split(":")[0] for part in config.split(",")} if ":" in config else set()
    return torch.device("cpu") if "cpu" in kinds else device


def _gather_rows(x: torch.Tensor, counts: List[int], group) -> torch.Tensor:
    """All rows of every rank, in rank order (ranks may hold different numbers of rows)."""
    most = max(counts)
    padded = x if x.shape[0] == most else torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def _centred(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return x.to(mean.dtype) - mean


def _gradient_coefficients(sumsq, grad_variance, grad_covariance, n: int, eps: float, gram: bool = True):
    """``(coef, scale)`` per column so that ``∂L/∂X = scale (Xc Xcᵀ) Xc + coef ⊙ Xc`` (Gram form) or
    ``scale Xc C_off + coef ⊙ Xc`` (direct form, ``C_off`` without its diagonal): the Triton apply
    kernel computes the same inside (``_gradient_coefficients`` of :mod:`fastdense.kernels.vicreg`)."""
    slots, dim = sumsq.shape
    std = torch.sqrt(sumsq / (n - 1) + eps)
    # relu'(0) = 0, as in autograd: only columns with std < 1 receive the hinge's gradient.
    coef = -(grad_variance.to(sumsq.dtype) / (slots * dim * (n - 1))) * (std < 1).to(sumsq.dtype) / std
    scale = 4 * grad_covariance.to(sumsq.dtype) / ((n - 1) ** 2 * dim * slots)
    return (coef - scale * sumsq if gram else coef), scale


class _RowBlockVarianceCovariance(torch.autograd.Function):
    # Autocast off inside: the products accumulate in float32 (float64) as the Triton kernels do.
    # Under autocast the reference form's bmm ran in 16 bits, so ‖K‖² − Σ d² cancelled, and the
    # 16-bit product kept for the backward met float32 operands there ("expected scalar type Float").
    @staticmethod
    def forward(ctx, x, eps: float, group, use_triton: bool):
        with torch.autocast(x.device.type, enabled=False):
            return _RowBlockVarianceCovariance._forward(ctx, x, eps, group, use_triton)

    @staticmethod
    def backward(ctx, grad_variance, grad_covariance):
        with torch.autocast(ctx.device_type, enabled=False):
            return _RowBlockVarianceCovariance._backward(ctx, grad_variance, grad_covariance)

    @staticmethod
    def _forward(ctx, x, eps: float, group, use_triton: bool):
        from fastdense.kernels import vicreg as kernels

        acc = kernels.accumulator_dtype(x.dtype)
        rank = dist.get_rank(group)
        # Every rank's shape, so that a mismatch raises the same error on every rank instead of
        # hanging or garbling the collectives below.
        shape = torch.tensor([*x.shape, FLOAT_DTYPES.index(x.dtype)], dtype=torch.int64, device=exchange_device(group, x.device))
        shapes_t = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shapes_t, shape, group=group)
        shapes = [tuple(int(v) for v in s) for s in shapes_t]
        if len({s[1:] for s in shapes}) > 1:
            seen = [f"{list(s[:3])} {FLOAT_DTYPES[s[3]]}" for s in shapes]
            raise ValueError(f"x must have the same [S, D] and dtype on every rank of the group, got {seen} (rows first)")
        counts = [s[0] for s in shapes]
        n = sum(counts)
        if n < 2:
            raise ValueError(f"x: the gathered batch needs n >= 2 rows for an unbiased variance, got {n}")
        _, slots, dim = x.shape

        # The two D-vectors (per slot) that are all-reduced: column sums, then centred sums of squares.
        column_sums = x.to(acc).sum(dim=0)
        dist.all_reduce(column_sums, group=group)
        mean = (column_sums / n).contiguous()
        sumsq = _centred(x, mean).pow(2).sum(dim=0)
        dist.all_reduce(sumsq, group=group)

        std = torch.sqrt(sumsq / (n - 1) + eps)
        variance = torch.relu(1 - std).mean()
        if kernels.use_gram_form(n, dim):
            gathered, product, squares = _row_block_gram(x, mean, counts, group, use_triton)
            off_diagonal = squares - sumsq.double().pow(2).sum(dim=1)
        else:
            gathered, product = x.new_empty(0), _summed_covariance(x, mean, group, use_triton)
            off_diagonal = product.double().pow(2).sum(dim=(1, 2))
        covariance = (off_diagonal / ((n - 1) ** 2 * dim)).mean().to(acc)

        ctx.save_for_backward(x, gathered, mean, sumsq, product if product is not None else x.new_empty(0))
        ctx.meta = (eps, n, use_triton, rank)
        ctx.device_type = x.device.type
        return variance, covariance

    @staticmethod
    def _backward(ctx, grad_variance, grad_covariance):
        from fastdense.kernels import vicreg as kernels

        x, gathered, mean, sumsq, product = ctx.saved_tensors
        eps, n, use_triton, _ = ctx.meta
        gram = kernels.use_gram_form(n, x.shape[2])
        product = product if product.numel() else None
        if use_triton:
            grad = torch.empty(x.shape, device=x.device, dtype=x.dtype)
            terms = kernels.GradientTerms(sumsq, grad_variance, grad_covariance, n, eps)
            if gram:
                kernels.covariance_gradient(
                    kernels.Operand(x, False), kernels.Operand(gathered, False), product, mean, terms, kernels.Operand(grad, False)
                )
            else:
                own = kernels.Operand(x, transposed=True)
                kernels.apply_product(own, own, product, mean, terms, kernels.Operand(grad, transposed=True))
            return grad, None, None, None
        coef, scale = _gradient_coefficients(sumsq, grad_variance, grad_covariance, n, eps, gram)
        own = _centred(x, mean)
        if not gram:  # ∂/∂Xc of Σ C_off² is 4 Xc C_off: this rank's rows times the summed matrix
            grad = scale * torch.bmm(own.transpose(0, 1), product).transpose(0, 1) + coef * own
            return grad.to(x.dtype), None, None, None
        every = _centred(gathered, mean).transpose(0, 1)  # [S, n, D]
        if product is None:
            product = torch.bmm(own.transpose(0, 1), every.transpose(1, 2))
        grad = scale * torch.bmm(product, every).transpose(0, 1) + coef * own
        return grad.to(x.dtype), None, None, None


def _row_block_gram(x, mean, counts: List[int], group, use_triton: bool):
    """Gram form (``n < D``): ``(gathered X, this rank's rows of K = Xc Xcᵀ if kept, ‖K‖² per slot)``,
    from the gathered rows; only the scalars ``‖K_r‖²`` are all-reduced."""
    from fastdense.kernels import vicreg as kernels

    n, slots = sum(counts), x.shape[1]
    acc = mean.dtype
    gathered = _gather_rows(x, counts, group)
    keep = kernels.product_fits(x.shape[0], n, slots, torch.finfo(acc).bits // 8)
    if use_triton:
        product = torch.empty(slots, x.shape[0], n, device=x.device, dtype=acc) if keep else None
        own = kernels.Operand(x, transposed=False)
        share = kernels.product_square_sums(own, kernels.Operand(gathered, transposed=False), mean, symmetric=False, product=product)
    else:
        product = torch.bmm(_centred(x, mean).transpose(0, 1), _centred(gathered, mean).permute(1, 2, 0))  # [S, n_r, n]
        share = product.pow(2).sum(dim=(1, 2))
        product = product if keep else None
    squares = share.double()
    dist.all_reduce(squares, group=group)
    return gathered, product if product is not None else x.new_empty(0, dtype=acc), squares


def _summed_covariance(x, mean, group, use_triton: bool) -> torch.Tensor:
    """Direct form (``n >= D``): ``Xcᵀ Xc`` of the whole batch with a zero diagonal, ``[S, D, D]``, as
    the all-reduced sum of every rank's ``Xc_rᵀ Xc_r`` (centred on the global mean). ``‖K‖² − Σ d²``
    would cancel here (``Σ d²`` dominates when ``n >> D``); with ``D <= n`` this all-reduce moves no
    more than gathering ``X`` would, and no gather is needed."""
    from fastdense.kernels import vicreg as kernels

    _, slots, dim = x.shape
    if use_triton:
        product = torch.empty(slots, dim, dim, device=x.device, dtype=mean.dtype)
        own = kernels.Operand(x, transposed=True)
        kernels.product_tile_squares(own, own, mean, symmetric=True, product=product)  # diagonal masked
    else:
        centred = _centred(x, mean).transpose(0, 1)  # [S, n_r, D]
        product = torch.bmm(centred.transpose(1, 2), centred)
        product.diagonal(dim1=1, dim2=2).zero_()
    dist.all_reduce(product, group=group)
    return product


def row_block_variance_covariance(x: torch.Tensor, eps: float, group, use_triton: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-batch ``(variance, covariance)`` of the rows gathered over ``group``; ``x`` is ``[n_r, D]``
    or ``[n_r, S, D]`` on this rank. Called by ``vicreg_variance_covariance(x, group=...)``."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialised; call init_process_group first")
    x3 = x.unsqueeze(1) if x.dim() == 2 else x
    return _RowBlockVarianceCovariance.apply(x3, float(eps), _group(group), use_triton)


def communication_bytes(world: int, rows_per_rank: int, dim: int, itemsize: int = 4, slots: int = 1) -> dict:
    """Bytes each rank sends and receives, row-block form (Gram, ``world * rows_per_rank < dim``) vs the reference recipe (ring collectives).

    Both all-gather ``X`` (each rank receives the other ranks' rows). The row-block form then
    all-reduces two ``D``-vectors (float32) and a few scalars; the reference all-reduces the whole
    stacked ``[world * rows, D]`` gradient in the backward."""
    gather = (world - 1) * rows_per_rank * dim * slots * itemsize
    ring = 2 * (world - 1) / world
    # the two D-vectors, the float64 square sums per slot, and every rank's [rows, S, D, dtype] (int64, all-gathered)
    vectors = ring * 2 * dim * slots * 4 + ring * (slots * 8) + (world - 1) * 4 * 8
    stacked_gradient = ring * world * rows_per_rank * dim * slots * itemsize
    return {
        "all_gather": gather,
        "row_block_all_reduce": vectors,
        "row_block_total": gather + vectors,
        "reference_all_reduce": stacked_gradient,
        "reference_total": gather + stacked_gradient,
    }


def covariance_flops_per_rank(world: int, rows_per_rank: int, dim: int, slots: int = 1) -> dict:
    """Multiply-add FLOPs (2 per pair) of the covariance products on one rank, forward and backward (Gram form, ``world * rows_per_rank < dim``).

    Reference: ``Xᵀ X`` over the gathered batch (``2 N D²``) and the two products of its backward
    (``x @ G`` and ``x @ Gᵀ``, ``4 N D²``). Row-block form: ``Xc_r Xc_gᵀ`` (``2 n_r N D``), kept for
    the backward when it fits (else recomputed), then ``K_r Xc_g`` (``2 n_r N D``)."""
    from fastdense.kernels.vicreg import SAVED_PRODUCT_BYTES

    n = world * rows_per_rank
    reference_forward = 2.0 * n * dim * dim * slots
    reference_backward = 4.0 * n * dim * dim * slots
    share = 2.0 * rows_per_rank * n * dim * slots
    kept = rows_per_rank * n * slots * 4 <= SAVED_PRODUCT_BYTES
    row_block_backward = share * (1 if kept else 2)
    return {
        "reference_forward": reference_forward,
        "reference_backward": reference_backward,
        "row_block_forward": share,
        "row_block_backward": row_block_backward,
        "forward_ratio": reference_forward / share,
        "total_ratio": (reference_forward + reference_backward) / (share + row_block_backward),
    }
