"""The four methods against hand-written float64 maths, their EMA targets, and their options.

Networks (backbones, BN heads) are used as black boxes fed the same rows the method feeds them, since
batch-norm statistics depend on that grouping; everything a method adds on top (box pooling, matching,
alignment maps, class attention, neighbour selection, the losses) is recomputed here from the
formulas, in float64, without calling the method's own helpers.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastdense.ops as ops
from fastdense.geometry import crop_matrix
from fastdense.methods import METHODS, build_method, method_options, recipe_for
from fastdense.methods.ema import cosine_momentum
from fastdense.methods.ranks import variance_covariance_over_ranks
from fastdense.models import Backbone, build_backbone
from fastdense.pipelines.batch import ViewBatch



def tiny_resnet_like(name, **kwargs):
    """A ResNet-shaped trunk (conv1 .. layer4, stride 32) with 32 output channels, so the float64
    tests stay fast; ViTs and anything else go to the real builder."""
    if not name.startswith("resnet"):
        return build_backbone(name, **kwargs)

    def stage(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    trunk = nn.Module()
    trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
    trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4 = stage(8, 8, 1), stage(8, 16, 2), stage(16, 16, 2), stage(16, 32, 2)
    return Backbone("tiny", trunk, 32, 32, "resnet")


@pytest.fixture(autouse=True)
def tiny_backbones(monkeypatch, request):
    if "real_resnet" in request.node.name:
        return
    for module in ("scrl", "vicregl", "lewel"):
        monkeypatch.setattr(f"fastdense.methods.{module}.build_backbone", tiny_resnet_like)


SMALL_BYOL = dict(projector_dims=[16, 8], predictor_dims=[16, 8])


def make_batch(sizes, batch=3, seed=0, flips=None, dtype=torch.float64):
    """Random views of the given sizes with random crops (flipped where ``flips[v][b]``)."""
    g = torch.Generator().manual_seed(seed)
    views, matrices = [], []
    for v, size in enumerate(sizes):
        views.append(torch.randn(batch, 3, size, size, generator=g, dtype=dtype))
        x0, y0 = torch.rand(batch, generator=g) * 40, torch.rand(batch, generator=g) * 40
        width, height = 80 + torch.rand(batch, generator=g) * 100, 80 + torch.rand(batch, generator=g) * 100
        flip = torch.tensor(flips[v]) if flips is not None else torch.rand(batch, generator=g) < 0.5
        matrices.append(crop_matrix(x0, y0, width, height, size, size, flip=flip))
    return ViewBatch(views, torch.stack(matrices, 1), torch.full((batch, 2), 256), torch.arange(batch))


def cos64(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def assert_close(actual, expected, tol=1e-9):
    actual, expected = float(torch.as_tensor(actual).detach()), float(torch.as_tensor(expected).detach())
    assert abs(actual - expected) <= tol * max(1.0, abs(expected)), (actual, expected)




# --------------------------------------------------------------------------------------------- SCRL


def scrl_rois(batch):
    """Two boxes for image 0, one for image 2, none for image 1, in each view's pixels."""
    rois1 = torch.tensor([[0, 3.0, 5.0, 50.0, 60.0], [0, 20.0, 1.0, 64.0, 30.0], [2, 10.0, 10.0, 40.0, 55.0]], dtype=torch.float64)
    rois2 = torch.tensor([[0, 0.0, 8.0, 44.0, 64.0], [0, 12.0, 4.0, 60.0, 28.0], [2, 2.0, 18.0, 37.0, 50.0]], dtype=torch.float64)
    return [rois1, rois2]


def test_scrl_prepare_draws_the_steps_boxes_without_reading_the_device():
    """The trainer calls ``prepare`` while the device still runs the step before: it reads the
    matrices and indices from the loader's host copies, and the box seed is a host int, so it never
    waits for the device. On the meta device any such read would fail. ``forward`` takes the
    prepared boxes; they are keyed by the step, the same as ``sample_boxes(draw=step)``."""
    method = build_method("scrl", preset="cpu", **SMALL_BYOL)
    host = make_batch([64, 64], batch=4, dtype=torch.float32)
    expected = method.sample_boxes(host, draw=7).rois
    assert all(r.device.type == "cpu" for r in expected) and expected[0].shape[0] > 0
    assert not torch.equal(method.sample_boxes(host, draw=8).rois[0], expected[0])
    assert int(method.box_draws) == 0  # a given draw leaves the counter alone

    on_meta = ViewBatch.on_device([v.to("meta") for v in host.views], host.matrices, host.source_size, host.index, host.label, "meta")
    assert on_meta.matrices.device.type == "meta" and on_meta.on_host("matrices") is host.matrices
    copy.deepcopy(method).to("meta").prepare(on_meta, step=7)
    prepared = on_meta.extras["scrl_rois"]
    assert [r.device.type for r in prepared] == ["meta", "meta"] and [r.shape for r in prepared] == [r.shape for r in expected]

    method.prepare(host, step=7)  # on the host: the very boxes of draw 7
    assert all(torch.equal(a, b) for a, b in zip(host.extras["scrl_rois"], expected))
    host.extras["scrl_rois"] = expected
    taken = []
    method.box_loss = lambda view1, view2, rois: taken.append(rois) or {"loss": torch.zeros(())}
    method(host)
    assert taken[0] is expected


def test_scrl_box_seed_is_host_state_that_checkpoints_carry():
    """The box seed lives on the host (no device read per batch) and travels in the state dict, as
    a tensor (checkpoints load with weights_only); older checkpoints held it as a buffer."""
    import pickle

    method = build_method("scrl", preset="cpu", **SMALL_BYOL)
    other = build_method("scrl", preset="cpu", **SMALL_BYOL)
    assert isinstance(method.box_seed, int) and method.box_seed != other.box_seed
    state = method.state_dict()
    assert torch.equal(state["_extra_state"], torch.tensor(method.box_seed))
    other.load_state_dict(state)
    assert other.box_seed == method.box_seed
    batch = make_batch([64, 64], batch=4, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(other.sample_boxes(batch, draw=3).rois, method.sample_boxes(batch, draw=3).rois))
    legacy = {k: v for k, v in state.items() if k != "_extra_state"} | {"box_seed": torch.tensor(12345)}
    other.load_state_dict(legacy)
    assert other.box_seed == 12345
    assert pickle.loads(pickle.dumps(method)).box_seed == method.box_seed


def test_scrl_refuses_a_batch_without_two_views():
    method = build_method("scrl", preset="cpu", **SMALL_BYOL)
    one_view = make_batch([64], batch=2, dtype=torch.float32)
    given_boxes = [torch.tensor([[0.0, 1.0, 1.0, 20.0, 20.0]])] * 2
    for call in (lambda: method.prepare(one_view, step=0), lambda: method(one_view), lambda: method(one_view, rois=given_boxes)):
        with pytest.raises(ValueError, match="SCRL needs 2 views, got 1"):
            call()


def test_scrl_loss_matches_float64():
    torch.manual_seed(0)
    method = build_method("scrl", preset="cpu", **SMALL_BYOL).double()
    batch = make_batch([64, 64], batch=3)
    rois = scrl_rois(batch)
    out = method(batch, rois=rois)

    with torch.no_grad():
        # As the reference: both views in one backbone batch, the boxes of both views in one head
        # batch (one set of BatchNorm statistics), view 2's boxes indexing images B..2B-1.
        both = torch.cat(batch.views)
        boxes = torch.cat([rois[0], rois[1] + torch.tensor([3.0, 0, 0, 0, 0], dtype=torch.float64)])
        pool = lambda f: torchvision.ops.roi_align(f, boxes, output_size=1, spatial_scale=1 / 32, sampling_ratio=-1, aligned=False).flatten(1)  # noqa: E731
        q1, q2 = method.predictor(method.projector(pool(method.backbone(both)))).chunk(2)
        z1, z2 = method.target_projector(pool(method.target_backbone(both))).chunk(2)
        expected = ((2 - 2 * cos64(q1, z2)) + (2 - 2 * cos64(q2, z1))).sum() / 3
    assert_close(out["loss"], expected)
    # BYOL's heads, as SCRL's reference builds them: the last Linear of each has no bias.
    assert method.projector[-1].bias is None and method.predictor[-1].bias is None and method.target_projector[-1].bias is None


def test_scrl_no_boxes_gives_zero_loss_with_graph():
    method = build_method("scrl", preset="cpu", **SMALL_BYOL).double()
    batch = make_batch([64, 64], batch=2)
    empty = torch.zeros(0, 5, dtype=torch.float64)
    loss = method(batch, rois=[empty, empty])["loss"]
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_scrl_step_and_ema_target():
    torch.manual_seed(1)
    method = build_method("scrl", preset="cpu", **SMALL_BYOL).double()
    online_before = [p.detach().clone() for p in method.projector.parameters()]
    target_before = [p.detach().clone() for p in method.target_projector.parameters()]
    # The reference initialises the target independently.
    assert not torch.equal(online_before[0], target_before[0])
    running_before = method.target_backbone.trunk.bn1.running_mean.clone()

    batch = make_batch([64, 64], batch=3)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(batch, rois=scrl_rois(batch))["loss"].backward()
    assert all(p.grad is None for p in method.target_projector.parameters())
    opt.step()
    online_after = [p.detach().clone() for p in method.projector.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(online_before, online_after))
    running_after_forward = method.target_backbone.trunk.bn1.running_mean.clone()

    method.update_target(step=3, total_steps=10)
    m = 1 - (1 - 0.97) * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert method.momentum == pytest.approx(m, abs=1e-15)
    for t0, o1, t1 in zip(target_before, online_after, method.target_projector.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * o1, rtol=1e-12, atol=1e-12)
    # Parameters only: buffers are left alone.
    assert torch.equal(method.target_backbone.trunk.bn1.running_mean, running_after_forward)
    assert not torch.equal(running_before, running_after_forward)  # the train-mode target updated its own stats


def test_scrl_cpu_preset_real_resnet_trains():
    torch.manual_seed(0)
    method = build_method("scrl", preset="cpu")
    assert method.backbone.name == "resnet18" and method.backbone.out_channels == 512
    batch = make_batch([64, 64], batch=3, dtype=torch.float32)
    rois = [r.float() for r in scrl_rois(batch)]
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    first = method(batch, rois=rois)["loss"]
    first.backward()
    opt.step()
    assert float(method(batch, rois=rois)["loss"].detach()) < float(first.detach())


def test_scrl_target_copy_option_and_min_size_scaling():
    method = build_method("scrl", preset="cpu", target_init="copy", **SMALL_BYOL)
    for a, b in zip(method.projector.parameters(), method.target_projector.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    assert method.box_min_size(224) == 32.0
    assert method.box_min_size(96) == pytest.approx(32 * 96 / 224)
    assert build_method("scrl", preset="cpu", box_min_size=20.0, **SMALL_BYOL).box_min_size(96) == 20.0


def test_scrl_sampled_boxes_are_one_source_box_seen_in_each_view():
    """``sample_boxes`` hands the sampler view 1's and view 2's matrices, in that order: box k of
    view 1 and box k of view 2, each mapped to the source through its own view's matrix (flips
    included), are the same source box."""
    method = build_method("scrl", preset="cpu", **SMALL_BYOL)
    batch = make_batch([96, 96], batch=4, flips=[[0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.float32)
    rois = method.sample_boxes(batch, draw=0).rois
    assert rois[0].shape[0] > 0 and torch.equal(rois[0][:, 0], rois[1][:, 0])

    def in_source(r, v):
        matrices = batch.matrices[r[:, 0].long(), v].double()  # [K, 3, 3]
        corners = torch.stack([r[:, [1, 2]], r[:, [3, 4]]], 1).double()  # [K, 2, 2]: (x0, y0), (x1, y1)
        points = torch.cat([corners, torch.ones_like(corners[..., :1])], -1)
        mapped = (matrices[:, None] @ points[..., None])[..., :2, 0]  # [K, 2, 2]
        return torch.cat([mapped.amin(1), mapped.amax(1)], 1)  # a flip swaps the x corners

    # Boxes clipped at a view's edge (the sampler clips to [0, view size]) cover less of the source.
    inside = ((torch.cat(rois, 1)[:, [1, 2, 3, 4, 6, 7, 8, 9]] - 48).abs() < 48).all(1)
    assert int(inside.sum()) >= rois[0].shape[0] // 2
    box1, box2 = in_source(rois[0][inside], 0), in_source(rois[1][inside], 1)
    assert not torch.allclose(box1, rois[0][inside, 1:].double(), atol=1.0)  # the views are not the source
    torch.testing.assert_close(box1, box2, rtol=0, atol=1e-3)


def test_scrl_sampler_gets_the_methods_box_options():
    """The box options reach the sampler (whose own tests are tests/test_boxes.py): the boxes are
    the sampler's for exactly those options, and each option changes them on this batch."""
    from fastdense.boxes import keyed_scrl_randoms, sample_scrl_boxes

    options = dict(num_boxes=4, box_min_size=10.0, box_iou_threshold=0.3, box_max_tries=3)
    method = build_method("scrl", preset="cpu", **SMALL_BYOL, **options)
    method.box_seed = 9  # fixed draws, so that every option below changes them
    batch = make_batch([64, 64, 32], batch=4, seed=3, dtype=torch.float32)
    got = method.sample_boxes(batch, draw=3).rois

    def sampled(num_boxes=4, min_size=10.0, iou_threshold=0.3, max_tries=3):
        return sample_scrl_boxes(batch.matrices[:, :2], view_size=(64, 64), num_boxes=num_boxes, min_size=min_size, iou_threshold=iou_threshold,
                                 max_tries=max_tries, random=keyed_scrl_randoms(method.box_seed, 3, batch.index)).rois

    assert got[0].shape[0] > 0 and all(torch.equal(a, b) for a, b in zip(got, sampled()))
    for changed in (dict(num_boxes=10), dict(min_size=32 * 64 / 224), dict(iou_threshold=0.5), dict(max_tries=50)):
        assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, sampled(**changed))), changed


def test_scrl_forward_draws_new_boxes_at_every_call():
    """Called without the trainer's ``prepare``, each ``sample_boxes`` call takes the next draw of
    the counter: a step never reuses the boxes of the step before."""
    method = build_method("scrl", preset="cpu", **SMALL_BYOL)
    batch = make_batch([64, 64], batch=4, dtype=torch.float32)
    first, second = method.sample_boxes(batch).rois, method.sample_boxes(batch).rois
    assert int(method.box_draws) == 2
    for got, draw in ((first, 0), (second, 1)):
        assert all(torch.equal(a, b) for a, b in zip(got, method.sample_boxes(batch, draw=draw).rois))
    assert not torch.equal(first[0], second[0])


def test_scrl_pools_boxes_in_float32_under_bfloat16():
    """RoIAlign runs in float32 even when the backbone's map is bfloat16 (autocast), as the
    reference keeps the pooling out of autocast."""
    method = build_method("scrl", preset="cpu", **SMALL_BYOL)
    features = torch.randn(3, 32, 2, 2).bfloat16()
    rois = scrl_rois(None)[0]
    with torch.autocast("cpu", torch.bfloat16):
        pooled = method.pool(features, rois.float())
    assert pooled.dtype == torch.float32
    expected = torchvision.ops.roi_align(features.double(), rois, output_size=1, spatial_scale=1 / 32, sampling_ratio=-1, aligned=False).flatten(1)
    torch.testing.assert_close(pooled.double(), expected, rtol=1e-5, atol=1e-6)


def test_scrl_forward_samples_boxes():
    torch.manual_seed(0)
    method = build_method("scrl", preset="cpu", **SMALL_BYOL)
    batch = make_batch([96, 96], batch=4, dtype=torch.float32)
    # Heavily overlapping crops: every image contributes boxes.
    batch.matrices[:, 1] = batch.matrices[:, 0]
    out = method(batch)
    assert torch.isfinite(out["loss"]) and float(out["boxes_per_image"]) == method.options["num_boxes"]


# ------------------------------------------------------------------------------------------ VICRegL


def variance64(x):
    """mean_d relu(1 - sqrt(unbiased var + 1e-4)), per slot for [n, S, D], slots averaged."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    centred = x - x.mean(0, keepdim=True)
    var = (centred**2).sum(0) / (x.shape[0] - 1)
    return torch.relu(1 - torch.sqrt(var + 1e-4)).mean()


def covariance64(x):
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    n, slots, dim = x.shape
    total = 0.0
    for s in range(slots):
        c = x[:, s] - x[:, s].mean(0)
        cov = c.T @ c / (n - 1)
        total = total + (cov**2).sum() - (torch.diagonal(cov) ** 2).sum()
    return total / dim / slots


def vicreg64(x, y):
    inv = ((x - y) ** 2).mean()
    return inv, (variance64(x) + variance64(y)) / 2, (covariance64(x) + covariance64(y)) / 2


def topk_matches(keys, candidate_keys, k):
    """For each image: the k rows whose nearest candidate is closest (ascending row order), and that candidate."""
    rows, cols = [], []
    for b in range(keys.shape[0]):
        dist = torch.cdist(keys[b], candidate_keys[b])
        nearest_dist, nearest = dist.min(dim=1)
        order = sorted(range(len(nearest_dist)), key=lambda r: (float(nearest_dist[r]), r))[:k]
        order = sorted(order)
        rows.append(torch.tensor(order))
        cols.append(nearest[order])
    return torch.stack(rows), torch.stack(cols)


def source_positions(matrices, h, w, size):
    """Cell (i, j) sits at view point ((j + .5) size / w, (i + .5) size / h); M maps it to the source."""
    points = []
    for i in range(h):
        for j in range(w):
            points.append([(j + 0.5) * size / w, (i + 0.5) * size / h, 1.0])
    points = torch.tensor(points, dtype=torch.float64)  # [hw, 3]
    return (matrices.double() @ points.T).transpose(1, 2)[..., :2]  # [B, hw, 2]


@pytest.mark.parametrize("all_matches, weights", [(False, (0.75, 25.0, 25.0, 1.0)), (True, (0.6, 2.0, 3.0, 5.0))])
def test_vicregl_loss_matches_float64(all_matches, weights):
    torch.manual_seed(0)
    alpha, inv_coeff, var_coeff, cov_coeff = weights
    method = build_method("vicregl", preset="cpu", expander="16-16-12", local_projector="8-8-6", num_matches=[5, 3], l2_all_matches=all_matches,
                          alpha=alpha, inv_coeff=inv_coeff, var_coeff=var_coeff, cov_coeff=cov_coeff).double()
    sizes = [128, 128, 64, 64]
    batch = make_batch(sizes, batch=4, flips=[[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]])
    out = method(batch)

    with torch.no_grad():
        # One pass per view, as the reference: BatchNorm statistics over that view's B images (and
        # B * HW locations in the local projector), never over several views.
        z, local, pos = [], [], []
        for v, view in enumerate(batch.views):
            maps = method.backbone(view)
            n, c, h, w = maps.shape
            z.append(method.expander(maps.mean(dim=(2, 3))))
            rows = maps.permute(0, 2, 3, 1).reshape(n * h * w, c)
            local.append(method.local_projector(rows).reshape(n, h * w, -1))
            pos.append(source_positions(batch.matrices[:, v], h, w, sizes[v]))

        pairs = [(i, j) for i in range(2) for j in range(4) if j != i]
        inv_g = sum(((z[i] - z[j]) ** 2).mean() for i, j in pairs) / len(pairs)
        var_g = sum(variance64(zv) for zv in z) / 4
        cov_g = sum(covariance64(zv) for zv in z) / 4
        global_loss = inv_coeff * inv_g + var_coeff * var_g + cov_coeff * cov_g

        totals = torch.zeros(3, dtype=torch.float64)
        for i, j in pairs:
            for key_i, key_j, use_all in ((local[i], local[j], all_matches), (pos[i], pos[j], False)):
                for (a, b, ka, kb, k) in ((i, j, key_i, key_j, 5), (j, i, key_j, key_i, 3)):
                    k = ka.shape[1] if use_all else min(k, ka.shape[1])
                    rows, cols = topk_matches(ka, kb, k)
                    x = torch.stack([local[a][n, rows[n]] for n in range(4)])
                    y = torch.stack([local[b][n, cols[n]] for n in range(4)])
                    totals += torch.stack(vicreg64(x, y)) / 2
        totals /= len(pairs)
        local_loss = inv_coeff * totals[0] + var_coeff * totals[1] + cov_coeff * totals[2]
        expected = alpha * global_loss + (1 - alpha) * local_loss
    assert_close(out["global_loss"], global_loss)
    assert_close(out["local_loss"], local_loss)
    assert_close(out["loss"], expected)


def test_vicregl_positions_follow_flips():
    method = build_method("vicregl", preset="cpu", expander="8-8", local_projector="4-4")
    batch = make_batch([64, 64], batch=2, flips=[[0, 0], [1, 1]], dtype=torch.float32)
    batch.matrices[:, 1] = crop_matrix(*[batch.matrices[:, 0, 0, 2], batch.matrices[:, 0, 1, 2]], batch.matrices[:, 0, 0, 0] * 64, batch.matrices[:, 0, 1, 1] * 64, 64, 64, flip=True)
    _, _, positions = method.encode(batch)
    # A flipped copy of the same crop: cell (i, j) of view 1 sits where cell (i, w - 1 - j) of view 0 does.
    mirrored = positions[0].reshape(2, 2, 2, 2).flip(2).reshape(2, 4, 2)
    torch.testing.assert_close(positions[1], mirrored)


def test_vicregl_step_changes_online_network():
    torch.manual_seed(0)
    method = build_method("vicregl", preset="cpu", expander="16-16", local_projector="8-8")
    batch = make_batch([64, 64, 32], batch=4, dtype=torch.float32)
    before = [p.detach().clone() for p in method.parameters()]
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    method(batch)["loss"].backward()
    opt.step()
    changed = [not torch.equal(a, b) for a, b in zip(before, method.parameters())]
    assert all(changed[:3]) and changed[-1]
    method.update_target(1, 10)  # no target: a no-op that must not fail


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_vicregl_step_matches_all_pairs_in_one_launch(autocast):
    """A whole VICRegL step (2 global + 2 local views: 6 ordered pairs, both spaces, both ways = 24
    matchings) takes one matching launch and one selection launch on the Triton backend (features
    and positions share a launch, bfloat16 features under autocast with float32 positions too), and
    its loss equals the reference backend's."""
    from fastdense.kernels import nearest_neighbor as nn_kernels

    torch.manual_seed(0)
    # the compiled kernels on a GPU, Triton's interpreter on the CPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # local features wider than the kernel's narrow (exact-difference) width, as in real runs
    method = build_method("vicregl", preset="cpu", expander="8-8", local_projector="4-12", num_matches=[3, 2]).to(device)
    batch = make_batch([64, 64, 32, 32], batch=2, dtype=torch.float32).to(device)
    launches = {"matching": 0, "selection": 0}

    def counted(kernel, name):
        class Counted:
            def __getitem__(self, grid):
                launches[name] += 1
                return kernel[grid]
        return Counted()

    kernel_name = "_tuned_kernel" if torch.cuda.is_available() else "_nearest_neighbor_kernel"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nn_kernels, kernel_name, counted(getattr(nn_kernels, kernel_name), "matching"))
        patch.setattr(nn_kernels, "_select_rows_kernel", counted(nn_kernels._select_rows_kernel, "selection"))
        with ops.backend("triton"), torch.autocast(device, torch.bfloat16, enabled=autocast):
            fast = method(batch)["local_loss"]
    assert launches == {"matching": 1, "selection": 1}
    with ops.backend("reference"), torch.autocast(device, torch.bfloat16, enabled=autocast):
        reference = method(batch)["local_loss"]
    # CONVENTIONS' tolerances: bfloat16 inputs 2e-2, float32 1e-5
    torch.testing.assert_close(fast, reference, rtol=2e-2 if autocast else 1e-5, atol=1e-6)


def test_vicregl_real_resnet_zero_initialises_residual_branches():
    # VICRegL's reference builds its ResNets with zero_init_residual=True (each block starts as the
    # identity); SCRL's and LEWEL's references keep torchvision's default.
    trunk = build_method("vicregl", preset="cpu", expander="8-8", local_projector="4-4").backbone.trunk
    assert all(float(block.bn2.weight.detach().abs().max()) == 0.0 for layer in (trunk.layer1, trunk.layer4) for block in layer)
    assert float(build_backbone("resnet18").trunk.layer1[0].bn2.weight.detach().abs().min()) == 1.0


def test_vicregl_convnext_is_the_references():
    """VICRegL's ConvNeXt: no layer scale, drop-path 0.1, a final LayerNorm on every location before
    both the pooling and the local projector, LayerNorm (not BatchNorm) in both heads."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    method = build_method("vicregl", backbone="convnext_atto", expander="16-12", local_projector="8-6").double()
    trunk = method.backbone.trunk
    blocks = [block for stage in trunk.stages for block in stage.blocks]
    assert all(block.gamma is None for block in blocks) and blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    for head in (method.expander, method.local_projector):
        assert isinstance(head[1], nn.LayerNorm) and head[-1].bias is None
    batch = make_batch([64, 64], batch=2)
    method.eval()  # no drop-path draws: the recomputation below sees the same network
    embeddings, local, _ = method.encode(batch)
    with torch.no_grad():
        maps = trunk.forward_features(batch.views[0]).permute(0, 2, 3, 1)  # [B, h, w, C]
        maps = F.layer_norm(maps, maps.shape[-1:], trunk.head.norm.weight, trunk.head.norm.bias, eps=1e-6).flatten(1, 2)
        torch.testing.assert_close(embeddings[0], method.expander(maps.mean(1)), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(local[0], method.local_projector(maps), rtol=1e-10, atol=1e-12)


def test_variance_covariance_over_ranks_in_one_process_is_the_op():
    """No process group: the op on this batch, gradient unscaled (the two-rank case is
    tests/test_distributed.py's one step equal to the full batch's)."""
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    terms = variance_covariance_over_ranks(x, eps=1e-3)
    expected = ops.vicreg_variance_covariance(x, eps=1e-3)
    for term, reference in zip(terms, expected):
        assert torch.equal(term, reference)
        assert torch.equal(*(torch.autograd.grad(t, x, retain_graph=True)[0] for t in (term, reference)))


# -------------------------------------------------------------------------------------------- LEWEL

SMALL_LEWEL = dict(neck_dims=[16, 8], predictor_dims=[16, 8], object_projector_dims=[16, 6], object_predictor_dims=[16, 6])


def lewel64(method, encoder, images, map_scale=1.0):
    """(image embedding [B, D], object embeddings [B, maps_per_head, D]) written out with einsum."""
    x = encoder.backbone(images).flatten(2)  # [B, C, P]
    b, c, p = x.shape
    columns = torch.cat([x, x.mean(2, keepdim=True)], 2)
    out = encoder.neck(columns.transpose(1, 2).reshape(b * (p + 1), c)).reshape(b, p + 1, -1)  # [B, P+1, M]
    g = out[:, p]
    pixels = out[:, :p]  # [B, P, M]
    maps = torch.softmax((pixels / pixels.norm(dim=2, keepdim=True)) / map_scale, dim=1)  # softmax over pixels
    heads = 4
    per_head = maps.shape[2] // heads
    groups = []
    for h in range(heads):
        channels = x[:, h * c // heads : (h + 1) * c // heads]  # [B, C/H, P]
        head_maps = maps[:, :, h * per_head : (h + 1) * per_head]  # [B, P, M/H]
        groups.append(torch.einsum("bcp,bpj->bjc", channels, head_maps))
    objects = torch.cat(groups, dim=2)  # [B, M/H, C] with channels head-major
    o = encoder.object_projector(objects.reshape(-1, c)).reshape(b, per_head, -1)
    return g, o


@pytest.mark.parametrize("eman, map_scale", [(False, 1.0), (True, 0.3)])
def test_lewel_loss_matches_float64(eman, map_scale):
    torch.manual_seed(0)
    method = build_method("lewel", preset="cpu", eman=eman, map_scale=map_scale, **SMALL_LEWEL).double()
    batch = make_batch([96, 96], batch=3)
    out = method(batch)
    with torch.no_grad():
        online = [lewel64(method, method.encoder, v, map_scale) for v in batch.views]
        target = [lewel64(method, method.target_encoder, v, map_scale) for v in batch.views]
        total = 0.0
        for a, b in ((0, 1), (1, 0)):
            g, o = online[a]
            gt, ot = target[b]
            glob = (2 - 2 * cos64(method.predictor(g), gt)).mean()
            po = method.object_predictor(o.reshape(-1, o.shape[-1])).reshape(o.shape)
            obj = (2 - 2 * cos64(po, ot)).mean()
            total = total + 0.5 * glob + 0.5 * obj
    assert_close(out["loss"], total)
    # LEWEL's reference MLPs (MLP1D) are bias-free 1x1 convolutions: a bias on the neck's last layer
    # would shift the alignment maps before their L2 normalisation.
    heads = (method.encoder.neck, method.encoder.object_projector, method.predictor, method.object_predictor)
    assert all(head[-1].bias is None for head in heads)


def test_lewel_heads_start_as_the_reference_initialises_them():
    torch.manual_seed(0)
    method = build_method("lewel", preset="cpu")  # 512 -> 512 -> 128 heads: enough weights for a std
    heads = (method.encoder.neck, method.encoder.object_projector, method.predictor, method.object_predictor)
    for head in heads:
        linears = [layer for layer in head if isinstance(layer, nn.Linear)]
        assert len(linears) == 2
        for layer in linears:
            expected = math.sqrt(2.0 / layer.out_features)  # He-normal over the outputs
            weight = layer.weight.detach()
            assert abs(float(weight.std()) / expected - 1) < 0.02 and abs(float(weight.mean())) < 0.02 * expected
            assert layer.bias is None or not layer.bias.any()
    for online, target in zip(method.encoder.parameters(), method.target_encoder.parameters()):
        assert torch.equal(online, target)  # the target copies the initialised encoder


def test_lewel_eman_target_is_eval_and_averages_buffers():
    torch.manual_seed(2)
    method = build_method("lewel", preset="cpu", eman=True, **SMALL_LEWEL).double()
    method.train()
    assert method.encoder.training and not method.target_encoder.training
    batch = make_batch([64, 64], batch=3)
    target_buffer = method.target_encoder.neck[1].running_mean.clone()
    target_param = method.target_encoder.neck[0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(batch)["loss"].backward()
    opt.step()
    assert torch.equal(method.target_encoder.neck[1].running_mean, target_buffer)  # eval mode: untouched by forward
    online_buffer = method.encoder.neck[1].running_mean.clone()
    assert not torch.equal(online_buffer, target_buffer)
    online_param = method.encoder.neck[0].weight.detach().clone()
    assert not torch.equal(online_param, target_param)
    method.update_target(step=0, total_steps=5)
    m = 0.98
    torch.testing.assert_close(method.target_encoder.neck[1].running_mean, m * target_buffer + (1 - m) * online_buffer, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(method.target_encoder.neck[0].weight, m * target_param + (1 - m) * online_param, rtol=1e-12, atol=1e-12)
    assert method.target_encoder.neck[1].num_batches_tracked == method.encoder.neck[1].num_batches_tracked


# ---------------------------------------------------------------------------------------- SelfPatch

SMALL_SELFPATCH = dict(
    image_out_dim=32, patch_out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8, drop_path_rate=0.0,
    backbone_options={"depth": 1, "embed_dim": 24, "num_heads": 2},
)


def class_attention64(block, tokens, query):
    """CaiT class attention written out: the query attends to [query, tokens], then an MLP."""
    u = torch.cat([query, tokens], 1)
    u = F.layer_norm(u, u.shape[-1:], block.norm1.weight, block.norm1.bias, eps=1e-6)
    n, t, c = u.shape
    heads = block.num_heads
    split = lambda x: x.reshape(n, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
    q = split(u[:, :1] @ block.q.weight.T + block.q.bias)
    k = split(u @ block.k.weight.T + block.k.bias)
    v = split(u @ block.v.weight.T + block.v.bias)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    mixed = (attn @ v).transpose(1, 2).reshape(n, 1, c) @ block.proj.weight.T + block.proj.bias
    query = query + mixed
    hidden = F.layer_norm(query, (c,), block.norm2.weight, block.norm2.bias, eps=1e-6)
    return query + block.mlp(hidden)


def dino_head64(head, x):
    y = head.mlp(x)
    y = y / y.norm(dim=-1, keepdim=True)
    w = head.last_direction / head.last_direction.norm(dim=1, keepdim=True)
    return y @ w.T


def selfpatch64(network, images, teacher, num_neighbours=4):
    tokens = network.backbone(images)  # [B, N, C]
    b, n, c = tokens.shape
    side = images.shape[-1] // 16
    sp = network.head

    def attend(t):
        query = sp.token.expand(t.shape[0], 1, c)
        for block in sp.blocks:
            query = class_attention64(block, t, query)
        return query

    image = attend(tokens)
    if teacher:
        patches = []
        for bi in range(b):
            for i in range(n):
                r, col = divmod(i, side)
                window = sorted({((r + dr) % side) * side + (col + dc) % side for dr in (-1, 0, 1) for dc in (-1, 0, 1)} - {i})
                sims = torch.stack([cos64(tokens[bi, i], tokens[bi, j]) for j in window])
                best = [window[j] for j in sims.topk(num_neighbours).indices.tolist()]
                patches.append(attend(tokens[bi, best][None])[0])
        patches = torch.stack(patches).reshape(b, n, c)
    else:
        patches = tokens
    out = F.layer_norm(torch.cat([image, patches], 1), (c,), sp.norm.weight, sp.norm.bias, eps=1e-6)
    return dino_head64(network.image_head, out[:, 0]), dino_head64(network.patch_head, out[:, 1:])


SELFPATCH_DEFAULTS = dict(teacher_temp=0.04, student_temp=0.1, center_momentum=0.9, patch_loss_weight=0.1, num_neighbours=4)


@pytest.mark.parametrize("options", [{}, dict(teacher_temp=0.07, student_temp=0.2, center_momentum=0.8, patch_loss_weight=0.3, num_neighbours=3)])
def test_selfpatch_loss_and_centres_match_float64(options):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    method = build_method("selfpatch", preset="cpu", **SMALL_SELFPATCH, **options).double()
    o = {**SELFPATCH_DEFAULTS, **options}
    with torch.no_grad():  # a teacher that differs from the student, and non-zero centres
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        method.center.normal_()
        method.patch_center.normal_()
    center, patch_center = method.center.clone(), method.patch_center.clone()
    batch = make_batch([64, 64, 48, 48], batch=2)
    out = method(batch)
    with torch.no_grad():
        student = [selfpatch64(method.student, v, teacher=False) for v in batch.views]
        teacher = [selfpatch64(method.teacher, v, teacher=True, num_neighbours=o["num_neighbours"]) for v in batch.views]
        image_terms = []
        for i in range(2):
            q = torch.softmax((teacher[i][0] - center) / o["teacher_temp"], -1)
            for v in range(4):
                if v != i:
                    image_terms.append(-(q * torch.log_softmax(student[v][0] / o["student_temp"], -1)).sum(-1).mean())
        patch_terms = []
        for v in range(4):
            q = torch.softmax((teacher[v][1] - patch_center) / o["teacher_temp"], -1)
            patch_terms.append(-(q * torch.log_softmax(student[v][1] / o["student_temp"], -1)).sum(-1).mean())
        image_loss = sum(image_terms) / 6
        patch_loss = sum(patch_terms) / 4
    assert_close(out["image_loss"], image_loss)
    assert_close(out["patch_loss"], patch_loss)
    assert_close(out["loss"], image_loss + o["patch_loss_weight"] * patch_loss)
    mean_image = torch.cat([t[0] for t in teacher]).mean(0, keepdim=True)
    mean_patch = torch.cat([t[1].reshape(-1, 16) for t in teacher]).mean(0, keepdim=True)
    m = o["center_momentum"]
    torch.testing.assert_close(method.center, m * center + (1 - m) * mean_image, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(method.patch_center, m * patch_center + (1 - m) * mean_patch, rtol=1e-10, atol=1e-12)


def test_selfpatch_freezes_last_layers_in_the_first_epoch():
    pytest.importorskip("timm")
    method = build_method("selfpatch", preset="cpu", **SMALL_SELFPATCH)
    last = {id(method.student.image_head.last_direction), id(method.student.patch_head.last_direction)}
    assert {id(p) for p in method.frozen_parameters(0)} == last and method.frozen_parameters(1) == []
    assert build_method("selfpatch", preset="cpu", freeze_last_layer=0, **SMALL_SELFPATCH).frozen_parameters(0) == []
    from fastdense.training import config as cfg

    assert cfg.resolve("selfpatch")["optimizer"]["clip_grad_per_parameter"] is True


def test_selfpatch_step_and_ema_teacher():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    method = build_method("selfpatch", preset="cpu", **SMALL_SELFPATCH)
    for a, b in zip(method.student.parameters(), method.teacher.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    assert not method.teacher.training
    batch = make_batch([48, 48, 48], batch=2, dtype=torch.float32)
    teacher_before = [p.detach().clone() for p in method.teacher.parameters()]
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(batch)["loss"].backward()
    opt.step()
    student_after = [p.detach().clone() for p in method.student.parameters()]
    assert sum(not torch.equal(a, b) for a, b in zip(teacher_before, student_after)) > len(student_after) // 2
    method.update_target(step=7, total_steps=10)
    m = 1 - (1 - 0.996) * (math.cos(math.pi * 0.7) + 1) / 2
    for t0, s1, t1 in zip(teacher_before, student_after, method.teacher.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s1, rtol=1e-6, atol=1e-7)


def _cubic64(distance: float, a: float = -0.75) -> float:
    d = abs(distance)
    if d <= 1:
        return ((a + 2) * d - (a + 3)) * d * d + 1
    return (((d - 5) * d + 8) * d - 4) * a if d < 2 else 0.0


def _bicubic_matrix64(size_out: int, size_in: int, scale_factor: float) -> torch.Tensor:
    """Rows: output positions; the weights of a half-pixel bicubic (a = -0.75) resampling at
    ``scale_factor``, edge pixels repeated; float64, written out from the formula."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        source = (i + 0.5) / scale_factor - 0.5
        left = math.floor(source)
        for offset in (-1, 0, 1, 2):
            matrix[i, min(max(left + offset, 0), size_in - 1)] += _cubic64(source - (left + offset))
    return matrix


@pytest.mark.parametrize("old, new", [((14, 14), (6, 6)), ((14, 14), (3, 3)), ((14, 14), (7, 5)), ((4, 6), (9, 13))])
def test_dino_pos_embed_resize_matches_a_float64_bicubic_at_the_reference_scale(old, new):
    from fastdense.models.backbones import dino_resample_pos_embed

    torch.manual_seed(0)
    pos_embed = torch.randn(1, old[0] * old[1], 5)
    got = dino_resample_pos_embed(pos_embed, new, old)
    grid = pos_embed.double().reshape(*old, 5)

    def resized(scale_y, scale_x):
        rows, cols = _bicubic_matrix64(new[0], old[0], scale_y), _bicubic_matrix64(new[1], old[1], scale_x)
        return torch.einsum("ij,jkc,lk->ilc", rows, grid, cols).reshape(1, new[0] * new[1], 5)

    expected = resized((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # the 0.1 moves the samples: a resize to the grid (scale new / old) is another result
    assert (resized(new[0] / old[0], new[1] / old[1]) - expected).abs().max() > 1e-3
    assert dino_resample_pos_embed(pos_embed, old, old) is pos_embed
    with pytest.raises(ValueError, match="rows"):
        dino_resample_pos_embed(pos_embed, new, (old[0] + 1, old[1]))


def test_selfpatch_vit_resizes_its_position_embedding_as_the_reference():
    pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    from fastdense.models.backbones import dino_resample_pos_embed

    torch.manual_seed(0)
    method = build_method("selfpatch", preset="cpu", **SMALL_SELFPATCH)
    images = torch.randn(2, 3, 48, 48)  # a 3 x 3 token grid; the embedding is the 14 x 14 grid's
    for network in (method.student, method.teacher):
        trunk = network.backbone.trunk
        assert trunk._pos_embed.args[0] is trunk  # each network its own trunk's embedding
        patches = trunk.patch_embed(images).reshape(2, 9, -1)
        torch.testing.assert_close(trunk._pos_embed(trunk.patch_embed(images)), patches + dino_resample_pos_embed(trunk.pos_embed, (3, 3), (14, 14)))
    copied = copy.deepcopy(method.student).backbone.trunk
    assert copied._pos_embed.args[0] is copied

    timm_way = build_method("selfpatch", preset="cpu", pos_embed_resize="timm", **SMALL_SELFPATCH)
    timm_way.load_state_dict(method.state_dict())  # the same weights, the same state dict keys
    trunk = timm_way.student.backbone.trunk
    timm_embed = resample_abs_pos_embed(trunk.pos_embed, new_size=(3, 3), old_size=(14, 14), num_prefix_tokens=0)
    torch.testing.assert_close(trunk._pos_embed(trunk.patch_embed(images)), trunk.patch_embed(images).reshape(2, 9, -1) + timm_embed)
    with torch.no_grad():
        assert not torch.allclose(timm_way.student.backbone(images), method.student.backbone(images))
        big = torch.randn(1, 3, 224, 224)  # the embedding's own grid: both as they are
        torch.testing.assert_close(timm_way.student.backbone(big), method.student.backbone(big))
    with pytest.raises(ValueError, match="pos_embed_resize"):
        build_method("selfpatch", preset="cpu", pos_embed_resize="nearest", **SMALL_SELFPATCH)
    from fastdense.models.backbones import use_reference_pos_embed

    small = dict(depth=1, embed_dim=24, num_heads=2)
    with pytest.raises(ValueError, match="class/register"):
        use_reference_pos_embed(build_backbone("vit_tiny_patch16_224", dynamic_img_size=True, **small).trunk)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        use_reference_pos_embed(build_backbone("vit_tiny_patch16_224", class_token=False, global_pool="", **small).trunk)


# ------------------------------------------------------------------------------------------ options


def test_registry_and_option_validation():
    assert sorted(METHODS) == ["lewel", "scrl", "selfpatch", "vicregl"]
    with pytest.raises(ValueError, match="method must be one of"):
        build_method("simclr")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['hidden'\]"):
        build_method("scrl", hidden=3)
    with pytest.raises(ValueError, match="preset must be one of"):
        build_method("lewel", preset="tpu")
    with pytest.raises(ValueError, match="target_init"):
        build_method("scrl", preset="cpu", target_init="zeros")
    with pytest.raises(ValueError, match="alpha"):
        build_method("vicregl", preset="cpu", alpha=1.5)
    with pytest.raises(ValueError, match="num_matches"):
        build_method("vicregl", preset="cpu", num_matches=[20])
    with pytest.raises(ValueError, match="num_heads"):
        build_method("lewel", preset="cpu", num_heads=3)
    with pytest.raises(ValueError, match="backbone"):
        build_method("selfpatch", backbone="resnet18")


@pytest.mark.parametrize("method, option, value", [
    ("scrl", "base_momentum", 1.5), ("scrl", "num_boxes", 0), ("scrl", "num_boxes", True), ("scrl", "box_min_size", -1.0),
    ("vicregl", "inv_coeff", -1.0), ("vicregl", "cov_coeff", -1.0), ("vicregl", "num_matches", [0, 4]), ("vicregl", "multi_crop", "yes"),
    ("lewel", "base_momentum", -0.1), ("lewel", "map_scale", 0.0), ("lewel", "num_heads", 0), ("lewel", "predictor_dims", [16, 7]),
    ("selfpatch", "num_neighbours", 9), ("selfpatch", "teacher_temp", 0.0), ("selfpatch", "center_momentum", 1.5),
    ("selfpatch", "patch_loss_weight", -0.1), ("selfpatch", "freeze_last_layer", -1),
])
def test_out_of_range_options_are_refused_naming_the_option(method, option, value):
    small = {"scrl": SMALL_BYOL, "lewel": SMALL_LEWEL}.get(method, {})
    with pytest.raises(ValueError, match=option):
        build_method(method, preset="cpu", **{**small, option: value})


@pytest.mark.parametrize("method, option, value", [
    ("scrl", "base_momentum", 1.0), ("vicregl", "alpha", 0.0), ("vicregl", "alpha", 1.0), ("vicregl", "cov_coeff", 0.0),
    ("selfpatch", "num_neighbours", 8), ("selfpatch", "num_neighbours", 1), ("selfpatch", "patch_loss_weight", 0.0),
])
def test_options_at_the_ends_of_their_ranges_are_accepted(method, option, value):
    pytest.importorskip("timm")
    small = {"scrl": SMALL_BYOL, "selfpatch": SMALL_SELFPATCH, "vicregl": dict(expander="8-8", local_projector="4-4")}[method]
    assert build_method(method, preset="cpu", **{**small, option: value}).options[option] == value


@pytest.mark.parametrize("method, message", [("scrl", "SCRL needs 2 views"), ("vicregl", "VICRegL needs at least 2 views"),
                                             ("lewel", "LEWEL needs 2 views"), ("selfpatch", "SelfPatch needs at least 2 views")])
def test_methods_refuse_a_batch_of_one_view(method, message):
    if method == "selfpatch":
        pytest.importorskip("timm")
    small = {"scrl": SMALL_BYOL, "lewel": SMALL_LEWEL, "selfpatch": SMALL_SELFPATCH, "vicregl": dict(expander="8-8", local_projector="4-4")}[method]
    with pytest.raises(ValueError, match=f"{message}, got 1"):
        build_method(method, preset="cpu", **small)(make_batch([64], batch=2, dtype=torch.float32))


def test_lewel_heads_must_divide_the_maps_too():
    # The tiny backbone's 32 channels divide by 4; the neck's 6 maps do not.
    with pytest.raises(ValueError, match=r"num_heads \(4\) must divide .* maps \(neck output, 6\)"):
        build_method("lewel", preset="cpu", **{**SMALL_LEWEL, "neck_dims": [16, 6], "predictor_dims": [16, 6]}, num_heads=4)


def test_lewel_target_mode_and_batchnorm_sync_follow_eman():
    """EMAN's target is in eval mode from the start (its buffers are averaged, not updated by its
    forward); BatchNorm is synchronised across ranks only without EMAN, as in the reference's runs."""
    eman = build_method("lewel", preset="cpu", eman=True, **SMALL_LEWEL)
    assert eman.training and not eman.target_encoder.training and not eman.synchronises_batchnorm
    byol = build_method("lewel", preset="cpu", eman=False, **SMALL_LEWEL)
    assert byol.synchronises_batchnorm


def test_mlp_and_head_specs_refuse_what_they_cannot_build():
    from fastdense.models.heads import mlp, parse_spec

    for in_dim, dims in ((0, [4]), (8, []), (8, [4, 0])):
        with pytest.raises(ValueError, match="mlp needs a positive in_dim"):
            mlp(in_dim, dims)
    assert parse_spec("16-8") == [16, 8] and parse_spec((4, 2)) == [4, 2]
    with pytest.raises(ValueError, match="head spec must look like '512-512-512', got '16-x'"):
        parse_spec("16-x")


@pytest.mark.parametrize("height, width", [(3, 3), (3, 5), (5, 3), (4, 7)])
def test_selfpatch_windows_wrap_each_axis_by_its_own_length(height, width):
    from fastdense.methods.selfpatch import window_neighbours

    expected = [sorted({((r + dr) % height) * width + (c + dc) % width for dr in (-1, 0, 1) for dc in (-1, 0, 1)} - {r * width + c})
                for r in range(height) for c in range(width)]
    assert window_neighbours(height, width).tolist() == expected
    for small in ((2, 5), (5, 2)):
        with pytest.raises(ValueError, match="at least 3 x 3"):
            window_neighbours(*small)


def test_selfpatch_centres_move_only_in_training():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    method = build_method("selfpatch", preset="cpu", **SMALL_SELFPATCH).double()
    batch = make_batch([64, 64], batch=2)
    method.eval()
    center, patch_center = method.center.clone(), method.patch_center.clone()
    with torch.no_grad():
        method(batch)
    assert torch.equal(method.center, center) and torch.equal(method.patch_center, patch_center)
    method.train()
    method(batch)
    assert not torch.equal(method.center, center) and not torch.equal(method.patch_center, patch_center)


def test_heads_are_the_references():
    """The heads the float64 oracles take as black boxes, checked against the papers' code: VICReg,
    BYOL and LEWEL MLPs with BatchNorm (or LayerNorm) and ReLU; DINO's head as Linear-GELU-Linear-
    GELU-Linear to the bottleneck, truncated-normal weights (std 0.02) and zero biases."""
    from fastdense.models.heads import DINOHead, mlp

    assert [type(m) for m in mlp(8, [16, 16, 4])] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert [type(m) for m in mlp(8, [16, 4], norm="layer")] == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear]
    torch.manual_seed(0)
    head = DINOHead(384, 64)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in head.mlp if isinstance(m, nn.Linear)] == [(384, 2048), (2048, 2048), (2048, 256)]
    for linear in (m for m in head.mlp if isinstance(m, nn.Linear)):
        assert abs(linear.weight.std().item() - 0.02) < 0.001 and torch.all(linear.bias == 0)


def test_selfpatch_network_is_the_references():
    """No final norm on the ViT (the head's own LayerNorm follows the class attention); a token refined
    by 2 class-attention blocks with MLP ratio 4, the token and the blocks' weights truncated normal
    with std 0.02."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    method = build_method("selfpatch", preset="cpu", **{**SMALL_SELFPATCH, "backbone_options": {"depth": 1, "embed_dim": 192, "num_heads": 3}})
    for network in (method.student, method.teacher):
        assert isinstance(network.backbone.trunk.norm, nn.Identity)
        head = network.head
        assert len(head.blocks) == 2
        assert all(block.mlp[0].out_features == 4 * 192 for block in head.blocks)
    token = method.student.head.token
    assert abs(token.std().item() - 0.02) < 0.004
    weights = torch.cat([m.weight.flatten() for m in method.student.head.modules() if isinstance(m, nn.Linear)])
    assert abs(weights.std().item() - 0.02) < 0.001


def test_reference_defaults_and_cpu_recipes():
    assert method_options("scrl")["base_momentum"] == 0.97 and method_options("scrl")["projector_dims"] == [4096, 256]
    vicregl = method_options("vicregl")
    assert (vicregl["alpha"], vicregl["inv_coeff"], vicregl["var_coeff"], vicregl["cov_coeff"]) == (0.75, 25.0, 25.0, 1.0)
    assert vicregl["expander"] == "8192-8192-8192" and vicregl["num_matches"] == [20, 4]
    assert method_options("lewel")["neck_dims"] == [4096, 256] and method_options("lewel")["base_momentum"] == 0.98
    # m0 0.98 (with lr 3.6 at batch 1024, wd 1.5e-6) is the reference's EMAN recipe, which the
    # 200-epoch results come from: the default target is that one.
    assert method_options("lewel")["eman"] is True and build_method("lewel", preset="cpu", **SMALL_LEWEL).eman
    selfpatch = method_options("selfpatch")
    assert (selfpatch["image_out_dim"], selfpatch["patch_out_dim"], selfpatch["teacher_temp"], selfpatch["center_momentum"]) == (65536, 4096, 0.04, 0.9)
    assert [v.size for v in recipe_for("scrl").views] == [224, 224]
    # VICRegL's reference recipes: ResNets train on 2 x 224 px, scale (0.08, 1); other backbones on
    # 2 x 224 (0.4, 1) + 6 x 96 (0.08, 0.4), the local views alternating the two BYOL colour
    # pipelines (blur 1 / solarise 0, blur 0.1 / solarise 0.2) as the global ones do.
    photometric = lambda views: [(v.blur_p, v.solarize_p) for v in views]  # noqa: E731
    two = recipe_for("vicregl").views
    assert [(v.size, v.scale) for v in two] == [(224, (0.08, 1.0))] * 2 and photometric(two) == [(1.0, 0.0), (0.1, 0.2)]
    multi = recipe_for("vicregl", backbone="convnext_small").views
    assert [(v.size, v.scale) for v in multi] == [(224, (0.4, 1.0))] * 2 + [(96, (0.08, 0.4))] * 6
    assert photometric(multi) == [(1.0, 0.0), (0.1, 0.2)] * 4
    assert len(recipe_for("vicregl", multi_crop=True).views) == 8 and len(recipe_for("vicregl", "cpu").views) == 8
    assert [v.size for v in recipe_for("selfpatch", "cpu").views] == [112] * 2 + [48] * 8
    assert method_options("lewel", "cpu")["backbone"] == "resnet18"


def test_byol_loss_stops_the_targets_gradient_and_ema_refuses_other_networks():
    from fastdense.methods.ema import byol_loss, ema_update

    prediction = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    byol_loss(prediction, target).sum().backward()
    assert prediction.grad is not None and target.grad is None
    with pytest.raises(ValueError, match="same parameters"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 50, 100) == pytest.approx(1 - 0.004 / 2)
    assert cosine_momentum(0.996, 100, 100) == 1.0
    with pytest.raises(ValueError):
        cosine_momentum(0.9, 11, 10)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="base_momentum"):
            cosine_momentum(bad, 0, 10)
