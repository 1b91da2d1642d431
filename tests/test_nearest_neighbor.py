"""Nearest-neighbour matching: reference vs a float64 oracle, Triton kernels vs the reference.

On CPU the kernels run in Triton's interpreter on a covering set of shapes (every N, M, D, B and
dtype value appears, mixed); with a GPU the full cartesian product runs.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastdense.ops as ops
from benchmarks.bench_nearest_neighbor import vicregl_step_pairs
from conftest import DEVICE, HAS_CUDA
from fastdense.ops.nearest_neighbor import nearest_neighbor_reference

TIE_RTOL = 1e-6  # CONVENTIONS.md: indices agree except on ties within 1e-6 relative distance
SIZES = (1, 3, 9, 49, 50, 196)
WIDTHS = (2, 3, 64, 512, 513)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (B, N, M, D, dtype): each value of SIZES (as N and as M), WIDTHS, B in {1, 5} and each dtype
# appears at least once, in varied combinations; the interpreter runs these in seconds.
COVERING_CASES = [
    (1, 1, 1, 2, torch.float32),
    (5, 3, 9, 3, torch.float16),
    (1, 9, 3, 64, torch.bfloat16),
    (5, 49, 50, 512, torch.float32),
    (1, 50, 49, 513, torch.bfloat16),
    (5, 196, 9, 2, torch.float32),
    (5, 9, 9, 513, torch.float16),
    (1, 196, 196, 64, torch.float16),
    (1, 9, 196, 513, torch.float32),
    (1, 49, 1, 512, torch.float16),
    (5, 50, 3, 2, torch.bfloat16),
    (1, 3, 50, 3, torch.float32),
    (5, 1, 49, 64, torch.bfloat16),
]
# GPU: every (N, M, D, dtype) combination, B alternating between 1 and 5 so both meet every other value;
# one test per (dtype, N) runs its 30 shapes in a loop (pytest overhead per case dominated before).
FULL_CASES = [((1, 5)[i % 2], n, m, d, dt) for i, (n, m, d, dt) in enumerate(itertools.product(SIZES, SIZES, WIDTHS, DTYPES))]


def _id(case):
    b, n, m, d, dt = case
    return f"B{b}-N{n}-M{m}-D{d}-{str(dt).split('.')[-1]}"


def oracle_distances(query, candidates):
    """All pairwise distances in float64 by explicit differences (independent of torch.cdist), on the
    inputs' device, a block of query rows at a time so the B x rows x M x D difference stays small."""
    q, c = query.double(), candidates.double()
    step = max(1, (1 << 24) // max(1, q.shape[0] * c.shape[1] * q.shape[2]))
    blocks = [(q[:, i : i + step, None, :] - c[:, None, :, :]).pow(2).sum(-1).sqrt() for i in range(0, q.shape[1], step)]
    return torch.cat(blocks, dim=1)


def oracle_nearest(query, candidates):
    dist = oracle_distances(query, candidates)
    best = dist.min(dim=-1, keepdim=True).values
    positions = torch.arange(dist.shape[-1], device=dist.device).expand_as(dist)
    # the lowest index among the exact minima
    index = torch.where(dist == best, positions, dist.shape[-1]).min(dim=-1).values
    return best.squeeze(-1), index


def oracle_select(distance, k):
    rows = []
    for row in distance.tolist():
        order = sorted(range(len(row)), key=lambda i: (row[i], i))[:k]
        rows.append(sorted(order))
    return torch.tensor(rows, dtype=torch.int64)


def assert_indices_agree(query, candidates, index, expected_index):
    """Indices equal, except where the chosen candidate is within TIE_RTOL of the best distance."""
    dist = oracle_distances(query, candidates)
    index, expected_index = index.to(dist.device), expected_index.to(dist.device)
    chosen = dist.gather(-1, index[..., None]).squeeze(-1)
    best = dist.gather(-1, expected_index[..., None]).squeeze(-1)
    near_tie = chosen <= best * (1 + TIE_RTOL) + 1e-12
    bad = (index != expected_index) & ~near_tie
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} indices differ beyond a 1e-6 tie; first at {bad.nonzero()[0].tolist()}"


def assert_pairs_agree(query, candidates, k, rows, match):
    """``rows`` are k ascending rows whose distances are the k smallest (up to ties), ``match`` their neighbours."""
    ref_dist, ref_index = nearest_neighbor_reference(query, candidates)
    rows, match = rows.to(query.device), match.to(query.device)
    assert rows.shape == match.shape == (query.shape[0], k)
    assert (rows.diff(dim=1) > 0).all(), "rows must be strictly ascending"
    expected = ref_dist.double().sort(dim=1).values[:, :k]
    got = ref_dist.double().gather(1, rows).sort(dim=1).values
    torch.testing.assert_close(got, expected, rtol=TIE_RTOL, atol=1e-12)
    assert_indices_agree(query.gather(1, rows[..., None].expand(-1, -1, query.shape[2])), candidates, match, ref_index.gather(1, rows))


def make_inputs(b, n, m, d, dtype, device, non_contiguous=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if non_contiguous:  # stored [B, D, rows] and transposed, plus a stride-2 batch slice
        q = torch.randn(2 * b, d, n, generator=g).to(dtype).to(device).transpose(1, 2)[::2]
        c = torch.randn(2 * b, d, m, generator=g).to(dtype).to(device).transpose(1, 2)[::2]
        for t in (q, c):  # a view with a single non-unit axis ([1, 1, D]) is contiguous whatever its strides
            assert t.is_contiguous() == (sum(size > 1 for size in t.shape) <= 1)
        return q, c
    return torch.randn(b, n, d, generator=g).to(dtype).to(device), torch.randn(b, m, d, generator=g).to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# The reference against the float64 oracle


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,n,m,d", [(1, 1, 1, 1), (3, 7, 5, 2), (2, 49, 9, 512), (1, 13, 196, 3)])
def test_reference_matches_float64_oracle(b, n, m, d, dtype):
    q, c = make_inputs(b, n, m, d, dtype, "cpu")
    dist, index = ops.nearest_neighbor(q, c)
    best, expected = oracle_nearest(q, c)
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(dist.double(), best, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    assert_indices_agree(q, c, index, expected)
    for k in sorted({1, (n + 1) // 2, n}):
        rows, match = ops.nearest_neighbor_pairs(q, c, k)
        if dtype == torch.float64:
            assert torch.equal(rows, oracle_select(best, k))
        assert_pairs_agree(q, c, k, rows, match)


def test_reference_ties_go_to_lowest_index_and_row():
    # integer points: every distance is exact, and the duplicates make exact ties
    c = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]])
    q = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])
    dist, index = ops.nearest_neighbor(q, c)
    assert index.tolist() == [[0, 0, 0, 1]]
    assert dist.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    rows, match = ops.nearest_neighbor_pairs(q, c, 3)
    assert rows.tolist() == [[0, 1, 3]] and match.tolist() == [[0, 0, 1]]


# ---------------------------------------------------------------------------------------------
# Triton against the reference


def check_triton_against_reference(case, device, non_contiguous=False):
    b, n, m, d, dtype = case
    q, c = make_inputs(b, n, m, d, dtype, device, non_contiguous, seed=n * 1000 + m + d)
    ref_dist, ref_index = nearest_neighbor_reference(q, c)
    ks = [max(1, n // 3), n]
    with ops.backend("triton"):
        dist, index = ops.nearest_neighbor(q, c)
        pairs = ops.nearest_neighbor_pairs_many([q] * 2, [c] * 2, ks)
    assert dist.dtype == torch.float32 and index.dtype == torch.int64
    assert dist.shape == index.shape == (b, n)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-5, atol=1e-5)
    assert_indices_agree(q, c, index, ref_index)
    for (rows, match), k in zip(pairs, ks):
        assert_pairs_agree(q, c, k, rows, match)


@pytest.mark.parametrize("case", COVERING_CASES, ids=_id)
def test_triton_matches_reference(case, device):
    check_triton_against_reference(case, device)


@pytest.mark.parametrize("case", [(5, 49, 9, 512, torch.bfloat16), (1, 50, 3, 2, torch.float32), (5, 9, 49, 513, torch.float32)], ids=_id)
def test_triton_non_contiguous(case, device):
    check_triton_against_reference(case, device, non_contiguous=True)


@pytest.mark.parametrize("d", [2, 64])
def test_triton_expanded_inputs(d, device):
    """Stride-0 inputs: one query set shared by every image, and candidates that are one row
    repeated (every candidate ties, so index 0 wins) or one set shared by every image."""
    g = torch.Generator().manual_seed(d)
    q = torch.randn(1, 9, d, generator=g).to(device).expand(3, 9, d)
    repeated = torch.randn(3, 1, d, generator=g).to(device).expand(3, 7, d)
    shared = torch.randn(1, 7, d, generator=g).to(device).expand(3, 7, d)
    with ops.backend("triton"):
        dist, index = ops.nearest_neighbor(q, repeated)
        (rows, match), = ops.nearest_neighbor_pairs_many([q], [shared], [4])
    assert torch.equal(index, torch.zeros_like(index))
    torch.testing.assert_close(dist, nearest_neighbor_reference(q, repeated)[0], rtol=1e-5, atol=1e-5)
    assert_pairs_agree(q, shared, 4, rows, match)


def test_autocast_leaves_the_matching_unchanged(device):
    """CONVENTIONS 3: the ops work under autocast; the matching follows the inputs' dtype (float32
    here), not the autocast dtype, eagerly and compiled, on both backends."""
    q, c = make_inputs(2, 9, 7, 64, torch.float32, device)

    def match(q, c):
        return ops.nearest_neighbor(q, c) + ops.nearest_neighbor_pairs(q, c, 4)

    compiled = torch.compile(match, backend="aot_eager", fullgraph=True)
    for backend in ("reference", "triton"):
        with ops.backend(backend):
            expected = match(q, c)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                for got in (match(q, c), compiled(q, c)):
                    assert got[0].dtype == torch.float32
                    for a, b in zip(got, expected):
                        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dt: str(dt).split(".")[-1])
@pytest.mark.parametrize("n", SIZES)
def test_triton_matches_reference_full_product(n, dtype, device):
    cases = [case for case in FULL_CASES if case[1] == n and case[4] == dtype]
    assert len(cases) == len(SIZES) * len(WIDTHS)
    for case in cases:
        check_triton_against_reference(case, device, non_contiguous=n == 49)


@pytest.mark.gpu
def test_every_tuning_config_matches_reference(device, monkeypatch):
    """Autotuning picks any of the configs on a large problem, where the tests above (small keys) only
    meet the small ones: each config of each kind of dot alone, with that kind's operands, on a
    16-aligned width (vector branch) and an odd one."""
    import triton

    from fastdense.kernels import nearest_neighbor as nn_kernels

    operands = [("tensor_core", [torch.float16, torch.bfloat16], None), ("float32", [torch.float32], "tf32x3"), ("float32", [torch.float32], "ieee")]
    for kind, dtypes, precision in operands:
        if precision is not None:
            monkeypatch.setattr(nn_kernels, "FP32_INPUT_PRECISION", precision)
        for i, config in enumerate(nn_kernels._tuning_configs(kind)):
            single = triton.autotune(configs=[config], key=["n_key", "m_key", "d_key"])(nn_kernels._nearest_neighbor_kernel)
            monkeypatch.setattr(nn_kernels, "_tuned_kernel", single)
            for d in (512, 131):
                check_triton_against_reference((3, 257, 301, d, dtypes[i % len(dtypes)]), device, non_contiguous=d == 131)


def _tile_cases():
    from fastdense.kernels import nearest_neighbor as nn_kernels

    for kind, dtype in (("tensor_core", torch.bfloat16), ("float32", torch.float32)):
        for config in nn_kernels._tuning_configs(kind):
            yield pytest.param(config, dtype, id=f"{kind}-{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_D']}")


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU, test_every_tuning_config_matches_reference runs the tiles for real")
@pytest.mark.parametrize("config,dtype", list(_tile_cases()))
def test_every_tuning_tile_in_the_interpreter(config, dtype, device, monkeypatch):
    """The GPU's tiles on CPU: the interpreter otherwise runs one small tile of its own. Two row
    blocks and two candidate tiles, the second of each partial, on the vector branch (D 96) and off it."""
    from fastdense.kernels import nearest_neighbor as nn_kernels

    monkeypatch.setattr(nn_kernels, "_interpreter_blocks", lambda *keys: dict(config.kwargs))
    n, m = config.kwargs["BLOCK_N"] + 22, config.kwargs["BLOCK_M"] + 14
    for d in (96, 40):
        check_triton_against_reference((2, n, m, d, dtype), device, non_contiguous=d == 40)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32x3"])
def test_float32_tensor_core_precision_matches_reference(precision, device, monkeypatch):
    from fastdense.kernels import nearest_neighbor as nn_kernels

    monkeypatch.setattr(nn_kernels, "FP32_INPUT_PRECISION", precision)
    for case in [(2, 196, 196, 512, torch.float32), (5, 49, 50, 513, torch.float32), (1, 784, 784, 2048, torch.float32)]:
        check_triton_against_reference(case, device)


@pytest.mark.parametrize("d,dtype", [(2, torch.float32), (16, torch.float32), (16, torch.bfloat16)], ids=["2-float32", "16-float32", "16-bfloat16"])
@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")  # the interpreter's numpy, on sqrt(-inf) = NaN
def test_triton_treats_nan_as_the_reference_does(d, dtype, device):
    """NaN wins the nearest-neighbour argmin (torch.argmin's rule: the first NaN) and sorts after
    every number in the row selection (a stable ascending sort's rule), in the kernel as in the reference."""
    q, c = make_inputs(2, 9, 7, d, dtype, device, seed=5)
    q[0, 3, 0] = float("nan")  # image 0, row 3: NaN to every candidate
    c[1, 4, 1] = float("nan")  # image 1, candidate 4: NaN to every row, so every row's nearest
    expected = nearest_neighbor_reference(q, c)
    with ops.backend("triton"):
        got = ops.nearest_neighbor(q, c)
        many = ops.nearest_neighbor_pairs_many([q] * 3, [c] * 3, [2, 8, 9])
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    with ops.backend("reference"):
        reference = ops.nearest_neighbor_pairs_many([q] * 3, [c] * 3, [2, 8, 9])
    for (rows, match), (ref_rows, ref_match) in zip(many, reference):
        assert torch.equal(rows, ref_rows) and torch.equal(match, ref_match)


def test_row_selection_puts_nan_after_infinity(device):
    from fastdense.kernels.nearest_neighbor import select_rows_many
    from fastdense.ops.nearest_neighbor import select_rows

    nan, inf = float("nan"), float("inf")
    dist = torch.tensor([[1.0, nan, inf, 0.0, nan, inf, 2.0], [nan, nan, 3.0, nan, inf, 3.0, nan]], device=device)
    index = torch.arange(dist.numel(), device=device)
    for k in range(1, 8):
        rows, match = select_rows_many(dist.reshape(-1), index, [0], [(2, 7)], [k])
        expected = select_rows(dist, k)
        assert torch.equal(rows.view(2, k), expected) and torch.equal(match.view(2, k), expected + 7 * torch.arange(2, device=device)[:, None])


@pytest.mark.parametrize("d,dtype", [(2, torch.float32), (64, torch.float32), (64, torch.bfloat16)], ids=["2-float32", "64-float32", "64-bfloat16"])
def test_triton_exact_ties_go_to_lowest_index(d, dtype, device):
    # small integers: exact in every dtype, and their squared norms and dot products are exact in
    # float32 (the tensor cores' accumulator included), so duplicates tie exactly
    g = torch.Generator().manual_seed(d)
    c = torch.randint(-2, 3, (2, 40, d), generator=g).to(dtype)
    c = torch.cat([c, c.flip(1)], dim=1).to(device)  # every candidate twice
    q = torch.randint(-2, 3, (2, 70, d), generator=g).to(dtype).to(device)
    ref_dist, ref_index = nearest_neighbor_reference(q, c)
    with ops.backend("triton"):
        dist, index = ops.nearest_neighbor(q, c)
        (rows, match), = ops.nearest_neighbor_pairs_many([q], [c], [33])
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-6, atol=0)
    ref_rows = ops.select_rows(ref_dist, 33)
    assert torch.equal(rows, ref_rows) and torch.equal(match, ref_index.gather(1, ref_rows))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dt: str(dt).split(".")[-1])
def test_triton_distance_of_identical_vectors_is_exact(dtype, device):
    """Long vectors, each query row also a candidate: ``|q|^2 - 2 q.c + |c|^2`` cancels to rounding
    noise of either sign there, so the kernel returns the chosen candidate's distance recomputed from
    differences: never NaN or negative, 0 for the copy, the exact distance for a near one it may pick."""
    g = torch.Generator().manual_seed(7)
    q = (300 + torch.randn(2, 9, 64, generator=g)).to(dtype)
    c = torch.cat([q + 1e-2 * torch.randn(2, 9, 64, generator=g).to(dtype), q], dim=1).to(device)
    q = q.to(device)
    with ops.backend("triton"):
        dist, index = ops.nearest_neighbor(q, c)
    exact = oracle_distances(q, c).gather(-1, index[..., None]).squeeze(-1)
    assert torch.isfinite(dist).all() and (dist >= 0).all()
    torch.testing.assert_close(dist.double(), exact, rtol=1e-5, atol=1e-6)
    assert (dist[index >= 9] == 0).all()


def test_selection_kernel_breaks_ties_by_row(device):
    from fastdense.kernels.nearest_neighbor import select_rows_many

    g = torch.Generator().manual_seed(1)
    shapes, ks, starts, dists = [(3, 200), (2, 9), (1, 1)], [150, 4, 1], [], []
    total = 0
    for b, n in shapes:
        starts.append(total)
        total += b * n
        dists.append(torch.randint(0, 5, (b * n,), generator=g).float())  # many exact ties
    dist = torch.cat(dists).to(device)
    index = torch.arange(total, device=device) * 7
    rows_flat, match_flat = select_rows_many(dist, index, starts, shapes, ks)
    out = 0
    for (b, n), k, start in zip(shapes, ks, starts):
        rows, match = rows_flat[out : out + b * k].view(b, k), match_flat[out : out + b * k].view(b, k)
        out += b * k
        d = dist[start : start + b * n].view(b, n).cpu()
        assert torch.equal(rows.cpu(), oracle_select(d, k))
        assert torch.equal(match, index[start : start + b * n].view(b, n).gather(1, rows))


# ---------------------------------------------------------------------------------------------
# A VICRegL step: all ordered pairs in one call


def vicregl_step_inputs(b, device, feature_dtype, seed=0):
    """2 global 7x7 and 6 local 3x3 views: the 56 matchings (D = 512 features, D = 2 cell centres)."""
    features, queries, candidates, ks = vicregl_step_pairs(b, device, feature_dtype, seed)
    assert len(queries) == 56
    return features, queries, candidates, ks


@pytest.fixture(scope="module")
def vicregl_step_float32():
    """A float32 step (features and locations share one matching launch) and its Triton matches."""
    features, queries, candidates, ks = vicregl_step_inputs(1 if not HAS_CUDA else 8, DEVICE, torch.float32, seed=3)
    with ops.backend("triton"):
        pairs = ops.nearest_neighbor_pairs_many(queries, candidates, ks)
    return features, queries, candidates, ks, pairs


@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16])
def test_vicregl_step_many_pairs_equals_single_pair_loop(feature_dtype, vicregl_step_float32, device):
    if feature_dtype == torch.float32:
        _, queries, candidates, ks, many = vicregl_step_float32
    else:
        _, queries, candidates, ks = vicregl_step_inputs(1, device, feature_dtype)
        with ops.backend("triton"):
            many = ops.nearest_neighbor_pairs_many(queries, candidates, ks)
    with ops.backend("triton"):
        # every kind of pair (global/local, both directions, both spaces) once; all 56 on a GPU
        kinds = range(56) if HAS_CUDA else [0, 1, 2, 3, 4, 5, 6, 7] if feature_dtype == torch.float32 else [4, 5]
        for i in kinds:
            rows1, match1 = ops.nearest_neighbor_pairs(queries[i], candidates[i], ks[i])
            assert torch.equal(many[i][0], rows1) and torch.equal(many[i][1], match1)
    for q, c, k, (rows, match) in zip(queries, candidates, ks, many):
        assert_pairs_agree(q, c, k, rows, match)


def local_matching_loss(x, y, rows, match):
    """VICRegL's local invariance term: MSE between matched features (gradients reach x and y)."""
    matched_x = x.gather(1, rows[..., None].expand(-1, -1, x.shape[2]))
    matched_y = y.gather(1, match[..., None].expand(-1, -1, y.shape[2]))
    return F.mse_loss(matched_x, matched_y)


def test_vicregl_local_loss_with_kernel_equals_reference(vicregl_step_float32):
    features, queries, candidates, ks, kernel_pairs = vicregl_step_float32
    with ops.backend("reference"):
        reference_pairs = ops.nearest_neighbor_pairs_many(queries, candidates, ks)
    feature_pairs = [(q, c, p) for q, c, p in zip(queries, candidates, kernel_pairs) if q.shape[2] == 512]
    reference_feature_pairs = [p for q, p in zip(queries, reference_pairs) if q.shape[2] == 512]
    leaves = [f.detach().requires_grad_() for f in features]
    lookup = {id(f): leaf for f, leaf in zip(features, leaves)}
    kernel_loss = sum(local_matching_loss(lookup[id(q)], lookup[id(c)], *p) for q, c, p in feature_pairs)
    reference_loss = sum(local_matching_loss(lookup[id(q)], lookup[id(c)], *p) for (q, c, _), p in zip(feature_pairs, reference_feature_pairs))
    torch.testing.assert_close(kernel_loss, reference_loss, rtol=1e-6, atol=0)
    kernel_loss.backward()
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)


# ---------------------------------------------------------------------------------------------
# Autograd, torch.compile, dispatch


def test_no_gradient_through_distances():
    q = torch.randn(2, 5, 3, requires_grad=True)
    c = torch.randn(2, 4, 3, requires_grad=True)
    dist, index = ops.nearest_neighbor(q, c)
    assert not dist.requires_grad and not index.requires_grad


def test_gradients_reach_the_embeddings_through_the_gather():
    """gradcheck (float64) of matched-feature differences: the indices are constants, the gathered
    rows carry the gradient to both inputs."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def matched_difference(q, c):
        rows, match = ops.nearest_neighbor_pairs(q, c, 3)
        return q.gather(1, rows[..., None].expand(-1, -1, 3)) - c.gather(1, match[..., None].expand(-1, -1, 3))

    assert torch.autograd.gradcheck(matched_difference, (q, c))


def test_ops_work_under_torch_compile():
    q, c = make_inputs(2, 9, 7, 3, torch.float32, "cpu")

    def step(q, c):
        dist, index = ops.nearest_neighbor(q, c)
        (rows, match), = ops.nearest_neighbor_pairs_many([q], [c], [4])
        return dist.sum() + index.sum() + rows.sum() + match.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, c), step(q, c))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_eager_calls_equal_the_registered_ops(backend, device):
    """Plain eager calls skip the custom ops' Python layer; the results are the registered ops'."""
    q, c = make_inputs(2, 9, 7, 3, torch.float32, device)
    q2, c2 = make_inputs(2, 5, 6, 2, torch.float32, device, seed=1)
    with ops.backend(backend):
        eager = ops.nearest_neighbor_pairs_many([q, q2], [c, c2], [4, 5])
        rows, match = torch.ops.fastdense.nearest_neighbor_pairs_many([q, q2], [c, c2], [4, 5])
        distance, index = ops.nearest_neighbor(q.requires_grad_(), c)
        op_distance, op_index = torch.ops.fastdense.nearest_neighbor(q.detach(), c)
    assert torch.equal(torch.cat([r.flatten() for r, _ in eager]), rows) and torch.equal(torch.cat([m.flatten() for _, m in eager]), match)
    assert torch.equal(distance, op_distance) and torch.equal(index, op_index) and not distance.requires_grad


def test_registered_op_passes_opcheck():
    q, c = make_inputs(2, 9, 7, 3, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastdense.nearest_neighbor.default, (q, c), test_utils=("test_schema", "test_faketensor"))
    # float64 input gives float64 distances, in the fake (compile-time) outputs as in the real ones
    torch.library.opcheck(torch.ops.fastdense.nearest_neighbor.default, (q.double(), c.double()), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastdense.nearest_neighbor_pairs_many.default, ([q, q], [c, c], [2, 9]), test_utils=("test_schema", "test_faketensor"))


def test_float64_runs_on_reference_and_triton_refuses_it():
    q, c = make_inputs(1, 4, 5, 3, torch.float64, "cpu")
    assert ops.nearest_neighbor(q, c)[0].dtype == torch.float64
    with ops.backend("triton"), pytest.raises(TypeError, match="float64 runs on the reference"):
        ops.nearest_neighbor(q, c)


# ---------------------------------------------------------------------------------------------
# Bad input


def _q(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    "query,candidates,error,pattern",
    [
        (_q(5, 3), _q(1, 4, 3), ValueError, r"query must have shape \[B, N, D\]"),
        (_q(1, 5, 3), _q(1, 1, 4, 3), ValueError, r"candidates must have shape \[B, M, D\]"),
        ([[[0.0]]], _q(1, 1, 1), TypeError, "query must be a torch.Tensor"),
        (torch.ones(1, 5, 3, dtype=torch.int64), _q(1, 4, 3), TypeError, "query must be a floating-point"),
        (_q(1, 5, 3), _q(1, 4, 3, dtype=torch.float16), TypeError, "same dtype"),
        (_q(2, 5, 3), _q(1, 4, 3), ValueError, "agree in B and D"),
        (_q(1, 5, 3), _q(1, 4, 2), ValueError, "agree in B and D"),
        (_q(1, 5, 3), _q(1, 0, 3), ValueError, r"M >= 1"),
        (_q(0, 5, 3), _q(0, 4, 3), ValueError, r"B >= 1"),
        (_q(1, 0, 3), _q(1, 4, 3), ValueError, r"N >= 1"),
        (_q(1, 5, 0), _q(1, 4, 0), ValueError, r"D >= 1"),
        (_q(1, 5, 3), _q(1, 4, 3).to("meta"), ValueError, "same device"),
    ],
)
def test_bad_input_is_rejected(query, candidates, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.nearest_neighbor(query, candidates)
    with pytest.raises(error, match=pattern):  # the single-pair form names its own arguments
        ops.nearest_neighbor_pairs(query, candidates, 1)
    with pytest.raises(error, match=pattern.replace("query", r"queries\[0\]").replace("candidates", r"candidates\[0\]")):
        ops.nearest_neighbor_pairs_many([query], [candidates], [1])


@pytest.mark.parametrize("k", [0, 6, -1, 2.0, True, None])
def test_bad_k_is_rejected(k):
    q, c = _q(1, 5, 3), _q(1, 4, 3)
    with pytest.raises(ValueError, match=r"^k must be an int in \[1, N\] for query of shape"):
        ops.nearest_neighbor_pairs(q, c, k)
    with pytest.raises(ValueError, match=r"ks\[1\] must be an int in \[1, N\]"):
        ops.nearest_neighbor_pairs_many([q, q], [c, c], [1, k])
    with pytest.raises(ValueError, match=r"^k must be an int in \[1, N\] for distance of shape \[B, N\] = \[2, 5\]"):
        ops.select_rows(torch.rand(2, 5), k)


@pytest.mark.parametrize("distance, error, pattern", [
    (torch.rand(2, 3, 4), ValueError, r"distance must have shape \[B, N\], got \[2, 3, 4\]"),
    (torch.arange(6).view(2, 3), TypeError, "distance must be a floating-point tensor"),
    ([[0.1, 0.2]], TypeError, "distance must be a torch.Tensor of shape"),
])
def test_select_rows_rejects_what_is_not_a_distance_matrix(distance, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.select_rows(distance, 1)


def test_bad_pair_lists_are_rejected():
    q, c = _q(1, 5, 3), _q(1, 4, 3)
    with pytest.raises(ValueError, match="same length"):
        ops.nearest_neighbor_pairs_many([q, q], [c], [1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        ops.nearest_neighbor_pairs_many([], [], [])
    with pytest.raises(ValueError, match="same device"):
        ops.nearest_neighbor_pairs_many([q, q.to("meta")], [c, c.to("meta")], [1, 1])
    # A single k instead of a list: 'int' object is not iterable, naming nothing.
    with pytest.raises(TypeError, match="ks must be a sequence"):
        ops.nearest_neighbor_pairs_many([q], [c], 1)
    with pytest.raises(TypeError, match="candidates must be a sequence"):
        ops.nearest_neighbor_pairs_many([q], None, [1])
    # A string is iterable, but its characters are not one k per pair.
    with pytest.raises(TypeError, match="ks must be a sequence"):
        ops.nearest_neighbor_pairs_many([q], [c], "1")


@pytest.mark.gpu
def test_kernel_never_allocates_the_distance_matrix(device):
    from benchmarks.common import peak_extra_bytes

    q, c = make_inputs(64, 784, 784, 512, torch.bfloat16, device)
    with ops.backend("triton"):
        ops.nearest_neighbor_pairs(q, c, 20)  # compile and tune first
        extra = peak_extra_bytes(lambda: ops.nearest_neighbor_pairs(q, c, 20), device)
    assert extra < 64 * 784 * 784 * 4 / 16, f"{extra} bytes: the op must not hold a B x N x M buffer"


_SM90_COMPILE_SCRIPT = r"""
import re
from benchmarks.sm90 import compile_for_sm90, spill_bytes
from fastdense.kernels import nearest_neighbor as nn_kernels

# Every tile the autotuner may pick, with the operands of its kind of dot: it compiles, streams its
# tiles with asynchronous copies (pipelined; scalar loads would not), takes the tensor cores where
# its kind says so, and fits in registers. The few bytes allowed are addresses and scalars parked
# across the candidate loop (nvdisasm places them there); the tiles this rules out spilled 0.2 to 9 KB.
operands = [("tensor_core", "bf16", None), ("float32", "fp32", "tf32x3"), ("float32", "fp32", "ieee")]
for kind, dtype, precision in operands:
    assert nn_kernels._dot_kind(precision) == kind
    for config in nn_kernels._tuning_configs(kind):
        # float32 locations beside every kind of feature: bf16 features with them is the default bf16 step
        signature = {"base_ptr": f"*{dtype}", "narrow_base_ptr": "*fp32", "groups_ptr": "*i64", "slot_offsets_ptr": "*i64", "dist_ptr": "*fp32", "index_ptr": "*i64",
                     "n_key": "i32", "m_key": "i32", "d_key": "i32", "max_n": "i32"}
        constants = dict(config.kwargs, DIRECT_MAX_D=nn_kernels.DIRECT_MAX_D, INPUT_PRECISION=precision, DOT_IN_FLOAT32=False)
        compiled = compile_for_sm90(nn_kernels._nearest_neighbor_kernel, signature, constants, num_warps=config.num_warps, num_stages=config.num_stages)
        name = f"{dtype} {precision} {config}"
        ptx = compiled.asm["ptx"]
        assert re.search(r"cp\.async", ptx), f"{name}: no asynchronous tile copies"
        if precision != "ieee" and config.kwargs["BLOCK_N"] >= 64:
            assert "wgmma.mma_async" in ptx, f"{name}: no wgmma"
        spilled = spill_bytes(compiled)
        assert spilled <= 48, f"{name}: spills {spilled} bytes"
signature = {"dist_ptr": "*fp32", "index_ptr": "*i64", "groups_ptr": "*i64", "rows_out_ptr": "*i64", "match_out_ptr": "*i64", "BLOCK": ""}
assert compile_for_sm90(nn_kernels._select_rows_kernel, signature, {"BLOCK": 128}).asm["cubin"]
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernels run for real in the tests above")
def test_kernels_compile_for_h100():
    """Compiling to sm_90 machine code catches what the interpreter lets through (see benchmarks/sm90.py)."""
    from benchmarks.sm90 import run_compile_script

    result = run_compile_script(_SM90_COMPILE_SCRIPT)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


class _LaunchCounter:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16])
def test_vicregl_step_takes_one_matching_launch_and_one_selection(feature_dtype, monkeypatch, device):
    """bfloat16 features beside float32 locations (a bf16 training step) share the launch too."""
    from fastdense.kernels import nearest_neighbor as nn_kernels

    matching = _LaunchCounter(nn_kernels._tuned_kernel if HAS_CUDA else nn_kernels._nearest_neighbor_kernel)
    selection = _LaunchCounter(nn_kernels._select_rows_kernel)
    monkeypatch.setattr(nn_kernels, "_tuned_kernel" if HAS_CUDA else "_nearest_neighbor_kernel", matching)
    monkeypatch.setattr(nn_kernels, "_select_rows_kernel", selection)
    _, queries, candidates, ks = vicregl_step_inputs(1, device, feature_dtype)
    assert {q.dtype for q in queries} == {feature_dtype, torch.float32}
    with ops.backend("triton"):
        ops.nearest_neighbor_pairs_many(queries, candidates, ks)
    assert (matching.launches, selection.launches) == (1, 1)


def test_one_matching_launch_per_wide_or_narrow_dtype(monkeypatch, device):
    """Wide pairs of two dtypes take two launches, each also carrying narrow pairs of one dtype."""
    from fastdense.kernels import nearest_neighbor as nn_kernels

    name = "_tuned_kernel" if HAS_CUDA else "_nearest_neighbor_kernel"
    recorder = _LaunchRecorder(getattr(nn_kernels, name))
    monkeypatch.setattr(nn_kernels, name, recorder)
    shapes = [(2, 5, 7, 24, torch.float16), (2, 3, 4, 16, torch.bfloat16), (2, 6, 5, 2, torch.float32), (1, 4, 9, 3, torch.bfloat16), (2, 9, 8, 2, torch.float32)]
    queries, candidates = [], []
    for i, (b, n, m, d, dtype) in enumerate(shapes):
        q, c = make_inputs(b, n, m, d, dtype, device, seed=40 + i)
        queries.append(q)
        candidates.append(c)
    dist, index, starts = nn_kernels.nearest_neighbor_many(queries, candidates)
    assert recorder.launches == 2
    assert {(args[0].dtype, args[1].dtype) for args in recorder.args} == {(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)}
    assert_matches_reference_pair_by_pair(queries, candidates, dist, index, starts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_16_bit_locations_at_pixel_scale(dtype, device):
    """Locations in source pixels (hundreds apart) in 16 bits: their squares pass float16's range
    (65504) and bfloat16's 8-bit mantissa, so the exact-difference scan squares in float32."""
    g = torch.Generator().manual_seed(3)
    q = (torch.rand(2, 30, 2, generator=g) * 600).to(device=device, dtype=dtype)
    c = (torch.rand(2, 40, 2, generator=g) * 600).to(device=device, dtype=dtype)
    with ops.backend("triton"):
        dist, index = ops.nearest_neighbor(q, c)
    ref_dist, ref_index = nearest_neighbor_reference(q, c)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-6, atol=1e-6)
    assert_indices_agree(q, c, index, ref_index)


def test_width_at_the_narrow_limit_matches_reference(device):
    """D = DIRECT_MAX_D (8) is the widest narrow pair: scanned by exact differences through the narrow
    base, like D = 2 beside it, while D = 9 and 16 take the expansion through the wide base."""
    from fastdense.kernels.nearest_neighbor import DIRECT_MAX_D

    assert DIRECT_MAX_D == 8
    shapes = [(2, 6, 7, 9), (2, 5, 9, 8), (1, 4, 3, 2), (2, 7, 5, 16), (1, 3, 4, 8)]
    queries, candidates = [], []
    for i, (b, n, m, d) in enumerate(shapes):
        q, c = make_inputs(b, n, m, d, torch.float32, device, seed=60 + i)
        queries.append(q)
        candidates.append(c)
    ks = [3, 5, 4, 2, 1]
    with ops.backend("triton"):
        pairs = ops.nearest_neighbor_pairs_many(queries, candidates, ks)
        single = ops.nearest_neighbor(queries[1], candidates[1])
    ref_dist, ref_index = nearest_neighbor_reference(queries[1], candidates[1])
    torch.testing.assert_close(single[0], ref_dist, rtol=1e-6, atol=1e-6)
    assert_indices_agree(queries[1], candidates[1], single[1], ref_index)
    for q, c, k, (rows, match) in zip(queries, candidates, ks, pairs):
        assert_pairs_agree(q, c, k, rows, match)


def test_launches_of_equal_shapes_write_their_own_rows(device):
    """Two launches in one call (wide pairs of two dtypes) whose pairs have the same shapes: each
    launch's group table sends its rows to its own pair's place in the output, not the other's."""
    q16, c16 = make_inputs(2, 5, 6, 24, torch.float16, device, seed=70)
    qbf, cbf = make_inputs(2, 5, 6, 24, torch.bfloat16, device, seed=71)
    with ops.backend("triton"):
        pairs = ops.nearest_neighbor_pairs_many([q16, qbf], [c16, cbf], [5, 5])
    for q, c, (rows, match) in zip([q16, qbf], [c16, cbf], pairs):
        assert torch.equal(rows, torch.arange(5, device=rows.device).expand(2, 5))
        assert_pairs_agree(q, c, 5, rows, match)


def test_float32_searches_in_exact_products_and_16_bit_on_tensor_cores(monkeypatch, device):
    """The issue's two modes: float32 input takes exact float32 products ("ieee", never TF32 unless
    FP32_INPUT_PRECISION asks), float16/bfloat16 the tensor cores' default (None). The interpreter
    computes both alike, so the launch arguments are what the CPU can check."""
    from fastdense.kernels import nearest_neighbor as nn_kernels

    name = "_tuned_kernel" if HAS_CUDA else "_nearest_neighbor_kernel"
    kernel, modes = getattr(nn_kernels, name), []

    class Recorder:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def record(*args, **kwargs):
                modes.append(kwargs["INPUT_PRECISION"])
                return launch(*args, **kwargs)

            return record

    monkeypatch.setattr(nn_kernels, name, Recorder())
    for dtype in DTYPES:
        q, c = make_inputs(1, 3, 5, 16, dtype, device)
        with ops.backend("triton"):
            ops.nearest_neighbor(q, c)
    assert nn_kernels.FP32_INPUT_PRECISION == "ieee" and modes == ["ieee", None, None]


# ---------------------------------------------------------------------------------------------
# Inputs are read in place: no packing copy


class _LaunchRecorder(_LaunchCounter):
    """Counts launches and keeps each launch's positional arguments."""

    def __init__(self, kernel):
        super().__init__(kernel)
        self.args = []

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def record(*args, **kwargs):
            self.args.append(args)
            return launch(*args, **kwargs)

        return record


def scattered_pairs(device):
    """Same-dtype pairs whose inputs lie all over memory: separate allocations; views of one storage
    at unaligned and aligned offsets, some below the aligned base the launcher picks (so their
    offsets from it are negative); one view that is the query of one pair and the candidates of
    another; a non-contiguous input passed twice; and a narrow (D = 2) pair in the same launch,
    read through its own base."""
    g = torch.Generator().manual_seed(11)
    store = torch.randn(1024, generator=g).to(device)
    unaligned = store[1:97].view(2, 3, 16)  # 4 bytes past a 16-byte boundary: never the base
    aligned = store[256:384].view(2, 4, 16)  # the first 16-byte aligned input: the base
    below = store[208:240].view(2, 1, 16)  # 48 elements below the base, a multiple of 16
    separate = torch.randn(2, 5, 16, generator=g).to(device)
    strided = torch.randn(2, 16, 6, generator=g).to(device).transpose(1, 2)
    near, far = torch.randn(2, 7, 2, generator=g).to(device), torch.randn(2, 4, 2, generator=g).to(device)
    assert not strided.is_contiguous()
    queries = [unaligned, aligned, aligned, below, separate, strided, strided, near]
    candidates = [aligned, unaligned, separate, aligned, strided, below, separate, far]
    return queries, candidates


def record_launch(monkeypatch):
    """Spies on the matching kernel's launches, on torch.cat and on the copies .contiguous() makes."""
    from fastdense.kernels import nearest_neighbor as nn_kernels

    name = "_tuned_kernel" if HAS_CUDA else "_nearest_neighbor_kernel"
    recorder = _LaunchRecorder(getattr(nn_kernels, name))
    monkeypatch.setattr(nn_kernels, name, recorder)
    calls = {"cat": 0, "contiguous copies": 0}
    cat, contiguous = torch.cat, torch.Tensor.contiguous

    def counting_cat(*args, **kwargs):
        calls["cat"] += 1
        return cat(*args, **kwargs)

    def counting_contiguous(t, *args, **kwargs):
        out = contiguous(t, *args, **kwargs)
        calls["contiguous copies"] += out.data_ptr() != t.data_ptr()
        return out

    monkeypatch.setattr(torch, "cat", counting_cat)
    monkeypatch.setattr(torch.Tensor, "contiguous", counting_contiguous)
    return recorder, calls


def assert_matches_reference_pair_by_pair(queries, candidates, dist, index, starts):
    for q, c, start in zip(queries, candidates, starts):
        ref_dist, ref_index = nearest_neighbor_reference(q, c)
        rows = slice(start, start + q.shape[0] * q.shape[1])
        torch.testing.assert_close(dist[rows].view(ref_dist.shape), ref_dist, rtol=1e-5, atol=1e-5)
        assert_indices_agree(q, c, index[rows].view(ref_index.shape), ref_index)


def test_launch_reads_inputs_in_place(monkeypatch, device):
    from fastdense.kernels.nearest_neighbor import nearest_neighbor_many

    queries, candidates = scattered_pairs(device)
    recorder, calls = record_launch(monkeypatch)
    dist, index, starts = nearest_neighbor_many(queries, candidates)
    assert recorder.launches == 1 and calls == {"cat": 0, "contiguous copies": 1}, calls
    base, narrow_base, _, slot_offsets = recorder.args[0][:4]
    assert base.data_ptr() == queries[1].data_ptr(), "the base must be an input itself (the first aligned one)"
    assert narrow_base.data_ptr() in (queries[-1].data_ptr(), candidates[-1].data_ptr()), "narrow pairs have a base of their own"
    inputs = queries + candidates
    narrow = [inputs[i % len(queries)].shape[2] <= 8 for i in range(len(inputs))]
    expected = [(t.data_ptr() - (narrow_base if is_narrow else base).data_ptr()) // t.element_size() for t, is_narrow in zip(inputs, narrow) if t.is_contiguous()]
    got = [offset for offset, t in zip(slot_offsets.tolist(), inputs) if t.is_contiguous()]
    assert got == expected and min(got) < 0
    assert_matches_reference_pair_by_pair(queries, candidates, dist, index, starts)

    # Through the public op (which detaches: new tensor objects over the same memory), no copy either.
    ks = [1, 2, 3, 1, 4, 6, 5, 7]
    calls.update({"cat": 0, "contiguous copies": 0})  # the reference checks above concatenate
    with ops.backend("triton"):
        pairs = ops.nearest_neighbor_pairs_many(queries, candidates, ks)
    assert calls == {"cat": 0, "contiguous copies": 1}, calls
    assert recorder.args[1][0].data_ptr() == queries[1].data_ptr()
    for q, c, k, (rows, match) in zip(queries, candidates, ks, pairs):
        assert_pairs_agree(q, c, k, rows, match)


def test_group_table_is_cached_by_shapes_and_offsets_come_per_call(monkeypatch, device):
    """A training loop's new tensors every step reuse the cached table, and are still read right."""
    from fastdense.kernels import nearest_neighbor as nn_kernels

    queries, candidates = scattered_pairs(device)
    nn_kernels.nearest_neighbor_many(queries, candidates)
    cached = dict(nn_kernels._TABLE_CACHE)
    g = torch.Generator().manual_seed(12)
    fresh_queries = [torch.randn(q.shape, generator=g).to(device) for q in queries]
    fresh_candidates = [torch.randn(c.shape, generator=g).to(device) for c in candidates]
    dist, index, starts = nn_kernels.nearest_neighbor_many(fresh_queries, fresh_candidates)
    assert nn_kernels._TABLE_CACHE.keys() == cached.keys() and all(nn_kernels._TABLE_CACHE[k] is t for k, t in cached.items())
    assert_matches_reference_pair_by_pair(fresh_queries, fresh_candidates, dist, index, starts)


def test_interpreter_on_device_tensors_falls_back_to_one_buffer(monkeypatch, device):
    """Where one base cannot reach every input (the interpreter on GPU tensors), the inputs are
    gathered into one buffer, with the same results."""
    from fastdense.kernels import nearest_neighbor as nn_kernels

    queries, candidates = scattered_pairs(device)
    monkeypatch.setattr(nn_kernels, "_inputs_addressable_from_one_base", lambda device: False)
    recorder, calls = record_launch(monkeypatch)
    dist, index, starts = nn_kernels.nearest_neighbor_many(queries, candidates)
    # one buffer for the wide inputs, one for the narrow ones
    assert calls["cat"] == 2 and recorder.args[0][0].numel() + recorder.args[0][1].numel() == sum(t.numel() for t in queries + candidates)
    assert_matches_reference_pair_by_pair(queries, candidates, dist, index, starts)
