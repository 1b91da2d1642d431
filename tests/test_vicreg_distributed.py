"""The row-block VICReg form on 2 and 4 gloo processes equals the single-process full-batch loss and gradient."""

import os
import re
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdense.ops as ops
from fastdense.ops.vicreg_distributed import communication_bytes, covariance_flops_per_rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_batch(x: torch.Tensor, eps: float):
    """Float64 loss terms and gradient of the whole batch, written from the definitions."""
    x = x.detach().double().requires_grad_(True)
    n, dim = x.shape[0], x.shape[-1]
    slots = x.reshape(n, -1, dim)
    centred = slots - slots.mean(dim=0)
    variance = torch.relu(1 - torch.sqrt((centred**2).sum(0) / (n - 1) + eps)).mean()
    cov = torch.einsum("nsa,nsb->sab", centred, centred) / (n - 1)
    off = cov - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
    covariance = (off**2).sum(dim=(1, 2)).mean() / dim
    grad = torch.autograd.grad(variance + 0.5 * covariance, x)[0]
    return variance.detach(), covariance.detach(), grad


# (ranks in the group, backend, rows per rank, trailing shape, dtype, tolerance)
CASES = [
    ((0, 1), "reference", [5, 5], (12,), torch.float64, 1e-12),
    ((0, 1, 2, 3), "reference", [3, 6, 1, 4], (3, 9), torch.float32, 1e-5),  # unequal blocks, per-slot, one row on a rank
    ((0, 1), "triton", [7, 4], (19,), torch.float32, 1e-5),
    ((0, 1, 2, 3), "triton", [2, 3, 3, 2], (2, 5), torch.float64, 1e-12),
    ((0, 1, 2, 3), "triton", [4, 0, 1, 3], (11,), torch.float32, 1e-5),  # a rank without rows, one with one row
    # n >= D: the direct form; through ‖K‖² − Σ d² the float32 loss lost three digits (Σ d² dominates)
    ((0, 1), "reference", [400, 300], (2,), torch.float32, 1e-5),
    ((0, 1, 2, 3), "triton", [90, 0, 130, 60], (2, 3), torch.float32, 1e-5),
    ((0, 1), "triton", [50, 40], (70,), torch.float64, 1e-12),  # several tiles a side: the mirrored D x D
]
# The Gram-form cases again with no room to keep the product ``Xc_r Xc_gᵀ`` for the backward
# (``SAVED_PRODUCT_BYTES`` 0): the reference and the Triton backward recompute it.
RECOMPUTE_CASES = [case for case, (_, _, rows, shape_tail, _, _) in enumerate(CASES) if sum(rows) < shape_tail[-1]]
# Under bf16 autocast (the training loop's precision), float32 embeddings: the same terms and gradient
# as without it, in the Gram form and the direct form. (ranks, backend, rows per rank, trailing shape)
AUTOCAST_CASES = [((0, 1), "reference", [3, 4], (16,)), ((0, 1), "reference", [40, 30], (4,))]
# The ranks of a 2-rank group whose gathered batch is bad: every one raises the same error (none hangs).
TOO_FEW = ((2, 3), [1, 0])
WORLD = 4


def _inputs(rows, shape_tail):
    torch.manual_seed(0)
    return torch.randn(sum(rows), *shape_tail, dtype=torch.float64) * torch.linspace(0.2, 2.0, shape_tail[-1], dtype=torch.float64)


def _worker(rank, port, result_queue):
    # One spawn serves every case (process start-up dominates); 2-rank cases run on a sub-group.
    # With a GPU every rank runs the compiled kernels on it (gloo moves CUDA tensors through the
    # host); without one, Triton's interpreter.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        _run_cases(rank, device, result_queue)
    except BaseException:  # the test fails at once with this rank's traceback instead of waiting out its timeout
        result_queue.put(("error", rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def _run_case(rank, device, key, ranks, backend_name, rows, shape_tail, dtype, result_queue):
    group = dist.new_group(list(ranks))
    if rank not in ranks:
        return
    start = sum(rows[: ranks.index(rank)])
    local = _inputs(rows, shape_tail)[start : start + rows[ranks.index(rank)]].to(device, dtype).requires_grad_(True)
    with ops.backend(backend_name):
        variance, covariance = ops.vicreg_variance_covariance(local, eps=1e-4, group=group)
    (variance + 0.5 * covariance).backward()
    result_queue.put((key, rank, variance.item(), covariance.item(), local.grad.double().tolist()))


def _run_cases(rank, device, result_queue):
    from fastdense.kernels import vicreg as kernels

    for case, (ranks, backend_name, rows, shape_tail, dtype, _) in enumerate(CASES):
        _run_case(rank, device, case, ranks, backend_name, rows, shape_tail, dtype, result_queue)
    limit, kernels.SAVED_PRODUCT_BYTES = kernels.SAVED_PRODUCT_BYTES, 0
    try:
        for case in RECOMPUTE_CASES:
            _run_case(rank, device, ("recompute", case), *CASES[case][:5], result_queue)
    finally:
        kernels.SAVED_PRODUCT_BYTES = limit
    for case, (ranks, backend_name, rows, shape_tail) in enumerate(AUTOCAST_CASES):
        group = dist.new_group(list(ranks))
        if rank not in ranks:
            continue
        start = sum(rows[: ranks.index(rank)])
        local = _inputs(rows, shape_tail)[start : start + rows[ranks.index(rank)]].to(device, torch.float32).requires_grad_(True)
        try:
            with ops.backend(backend_name), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                variance, covariance = ops.vicreg_variance_covariance(local * 1.0, eps=1e-4, group=group)
            (variance + 0.5 * covariance).backward()
            result_queue.put((("autocast", case), rank, variance.item(), covariance.item(), local.grad.double().tolist()))
        except RuntimeError as error:
            result_queue.put((("autocast", case), rank, None, None, str(error)))
    ranks, rows = TOO_FEW
    group = dist.new_group(list(ranks))
    if rank in ranks:
        try:
            ops.vicreg_variance_covariance(torch.zeros(rows[ranks.index(rank)], 4, device=device), group=group)
            result_queue.put(("too_few", rank, None))
        except ValueError as error:
            result_queue.put(("too_few", rank, str(error)))
        for what, bad in (("mismatch", torch.zeros(3, 4 + rank, device=device)), ("dtype", torch.zeros(3, 4, device=device, dtype=(torch.float32, torch.float64)[rank % 2]))):
            try:  # different D, then different dtypes, on the two ranks
                ops.vicreg_variance_covariance(bad, group=group)
                result_queue.put((what, rank, None))
            except ValueError as error:
                result_queue.put((what, rank, str(error)))


@pytest.fixture(scope="module")
def gloo_results():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    expected = sum(len(case[0]) for case in CASES + [CASES[c] for c in RECOMPUTE_CASES] + AUTOCAST_CASES) + 3 * len(TOO_FEW[0])
    results = []
    for _ in range(expected):
        results.append(queue.get(timeout=150))
        if results[-1][0] == "error":
            for p in procs:
                p.kill()
            pytest.fail(f"rank {results[-1][1]} failed:\n{results[-1][2]}")
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _case_id(case):
    ranks, backend_name, _, _, dtype, _ = CASES[case]
    return f"{len(ranks)}ranks-{backend_name}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", range(len(CASES)), ids=_case_id)
def test_row_block_equals_full_batch(gloo_results, case):
    _check_case(gloo_results, case, case)


@pytest.mark.parametrize("case", RECOMPUTE_CASES, ids=_case_id)
def test_row_block_recomputing_the_product_equals_full_batch(gloo_results, case):
    _check_case(gloo_results, ("recompute", case), case)


def _check_case(gloo_results, key, case):
    ranks, _, rows, shape_tail, _, tol = CASES[case]
    variance, covariance, grad = _full_batch(_inputs(rows, shape_tail), 1e-4)
    mine = [r for r in gloo_results if r[0] == key]
    assert sorted(r[1] for r in mine) == list(ranks)
    for _, rank, v, c, g in mine:
        assert abs(v - float(variance)) <= tol * max(1.0, abs(float(variance)))
        assert abs(c - float(covariance)) <= tol * abs(float(covariance))
        start = sum(rows[: ranks.index(rank)])
        own = grad[start : start + rows[ranks.index(rank)]]
        assert torch.linalg.vector_norm(torch.tensor(g, dtype=torch.float64).reshape(own.shape) - own) <= tol * torch.linalg.vector_norm(grad)


@pytest.mark.parametrize("case", range(len(AUTOCAST_CASES)), ids=["gram", "direct"])
def test_row_block_under_autocast_equals_full_batch(gloo_results, case):
    ranks, _, rows, shape_tail = AUTOCAST_CASES[case]
    variance, covariance, grad = _full_batch(_inputs(rows, shape_tail).float(), 1e-4)
    mine = [r for r in gloo_results if r[0] == ("autocast", case)]
    assert sorted(r[1] for r in mine) == list(ranks)
    for _, rank, v, c, g in mine:
        assert v is not None, g  # the backward failed: its message
        assert abs(v - float(variance)) <= 1e-5 and abs(c - float(covariance)) <= 1e-5 * abs(float(covariance))
        start = sum(rows[: ranks.index(rank)])
        own = grad[start : start + rows[ranks.index(rank)]]
        assert torch.linalg.vector_norm(torch.tensor(g, dtype=torch.float64).reshape(own.shape) - own) <= 1e-5 * torch.linalg.vector_norm(grad)


@pytest.mark.parametrize("what, match", [("too_few", "n >= 2"), ("mismatch", r"\[3, 1, 6\] torch.float32', '\[3, 1, 7\]"), ("dtype", "same .* dtype on every rank")])
def test_bad_gathered_batch_raises_on_every_rank(gloo_results, what, match):
    # Fewer than two rows gathered, or different D or dtypes on two ranks: each rank raises the same ValueError.
    errors = sorted((r[1], r[2]) for r in gloo_results if r[0] == what)
    assert [rank for rank, _ in errors] == list(TOO_FEW[0])
    assert all(message is not None and re.search(match, message) for _, message in errors), errors


def test_group_requires_initialised_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        ops.vicreg_variance_covariance(torch.randn(4, 3), group="world")


def test_eight_rank_counts_meet_targets():
    flops = covariance_flops_per_rank(world=8, rows_per_rank=256, dim=8192)
    assert flops["forward_ratio"] == pytest.approx(32.0)
    # 6 N D^2 against twice 2 n_r N D: the [256, 2048] product (2 MiB) is kept for the backward.
    assert flops["row_block_backward"] == flops["row_block_forward"] and flops["total_ratio"] == pytest.approx(48.0)
    comm = communication_bytes(world=8, rows_per_rank=256, dim=8192)
    # Beyond the shared all-gather, only two float32 D-vectors and a float64 scalar through a ring
    # all-reduce (2 (w - 1) / w of them each way), and every other rank's four int64 shape entries.
    ring = 2 * 7 / 8
    assert comm["row_block_all_reduce"] == pytest.approx(ring * 2 * 8192 * 4 + ring * 8 + 7 * 4 * 8)
    assert comm["reference_all_reduce"] > 100 * comm["row_block_all_reduce"]
