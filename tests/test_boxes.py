"""SCRL box sampler: the C++ twin equals the reference bit for bit; the reference follows SCRL's
crop-tuple formulation and keeps every promised property."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from fastdense import boxes, geometry
from fastdense.ops import backend

VIEW = 224


def random_view_pairs(batch, generator, scale=(0.2, 1.0), view_size=(VIEW, VIEW)):
    """RandomResizedCrop-like matrices [B, 2, 3, 3] on sources of random size, random flips."""
    src_w = torch.randint(64, 700, (batch, 1), generator=generator).double()
    src_h = torch.randint(64, 700, (batch, 1), generator=generator).double()
    area = torch.empty(batch, 2, dtype=torch.float64).uniform_(*scale, generator=generator)
    ratio = torch.empty(batch, 2, dtype=torch.float64).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator).exp()
    w = (src_w * (area * ratio).sqrt()).clamp(max=src_w)
    h = (src_h * (area / ratio).sqrt()).clamp(max=src_h)
    x0 = torch.rand(batch, 2, generator=generator, dtype=torch.float64) * (src_w - w)
    y0 = torch.rand(batch, 2, generator=generator, dtype=torch.float64) * (src_h - h)
    flip = torch.rand(batch, 2, generator=generator) < 0.5
    return geometry.crop_matrix(x0, y0, w, h, view_size[1], view_size[0], flip).float()


def integer_view_pairs(batch, generator, max_shift=120):
    """Unscaled 224 px crops at whole-pixel offsets: the scaled grid is exact, so nothing is clipped."""
    x0 = torch.randint(0, max_shift, (batch, 2), generator=generator).float()
    y0 = torch.randint(0, max_shift, (batch, 2), generator=generator).float()
    flip = torch.rand(batch, 2, generator=generator) < 0.5
    return geometry.crop_matrix(x0, y0, VIEW, VIEW, VIEW, VIEW, flip)


def sample(matrices, name, **kwargs):
    with backend(name):
        return boxes.sample_scrl_boxes(matrices, **kwargs)


def require_cpp():
    assert boxes._cpp_module() is not None, "fastdense._C is not built: run `python3 setup.py build_ext --inplace`"


def assert_identical(a, b):
    for view in range(2):
        assert a.rois[view].dtype == b.rois[view].dtype
        assert torch.equal(a.rois[view], b.rois[view]), f"view {view} boxes differ"
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(a.iou_rule_met, b.iou_rule_met)


def per_image(rois, counts):
    return torch.split(rois, counts.tolist())


# ---------------------------------------------------------------------------------------------
# C++ == reference


@pytest.mark.parametrize(
    "seed, kwargs",
    [
        (0, {}),
        (1, {"view_size": (160, 224), "num_boxes": 7}),
        (2, {"min_size": 24.5, "iou_threshold": 0.3, "max_tries": 5}),
        (3, {"num_boxes": 1}),
        (4, {"iou_threshold": 1.0}),
        (5, {"min_size": 64.0, "max_tries": 3, "num_boxes": 13}),
    ],
)
def test_cpp_matches_reference_bit_for_bit(seed, kwargs):
    require_cpp()
    g = torch.Generator().manual_seed(seed)
    view_size = kwargs.get("view_size", (VIEW, VIEW))
    for scale in ((0.2, 1.0), (0.05, 0.3)):
        m = random_view_pairs(48, g, scale, view_size)
        keys = boxes.draw_scrl_randoms(48, g)
        ref = sample(m, "reference", random=keys, **kwargs)
        assert_identical(sample(m, "cpp", random=keys, **kwargs), ref)
        assert ref.counts.sum() > 0


def test_cpp_matches_reference_when_the_iou_rule_cannot_be_met():
    require_cpp()
    g = torch.Generator().manual_seed(11)
    # 36-40 px square overlaps: every box is 32-40 px, so later boxes overlap earlier ones heavily.
    shift = torch.randint(184, 189, (2, 16), generator=g).float()
    m = torch.stack([geometry.crop_matrix(0.0, 0.0, VIEW, VIEW, VIEW, VIEW).expand(16, 3, 3), geometry.crop_matrix(shift[0], shift[1], VIEW, VIEW, VIEW, VIEW, True)], dim=1)
    keys = boxes.draw_scrl_randoms(16, g)
    ref = sample(m, "reference", random=keys)
    assert_identical(sample(m, "cpp", random=keys), ref)
    assert not ref.iou_rule_met.all()
    # A threshold of 1 takes every first try, exact repeats of earlier boxes included (IoU 1),
    # which these small overlaps draw.
    ref = sample(m, "reference", random=keys, iou_threshold=1.0)
    assert_identical(sample(m, "cpp", random=keys, iou_threshold=1.0), ref)
    assert ref.iou_rule_met.all()


def test_float64_matrices_give_float64_boxes_and_same_values():
    require_cpp()
    g = torch.Generator().manual_seed(3)
    m = random_view_pairs(8, g)
    keys = boxes.draw_scrl_randoms(8, g)
    a = sample(m.double(), "cpp", random=keys)
    b = sample(m.double(), "reference", random=keys)
    assert a.rois[0].dtype == torch.float64
    assert_identical(a, b)
    assert torch.equal(sample(m, "cpp", random=keys).rois[1], a.rois[1].float())


# ---------------------------------------------------------------------------------------------
# The reference against SCRL's own formulation: crop tuples (x, y, w, h, flip), scale = 224 / w.


def scrl_crop_tuple_oracle(crops, key, num_boxes=10, min_size=32.0, iou_threshold=0.5, max_tries=50):
    """Boxes for one image written the way SCRL's reference code computes them, from crop tuples."""
    (x1, y1, w1, h1, f1), (x2, y2, w2, h2, f2) = crops
    left, right = max(x1, x2), min(x1 + w1, x2 + w2)
    top, bottom = max(y1, y2), min(y1 + h1, y2 + h2)
    if left >= right or top >= bottom:
        return []
    sw1, sh1, sw2, sh2 = VIEW / w1, VIEW / h1, VIEW / w2, VIEW / h2
    sw, sh = min(sw1, sw2), min(sh1, sh2)
    width, height = round((right - left) * sw), round((bottom - top) * sh)
    if min_size >= width or min_size >= height:
        return []
    stream = boxes._SplitMix64(key)
    out, on_grid = [], []
    for k in range(num_boxes):
        for _ in range(max_tries):
            dw, dh = stream.randint(1, int(width / min_size) + 1), stream.randint(1, int(height / min_size) + 1)
            gw, gh = width / dw, height / dh
            gx, gy = stream.randint(0, dw), stream.randint(0, dh)
            bw, bh = stream.randint(int(min_size), int(gw + 1)), stream.randint(int(min_size), int(gh + 1))
            bx = stream.randint(0, int(gw - bw + 1)) + int(gx * gw)
            by = stream.randint(0, int(gh - bh + 1)) + int(gy * gh)
            views = []
            for x, y, f, sx, sy in ((x1, y1, f1, sw1, sh1), (x2, y2, f2, sw2, sh2)):
                l = bx / sw * sx + (left - x) * sx
                r = l + bw / sw * sx
                t = by / sh * sy + (top - y) * sy
                b = t + bh / sh * sy
                if f:
                    l, r = VIEW - r, VIEW - l
                views.append([l, t, r, b])
            if k == 0:
                break
            # The IoU on the scaled grid (whole cells: exact, where SCRL's code rounds in view pixels).
            candidate = torch.tensor([[bx, by, bx + bw, by + bh]], dtype=torch.float64)
            if box_iou(candidate, torch.tensor(on_grid, dtype=torch.float64)).max() < iou_threshold:
                break
        out.append([[min(max(v, 0.0), VIEW) for v in box] for box in views])
        on_grid.append([bx, by, bx + bw, by + bh])
    return out


def test_reference_follows_scrl_crop_tuple_formulation():
    g = torch.Generator().manual_seed(5)
    batch = 24
    m = random_view_pairs(batch, g).double()
    keys = boxes.draw_scrl_randoms(batch, g)
    got = sample(m, "reference", random=keys)
    rois = [per_image(r, got.counts) for r in got.rois]
    for b in range(batch):
        crops = []
        for v in range(2):
            sx, tx, sy, ty = m[b, v, 0, 0].item(), m[b, v, 0, 2].item(), m[b, v, 1, 1].item(), m[b, v, 1, 2].item()
            w, h = abs(sx) * VIEW, sy * VIEW
            crops.append((min(tx, tx + sx * VIEW), ty, w, h, sx < 0))
        expected = scrl_crop_tuple_oracle(crops, keys[b].item())
        assert len(expected) == got.counts[b]
        for v in range(2):
            if expected:
                torch.testing.assert_close(rois[v][b][:, 1:], torch.tensor([e[v] for e in expected], dtype=torch.float64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Properties


def test_boxes_inside_both_views_with_sizes_in_bounds():
    g = torch.Generator().manual_seed(7)
    view_h, view_w, min_size = 192, 256, 32.0
    m = random_view_pairs(64, g, (0.1, 1.0), (view_h, view_w))
    out = boxes.sample_scrl_boxes(m, view_size=(view_h, view_w), generator=g)
    assert set(out.counts.tolist()) <= {0, 10} and out.counts.sum() > 0
    assert out.rois[0].shape == out.rois[1].shape == (int(out.counts.sum()), 5)
    for rois in out.rois:
        assert torch.equal(rois[:, 0], torch.repeat_interleave(torch.arange(64), out.counts).float())
        x1, y1, x2, y2 = rois[:, 1:].unbind(-1)
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= view_w).all() and (y2 <= view_h).all()
        assert (x2 > x1).all() and (y2 > y1).all()
    # In the more zoomed-out view a box is exactly its scaled size: min_size .. the scaled overlap
    # (less at most half a pixel where clipping trims the rounded-up overlap).
    zoomed_out = (m[:, 1, 0, 0].abs() > m[:, 0, 0, 0].abs()).long()
    overlap, _ = geometry.intersect(geometry.view_extent(m[:, 0], (view_h, view_w)), geometry.view_extent(m[:, 1], (view_h, view_w)))
    owner = out.rois[0][:, 0].long()
    widths = torch.where(zoomed_out[owner] == 1, out.rois[1][:, 3] - out.rois[1][:, 1], out.rois[0][:, 3] - out.rois[0][:, 1])
    unit_x = torch.maximum(m[:, 0, 0, 0].abs(), m[:, 1, 0, 0].abs())[owner]
    assert (widths >= min_size - 0.5 - 1e-3).all()
    assert (widths <= (overlap[owner, 2] - overlap[owner, 0]) / unit_x + 0.5 + 1e-3).all()


def test_iou_rule_holds_and_flag_is_truthful():
    g = torch.Generator().manual_seed(9)
    m = integer_view_pairs(40, g)
    for max_tries in (50, 1):
        out = boxes.sample_scrl_boxes(m, max_tries=max_tries, generator=g)
        met = out.iou_rule_met.split(out.counts.tolist())
        for image_boxes, image_met in zip(per_image(out.rois[0], out.counts), met):
            if len(image_boxes) == 0:
                continue
            iou = box_iou(image_boxes[:, 1:].double(), image_boxes[:, 1:].double())
            earlier_max = torch.stack([iou[k, :k].max() if k else iou.new_tensor(0.0) for k in range(len(image_boxes))])
            assert image_met[0]
            assert torch.equal(image_met[1:], earlier_max[1:] < 0.5)
        if max_tries == 50:
            assert out.iou_rule_met.float().mean() > 0.9
        else:
            assert not out.iou_rule_met.all()


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_a_box_with_iou_exactly_at_the_threshold_is_not_taken(name):
    """The rule is IoU *below* 0.5. Whole-pixel crops of random sizes, as float32 matrices (the
    pipelines'), make exact ties common (IoU 1024/2048 on the scaled grid); computed in view pixels,
    rounding put them on either side, and about a third were taken. Ties show in the output as an
    IoU within rounding of 0.5: no box that met the rule may have one."""
    g = torch.Generator().manual_seed(11)
    batch = 400
    src = torch.randint(300, 600, (batch, 1, 2), generator=g)
    size = (torch.rand(batch, 2, 2, generator=g) * (src - 60) + 60).floor()
    corner = (torch.rand(batch, 2, 2, generator=g) * (src - size + 1)).floor()
    flip = torch.rand(batch, 2, generator=g) < 0.5
    m = geometry.crop_matrix(corner[..., 0], corner[..., 1], size[..., 0], size[..., 1], VIEW, VIEW, flip).float()
    out = sample(m, name, random=boxes.draw_scrl_randoms(batch, g))
    near_ties = checked = 0
    for image_boxes, met in zip(per_image(out.rois[0], out.counts), out.iou_rule_met.split(out.counts.tolist())):
        iou = box_iou(image_boxes[:, 1:].double(), image_boxes[:, 1:].double())
        for k in range(1, len(image_boxes)):
            if met[k]:
                checked += 1
                near_ties += bool((iou[k, :k] - 0.5).abs().min() < 1e-5)
    assert checked > 1000 and near_ties == 0, (checked, near_ties)


def test_same_box_maps_to_same_source_region_from_both_views():
    g = torch.Generator().manual_seed(13)
    m = random_view_pairs(64, g).double()
    out = boxes.sample_scrl_boxes(m, generator=g)
    owner = out.rois[0][:, 0].long()
    source = [geometry.map_boxes(m[owner, v], out.rois[v][:, None, 1:]).squeeze(1) for v in range(2)]
    overlap, non_empty = geometry.intersect(geometry.view_extent(m[:, 0], (VIEW, VIEW)), geometry.view_extent(m[:, 1], (VIEW, VIEW)))
    assert non_empty[owner].all()
    # Clipping trims at most half a scaled pixel, in source pixels half the coarser view's scale.
    unit = torch.maximum(m[owner, 0].diagonal(dim1=-2, dim2=-1)[:, :2].abs(), m[owner, 1].diagonal(dim1=-2, dim2=-1)[:, :2].abs())
    tolerance = 0.5 * unit.repeat(1, 2) + 1e-6
    assert ((source[0] - source[1]).abs() <= tolerance).all()
    inside = torch.cat([source[0][:, :2] - overlap[owner, :2], overlap[owner, 2:] - source[0][:, 2:]], dim=1)
    assert (inside >= -tolerance).all()

    exact = integer_view_pairs(32, g)
    out = boxes.sample_scrl_boxes(exact, generator=g)
    owner = out.rois[0][:, 0].long()
    a, b = (geometry.map_boxes(exact[owner, v], out.rois[v][:, None, 1:]) for v in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_flipping_view_one_mirrors_its_boxes_and_keeps_view_two():
    g = torch.Generator().manual_seed(17)
    m = integer_view_pairs(24, g)
    keys = boxes.draw_scrl_randoms(24, g)
    mirrored = m.clone()
    mirrored[:, 0] = m[:, 0] @ torch.tensor([[-1.0, 0, VIEW], [0, 1, 0], [0, 0, 1]])
    a = boxes.sample_scrl_boxes(m, random=keys)
    b = boxes.sample_scrl_boxes(mirrored, random=keys)
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(b.rois[1], a.rois[1], rtol=0, atol=1e-4)
    expected = torch.stack([a.rois[0][:, 0], VIEW - a.rois[0][:, 3], a.rois[0][:, 2], VIEW - a.rois[0][:, 1], a.rois[0][:, 4]], dim=1)
    torch.testing.assert_close(b.rois[0], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_small_overlaps_give_no_boxes(name):
    if name == "cpp":
        require_cpp()
    # Unscaled views shifted so that the overlap is shift-dependent: 224 - shift pixels wide.
    shifts = torch.tensor([0.0, 300.0, 192.0, 191.6, 191.5, 191.4, 190.5, 190.0])
    base = geometry.crop_matrix(0.0, 0.0, VIEW, VIEW, VIEW, VIEW).expand(len(shifts), 3, 3)
    for axis in ("x", "y"):
        x0, y0 = (shifts, 0.0) if axis == "x" else (0.0, shifts)
        m = torch.stack([base, geometry.crop_matrix(x0, y0, VIEW, VIEW, VIEW, VIEW, flip=True)], dim=1)
        out = sample(m, name, generator=torch.Generator().manual_seed(0))
        # Overlaps 224, 0 (disjoint), 32, 32.4 and 32.5 (round to 32: not larger than 32), 32.6, 33.5 (-> 34), 34.
        assert out.counts.tolist() == [10, 0, 0, 0, 0, 10, 10, 10]


def test_deterministic_in_the_generator():
    g = torch.Generator().manual_seed(21)
    m = random_view_pairs(16, g)
    a = boxes.sample_scrl_boxes(m, generator=torch.Generator().manual_seed(1))
    b = boxes.sample_scrl_boxes(m, generator=torch.Generator().manual_seed(1))
    c = boxes.sample_scrl_boxes(m, generator=torch.Generator().manual_seed(2))
    assert_identical(a, b)
    assert not torch.equal(a.rois[0], c.rois[0])


def test_auto_dispatch_uses_cpp_and_forcing_triton_fails(monkeypatch):
    require_cpp()
    m = random_view_pairs(2, torch.Generator().manual_seed(0))
    calls = []
    real = boxes._cpp_module()

    class Spy:
        def sample_scrl_boxes(self, *args):
            calls.append(True)
            return real.sample_scrl_boxes(*args)

    monkeypatch.setattr(boxes, "_cpp_module", lambda: Spy())
    boxes.sample_scrl_boxes(m)
    assert calls
    monkeypatch.setenv("FASTDENSE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="sample_scrl_boxes"):
        boxes.sample_scrl_boxes(m)


def test_reference_serves_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(boxes, "_cpp_module", lambda: None)
    m = random_view_pairs(2, torch.Generator().manual_seed(0))
    assert boxes.sample_scrl_boxes(m).counts.shape == (2,)
    with backend("cpp"), pytest.raises(RuntimeError, match="cpp"):
        boxes.sample_scrl_boxes(m)


@pytest.mark.gpu
def test_cuda_matrices_give_cuda_boxes_equal_to_cpu():
    m = random_view_pairs(8, torch.Generator().manual_seed(0))
    keys = boxes.draw_scrl_randoms(8, torch.Generator().manual_seed(1))
    on_gpu = boxes.sample_scrl_boxes(m.cuda(), random=keys.cuda())
    assert on_gpu.rois[0].is_cuda and on_gpu.counts.is_cuda
    assert torch.equal(on_gpu.rois[1].cpu(), boxes.sample_scrl_boxes(m, random=keys).rois[1])


# ---------------------------------------------------------------------------------------------
# Bad input

GOOD = geometry.crop_matrix(torch.zeros(2, 2), 0.0, 100.0, 100.0, VIEW, VIEW)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"matrices": GOOD.tolist()}, TypeError, "matrices"),
        ({"matrices": GOOD[0]}, ValueError, r"matrices.*\[B, 2, 3, 3\]"),
        ({"matrices": torch.zeros(2, 3, 3, 3)}, ValueError, r"matrices.*\[B, 2, 3, 3\]"),
        ({"matrices": GOOD[:0]}, ValueError, "B >= 1"),
        ({"matrices": GOOD.long()}, TypeError, "matrices"),
        ({"matrices": GOOD.index_put((torch.tensor(0), torch.tensor(0), torch.tensor(0), torch.tensor(1)), torch.tensor(0.3))}, ValueError, "axis-aligned"),
        ({"matrices": GOOD.index_put((torch.tensor(0), torch.tensor(1), torch.tensor(0), torch.tensor(0)), torch.tensor(0.0))}, ValueError, "sx, sy != 0"),
        ({"matrices": GOOD.index_put((torch.tensor(1), torch.tensor(0), torch.tensor(2), torch.tensor(0)), torch.tensor(0.01))}, ValueError, "axis-aligned"),  # a projective bottom row
        ({"matrices": GOOD.index_put((torch.tensor(1), torch.tensor(1), torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan")))}, ValueError, "finite"),
        ({"view_size": (224,)}, ValueError, "view_size"),
        ({"view_size": 0}, ValueError, "view_size"),
        ({"view_size": (224.0, 224.0)}, ValueError, "view_size"),
        ({"num_boxes": 0}, ValueError, "num_boxes"),
        ({"num_boxes": 2.0}, ValueError, "num_boxes"),
        ({"min_size": 0.5}, ValueError, "min_size"),
        ({"min_size": float("inf")}, ValueError, "min_size"),
        ({"iou_threshold": 0.0}, ValueError, "iou_threshold"),
        ({"max_tries": 0}, ValueError, "max_tries"),
        ({"random": torch.zeros(3, dtype=torch.int64)}, ValueError, r"random.*\[2\]"),
        ({"random": torch.zeros(2)}, ValueError, "random.*int64"),
        ({"random": [1, 2]}, TypeError, "random"),
        # B * num_boxes past int32: std::bad_alloc from the C++ sampler (or int64 wrap-around), hours in the reference.
        ({"num_boxes": 2**30}, ValueError, r"num_boxes \* B must be below 2\*\*31"),
        ({"num_boxes": 2**62}, ValueError, r"num_boxes \* B must be below 2\*\*31"),
        ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    kwargs = {"matrices": GOOD, **kwargs}
    with pytest.raises(error, match=match):
        boxes.sample_scrl_boxes(**kwargs)


def test_keyed_scrl_randoms_validates_index():
    with pytest.raises(TypeError, match="index must be a torch.Tensor"):
        boxes.keyed_scrl_randoms(0, 0, [1, 2])
    # Float indices were truncated: 1.5 and 1.7 gave one key.
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        boxes.keyed_scrl_randoms(0, 0, torch.tensor([1.5, 1.7]))
    assert boxes.keyed_scrl_randoms(0, 0, torch.tensor([1, 2], dtype=torch.int32)).tolist() == boxes.keyed_scrl_randoms(0, 0, torch.tensor([1, 2])).tolist()


def test_draw_scrl_randoms_validates_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        boxes.draw_scrl_randoms(0)
