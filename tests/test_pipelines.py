"""Pipelines: every backend against the same contract (CONVENTIONS.md sections 1-2).

Backends are parametrised as ["torch", "dali", "ffcv"]; a backend whose module file is not in the
package yet is skipped with that reason. A backend whose module exists but whose package is missing
fails: scripts/install.sh installs every backend's package.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import fastdense.pipelines as pipelines
from fastdense.pipelines import builtin, make_loader
from fastdense.pipelines.base import epoch_order
from fastdense.pipelines.crops import crops_to_matrices, sample_crop
from fastdense.pipelines.folder import scan_image_folder
from fastdense.pipelines.photometric import PhotometricParams, apply_params, apply_photometric, normalize, sample_params
from fastdense.pipelines.recipes import RECIPES, Recipe, ViewSpec, get_recipe

from pipeline_helpers import SMALL_IMAGE_CROPS, build_bad_corpus, build_coordinate_folder, crop_sampler_gaps, roundtrip_check, save_image, single_view, unnormalize

PIPELINES_DIR = Path(pipelines.__file__).resolve().parent
BACKENDS = ["torch", "dali", "ffcv"]
# Sources for the round trip: odd sizes, portrait and landscape, every EXIF orientation, and one
# large enough that the smallest views decode at reduced JPEG size.
COORDINATE_SIZES = [(300, 400), (257, 331), (120, 90), (1400, 1000)]
COORDINATE_ORIENTATIONS = (1, 6, 3, 8, 2, 5, 4, 7)


def require_backend(name: str) -> str:
    module = PIPELINES_DIR / f"{name}_backend.py"
    if not module.is_file():
        pytest.skip(f"the {name} backend ({module.name}) is not in this checkout yet")
    return name


def open_loader(backend: str, folder: Path, tmp_path: Path, beton_write_mode: str = "jpg", **options):
    """A loader over an image folder; ffcv reads it through a .beton written first, its pixels
    stored as ``beton_write_mode`` ("jpg" re-encodes them, "raw" keeps them exactly)."""
    data = folder
    if backend == "ffcv":
        data = tmp_path / "data.beton"
        pipelines.write_beton(folder, data, write_mode=beton_write_mode)
    options.setdefault("num_workers", 0)
    options.setdefault("device", "cpu")
    return make_loader(backend, data=data, **options)


def with_flips(recipe: Recipe, flip_p: float) -> Recipe:
    return dataclasses.replace(recipe, views=tuple(dataclasses.replace(v, flip_p=flip_p) for v in recipe.views))


def small(recipe) -> Recipe:
    return get_recipe(recipe).resized({224: 32, 96: 16})


@pytest.fixture(scope="module")
def coordinate_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("coordinates")
    sources = build_coordinate_folder(root, COORDINATE_SIZES, suffix=".jpg", quality=98, orientations=COORDINATE_ORIENTATIONS)
    return root, sources


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory):
    return builtin.ensure_builtin_dataset(tmp_path_factory.mktemp("builtin"), num_images=30, image_size=48, num_classes=3)


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    return build_bad_corpus(tmp_path_factory.mktemp("bad"))


# ---------------------------------------------------------------------------------------- folder


def test_scan_image_folder_layout(bad_corpus):
    index = scan_image_folder(bad_corpus["root"])
    assert index.classes == bad_corpus["classes"]
    paths = {path: label for path, label in index.samples}
    expected = set(bad_corpus["readable"]) | set(bad_corpus["unreadable"])
    assert set(paths) == expected
    nested = next(p for p in paths if p.name == "nested.jpg")
    assert index.classes[paths[nested]] == "nested"
    assert [p for p, _ in index.samples] == sorted(paths, key=lambda p: (index.classes[paths[p]], str(p)))


def test_scan_reads_each_folder_once_through_symlinks(tmp_path):
    """Symlinked folders are followed, each once: a link from a class folder to itself made 8 images
    328 samples, one to the root hung the scan. Such links, and one into another class, are skipped
    with a warning naming them; a class folder that links elsewhere, and a linked sub-folder, are read."""
    root, elsewhere, extra = tmp_path / "root", tmp_path / "elsewhere", tmp_path / "extra"
    tiny = np.zeros((4, 4, 3), dtype=np.uint8)
    own = [save_image(tiny, root / "cls" / f"{k}.png") for k in range(3)] + [save_image(tiny, root / "cls" / "sub" / "s.png")]
    outside = [save_image(tiny, elsewhere / f"{k}.png") for k in range(2)]
    more = [save_image(tiny, extra / f"{k}.png") for k in range(2)]
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "cls" / "sub" / "outside").symlink_to(extra, target_is_directory=True)
    (root / "cls" / "other_class").symlink_to(root / "linked", target_is_directory=True)
    (root / "cls" / "self").symlink_to((root / "cls").resolve(), target_is_directory=True)
    (root / "cls" / "up").symlink_to("..", target_is_directory=True)
    (root / "cls" / "sub" / "back").symlink_to("..", target_is_directory=True)
    (root / "cls" / "sub" / "again").symlink_to(".", target_is_directory=True)  # a sub-folder, not a class
    with pytest.warns(UserWarning) as caught:
        index = scan_image_folder(root)
    assert index.classes == ["cls", "linked"]
    expected = own + [root / "cls" / "sub" / "outside" / p.name for p in more]
    assert sorted(p for p, label in index.samples if label == 0) == sorted(expected)
    assert sorted(p for p, label in index.samples if label == 1) == [root / "linked" / p.name for p in outside]
    warned = sorted(str(w.message).split("'")[1] for w in caught)
    assert warned == sorted(str(root / "cls" / name) for name in ("other_class", "self", "sub/again", "sub/back", "up"))


def test_scan_matches_extensions_in_any_case_and_skips_hidden_files(tmp_path):
    tiny = np.zeros((4, 4, 3), dtype=np.uint8)
    wanted = [save_image(tiny, tmp_path / "cls" / name) for name in ("a.JPG", "b.Png", "c.jpeg")]
    for name in (".hidden.png", ".cache/d.png", "sub/.e.png"):
        save_image(tiny, tmp_path / "cls" / name)
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    save_image(tiny, tmp_path / ".hidden_class" / "f.png")
    index = scan_image_folder(tmp_path)
    assert index.classes == ["cls"] and [p for p, _ in index.samples] == wanted


def test_scan_refuses_a_file_for_a_folder(tmp_path):
    photo = save_image(np.zeros((4, 4, 3), dtype=np.uint8), tmp_path / "photo.jpg")
    with pytest.raises(ValueError, match="photo.jpg.* is not a directory"):
        scan_image_folder(photo)


def test_scan_names_images_left_directly_under_the_root(tmp_path):
    save_image(np.zeros((4, 4, 3), dtype=np.uint8), tmp_path / "photo.JPG")
    (tmp_path / "class_without_images").mkdir()
    with pytest.raises(ValueError, match=r"holds no image in any class folder .*images directly under it \(photo\.JPG\.\.\.\) need a class folder"):
        scan_image_folder(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_or_empty_folder_fails_before_work(backend, tmp_path):
    require_backend(backend)
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        make_loader(backend, data=missing, device="cpu")
    empty = tmp_path / "empty_root"
    (empty / "class_without_images").mkdir(parents=True)
    with pytest.raises((ValueError, FileNotFoundError), match="empty_root"):
        make_loader(backend, data=empty, device="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_name_their_samples_for_resume(backend, scene_folder, tmp_path):
    """``num_samples`` and ``sample_names()``, by which a resumed run checks its data: the names do
    not depend on where the folder is and change when a file is renamed; a .beton names none."""
    import shutil

    require_backend(backend)
    moved = tmp_path / "moved"
    shutil.copytree(scene_folder, moved)
    options = dict(recipe=small("plain"), batch_size=2)
    first = open_loader(backend, Path(scene_folder), tmp_path / "a", **options)
    assert first.num_samples == 30 and isinstance(first.num_samples, int)
    if backend == "ffcv":
        assert first.sample_names() is None
        return
    names = first.sample_names()
    assert len(names) == 30 and len(set(names)) == 30 and not any(str(scene_folder) in name for name in names)
    assert open_loader(backend, moved, tmp_path / "b", **options).sample_names() == names
    victim = sorted(moved.rglob("*.*"))[0]
    victim.rename(victim.with_name("renamed" + victim.suffix))
    renamed = open_loader(backend, moved, tmp_path / "c", **options).sample_names()
    assert len(renamed) == 30 and renamed != names


@pytest.mark.parametrize("backend", BACKENDS)
def test_folder_of_unreadable_files_is_an_error(backend, bad_corpus, tmp_path):
    """A folder whose every image fails to decode is as good as empty: dali and ffcv refuse it when
    the loader is made, torch (which decodes lazily) once its first epoch has read nothing; it used
    to run the epoch with no batch and only a warning."""
    require_backend(backend)
    folder = tmp_path / "unreadable"
    for path in bad_corpus["unreadable"]:
        (folder / "only").mkdir(parents=True, exist_ok=True)
        (folder / "only" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="no readable image"):
        list(open_loader(backend, folder, tmp_path, recipe=small("plain"), batch_size=2, drop_last=False))


def test_make_loader_rejects_bad_arguments(scene_folder):
    with pytest.raises(ValueError, match="backend"):
        make_loader("opencv", data=scene_folder)
    with pytest.raises(ValueError, match="shard_id"):
        make_loader("torch", data=scene_folder, shard_id=2, num_shards=2)
    for batch_size in (0, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            make_loader("torch", data=scene_folder, batch_size=batch_size)
    assert len(make_loader("torch", data=scene_folder, batch_size=4, seed=np.int64(3), num_workers=0, device="cpu")) == 7  # numpy ints are ints
    for backend in BACKENDS:  # numpy and DALI reject it only once an epoch starts
        with pytest.raises(ValueError, match="seed"):
            make_loader(backend, data=scene_folder, seed=-1, device="cpu")
    with pytest.raises(ValueError, match="recipe"):
        make_loader("torch", data=scene_folder, recipe="simclr")
    with pytest.raises(ValueError, match="num_workers"):  # torch's DataLoader would refuse it only once an epoch starts
        make_loader("torch", data=scene_folder, num_workers=-1)


def test_make_loader_names_the_extra_that_installs_a_missing_backend(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fastdense.pipelines.dali_backend", None)  # its import now fails
    with pytest.raises(ImportError, match=r"the 'dali' pipeline backend needs a package that is missing: .*"
                                          r"\(install it with `pip install 'fastdense\[dali\]'`\)"):
        make_loader("dali", data=tmp_path, device="cpu")


# ----------------------------------------------------------------------------------------- crops


def _crop_statistics(spec, height, width, draws, sampler):
    areas, log_ratios = [], []
    for _ in range(draws):
        x0, y0, w, h = sampler()
        assert 0 <= x0 and x0 + w <= width and 0 <= y0 and y0 + h <= height
        areas.append(w * h / (height * width))
        log_ratios.append(math.log(w / h))
    return np.array(areas), np.array(log_ratios)


@pytest.mark.parametrize("spec", sorted({v for r in RECIPES.values() for v in r.views}, key=repr), ids=lambda s: f"{s.size}px-{s.scale}")
def test_crop_distribution_matches_torchvision(spec):
    """Areas and aspect ratios stay in the recipe's ranges and follow RandomResizedCrop's distribution."""
    height, width, draws = 375, 500, 1500
    rng = np.random.default_rng(0)
    ours = _crop_statistics(spec, height, width, draws, lambda: sample_crop(height, width, spec, rng)[:4])
    torch.manual_seed(0)
    image = torch.empty(3, height, width)

    def torchvision_window():
        i, j, h, w = T.RandomResizedCrop.get_params(image, list(spec.scale), list(spec.ratio))
        return j, i, w, h

    theirs = _crop_statistics(spec, height, width, draws, torchvision_window)
    area, log_ratio = ours
    rounding = 2.0 / min(height, width)  # windows are rounded to whole pixels
    assert area.min() >= spec.scale[0] * (1 - 2 * rounding) and area.max() <= spec.scale[1] + rounding
    assert log_ratio.min() >= math.log(spec.ratio[0]) - 2 * rounding and log_ratio.max() <= math.log(spec.ratio[1]) + 2 * rounding
    quantiles = np.linspace(0.05, 0.95, 19)
    for ours_values, their_values, name in zip(ours, theirs, ("area", "log aspect ratio")):
        gap = np.abs(np.quantile(ours_values, quantiles) - np.quantile(their_values, quantiles)).max()
        spread = their_values.max() - their_values.min()
        assert gap < 0.08 * spread, f"{name} quantiles differ from torchvision's by {gap:.3f}"


@pytest.mark.parametrize("height,width", [(10, 1000), (1000, 10), (7, 7)])
def test_crop_fallback_is_torchvision_centre_crop(height, width):
    spec = ViewSpec(224, (0.9, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.0)
    x0, y0, w, h, flip = sample_crop(height, width, spec, np.random.default_rng(1))
    if height == width:  # a square fits: not the fallback, but must still be a whole window
        assert 0 < w <= width and 0 < h <= height
        return
    i, j, th, tw = T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.9, 1.0], [3 / 4, 4 / 3])
    assert (x0, y0, w, h, flip) == (j, i, tw, th, False)
    flipped = sample_crop(height, width, dataclasses.replace(spec, flip_p=1.0), np.random.default_rng(1))
    assert flipped == (x0, y0, w, h, True), "the fallback window is flipped with probability flip_p too"


@pytest.mark.parametrize("height,width,scale", SMALL_IMAGE_CROPS)
def test_small_image_crops_follow_torchvision(height, width, scale):
    """On images a few pixels wide, windows reach the sides: a window as wide or as high as the
    image must fit, and every position up to the far side must be drawn, as RandomResizedCrop does."""
    rng = np.random.default_rng(0)
    spec = ViewSpec(16, scale)
    size_gap, side_gap = crop_sampler_gaps(lambda: sample_crop(height, width, spec, rng), height, width, scale)
    assert size_gap < 0.06 and side_gap < 0.05, (size_gap, side_gap)


def test_sample_crop_rejects_an_empty_image():
    with pytest.raises(ValueError, match="0 x 5"):
        sample_crop(0, 5, ViewSpec(16, (0.5, 1.0)), np.random.default_rng(0))


def test_crops_to_matrices_follow_conventions():
    crops = np.array([[[10, 20, 100, 50, 0], [30, 5, 64, 64, 1]]])
    m = crops_to_matrices(crops, [224, 32])
    assert m.shape == (1, 2, 3, 3) and m.dtype == torch.float32
    torch.testing.assert_close(m[0, 0], torch.tensor([[100 / 224, 0, 10], [0, 50 / 224, 20], [0, 0, 1.0]]))
    torch.testing.assert_close(m[0, 1], torch.tensor([[-2.0, 0, 94], [0, 2.0, 5], [0, 0, 1.0]]))
    # A view size given as (H_v, W_v): x scales by the width, y by the height.
    m = crops_to_matrices(crops, [(25, 50), (32, 16)])
    torch.testing.assert_close(m[0, 0], torch.tensor([[2.0, 0, 10], [0, 2.0, 20], [0, 0, 1.0]]))
    torch.testing.assert_close(m[0, 1], torch.tensor([[-4.0, 0, 94], [0, 2.0, 5], [0, 0, 1.0]]))
    with pytest.raises(ValueError, match="one size per view"):
        crops_to_matrices(crops, [224])
    with pytest.raises(ValueError, match="crops must have shape"):
        crops_to_matrices(crops[..., :4], [224, 32])


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("orientation", COORDINATE_ORIENTATIONS)
def test_torch_backend_views_equal_torchvision_resized_crop(orientation, interpolation, tmp_path):
    """Each view is the reference repositories' ``resized_crop`` of the upright image, then the flip:
    within one grey level per resampling pass (PyTorch's uint8 antialiased resize against PIL's)."""
    from PIL import Image, ImageOps

    from fastdense.pipelines.torch_backend import decode_views

    scene, _ = builtin.render_scene(3, 1, 160, 6, seed=2)
    specs = [ViewSpec(48, (0.05, 1.0), flip_p=0.5), ViewSpec(24, (0.05, 0.3), flip_p=0.5), ViewSpec(200, (0.5, 1.0), flip_p=0.5)]
    mode = TF.InterpolationMode.BICUBIC if interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    for path in [save_image(scene[:123], tmp_path / "scene.png", orientation=orientation),
                 save_image(scene[:123], tmp_path / "scene.jpg", orientation=orientation, quality=95)]:
        upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        for seed in range(6):
            views, crops, size = decode_views(path, specs, interpolation, np.random.default_rng(seed))
            assert size == (upright.height, upright.width)
            for view, (x0, y0, w, h, flip), spec in zip(views, crops, specs):
                expected = TF.resized_crop(upright, int(y0), int(x0), int(h), int(w), [spec.size, spec.size], mode)
                expected = np.asarray(TF.hflip(expected) if flip else expected).astype(int)
                assert view.shape == (3, spec.size, spec.size) and view.dtype == torch.uint8 and view.is_contiguous()
                error = np.abs(view.permute(1, 2, 0).numpy().astype(int) - expected)
                assert error.max() <= 2 and error.mean() < 0.05, (path.name, seed, spec.size, error.max(), error.mean())


def test_float_images_read_as_0_to_1_scaled_to_8_bits(tmp_path):
    """A 32-bit float image (PIL mode F, as a TIFF stores it) holds 0-1 values: v -> round(255 v), clipped."""
    from PIL import Image

    from fastdense.pipelines.torch_backend import to_rgb

    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0, 1.5, -0.5]], dtype=np.float32), "F").save(tmp_path / "float.tif")
    with Image.open(tmp_path / "float.tif") as image:
        assert image.mode == "F"
        rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (1, 6, 3) and (rgb == np.array([0, 64, 128, 255, 255, 0], dtype=np.uint8)[None, :, None]).all(), rgb[0, :, 0]


@pytest.mark.parametrize("orientation", [0, 9])
def test_torch_backend_reads_an_exif_orientation_outside_1_to_8_as_upright(orientation, tmp_path):
    """Broken writers store 0 or 9: ignored, as PIL's exif_transpose (the other backends' reader) ignores it."""
    from PIL import Image, ImageOps

    from fastdense.pipelines.torch_backend import decode_views

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "odd.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "odd.jpg") as image:
        assert ImageOps.exif_transpose(image).size == (30, 20)
    views, crops, size = decode_views(tmp_path / "odd.jpg", [ViewSpec(8, (0.5, 1.0))], "bilinear", np.random.default_rng(0))
    assert size == (20, 30) and crops[0, 0] + crops[0, 2] <= 30 and crops[0, 1] + crops[0, 3] <= 20


def test_torch_backend_decodes_jpegs_reduced_never_below_a_view(tmp_path, monkeypatch):
    """A JPEG is decoded at 1/2, 1/4 or 1/8 size only while every window keeps at least its view's
    size along both sides there: a smaller one would be enlarged, losing detail the source has."""
    from PIL import JpegImagePlugin

    from fastdense.pipelines.torch_backend import decode_views

    scene, _ = builtin.render_scene(0, 0, 480, 4, seed=1)
    path = save_image(scene[:400], tmp_path / "scene.jpg", quality=95)
    drafted, draft = [], JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        drafted.append(self.size[0])  # the width it now decodes at
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    specs = [ViewSpec(32, (0.3, 1.0), ratio=(1 / 3, 3.0)), ViewSpec(16, (0.05, 0.3), ratio=(1 / 3, 3.0))]
    reduced = 0
    for seed in range(20):
        drafted.clear()
        _, crops, _ = decode_views(path, specs, "bicubic", np.random.default_rng(seed))
        scale = 480 / drafted[-1] if drafted else 1.0
        reduced += scale > 1
        for (x0, y0, w, h, flip), spec in zip(crops, specs):
            assert min(w, h) / scale >= spec.size, (seed, (w, h), scale, spec.size)
    assert reduced >= 5


# ------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("flip", ["flip", "no-flip"])
@pytest.mark.parametrize("recipe_name", ["scrl", "lewel", "vicregl", "selfpatch", "plain"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_every_view(backend, recipe_name, flip, coordinate_folder, tmp_path):
    """Each view pixel's colour says where in the source it came from; the matrix must agree.

    FFCV stores the decoded sources losslessly here: its own JPEG decoder shifts red and blue by
    about one level, which this colour code reads as a shift of ~2 source pixels in x. JPEG storage
    is covered by the other ffcv tests (seeds, shards, unreadable files)."""
    require_backend(backend)
    folder, sources = coordinate_folder
    recipe = with_flips(get_recipe(recipe_name), 1.0 if flip == "flip" else 0.0)
    loader = open_loader(backend, folder, tmp_path, beton_write_mode="raw", recipe=recipe, batch_size=len(sources), photometric=False, drop_last=False, shuffle=False)
    batches = list(loader)
    assert sum(b.batch_size for b in batches) == len(sources) and not loader.skipped
    for batch in batches:
        assert [tuple(v.shape[-2:]) for v in batch.views] == [(s.size, s.size) for s in recipe.views]
        assert batch.matrices.dtype == torch.float32
        assert bool(((batch.matrices[..., 0, 0] < 0) == (flip == "flip")).all())
        stats = roundtrip_check(batch, sources, recipe.mean, recipe.std, noise_levels=2.0)
        assert stats["views_checked"] >= batch.batch_size  # every image had at least one checkable view


@pytest.mark.parametrize("recipe_name", ["scrl", "lewel", "vicregl", "selfpatch", "plain"])
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_round_trip_check_catches_a_half_pixel_slip(backend, recipe_name, coordinate_folder, tmp_path):
    """The round trip cannot pass vacuously: on the sources and recipes of test_round_trip_every_view,
    its check passes every view with its own matrix and fails it with the matrix moved by half a
    pixel along x or along y, either way. Half a pixel of the coarser grid: the source's where the
    view enlarges, the view's where it shrinks (the mistake of mapping pixel corners, not centres).
    (FFCV's INTER_AREA views are not probed: enlarging, they sit up to 0.26 px off on their own.)"""
    require_backend(backend)
    folder, sources = coordinate_folder
    recipe = with_flips(get_recipe(recipe_name), 0.5)
    loader = open_loader(backend, folder, tmp_path, recipe=recipe, batch_size=len(sources), photometric=False, drop_last=False, shuffle=False)
    batch = next(iter(loader))
    checked = 0
    for b in range(batch.batch_size):
        for v in range(batch.num_views):
            matrix = batch.matrices[b, v].double()
            if not roundtrip_check(single_view(batch, b, v, matrix), sources, recipe.mean, recipe.std, noise_levels=2.0)["views_checked"]:
                continue
            checked += 1
            for axis in (0, 1):
                half_pixel = 0.5 * max(1.0, abs(float(matrix[axis, axis])))
                for sign in (1, -1):
                    slipped = matrix.clone()
                    slipped[axis, 2] += sign * half_pixel
                    with pytest.raises(AssertionError, match=f"shifted by .* in {'xy'[axis]}"):
                        roundtrip_check(single_view(batch, b, v, slipped), sources, recipe.mean, recipe.std, noise_levels=2.0)
    assert checked >= batch.batch_size


# ------------------------------------------------------------------------------- seeds and shards


def _batches(loader):
    return [(b.index.clone(), b.matrices.clone(), [v.clone() for v in b.views]) for b in _with_host_copies(loader)]


def _with_host_copies(loader):
    """The loader's batches, each checked to carry CPU copies of its small tensors (what host-side
    work such as SCRL's box sampler reads without a device sync) equal to the tensors themselves."""
    for batch in loader:
        assert batch.host is not None
        for name in ("matrices", "source_size", "index", "label"):
            copy = batch.on_host(name)
            assert copy is batch.host[name] and copy.device.type == "cpu" and torch.equal(copy, getattr(batch, name).cpu()), name
        yield batch


def _assert_same(first, second):
    assert len(first) == len(second)
    for (i1, m1, v1), (i2, m2, v2) in zip(first, second):
        assert torch.equal(i1, i2) and torch.equal(m1, m2)
        assert all(torch.equal(a, b) for a, b in zip(v1, v2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_crops(backend, scene_folder, tmp_path):
    require_backend(backend)
    options = dict(recipe=small("vicregl"), batch_size=10, seed=3)
    first = _batches(open_loader(backend, scene_folder, tmp_path, **options))
    second_loader = open_loader(backend, scene_folder, tmp_path, **options)
    _assert_same(first, _batches(second_loader))
    next_epoch = _batches(second_loader)  # a second pass is epoch 1: new order and new crops
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, next_epoch))
    second_loader.set_epoch(0)
    _assert_same(first, _batches(second_loader))
    other_seed = _batches(open_loader(backend, scene_folder, tmp_path, **{**options, "seed": 4}))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other_seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pass_stopped_early_still_ends_its_epoch(backend, scene_folder, tmp_path):
    """A pass cut short (a peek, a cap on steps per epoch) counts as its epoch: the next pass is
    epoch 1. DALI and FFCV advanced only at an epoch's end, so they served epoch 0 again."""
    require_backend(backend)
    loader = open_loader(backend, scene_folder, tmp_path, recipe=small("plain"), batch_size=10, photometric=False)
    peek = next(iter(loader)).matrices.clone()
    after_peek = _batches(loader)
    loader.set_epoch(1)
    _assert_same(after_peek, _batches(loader))
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader)).matrices, peek)


@pytest.mark.parametrize("backend", ["torch", "dali"])  # ffcv: test_ffcv_round_trip_raw_storage
def test_each_epoch_draws_new_crops_of_the_same_images(backend, scene_folder, tmp_path):
    """In dataset order, so that only the crops can change: epoch 1 crops each image anew."""
    require_backend(backend)
    loader = open_loader(backend, scene_folder, tmp_path, recipe=small("scrl"), batch_size=10, photometric=False, shuffle=False)
    first, second = (next(iter(loader)) for _ in range(2))
    assert torch.equal(first.index, second.index)
    changed = (first.matrices != second.matrices).flatten(2).any(-1)  # [B, V]
    assert changed.float().mean() > 0.8, changed


def test_torch_backend_results_do_not_depend_on_workers(scene_folder, tmp_path):
    options = dict(recipe=small("scrl"), batch_size=8, seed=5)
    in_process = _batches(open_loader("torch", scene_folder, tmp_path, num_workers=0, **options))
    with_workers = _batches(open_loader("torch", scene_folder, tmp_path, num_workers=2, **options))
    _assert_same(in_process, with_workers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_disjoint_and_complete(backend, scene_folder, tmp_path, caplog):
    require_backend(backend)
    labels = [label for _, label in scan_image_folder(scene_folder).samples]  # 3 classes
    total = len(labels)
    options = dict(recipe=small("plain"), batch_size=4, photometric=False, num_shards=3)
    seen, first_windows = [], []
    for shard in range(3):
        loader = open_loader(backend, scene_folder, tmp_path, shard_id=shard, drop_last=False, **options)
        batches = list(loader)
        indices = torch.cat([b.index for b in batches]).tolist()
        assert len(indices) == len(set(indices))
        assert torch.cat([b.label for b in batches]).tolist() == [labels[i] for i in indices]
        seen.append(set(indices))
        first_windows.append(batches[0].matrices)
    assert set().union(*seen) == set(range(total))
    assert sum(len(s) for s in seen) == total
    assert not [r for r in caplog.records if "could not be read" in r.getMessage()], "a clean folder's epoch reported skips"
    # Every image here has the same size: shards that drew from one random stream would crop alike.
    assert not torch.equal(first_windows[0], first_windows[1]), "shards must draw their own crops"
    # 30 samples over 4 shards: 8, 8, 7 and 7, of which drop_last keeps 7 each, so one whole batch.
    options["num_shards"] = 4
    loaders = [open_loader(backend, scene_folder, tmp_path, shard_id=k, drop_last=True, **options) for k in range(4)]
    lengths = {len(loader) for loader in loaders}
    assert lengths == {1}, f"with drop_last every shard must run the same number of batches, got {lengths}"
    assert [b.batch_size for b in loaders[0]] == [4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_dataset_one_class_images_smaller_than_views(backend, tmp_path):
    """Three images of one class, each smaller than the views: upsampled views with exact matrices;
    a batch larger than the data is one short batch without drop_last, and a clear error before any
    work with it (an epoch of no batch at all), as is a shard left without samples."""
    require_backend(backend)
    folder = tmp_path / "three"
    sources = build_coordinate_folder(folder, [(28, 24), (30, 36), (26, 26)], suffix=".png")
    recipe = with_flips(small("plain").resized({32: 48}), 0.5)
    with pytest.raises(ValueError, match="batch_size is 4 .*; pass drop_last=False or a smaller batch_size"):
        open_loader(backend, folder, tmp_path, recipe=recipe, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="shard 3 of 4 gets 0"):
        open_loader(backend, folder, tmp_path, recipe=recipe, batch_size=1, shard_id=3, num_shards=4, drop_last=False)
    with pytest.raises(ValueError, match="shard 0 of 2 gets 1 of the 3"):  # drop_last: each shard keeps 3 // 2
        open_loader(backend, folder, tmp_path, recipe=recipe, batch_size=2, shard_id=0, num_shards=2, drop_last=True)
    loader = open_loader(backend, folder, tmp_path, beton_write_mode="raw", recipe=recipe, batch_size=4, drop_last=False, photometric=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 1 and batches[0].batch_size == 3 and not loader.skipped
    assert sorted(batches[0].index.tolist()) == [0, 1, 2] and batches[0].label.tolist() == [0, 0, 0]
    assert [tuple(v.shape) for v in batches[0].views] == [(3, 3, 48, 48)]
    if backend != "ffcv":  # FFCV enlarges with INTER_AREA, blockier than the round trip's mean limit
        roundtrip_check(batches[0], sources, recipe.mean, recipe.std, noise_levels=1.0)


def test_view_batch_checks_its_shapes_and_moves_every_tensor():
    views = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4)]
    fields = dict(views=views, matrices=torch.eye(3).expand(2, 2, 3, 3), source_size=torch.full((2, 2), 8), index=torch.arange(2), label=torch.ones(2, dtype=torch.int64))
    batch = pipelines.ViewBatch(**fields, extras={"rois": torch.zeros(4, 5), "note": "kept"})
    assert (batch.batch_size, batch.num_views) == (2, 2)
    moved = batch.to("meta")  # stands in for a GPU: every tensor must move
    assert all(t.device.type == "meta" for t in moved.views + [moved.matrices, moved.source_size, moved.index, moved.label, moved.extras["rois"]])
    assert moved.extras["note"] == "kept"
    for name, value, message in [("views", [], "at least one view"), ("views", [views[0], torch.zeros(3, 3, 4, 4)], r"views\[1\] must have shape \[2, 3, H, W\]"),
                                 ("views", [views[0], torch.zeros(2, 1, 4, 4)], r"views\[1\] must have shape \[2, 3, H, W\], got \(2, 1, 4, 4\)"),
                                 ("matrices", torch.eye(3).expand(2, 1, 3, 3), r"matrices must have shape \[2, 2, 3, 3\]"),
                                 ("source_size", torch.zeros(2, 3), "source_size must have shape"), ("index", torch.arange(3), "index must have shape"),
                                 ("label", torch.zeros(2, 1), r"label must have shape \[2\]")]:
        with pytest.raises(ValueError, match=message):
            pipelines.ViewBatch(**{**fields, name: value})


def test_epoch_order_shards():
    for drop_last in (False, True):
        shards = [epoch_order(23, seed=1, epoch=2, shard_id=k, num_shards=4, drop_last=drop_last) for k in range(4)]
        flat = np.concatenate(shards)
        assert len(flat) == len(set(flat.tolist()))
        assert len(flat) == (20 if drop_last else 23)
    assert not np.array_equal(epoch_order(50, 0, 0), epoch_order(50, 0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_crops_stay_in_recipe_ranges(backend, scene_folder, tmp_path):
    require_backend(backend)
    recipe = small("selfpatch")
    loader = open_loader(backend, scene_folder, tmp_path, recipe=recipe, batch_size=10, photometric=False, drop_last=False)
    for batch in loader:
        for v, spec in enumerate(recipe.views):
            m = batch.matrices[:, v]
            w, h = m[:, 0, 0].abs() * spec.size, m[:, 1, 1] * spec.size
            area = w * h / (batch.source_size[:, 0] * batch.source_size[:, 1]).float()
            assert bool((area >= spec.scale[0] * 0.9).all() and (area <= spec.scale[1] * 1.05).all())
            ratio = w / h
            assert bool((ratio >= spec.ratio[0] * 0.95).all() and (ratio <= spec.ratio[1] * 1.05).all())


# --------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_corpus(backend, bad_corpus, tmp_path, caplog):
    """Unreadable files are skipped and reported by path; readable files of any mode load correctly.

    The epoch is taken as a training loop takes it, ``len(loader)`` batches and no request past the
    last: the report must come with the last batch (it came only when the iteration ended, so a
    training loop never saw it). FFCV stores pixels losslessly here for the coordinate image's
    position check (see test_round_trip_every_view); test_pipelines_dali_ffcv loads this corpus
    from JPEG storage."""
    import itertools

    require_backend(backend)
    recipe = dataclasses.replace(small("plain"), views=(ViewSpec(32, (0.3, 1.0)), ViewSpec(16, (0.1, 0.5))))
    paths = [p for p, _ in scan_image_folder(bad_corpus["root"]).samples]
    with caplog.at_level(logging.WARNING, logger="fastdense.pipelines"):
        loader = open_loader(backend, bad_corpus["root"], tmp_path, beton_write_mode="raw", recipe=recipe, batch_size=4, photometric=False, drop_last=False, shuffle=False)
        batches = list(itertools.islice(loader, len(loader)))
    skipped = {Path(path) for path, _ in loader.skipped}
    assert skipped == set(bad_corpus["unreadable"]), f"skipped {sorted(map(str, skipped))}"
    assert all(reason for _, reason in loader.skipped)
    # (write_beton logs the same paths as it writes: only the epoch's own report counts here)
    reports = [record.getMessage() for record in caplog.records if record.getMessage().startswith("epoch 0: skipped")]
    assert len(reports) == 1, "no end-of-epoch report with the last batch"
    for path in bad_corpus["unreadable"]:
        assert str(path) in reports[0], f"{path} missing from the end-of-epoch report"
    loaded = {}
    for batch in batches:
        for b in range(batch.batch_size):
            loaded[paths[int(batch.index[b])]] = (batch, b)
    assert set(loaded) == set(bad_corpus["readable"])
    for path, facts in bad_corpus["readable"].items():
        batch, b = loaded[path]
        assert tuple(batch.source_size[b].tolist()) == facts["size"], f"{facts['kind']}: source size"
        for view in batch.views:
            pixels = unnormalize(view[b], recipe.mean, recipe.std)
            if "colour" in facts:
                error = np.abs(pixels.reshape(-1, 3).mean(0) - np.array(facts["colour"])).max()
                assert error < 6, f"{facts['kind']}: mean colour {pixels.reshape(-1, 3).mean(0).round(1)}, expected {facts['colour']}"
            if facts.get("gray"):
                assert np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() < 1.0, f"{facts['kind']}: not gray"
        if facts.get("coordinates"):
            sub = pipelines.ViewBatch(views=[v[b:b + 1] for v in batch.views], matrices=batch.matrices[b:b + 1],
                                      source_size=batch.source_size[b:b + 1], index=torch.zeros(1, dtype=torch.int64))
            roundtrip_check(sub, {0: facts["size"]}, recipe.mean, recipe.std, noise_levels=2.0)
    # The next epoch, taken to its end, lists its own skips (not the first epoch's again) and
    # reports them once, with the number of files the epoch read.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdense.pipelines"):
        list(loader)
    assert sorted(Path(path) for path, _ in loader.skipped) == sorted(bad_corpus["unreadable"])
    reports = [record.getMessage() for record in caplog.records if "could not be read" in record.getMessage()]
    assert len(reports) == 1 and reports[0].startswith(f"epoch 1: skipped 3 of {len(paths)} files"), reports


def test_torch_backend_keeps_batches_whole(bad_corpus):
    """The torch backend learns of unreadable files only while decoding: another image stands in for
    each, so two shards still give whole batches, the same number of them (what VICReg's all-gather
    and a lock-step training loop need), and every unreadable file is reported once, by its shard.
    The stand-ins do not depend on the number of workers."""
    recipe = dataclasses.replace(small("plain"), views=(ViewSpec(16, (0.3, 1.0)),))
    paths = [p for p, _ in scan_image_folder(bad_corpus["root"]).samples]
    skipped, runs = [], {}
    for num_workers in (0, 2):
        for shard in (0, 1):
            loader = make_loader("torch", data=bad_corpus["root"], recipe=recipe, batch_size=3, num_shards=2, shard_id=shard,
                                 drop_last=True, photometric=False, num_workers=num_workers, device="cpu", seed=5)
            batches = list(loader)
            assert len(batches) == len(loader) and all(b.batch_size == 3 for b in batches)
            assert {paths[int(i)] for b in batches for i in b.index} <= set(bad_corpus["readable"])
            runs[num_workers, shard] = [(b.index.tolist(), b.matrices.tolist()) for b in batches]
            if num_workers == 0:
                skipped += [Path(path) for path, _ in loader.skipped]
    order = np.concatenate([epoch_order(len(paths), 5, 0, shard, 2, drop_last=True) for shard in (0, 1)])
    assert len(skipped) >= 3 and sorted(skipped) == sorted(p for p in map(paths.__getitem__, order) if p in bad_corpus["unreadable"])
    assert [runs[0, s] for s in (0, 1)] == [runs[2, s] for s in (0, 1)]


def test_torch_backend_keeps_batches_whole_in_a_mostly_unreadable_folder(tmp_path):
    """With 2 readable images among 42 files, 8 stand-in draws often all failed: batch 2 gave 11
    batches of sizes 1 and 2 instead of 21 of 2 (BatchNorm then failed on 1 sample, and resuming,
    which counts batches, broke). Stand-ins now run on through the whole folder, deterministically:
    every batch is whole, the same for any number of workers and from a mid-epoch start."""
    rng = np.random.default_rng(0)
    for k in range(2):
        save_image(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), tmp_path / "data" / "a" / f"good{k}.png")
    for k in range(40):
        (tmp_path / "data" / "a" / f"junk{k:02d}.jpg").write_bytes(rng.bytes(300))
    recipe = dataclasses.replace(small("plain"), views=(ViewSpec(16, (0.3, 1.0)),))
    runs = {}
    for num_workers in (0, 2):
        loader = make_loader("torch", data=tmp_path / "data", recipe=recipe, batch_size=2, photometric=False,
                             num_workers=num_workers, device="cpu", seed=3)
        batches = list(loader)
        assert len(loader) == 21 and [b.batch_size for b in batches] == [2] * 21
        # each file reported once, by itself (not a stand-in that failed in its place)
        assert sorted(Path(path).name for path, _ in loader.skipped) == [f"junk{k:02d}.jpg" for k in range(40)]
        runs[num_workers] = [(b.index.tolist(), b.matrices.tolist()) for b in batches]
        loader.set_epoch(0)
        loader.start_at(15)
        assert [(b.index.tolist(), b.matrices.tolist()) for b in loader] == runs[num_workers][15:]
    assert runs[0] == runs[2]


def test_torch_backend_draws_stand_ins_anew_each_epoch(tmp_path):
    """The image standing in for an unreadable file is drawn per epoch, as crops are: not the same
    duplicate of one image in its place every epoch."""
    for k in range(6):
        save_image(np.full((20, 20, 3), 40 * k, dtype=np.uint8), tmp_path / "data" / "a" / f"good{k}.png")
    for k in range(2):
        (tmp_path / "data" / "a" / f"junk{k}.jpg").write_bytes(b"not an image")
    recipe = dataclasses.replace(small("plain"), views=(ViewSpec(16, (0.3, 1.0)),))
    loader = make_loader("torch", data=tmp_path / "data", recipe=recipe, batch_size=8, photometric=False,
                         num_workers=0, device="cpu", shuffle=False)
    stand_ins = [next(iter(loader)).index.tolist() for epoch in range(3)]
    assert all(indices[:6] == list(range(6)) and max(indices[6:]) < 6 for indices in stand_ins)
    assert len({tuple(indices[6:]) for indices in stand_ins}) > 1, stand_ins


def test_torch_backend_tries_a_file_again_after_an_io_error(tmp_path, monkeypatch):
    """A file whose read failed with an I/O error (errno set: a network disk's hiccup) is tried again
    when next visited; only a file whose content fails is remembered as undecodable."""
    from fastdense.pipelines import torch_backend

    for k in range(2):
        save_image(np.full((20, 20, 3), 90 * k, dtype=np.uint8), tmp_path / "data" / "a" / f"{k}.png")
    decode, failed = torch_backend.decode_views, []

    def hiccup_once(path, *args, **kwargs):
        if Path(path).name == "0.png" and not failed:
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error")
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "decode_views", hiccup_once)
    loader = make_loader("torch", data=tmp_path / "data", recipe=small("plain"), batch_size=2, photometric=False,
                         num_workers=0, device="cpu", shuffle=False)
    first = next(iter(loader))
    assert len(failed) == 1 and first.batch_size == 2 and next(iter(loader)).index.tolist() == [0, 1]


def test_torch_backend_never_yields_a_short_batch_when_files_fail_mid_batch(tmp_path, monkeypatch):
    """A batch whose first image decodes but whose next images and every stand-in then fail with I/O
    errors (a data disk gone mid-epoch) is an error naming the folder, never a short batch."""
    from fastdense.pipelines import torch_backend

    for k in range(3):
        save_image(np.full((20, 20, 3), 40 * k, dtype=np.uint8), tmp_path / "data" / "a" / f"{k}.png")
    decode, calls = torch_backend.decode_views, []

    def disk_gone_after_one(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > 1:
            raise OSError(errno.EIO, "Input/output error")
        return decode(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "decode_views", disk_gone_after_one)
    loader = make_loader("torch", data=tmp_path / "data", recipe=small("plain"), batch_size=3, photometric=False,
                         num_workers=0, device="cpu", shuffle=False)
    with pytest.raises(ValueError, match=f"{tmp_path / 'data'}.*no readable image.*Input/output error"):
        next(iter(loader))
    assert len(calls) > 3  # every stand-in was tried


def test_torch_backend_refuses_a_folder_with_nothing_readable_at_its_first_batch(tmp_path):
    """A folder where no file decodes was only refused at the end of the first epoch, after training
    had started on no batch; now the first batch raises a ValueError naming the folder."""
    for k in range(4):
        (tmp_path / "data" / "a" / f"junk{k}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "a" / f"junk{k}.jpg").write_bytes(b"not an image")
    loader = make_loader("torch", data=tmp_path / "data", recipe=small("plain"), batch_size=2, num_workers=0, device="cpu")
    with pytest.raises(ValueError, match=f"{tmp_path / 'data'}.*no readable image among its 4 files"):
        next(iter(loader))


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
def test_starts_mid_epoch_with_the_batches_a_whole_pass_gives(backend, scene_folder, tmp_path):
    """``start_at(k)`` skips the first ``k`` batches without decoding them and gives the rest exactly
    as a whole pass does (crops, colours and all); the pass after starts from batch 0 again. (DALI's
    random streams run on from batch to batch: a resumed run replays it instead.)"""
    require_backend(backend)
    loader = open_loader(backend, scene_folder, tmp_path, recipe=small("vicregl"), batch_size=4, seed=3)
    whole = list(loader)
    loader.set_epoch(0)
    loader.start_at(5)
    tail = list(loader)
    assert len(whole) == len(loader) == 7 and len(tail) == 2
    for a, b in zip(whole[5:], tail):
        assert torch.equal(a.index, b.index) and torch.equal(a.matrices, b.matrices)
        assert all(torch.equal(u, v) for u, v in zip(a.views, b.views))
    loader.set_epoch(0)
    assert [b.index.tolist() for b in loader] == [b.index.tolist() for b in whole]
    loader.start_at(7)  # the epoch's end: a pass of no batch
    assert list(loader) == []
    with pytest.raises(ValueError, match="batch"):
        loader.start_at(8)


# -------------------------------------------------------------------------------------- photometric


def _images(batch=6, size=20, seed=0):
    return torch.rand(batch, 3, size, size + 3, generator=torch.Generator().manual_seed(seed))


def test_photometric_matches_torchvision_per_sample():
    """Each sample's jitter (in its own order), grayscale, blur and solarize equal torchvision's."""
    spec = ViewSpec(32, (0.2, 1.0), jitter_p=0.7, grayscale_p=0.3, blur_p=0.5, solarize_p=0.5)
    images = _images(batch=24)
    params = sample_params(spec, 24, torch.Generator().manual_seed(1))
    out = apply_params(images, params, spec.blur_kernel_size, spec.solarize_threshold)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(24):
        expected = images[b]
        if params.jitter[b]:
            for op in params.order[b].tolist():
                expected = ops[op](expected, float(params.factors[b, op]))
        if params.grayscale[b]:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        if params.blur[b]:
            k = spec.blur_kernel_size
            expected = TF.gaussian_blur(expected, [k, k], [float(params.sigma[b])] * 2)
        if params.solarize[b]:
            expected = TF.solarize(expected, spec.solarize_threshold)
        torch.testing.assert_close(out[b], expected, atol=2e-5, rtol=0)
    for flag in ("jitter", "grayscale", "blur", "solarize"):  # the test covered both branches of each
        assert 0 < int(getattr(params, flag).sum()) < 24, flag


def test_recipes_follow_reference_views():
    """Each recipe's views, as the methods' reference code builds them (METHODS.md); VICRegL gives
    local view j the colour pipeline of global view j % 2 (its transforms.get_color_distortion)."""
    first, second = (1.0, 0.0), (0.1, 0.2)  # (blur_p, solarize_p) of BYOL's two views

    def views(recipe):
        return [(v.size, v.scale, (v.blur_p, v.solarize_p)) for v in RECIPES[recipe].views]

    assert views("scrl") == views("lewel") == [(224, (0.2, 1.0), first), (224, (0.2, 1.0), second)]
    assert views("vicregl") == [(224, (0.4, 1.0), first), (224, (0.4, 1.0), second)] + 3 * [(96, (0.08, 0.4), first), (96, (0.08, 0.4), second)]
    assert views("vicregl_two_views") == [(224, (0.08, 1.0), first), (224, (0.08, 1.0), second)]  # its ResNet-50 recipe
    assert views("selfpatch") == [(224, (0.25, 1.0), first), (224, (0.25, 1.0), second)] + 8 * [(96, (0.05, 0.25), (0.5, 0.0))]
    for name in ("scrl", "lewel", "vicregl", "vicregl_two_views", "selfpatch"):
        for v in RECIPES[name].views:
            assert (v.jitter, v.jitter_p, v.grayscale_p, v.flip_p, v.ratio) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5, (3 / 4, 4 / 3))
    assert {name: r.interpolation for name, r in RECIPES.items() if name != "plain"} == dict(scrl="bicubic", lewel="bilinear", vicregl="bicubic", vicregl_two_views="bicubic", selfpatch="bicubic")
    assert RECIPES["vicregl"].std == (0.228, 0.224, 0.225) and RECIPES["scrl"].std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("field,value", [("size", 0), ("scale", (0.0, 1.0)), ("scale", (0.5, 0.2)), ("ratio", (0.0, 1.0)),
                                         ("blur_sigma", (2.0, 0.1)), ("flip_p", 1.5), ("blur_p", -0.1), ("jitter", (0.4, 0.4, 0.2, 0.7)),
                                         ("jitter", (0.4, -0.4, 0.2, 0.1))])
def test_view_spec_rejects_bad_values(field, value):
    """A bad recipe value is an error when the recipe is made; the torch backend met it inside every
    sample's decode (a ratio of 0: 'math domain error') and reported every file as unreadable."""
    with pytest.raises(ValueError, match=f"ViewSpec.{field}"):
        ViewSpec(**{"size": 32, "scale": (0.2, 1.0), field: value})


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_view():
    """BYOL's 23 px kernel at 224 px: round(0.1 * size), made odd upwards, at least 3."""
    assert [ViewSpec(size, (0.2, 1.0)).blur_kernel_size for size in (224, 96, 48, 32, 16)] == [23, 11, 5, 3, 3]


def test_view_spec_accepts_equal_bounds():
    spec = ViewSpec(32, (1.0, 1.0), ratio=(1.0, 1.0), blur_sigma=(0.5, 0.5))  # a fixed scale, a square window
    x0, y0, w, h, _ = sample_crop(20, 20, spec, np.random.default_rng(0))
    assert (x0, y0, w, h) == (0, 0, 20, 20)


def test_recipe_rejects_bad_values():
    with pytest.raises(ValueError, match="interpolation"):
        Recipe("nearest", (ViewSpec(32, (0.2, 1.0)),), interpolation="nearest")
    with pytest.raises(ValueError, match="views"):
        Recipe("none", ())
    with pytest.raises(ValueError, match="views must be one or more ViewSpec objects"):
        Recipe("sizes", (224, 96))


@pytest.mark.parametrize("spec", [
    RECIPES["scrl"].views[1],
    RECIPES["scrl"].views[0],  # solarize_p 0
    # every probability different, so that no flag can be drawn with another's
    dataclasses.replace(RECIPES["scrl"].views[1], jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.05, blur_sigma=(0.3, 1.7)),
], ids=["scrl-view2", "scrl-view1", "distinct"])
def test_photometric_parameters_follow_spec(spec):
    params = sample_params(spec, 4000, torch.Generator().manual_seed(0))
    for flag, p in (("jitter", spec.jitter_p), ("grayscale", spec.grayscale_p), ("blur", spec.blur_p), ("solarize", spec.solarize_p)):
        assert abs(getattr(params, flag).float().mean().item() - p) < 0.03, flag
    b, c, s, h = spec.jitter
    for k, (low, high) in enumerate([(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]):
        values = params.factors[:, k]
        assert low <= values.min() and values.max() <= high and values.max() - values.min() > 0.9 * (high - low)
    low, high = spec.blur_sigma  # sigma uniform over the spec's range
    assert low <= params.sigma.min() and params.sigma.max() <= high and params.sigma.max() - params.sigma.min() > 0.9 * (high - low)
    assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(4000, 4))
    assert params.order[:, 0].bincount(minlength=4).min() > 800  # every op comes first about a quarter of the time


def test_photometric_asks_the_device_nothing():
    # On a GPU, a torch.nonzero or bool() of a device tensor makes the host wait for every queued
    # kernel (the training step's); the meta device stands in for it, since such calls raise there.
    spec = dataclasses.replace(get_recipe("scrl").views[0], jitter_p=0.9, grayscale_p=0.5, blur_p=0.5, solarize_p=0.5)
    params = sample_params(spec, 16, torch.Generator().manual_seed(0))
    assert all(0 < int(mask.sum()) < 16 for mask in (params.jitter, params.grayscale, params.blur, params.solarize))
    out = apply_params(torch.rand(16, 3, 32, 32, device="meta"), params, spec.blur_kernel_size, spec.solarize_threshold)
    assert out.device.type == "meta" and out.shape == (16, 3, 32, 32)


def test_photometric_solarize_inverts_the_pixels_at_or_above_its_threshold():
    """torchvision's solarize on every 8-bit level, the threshold's own level (128) included."""
    spec = ViewSpec(32, (0.2, 1.0), jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=1.0)
    levels = torch.arange(256, dtype=torch.float32).div(255).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    out = apply_photometric(levels, spec, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, TF.solarize(levels, spec.solarize_threshold), rtol=0, atol=0)
    assert out[0, 0, 8, 0] == 1 - levels[0, 0, 8, 0]  # level 128


def test_apply_photometric_per_sample_specs_and_validation():
    plain, strong = ViewSpec(32, (0.2, 1.0), jitter_p=0, grayscale_p=0), ViewSpec(32, (0.2, 1.0), grayscale_p=1.0, jitter_p=0)
    images = _images(batch=4)
    out = apply_photometric(images, [plain, strong, plain, strong], torch.Generator().manual_seed(0))
    assert torch.equal(images, _images(batch=4)), "the input was modified"
    torch.testing.assert_close(out[0], images[0])
    assert torch.allclose(out[1][0], out[1][1]) and torch.allclose(out[3][0], out[3][2])
    with pytest.raises(ValueError, match="images"):
        apply_photometric(images[0], plain)
    with pytest.raises(ValueError, match=r"images must be a tensor of shape \[B, 3, H, W\], got \[4, 4, 20, 23\]"):
        apply_photometric(torch.cat([images, images[:, :1]], dim=1), plain)  # RGBA
    with pytest.raises(TypeError, match="float"):
        apply_photometric((images * 255).to(torch.uint8), plain)
    with pytest.raises(ValueError, match="one per image"):
        apply_photometric(images, [plain, strong])
    torch.testing.assert_close(normalize(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), images * 2 - 1)
    copy = images.clone()
    assert normalize(copy, (0.25, 0.5, 0.75), (0.5, 2.0, 4.0), inplace=True) is copy
    torch.testing.assert_close(copy, normalize(images, (0.25, 0.5, 0.75), (0.5, 2.0, 4.0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_photometric_never_moves_geometry(backend, scene_folder, tmp_path):
    require_backend(backend)
    options = dict(recipe=small("scrl"), batch_size=8, seed=2)
    coloured = _batches(open_loader(backend, scene_folder, tmp_path, photometric=True, **options))
    plain = _batches(open_loader(backend, scene_folder, tmp_path, photometric=False, **options))
    for (i1, m1, v1), (i2, m2, v2) in zip(coloured, plain):
        assert torch.equal(i1, i2) and torch.equal(m1, m2)
        assert not torch.equal(v1[0], v2[0])


@pytest.mark.parametrize("photometric", [True, False])
def test_finish_views_in_chunks_equals_whole_batch(photometric):
    """The torch backend colours and normalises a CPU batch a few images at a time: the result is
    the whole-batch ``apply_photometric`` with the same draws, then ``normalize``."""
    from fastdense.pipelines.base import sample_seed
    from fastdense.pipelines.torch_backend import CPU_CHUNK, finish_views

    recipe = get_recipe("vicregl")
    batch = 2 * CPU_CHUNK + 3
    views = [(_images(batch=batch, size=spec.size // 4, seed=v) * 255).round().to(torch.uint8) for v, spec in enumerate(recipe.views[:3])]
    views[1] = views[1].contiguous(memory_format=torch.channels_last)  # FFCV hands over channels-last views
    finished = finish_views(views, recipe, photometric, seed=5, epoch=2, shard_id=1, batch_number=4)
    for v, (view, spec, out) in enumerate(zip(views, recipe.views, finished)):
        expected = view.float() / 255
        if photometric:
            expected = apply_photometric(expected, spec, torch.Generator().manual_seed(sample_seed(5, 2, 1, 4, v)))
        torch.testing.assert_close(out, normalize(expected, recipe.mean, recipe.std), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_photometric_gpu_equals_cpu():
    spec = RECIPES["vicregl"].views[2]
    images = _images(batch=32, size=96)
    cpu = apply_photometric(images, spec, torch.Generator().manual_seed(7))
    gpu = apply_photometric(images.cuda(), spec, torch.Generator().manual_seed(7))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_gpu_round_trip(backend, coordinate_folder, tmp_path):
    """On a GPU (DALI: nvJPEG's mixed decoder, resize on the GPU): views on the device, and each
    view's matrix still says where its pixels came from; the host keeps the matrices' CPU copies."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (a GPU machine gets it from scripts/gpu_install_wheels.sh)")
    folder, sources = coordinate_folder
    recipe = get_recipe("vicregl")
    loader = open_loader(backend, folder, tmp_path, recipe=recipe, batch_size=len(sources), photometric=False, device="cuda", drop_last=False)
    checked = 0
    for batch in loader:
        assert all(v.is_cuda for v in batch.views) and batch.matrices.is_cuda and not batch.on_host("matrices").is_cuda
        checked += roundtrip_check(batch, sources, recipe.mean, recipe.std, noise_levels=2.0)["views_checked"]
    assert checked >= len(sources)


# ------------------------------------------------------------------------------------ built-in data


def test_builtin_dataset_is_deterministic_and_labelled(tmp_path, scene_folder):
    again = builtin.ensure_builtin_dataset(tmp_path, num_images=30, image_size=48, num_classes=3)
    assert again != scene_folder
    first = sorted(p.relative_to(scene_folder) for p in scene_folder.rglob("*.jpg"))
    assert first == sorted(p.relative_to(again) for p in again.rglob("*.jpg")) and len(first) == 30
    for relative in first[:6]:
        assert (scene_folder / relative).read_bytes() == (again / relative).read_bytes()
    other_seed = builtin.ensure_builtin_dataset(tmp_path, num_images=30, image_size=48, num_classes=3, seed=1)
    assert all((other_seed / relative).read_bytes() != (again / relative).read_bytes() for relative in first[:6])
    index = scan_image_folder(again)
    assert index.classes == builtin.class_names(3)
    assert sorted(builtin.class_names(12)) == builtin.class_names(12)  # folder order is label order
    for path, label in index.samples:
        mask = builtin.load_mask(path)
        assert mask.shape == (48, 48)
        values = set(np.unique(mask).tolist())
        assert values <= {0, 255, 1, 2, 3} and label + 1 in values
        counts = {k: int((mask == k).sum()) for k in (1, 2, 3)}
        assert max(counts, key=counts.get) == label + 1, "the labelled object is the largest one"


def test_builtin_dataset_is_atomic_and_cached(tmp_path, monkeypatch):
    def crash(index, *args):
        if index == 5:
            raise RuntimeError("simulated crash")
        return render(index, *args)

    render = builtin.render_scene
    monkeypatch.setattr(builtin, "render_scene", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        builtin.ensure_builtin_dataset(tmp_path, num_images=12, image_size=32, num_classes=2)
    assert list(tmp_path.iterdir()) == [], "a crash must leave nothing behind"
    monkeypatch.setattr(builtin, "render_scene", render)
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    path = builtin.ensure_builtin_dataset(num_images=12, image_size=32, num_classes=2)
    assert path.is_relative_to(tmp_path / "cache")
    stamp = path.parent.joinpath("meta.json").stat().st_mtime_ns
    monkeypatch.setattr(builtin, "render_scene", lambda *args: pytest.fail("the dataset was generated again"))
    assert builtin.ensure_builtin_dataset(num_images=12, image_size=32, num_classes=2) == path
    assert path.parent.joinpath("meta.json").stat().st_mtime_ns == stamp, "the second call must reuse the cache"


def test_builtin_dataset_refuses_bad_sizes_before_writing(tmp_path):
    for options, name in (({"num_images": 2, "num_classes": 3}, "num_classes"), ({"image_size": 8}, "image_size"),
                          ({"num_images": 0}, "num_images")):
        with pytest.raises(ValueError, match=name):
            builtin.ensure_builtin_dataset(tmp_path, **options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (6, 7)])
def test_builtin_mask_boundaries_mark_both_sides_of_every_label_edge(shape):
    """The ignored band: every pixel with a 4-neighbour of another label, on either side of the edge."""
    labels = np.random.default_rng(shape[0]).integers(0, 3, shape).astype(np.uint8)
    padded = np.pad(labels.astype(np.int64), 1, constant_values=-1)
    neighbours = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
    expected = np.any([(n >= 0) & (n != labels) for n in neighbours], axis=0)
    assert np.array_equal(builtin._label_boundaries(labels), expected)


def test_make_loader_defaults_to_builtin_dataset(tmp_path, monkeypatch):
    made, generate = {}, builtin.ensure_builtin_dataset

    def small_builtin(root=None, **_):
        made["path"] = generate(tmp_path, num_images=8, image_size=32, num_classes=2)
        return made["path"]

    monkeypatch.setattr(builtin, "ensure_builtin_dataset", small_builtin)
    loader = make_loader("torch", data=None, recipe=small("scrl"), batch_size=4, num_workers=0, device="cpu")
    batch = next(iter(loader))
    assert len(loader) == 2 and batch.label is not None and batch.matrices.shape == (4, 2, 3, 3)
    assert loader.index.root == made["path"]
