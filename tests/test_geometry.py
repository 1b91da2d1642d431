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
