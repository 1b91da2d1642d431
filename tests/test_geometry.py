"""fastdense.geometry against hand-computed cases: matrices, inverses, composition, grids, boxes."""

import numpy as np
import pytest
import torch

from fastdense import geometry


def test_crop_matrix_maps_view_corners_to_crop_corners():
    m = geometry.crop_matrix(10.0, 20.0, 100.0, 50.0, 200, 100)
    corners = torch.tensor([[0.0, 0.0], [200.0, 100.0]])
    assert torch.allclose(geometry.apply(m, corners), torch.tensor([[10.0, 20.0], [110.0, 70.0]]))


def test_flip_reverses_x_and_inverts():
    m = geometry.crop_matrix(10.0, 20.0, 100.0, 50.0, 200, 100, flip=True)
    assert torch.linalg.det(m) < 0
    assert torch.allclose(geometry.apply(m, torch.tensor([[0.0, 0.0]])), torch.tensor([[110.0, 20.0]]))
    assert torch.allclose(geometry.invert(m) @ m, torch.eye(3), atol=1e-6)


def test_crop_matrix_is_the_conventions_formula():
    m = geometry.crop_matrix(5.0, 7.0, 120.0, 60.0, 224, 112, flip=True)
    expected = torch.tensor([[-120 / 224, 0, 125.0], [0, 60 / 112, 7.0], [0, 0, 1]])
    torch.testing.assert_close(m, expected)
    # Pixel column j covers [j, j + 1): the centre of the flipped view's first pixel is the
    # source point half a view pixel left of the crop's right edge.
    torch.testing.assert_close(geometry.apply(m, torch.tensor([[0.5, 0.5]])), torch.tensor([[125 - 0.5 * 120 / 224, 7 + 0.5 * 60 / 112]]))


def test_crop_matrix_batched_over_views_and_dtype():
    x0 = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    flip = torch.tensor([[True, False]] * 3)
    m = geometry.crop_matrix(x0, 0.0, 50.0, 40.0, 100, 80, flip)
    assert m.shape == (3, 2, 3, 3) and m.dtype == torch.float64
    torch.testing.assert_close(m[2, 0], geometry.crop_matrix(4.0, 0.0, 50.0, 40.0, 100, 80, True).double())
    torch.testing.assert_close(m[1, 1], geometry.crop_matrix(3.0, 0.0, 50.0, 40.0, 100, 80).double())
    # NumPy scalars and arrays, as pipelines draw them, are accepted like numbers and tensors.
    torch.testing.assert_close(geometry.crop_matrix(np.int64(4), np.float32(0), np.array([50.0]), 40, 100, 80, True)[0], m[2, 0].float())
    # flip broadcasts like the others: 0/1 integers, and a flip vector over one scalar crop.
    torch.testing.assert_close(geometry.crop_matrix(x0, 0.0, 50.0, 40.0, 100, 80, flip.long()), m)
    both = geometry.crop_matrix(4.0, 0.0, 50.0, 40.0, 100, 80, torch.tensor([True, False]))
    torch.testing.assert_close(both, torch.stack([geometry.crop_matrix(4.0, 0.0, 50.0, 40.0, 100, 80, flip) for flip in (True, False)]))


def test_round_trip_points_through_inverse():
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.rand(4, 3, generator=g) * 50, torch.rand(4, 3, generator=g) * 50
    w, h = 20 + torch.rand(4, 3, generator=g) * 200, 20 + torch.rand(4, 3, generator=g) * 200
    m = geometry.crop_matrix(x0, y0, w, h, 96, 64, torch.rand(4, 3, generator=g) < 0.5).double()
    points = torch.rand(4, 3, 17, 2, generator=g, dtype=torch.float64) * 100
    torch.testing.assert_close(geometry.apply(m, geometry.apply(geometry.invert(m), points)), points)
    torch.testing.assert_close(geometry.invert(m), torch.linalg.inv(m))


def test_view_indices_count_from_the_end_when_negative_and_others_are_refused():
    m = torch.stack([geometry.crop_matrix(10.0 * v, 5.0, 100.0, 80.0 + v, 32, 32) for v in range(3)])
    assert torch.equal(geometry.view_to_view(m, -1, -3), geometry.view_to_view(m, 2, 0))
    for src in (3, -4, True, 1.0):
        with pytest.raises(ValueError, match=r"src must be a view index in \[-3, 3\)"):
            geometry.view_to_view(m, src, 0)


def test_compose_and_view_to_view_hand_computed():
    # View 0: source [0, 200)^2 at 100 px (2 source px per pixel); view 1: source [50, 150)^2 at
    # 100 px, flipped (1 source px per pixel, x reversed).
    m = torch.stack([geometry.crop_matrix(0.0, 0.0, 200.0, 200.0, 100, 100), geometry.crop_matrix(50.0, 50.0, 100.0, 100.0, 100, 100, flip=True)])
    one_to_zero = geometry.view_to_view(m, src=1, dst=0)
    torch.testing.assert_close(one_to_zero, torch.tensor([[-0.5, 0.0, 75.0], [0.0, 0.5, 25.0], [0.0, 0.0, 1.0]]))
    # View 1's pixel (0, 0) is source (150, 50), which is view 0's (75, 25).
    torch.testing.assert_close(geometry.apply(one_to_zero, torch.tensor([[0.0, 0.0]])), torch.tensor([[75.0, 25.0]]))
    torch.testing.assert_close(geometry.view_to_view(m, 0, 1) @ one_to_zero, torch.eye(3))
    torch.testing.assert_close(geometry.compose(m[0], one_to_zero), m[1])


def test_compose_crop_of_a_crop():
    resize = geometry.crop_matrix(0.0, 0.0, 400.0, 300.0, 200, 150)  # a decoded image downscaled 2x
    crop = geometry.crop_matrix(20.0, 10.0, 100.0, 100.0, 50, 50)  # then cropped and resized
    both = geometry.compose(resize, crop)
    torch.testing.assert_close(geometry.apply(both, torch.tensor([[0.0, 0.0], [50.0, 50.0]])), torch.tensor([[40.0, 20.0], [240.0, 220.0]]))


def test_cell_centers_any_size_and_stride():
    c = geometry.cell_centers(2, 3, 32)
    expected = torch.tensor([[16.0, 16.0], [48.0, 16.0], [80.0, 16.0], [16.0, 48.0], [48.0, 48.0], [80.0, 48.0]])
    torch.testing.assert_close(c, expected)
    c = geometry.cell_centers(1, 2, (10.0, 4.0))  # (s_y, s_x)
    torch.testing.assert_close(c, torch.tensor([[2.0, 5.0], [6.0, 5.0]]))


def test_cell_centers_in_source_with_flip():
    # A 7x7 map of a 224 px flipped view of source [100, 324) x [0, 448): its first cell sits at the
    # right end of the crop in the source.
    m = geometry.crop_matrix(100.0, 0.0, 224.0, 448.0, 224, 224, flip=True)
    centers = geometry.cell_centers_in_source(torch.stack([m, m]), 7, 7, (224, 224))
    assert centers.shape == (2, 49, 2)
    torch.testing.assert_close(centers[0, 0], torch.tensor([324.0 - 16.0, 32.0]))
    torch.testing.assert_close(centers[1, 48], torch.tensor([100.0 + 16.0, 448.0 - 32.0]))
    # A non-square map of a non-square view: stride differs per axis.
    m = geometry.crop_matrix(0.0, 0.0, 96.0, 64.0, 96, 64)
    torch.testing.assert_close(geometry.cell_centers_in_source(m, 2, 3, (64, 96))[0], torch.tensor([16.0, 16.0]))


def test_map_boxes_flip_aware_and_between_views():
    m = geometry.crop_matrix(10.0, 0.0, 100.0, 100.0, 50, 50, flip=True)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 20.0]]])
    # View x in [0, 10) is source [90, 110) after the flip: corners are re-ordered.
    torch.testing.assert_close(geometry.map_boxes(m, boxes), torch.tensor([[[90.0, 0.0, 110.0, 40.0]]]))
    views = torch.stack([geometry.crop_matrix(0.0, 0.0, 100.0, 100.0, 100, 100), m])
    torch.testing.assert_close(geometry.boxes_between_views(views, torch.tensor([[90.0, 0.0, 110.0, 40.0]]), 0, 1), boxes[0])
    back = geometry.boxes_between_views(views, geometry.boxes_between_views(views, boxes[0], 1, 0), 0, 1)
    torch.testing.assert_close(back, boxes[0])


def test_view_extent_and_intersection():
    m = torch.stack([geometry.crop_matrix(0.0, 0.0, 100.0, 100.0, 224, 224), geometry.crop_matrix(60.0, 30.0, 100.0, 50.0, 224, 224, True)])
    torch.testing.assert_close(geometry.view_extent(m, (224, 224)), torch.tensor([[0.0, 0.0, 100.0, 100.0], [60.0, 30.0, 160.0, 80.0]]))
    box, non_empty = geometry.views_intersection(m[None].expand(3, 2, 3, 3), (224, 224))
    torch.testing.assert_close(box, torch.tensor([[60.0, 30.0, 100.0, 80.0]] * 3))
    assert non_empty.all()
    apart = torch.stack([m[0], geometry.crop_matrix(300.0, 0.0, 10.0, 10.0, 224, 224)])
    box, non_empty = geometry.views_intersection(apart, (224, 224))
    assert not non_empty and box[2] == box[0]


def test_views_intersection_of_views_of_different_sizes():
    # View 0: source [0, 100)^2 at 224 px. View 1: a local view, source [60, 108) x [30, 78) at
    # 96 px (48 source px over 96 view px: 0.5 each). Both see source [60, 100) x [30, 78).
    m = torch.stack([geometry.crop_matrix(0.0, 0.0, 100.0, 100.0, 224, 224), geometry.crop_matrix(60.0, 30.0, 48.0, 48.0, 96, 96, True)])
    box, non_empty = geometry.views_intersection(m, ((224, 224), (96, 96)))
    torch.testing.assert_close(box, torch.tensor([60.0, 30.0, 100.0, 78.0]))
    assert non_empty
    # Sizes follow first and second, not the order of the views in the matrices.
    torch.testing.assert_close(geometry.views_intersection(m, ((96, 96), (224, 224)), first=1, second=0)[0], box)
    # One size for both reads view 1 as 224 px: flipped, it would span source [108 - 112, 108) x [30, 142).
    torch.testing.assert_close(geometry.views_intersection(m, (224, 224))[0], torch.tensor([0.0, 30.0, 100.0, 100.0]))
    # Non-square views, each with its own (H, W): view 1 is 48 x 96 px of a 96 x 24 source window.
    m = torch.stack([geometry.crop_matrix(0.0, 0.0, 100.0, 100.0, 224, 112), geometry.crop_matrix(80.0, 10.0, 96.0, 24.0, 96, 48)])
    box, _ = geometry.views_intersection(m[None].expand(2, 2, 3, 3), [(112, 224), (48, 96)])
    torch.testing.assert_close(box, torch.tensor([[80.0, 10.0, 100.0, 34.0]] * 2))


def test_mismatched_dtypes_and_devices_name_both_arguments():
    m = geometry.crop_matrix(10.0, 20.0, 100.0, 50.0, 200, 100)
    points = torch.tensor([[1.0, 2.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    cases = [
        (lambda: geometry.apply(m, points.double()), r"matrices and points must have the same dtype and device, got matrices torch.float32 on cpu and points torch.float64 on cpu"),
        (lambda: geometry.apply(m, points.to("meta")), r"matrices torch.float32 on cpu and points torch.float32 on meta"),
        (lambda: geometry.apply(m.double(), points.long()), r"matrices torch.float64 .* points torch.int64"),
        (lambda: geometry.map_boxes(m, boxes.double()), r"matrices and boxes .* boxes torch.float64 on cpu"),
        (lambda: geometry.map_boxes(m.to("meta"), boxes), r"matrices torch.float32 on meta and boxes torch.float32 on cpu"),
        (lambda: geometry.boxes_between_views(torch.stack([m, m]).double(), boxes, 0, 1), r"matrices and boxes"),
        (lambda: geometry.compose(m, m.double()), r"outer and inner .* outer torch.float32 on cpu and inner torch.float64 on cpu"),
        (lambda: geometry.intersect(boxes[0], boxes[0].to("meta")), r"box_a and box_b must have the same device, got box_a torch.float32 on cpu and box_b torch.float32 on meta"),
    ]
    for call, match in cases:
        with pytest.raises(TypeError, match=match):
            call()
    # Valid input is unchanged: intersect promotes mixed dtypes, as it always did.
    box, non_empty = geometry.intersect(boxes[0], torch.tensor([5.0, 5.0, 30.0, 30.0], dtype=torch.float64))
    assert box.dtype == torch.float64 and non_empty
    torch.testing.assert_close(box, torch.tensor([5.0, 5.0, 10.0, 20.0], dtype=torch.float64))


def test_invert_refuses_zero_size_crops_on_cpu():
    width = torch.tensor([[50.0, 0.0], [50.0, 50.0]])  # tensors pass crop_matrix unchecked (no GPU sync there)
    m = geometry.crop_matrix(torch.tensor([[0.0, 5.0], [3.0, 4.0]]), 0.0, width, 40.0, 32, 32)
    with pytest.raises(ValueError, match=r"matrices must be invertible: 1 of the 4 matrices have a zero scale .* index \[0, 1\]"):
        geometry.invert(m)
    with pytest.raises(ValueError, match="zero scale"):
        geometry.invert(geometry.crop_matrix(0.0, 0.0, 10.0, torch.tensor(0.0), 32, 32))  # zero height
    with pytest.raises(ValueError, match="invertible"):
        geometry.view_to_view(m, 0, 1)
    # A device that is not checked (the GPU's path: no host sync) still gives the shape.
    assert geometry.invert(m.to("meta")).shape == m.shape


def test_gradients_flow_through_matrices_and_boxes():
    x0 = torch.tensor([3.0, 5.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([50.0, 70.0], dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[1.0, 2.0, 9.0, 12.0], [4.0, 4.0, 20.0, 30.0]]] * 2, dtype=torch.float64, requires_grad=True)

    def mapped(x0, w, boxes):
        m = geometry.crop_matrix(x0, 1.0, w, 40.0, 32, 32, torch.tensor([False, True]))
        return geometry.map_boxes(geometry.invert(m), geometry.map_boxes(m, boxes) * 1.5), geometry.cell_centers_in_source(m, 3, 2, (32, 32))

    assert torch.autograd.gradcheck(mapped, (x0, w, boxes))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: geometry.crop_matrix(0, 0, 0, 10, 224, 224), ValueError, "width must be positive"),
        (lambda: geometry.crop_matrix(0, 0, 10, 10, 224, -1), ValueError, "out_height must be positive"),
        (lambda: geometry.crop_matrix("0", 0, 10, 10, 224, 224), TypeError, "x0"),
        (lambda: geometry.crop_matrix(0, None, 10, 10, 224, 224), TypeError, "y0"),
        (lambda: geometry.crop_matrix(0, 0, 10, 10, [224, "a"], 224), TypeError, "out_width"),
        (lambda: geometry.crop_matrix(torch.zeros(3), torch.zeros(4), 10, 10, 224, 224), ValueError, "broadcast"),
        (lambda: geometry.crop_matrix(torch.zeros(3), torch.zeros(3), 10, torch.ones(4), 224, 224), ValueError, r"height of shape \[4\] does not broadcast"),
        (lambda: geometry.crop_matrix(torch.zeros(3), 0, 10, 10, 224, 224, flip=torch.zeros(4, dtype=torch.bool)), ValueError, r"flip of shape \[4\] does not broadcast with the other arguments' shape \[3\]"),
        (lambda: geometry.crop_matrix(torch.zeros(2, 3), 0, 10, 10, 224, 224, flip=[True, False]), ValueError, r"flip of shape \[2\]"),
        (lambda: geometry.crop_matrix(0, 0, 10, 10, 224, 224, flip="yes"), TypeError, "flip must be a bool"),
        (lambda: geometry.crop_matrix(0, 0, 10, 10, 224, 224, flip=None), TypeError, "flip must be a bool"),
        (lambda: geometry.crop_matrix(0, 0, 10, 10, 224, 224, flip=[[True], [False, True]]), TypeError, "flip must be a bool"),
        (lambda: geometry.crop_matrix(0, 0, 10, 10, 224, 224, flip=torch.tensor([0.5, 1.0])), TypeError, r"flip .* got dtype torch.float32"),
        (lambda: geometry.views_intersection(torch.eye(3).expand(2, 3, 3), ((224, 224), (96, 0))), ValueError, r"view_size\[1\] must be a pair \(H, W\)"),
        (lambda: geometry.views_intersection(torch.eye(3).expand(2, 3, 3), ((224, 224),)), ValueError, r"view_size must be \(H_v, W_v\) for both views or \(\(H1, W1\), \(H2, W2\)\)"),
        (lambda: geometry.views_intersection(torch.eye(3).expand(2, 3, 3), ((224, 224), 96)), ValueError, "view_size must be"),
        (lambda: geometry.invert(torch.zeros(3, 4)), ValueError, r"matrices must have shape \[\.\.\., 3, 3\]"),
        (lambda: geometry.invert([[1.0]]), ValueError, "matrices"),
        (lambda: geometry.compose(torch.eye(3), torch.eye(2)), ValueError, "inner"),
        (lambda: geometry.view_to_view(torch.eye(3), 0, 1), ValueError, r"\[\.\.\., V, 3, 3\]"),
        (lambda: geometry.view_to_view(torch.eye(3).expand(2, 3, 3), 0, 2), ValueError, "dst must be a view index"),
        (lambda: geometry.apply(torch.eye(3), torch.zeros(4, 3)), ValueError, r"points must have shape \[\.\.\., N, 2\]"),
        (lambda: geometry.cell_centers(0, 3, 32), ValueError, "height and width"),
        (lambda: geometry.cell_centers(2, 3, 0), ValueError, "stride"),
        (lambda: geometry.cell_centers(2, 3, (1, 2, 3)), ValueError, "stride"),
        (lambda: geometry.cell_centers_in_source(torch.eye(3), 7, 7, 224), ValueError, "view_size"),
        (lambda: geometry.map_boxes(torch.eye(3), torch.zeros(5, 3)), ValueError, r"boxes must have shape \[\.\.\., K, 4\]"),
        (lambda: geometry.view_extent(torch.eye(3), (224, 0)), ValueError, "view_size"),
        (lambda: geometry.intersect(torch.zeros(4), torch.zeros(2, 5)), ValueError, "box_b"),
        (lambda: geometry.views_intersection(torch.eye(3).expand(2, 3, 3), (224, 224), 0, 5), ValueError, "second"),
        # Leading dimensions that do not broadcast: named, not torch's "size of tensor a (2) must match".
        (lambda: geometry.compose(torch.eye(3).expand(2, 3, 3), torch.eye(3).expand(3, 3, 3)), ValueError, r"outer .* and inner .* broadcast, got outer \[2, 3, 3\] and inner \[3, 3, 3\]"),
        (lambda: geometry.apply(torch.eye(3).expand(2, 3, 3), torch.zeros(3, 4, 2)), ValueError, r"matrices .* and points .* broadcast"),
        (lambda: geometry.map_boxes(torch.eye(3).expand(2, 3, 3), torch.zeros(3, 5, 4)), ValueError, r"matrices .* and boxes .* broadcast"),
        (lambda: geometry.boxes_between_views(torch.eye(3).expand(2, 2, 3, 3), torch.zeros(3, 1, 4), 0, 1), ValueError, r"and boxes .* broadcast"),
        (lambda: geometry.intersect(torch.zeros(3, 4), torch.zeros(2, 4)), ValueError, r"box_a .* and box_b .* broadcast"),
        # A map of zero cells: a ZeroDivisionError computing its stride before.
        (lambda: geometry.cell_centers_in_source(torch.eye(3), 0, 7, (224, 224)), ValueError, "height and width must be positive ints"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
