"""Photometric augmentation of a batch with per-sample parameters, on whatever device holds it.

The BYOL/DINO colour pipeline, in its order: colour jitter (probability ``jitter_p``), grayscale
(``grayscale_p``), Gaussian blur (``blur_p``), solarize (``solarize_p``). Each sample draws its own
parameters, as torchvision's transforms do when applied image by image:

- colour jitter: brightness, contrast and saturation factors uniform in ``[max(0, 1 - s), 1 + s]``,
  hue shift uniform in ``[-s, s]``, applied in a random order per sample (torchvision's
  ``ColorJitter`` semantics); each operation matches ``torchvision.transforms.functional`` on float
  images (contrast blends towards the mean of the grayscale image, hue shifts in HSV space);
- grayscale: ITU-R 601-2 luma (0.2989, 0.587, 0.114) copied to three channels;
- blur: ``spec.blur_kernel_size`` taps, sigma uniform in ``blur_sigma``, reflect padding, as
  ``torchvision.transforms.GaussianBlur``;
- solarize: ``x >= threshold -> 1 - x``.

Images are float ``[B, 3, H, W]`` in ``[0, 1]``. Nothing here moves a pixel, so the view matrices
stay exact. Random draws come from a ``torch.Generator`` on the CPU and are then moved to the images'
device, so a seed gives the same augmentation on CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from fastdense.pipelines.batch import to_device_async
from fastdense.pipelines.recipes import ViewSpec

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass
class PhotometricParams:
    """Per-sample parameters for a batch of ``B`` images (all tensors have leading dimension ``B``).

    ``jitter``, ``grayscale``, ``blur``, ``solarize`` are bool masks; ``factors`` is ``[B, 4]``
    (brightness, contrast, saturation, hue); ``order`` is ``[B, 4]``, a permutation of the four
    jitter operations per sample; ``sigma`` is ``[B]``.
    """

    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def to(self, device) -> "PhotometricParams":
        """On ``device`` (from the CPU to a GPU without waiting: :func:`to_device_async`)."""
        return PhotometricParams(**{k: to_device_async(v, device) for k, v in self.__dict__.items()})

    def __getitem__(self, rows) -> "PhotometricParams":
        """The parameters of images ``rows`` (a slice or an index tensor)."""
        return PhotometricParams(**{k: v[rows] for k, v in self.__dict__.items()})


def sample_params(spec: ViewSpec, batch: int, generator: Optional[torch.Generator] = None) -> PhotometricParams:
    """Draw parameters for ``batch`` images under ``spec`` from a CPU ``generator``."""

    def uniform(low, high, n=batch):
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    def coin(p):
        return torch.rand(batch, generator=generator, dtype=torch.float64) < p

    b, c, s, h = spec.jitter
    jitter = coin(spec.jitter_p)
    factors = torch.stack(
        [uniform(max(0.0, 1 - b), 1 + b), uniform(max(0.0, 1 - c), 1 + c), uniform(max(0.0, 1 - s), 1 + s), uniform(-h, h)], dim=1
    ).float()
    order = torch.argsort(torch.rand(batch, 4, generator=generator), dim=1)
    grayscale = coin(spec.grayscale_p)
    blur = coin(spec.blur_p)
    sigma = uniform(spec.blur_sigma[0], spec.blur_sigma[1]).float()
    solarize = coin(spec.solarize_p)
    return PhotometricParams(jitter, factors, order, grayscale, blur, sigma, solarize)


def apply_photometric(
    images: torch.Tensor,
    specs_or_spec: Union[ViewSpec, Sequence[ViewSpec]],
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Colour-augment ``images [B, 3, H, W]`` (float in ``[0, 1]``) with per-sample random parameters.

    ``specs_or_spec`` is one :class:`ViewSpec` for the whole batch or one per sample. Returns a new
    tensor on the same device; the input is not modified.

    >>> from fastdense.pipelines.recipes import get_recipe
    >>> views = torch.rand(4, 3, 32, 32)
    >>> out = apply_photometric(views, get_recipe("scrl").views[0], torch.Generator().manual_seed(0))
    >>> out.shape, bool(out.min() >= 0), bool(out.max() <= 1)
    (torch.Size([4, 3, 32, 32]), True, True)
    """
    _check_images(images)
    if isinstance(specs_or_spec, ViewSpec):
        params = sample_params(specs_or_spec, images.shape[0], generator)
        return apply_params(images, params, specs_or_spec.blur_kernel_size, specs_or_spec.solarize_threshold)
    specs = list(specs_or_spec)
    if len(specs) != images.shape[0]:
        raise ValueError(f"specs_or_spec must be one ViewSpec or {images.shape[0]} of them (one per image), got {len(specs)}")
    out = images.clone()
    for spec in dict.fromkeys(specs):  # unique specs, first-seen order, so draws are reproducible
        rows = to_device_async(torch.tensor([k for k, s in enumerate(specs) if s == spec]), images.device)
        params = sample_params(spec, len(rows), generator)
        out[rows] = apply_params(images[rows], params, spec.blur_kernel_size, spec.solarize_threshold)
    return out


def apply_params(images: torch.Tensor, params: PhotometricParams, blur_kernel_size: int, solarize_threshold: float) -> torch.Tensor:
    """Apply drawn parameters; the deterministic half of :func:`apply_photometric`."""
    _check_images(images)
    # Which rows take which operation is read off the host's copy of the parameters: on a GPU, a
    # torch.nonzero or bool() of a device tensor makes the host wait for every queued kernel.
    host = params.to("cpu")
    params = params.to(images.device)
    out = images.clone()

    def rows_of(mask: torch.Tensor) -> torch.Tensor:
        return to_device_async(torch.nonzero(mask).squeeze(1), images.device)

    for position in range(4):
        for op in range(4):
            rows = rows_of(host.jitter & (host.order[:, position] == op))
            if rows.numel():
                out[rows] = _JITTER_OPS[op](out[rows], params.factors[rows, op])
    rows = rows_of(host.grayscale)
    if rows.numel():
        out[rows] = rgb_to_gray(out[rows]).expand(-1, 3, -1, -1)
    rows = rows_of(host.blur)
    if rows.numel():
        out[rows] = gaussian_blur(out[rows], blur_kernel_size, params.sigma[rows])
    rows = rows_of(host.solarize)
    if rows.numel():
        out[rows] = torch.where(out[rows] >= solarize_threshold, 1.0 - out[rows], out[rows])
    return out



def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> torch.Tensor:
    """``(images - mean) / std`` per channel, for ``[B, 3, H, W]`` images on any device; with
    ``inplace``, written over ``images`` (on CPU a fresh batch-sized buffer costs more than the maths)."""
    _check_images(images)
    mean_t = to_device_async(torch.as_tensor(mean, dtype=images.dtype), images.device).view(1, -1, 1, 1)
    std_t = to_device_async(torch.as_tensor(std, dtype=images.dtype), images.device).view(1, -1, 1, 1)
    if inplace:
        return images.sub_(mean_t).div_(std_t)
    return (images - mean_t) / std_t


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` of ``[B, 3, H, W]`` images."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(factor: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return factor.to(images.dtype).view(-1, 1, 1, 1)


def _blend(images, other, factor):
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(images, factor):
    return (images * _per_sample(factor, images)).clamp(0, 1)


def adjust_contrast(images, factor):
    return _blend(images, rgb_to_gray(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(images, factor):
    return _blend(images, rgb_to_gray(images), factor)


def adjust_hue(images, shift):
    """Rotate hue by ``shift`` (fraction of a turn) per sample, through HSV like torchvision."""
    hue, saturation, value = _rgb_to_hsv(images)
    hue = torch.remainder(hue + _per_sample(shift, images)[:, 0], 1.0)
    return _hsv_to_rgb(hue, saturation, value)


_JITTER_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}


def _rgb_to_hsv(images):
    r, g, b = images.unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    spread = value - low
    flat = spread == 0
    saturation = spread / torch.where(flat, torch.ones_like(value), value)
    safe = torch.where(flat, torch.ones_like(spread), spread)
    # Hue sector: which channel is the maximum decides the 60-degree sector (red first on ties).
    red_max = value == r
    green_max = (value == g) & ~red_max
    hue = torch.where(red_max, (g - b) / safe, torch.where(green_max, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(flat, torch.zeros_like(hue), hue)
    return torch.remainder(hue / 6.0 + 1.0, 1.0), saturation, value


def _hsv_to_rgb(hue, saturation, value):
    # Channel n in (red 5, green 3, blue 1): v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6,
    # the closed form of the six-sector table.
    hue6 = hue * 6.0
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = torch.remainder(hue6 + offset, 6.0)
        channels.append(value - value * saturation * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(channels, dim=1)


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per sample, reflect padding (torchvision's semantics)."""
    batch, channels, height, width = images.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    weights = torch.exp(-0.5 * (taps / sigma.to(images.dtype).view(-1, 1)) ** 2)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    pad = kernel_size // 2
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weights.view(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.conv2d(flat, weights.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def _check_images(images):
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = list(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape [B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}")
