"""Backend-specific tests for the DALI and FFCV pipelines (the shared contract is in test_pipelines.py).

- DALI: the round trip on lossless sources with both interpolations; the unreadable-file check and
  its cache.
- FFCV: the round trip on a losslessly stored .beton (FFCV's own JPEG decoder shifts red and blue by
  about one level, which a coordinate encoding reads as a shift in x); write_beton's skip report,
  side file and downscale; the command line; the compiled crop sampler against RandomResizedCrop;
  the resize (INTER_AREA, whatever the recipe's interpolation);
  several loaders in one process (FFCV 1.0.2 alters a shared numba type, which made the second
  loader's compilation fail in its thread and the main thread wait forever).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdense.pipelines import make_loader
from fastdense.pipelines.crops import sample_crop
from fastdense.pipelines.recipes import Recipe, ViewSpec

from PIL import Image

from fastdense.pipelines.photometric import GRAY_WEIGHTS

from pipeline_helpers import SMALL_IMAGE_CROPS, build_bad_corpus, build_coordinate_folder, coordinate_image, crop_sampler_gaps, roundtrip_check, unnormalize

pytest.importorskip("nvidia.dali", reason="scripts/install.sh installs nvidia-dali")
ffcv = pytest.importorskip("ffcv", reason="scripts/install.sh installs ffcv")

from fastdense.pipelines import ffcv_backend, validate  # noqa: E402

SIZES = [(150, 200), (211, 173), (64, 90)]


def two_view_recipe(interpolation="bilinear", flip_p=(1.0, 0.0)):
    return Recipe(
        "test",
        (ViewSpec(48, (0.3, 1.0), flip_p=flip_p[0], jitter_p=0.0, grayscale_p=0.0),
         ViewSpec(24, (0.05, 0.3), flip_p=flip_p[1], jitter_p=0.0, grayscale_p=0.0)),
        interpolation=interpolation,
    )


@pytest.fixture(scope="module")
def coordinate_pngs(tmp_path_factory):
    root = tmp_path_factory.mktemp("coordinate_pngs")
    return root, build_coordinate_folder(root, SIZES, suffix=".png")


@pytest.fixture(scope="module")
def raw_beton(coordinate_pngs, tmp_path_factory):
    root, sources = coordinate_pngs
    path = tmp_path_factory.mktemp("beton") / "coords.beton"
    summary = ffcv_backend.write_beton(root, path, write_mode="raw", num_workers=1)
    assert summary == {"written": len(SIZES), "skipped": []}
    return path, sources


@pytest.fixture(scope="module")
def corpus_beton(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("corpus")
    corpus = build_bad_corpus(tmp_path / "corpus")
    out = tmp_path / "corpus.beton"
    logger = logging.getLogger("fastdense.pipelines")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        summary = ffcv_backend.write_beton(corpus["root"], out, max_resolution=256, num_workers=2)
    finally:
        logger.removeHandler(handler)
    return corpus, out, summary, "\n".join(r.getMessage() for r in records)


# --------------------------------------------------------------------------------------------- DALI


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_dali_round_trip_lossless(coordinate_pngs, interpolation, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path))
    root, sources = coordinate_pngs
    recipe = two_view_recipe(interpolation)
    loader = make_loader("dali", data=root, recipe=recipe, batch_size=len(SIZES), num_workers=1, device="cpu",
                         photometric=False, drop_last=False, shuffle=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 1
    batch = batches[0]
    assert batch.index.tolist() == [0, 1, 2] and batch.source_size.tolist() == [list(s) for s in SIZES]
    assert bool((batch.matrices[:, 0, 0, 0] < 0).all()) and bool((batch.matrices[:, 1, 0, 0] > 0).all())
    stats = roundtrip_check(batch, sources, recipe.mean, recipe.std, noise_levels=0.5)
    assert stats["views_checked"] >= len(SIZES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the GPU pipeline runs for real (benchmarks/bench_pipelines.py)")
@pytest.mark.parametrize("recipe", ["scrl", "vicregl", "lewel", "selfpatch"])
def test_dali_gpu_pipeline_is_well_formed(recipe, coordinate_pngs, monkeypatch, tmp_path):
    """The GPU pipeline without a GPU: ``Pipeline.build`` asserts CUDA, but the graph can still be
    defined (``_build_graph``, DALI's own step before the backend), and that checks what a first GPU
    run would trip on. Named arguments must stay on the CPU. Every operator must have an
    implementation on the device it landed on (an operator follows a GPU input to the GPU, and one
    without a GPU kernel fails only when the pipeline is built), with its inputs where that
    implementation reads them. Decoding is nvJPEG's (mixed), and the pixel work after it runs on the GPU."""
    from nvidia.dali import backend
    from nvidia.dali.pipeline import Pipeline

    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path))
    monkeypatch.setattr(Pipeline, "build", Pipeline._build_graph)
    implemented = {"cpu": set(backend.RegisteredCPUOps()), "gpu": set(backend.RegisteredGPUOps()), "mixed": set(backend.RegisteredMixedOps())}
    root, _ = coordinate_pngs
    for photometric in (True, False):
        loader = make_loader("dali", data=root, recipe=recipe, batch_size=2, num_workers=1, device="cuda:0", photometric=photometric)
        operators = loader._build(0)._ops
        placed = {(op._op.schema_name, op._op.device) for op in operators}
        assert {(name, device) for name, device in placed if name not in implemented[device]} == set()
        for op in operators:
            schema, device = backend.GetSchema(op._op.schema_name), op._op.device
            for i, given in enumerate(node.device for node in op.inputs[: op.spec.NumRegularInput()]):
                wanted = schema.GetInputDevice(i, None, device)
                wanted = "cpu" if wanted == "mixed" else wanted  # a mixed operator reads CPU input
                assert wanted in (given, "any"), f"{op._op.schema_name} on {device}: input {i} is on {given}, wants {wanted}"
        assert ("decoders__Image", "mixed") in placed
        on_gpu = ["Resize", "CropMirrorNormalize"] + (["ColorTwist"] if photometric else [])
        for name in on_gpu:
            assert (name, "gpu") in placed and (name, "cpu") not in placed, (name, sorted(placed))


def _dali_views(root, recipe, photometric, batch_size):
    loader = make_loader("dali", data=root, recipe=recipe, batch_size=batch_size, num_workers=1, device="cpu", seed=1,
                         photometric=photometric, drop_last=False, shuffle=False)
    batch = next(iter(loader))
    return np.stack([unnormalize(batch.views[0][b], recipe.mean, recipe.std) for b in range(batch.batch_size)])


def test_dali_bicubic_views_stay_in_0_255(tmp_path, monkeypatch):
    """Bicubic resampling overshoots next to sharp edges; DALI's float views are clipped to 0-255, as
    PIL's and the torch backend's uint8 views are."""
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "images" / "a").mkdir(parents=True)
    checks = (np.indices((12, 12)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.repeat(checks[..., None], 3, axis=2)).save(tmp_path / "images" / "a" / "checks.png")
    recipe = Recipe("upscale", (ViewSpec(40, (0.9, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0),), interpolation="bicubic")
    views = _dali_views(tmp_path / "images", recipe, False, 1)
    assert views.min() > -0.01 and views.max() < 255.01 and views.min() < 1 and views.max() > 254


def test_dali_colour_jitter_follows_torchvision(tmp_path, monkeypatch):
    """Contrast blends towards each image's grayscale mean, and every jitter step stays in [0, 255],
    as torchvision's; a jitter strength of 0 (an empty range to draw from) is allowed.

    ``fn.color_twist`` pivots its contrast on 0.5 for float input, where the views span 0-255: it
    darkened every image like a second brightness factor, and nothing clamped its output."""
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for k in range(6):  # smooth mid-range colours, so a contrast of 1.8 never needs clipping
        Image.fromarray(rng.integers(70, 180, (8, 8, 3), dtype=np.uint8)).resize((48, 48), Image.Resampling.BILINEAR).save(root / "a" / f"{k}.png")
    only_contrast = Recipe("contrast", (ViewSpec(32, (0.5, 1.0), jitter=(0.0, 0.8, 0.0, 0.0), jitter_p=1.0, grayscale_p=0.0),))
    plain, jittered = (_dali_views(root, only_contrast, photometric, 6) for photometric in (False, True))
    luma = np.array(GRAY_WEIGHTS)
    factors = []
    for before, after in zip(plain, jittered):
        mean = float((before @ luma).mean())
        factor = float(np.std(after) / np.std(before))
        factors.append(factor)
        assert abs(float((after @ luma).mean()) - mean) < 1.0, "contrast must keep the grayscale mean"
        assert np.abs(after - (mean + factor * (before - mean))).max() < 2.0
    assert min(factors) >= 0.2 - 0.01 and max(factors) <= 1.8 + 0.01 and max(factors) - min(factors) > 0.2

    for k in range(6):  # black and white halves: strong jitter would leave [0, 255] without clamping
        image = np.zeros((48, 48, 3), np.uint8)
        image[:, 24:] = 255
        image[::2, :, 1] = 200
        Image.fromarray(image).save(root / "a" / f"{k}.png")
    strong = Recipe("strong", (ViewSpec(32, (0.5, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1.0, grayscale_p=0.0, solarize_p=0.5),))
    views = _dali_views(root, strong, True, 6)
    assert views.min() > -0.5 and views.max() < 255.5, (views.min(), views.max())


def test_dali_solarize_inverts_the_pixels_at_or_above_its_threshold(tmp_path, monkeypatch):
    """torchvision's solarize: 255 - x where x >= 128 (on 0-255 views), x elsewhere."""
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((48, 48), Image.Resampling.BILINEAR).save(root / "a" / f"{k}.png")
    only_solarize = Recipe("solarize", (ViewSpec(32, (0.5, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=1.0),))
    plain, solarized = (_dali_views(root, only_solarize, photometric, 4) for photometric in (False, True))
    above = plain >= 128
    assert 0.2 < above.mean() < 0.8  # both sides of the threshold are there
    np.testing.assert_allclose(solarized, np.where(above, 255 - plain, plain), atol=0.5)


def test_unreadable_files_found_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    corpus = build_bad_corpus(tmp_path / "corpus")
    paths = sorted(set(corpus["readable"]) | set(corpus["unreadable"]))
    found = dict(validate.find_unreadable(paths, corpus["root"], num_workers=2))
    assert set(found) == set(corpus["unreadable"])
    assert "truncated" in found[next(p for p in found if p.name == "truncated.jpg")].lower()

    def must_not_run(path):
        raise AssertionError(f"{path} was checked again although its size and time did not change")

    monkeypatch.setattr(validate, "check_image_file", must_not_run)
    assert dict(validate.find_unreadable(paths, corpus["root"])) == found
    monkeypatch.undo()
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    # A file rewritten in place with as many bytes is checked again (its time changed).
    good = next(p for p in paths if p.suffix == ".jpg" and p not in corpus["unreadable"])
    stamp = good.stat()
    good.write_bytes(b"x" * stamp.st_size)
    os.utime(good, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert set(dict(validate.find_unreadable(paths, corpus["root"]))) == set(corpus["unreadable"]) | {good}
    # A cache written by another version of the checks is not trusted.
    (cache_file,) = (tmp_path / "cache" / "validated").glob("*.json")
    stored = json.loads(cache_file.read_text())
    stored["version"] -= 1
    stored["files"][str(good)][2] = None
    cache_file.write_text(json.dumps(stored))
    assert good in dict(validate.find_unreadable(paths, corpus["root"]))
    # Verdicts under a backend's refuse check are cached apart from those without one.
    readable = [p for p in paths if p not in corpus["unreadable"] and p != good]
    assert validate.find_unreadable(readable, corpus["root"]) == []
    refused = validate.find_unreadable(readable, corpus["root"], refuse=lambda image: "refused by this backend")
    assert refused == [(p, "refused by this backend") for p in readable]


def test_jpeg_with_data_after_its_end_marker_is_readable(tmp_path):
    """A trailer after ``FF D9`` (phones append one) leaves the JPEG readable, as PIL and DALI read
    it; the check called it truncated, so dali and ffcv skipped files the torch backend loads."""
    import io

    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(encoded, format="JPEG")
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(encoded.getvalue() + b"SEFH" + bytes(range(256)) + b"SEFT")
    assert validate.check_image_file(trailer) is None
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    assert "truncated" in validate.check_image_file(cut)


@pytest.mark.parametrize("image_format", ["BMP", "TIFF"])
def test_dali_skips_other_formats_cut_short(image_format, tmp_path, monkeypatch):
    """A BMP or TIFF cut in half passes PIL's ``verify``; DALI's decoder then stopped the whole
    pipeline mid-epoch. It is skipped and reported, as the torch backend skips it."""
    import io

    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "images" / "a").mkdir(parents=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "images" / "a" / "good.png")
    encoded = io.BytesIO()
    image.save(encoded, format=image_format)
    cut = tmp_path / "images" / "a" / f"cut.{image_format.lower()}"
    cut.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    loader = make_loader("dali", data=tmp_path / "images", recipe=two_view_recipe(), batch_size=2, num_workers=1, device="cpu", drop_last=False)
    assert [b.batch_size for b in loader] == [1] and [Path(p) for p, _ in loader.skipped] == [cut]


def test_dali_skips_formats_it_cannot_decode(tmp_path, monkeypatch):
    """A GIF named .jpg is read by PIL (torch, ffcv) but not by DALI, whose pipeline it stopped
    mid-epoch: DALI skips and reports it. A PNG named .jpg is read by its content everywhere."""
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "images" / "a").mkdir(parents=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "images" / "a" / "png_named.jpg", format="PNG")
    gif = tmp_path / "images" / "a" / "gif_named.jpg"
    image.save(gif, format="GIF")
    loader = make_loader("dali", data=tmp_path / "images", recipe=two_view_recipe(), batch_size=2, num_workers=1, device="cpu", drop_last=False)
    assert [b.batch_size for b in loader] == [1] and [Path(p) for p, _ in loader.skipped] == [gif]
    assert "GIF" in loader.skipped[0][1]
    assert validate.find_unreadable([gif], tmp_path / "images") == []  # other backends read it


def test_dali_skips_image_modes_its_decoder_refuses(tmp_path, monkeypatch):
    """A 32-bit integer TIFF (PIL mode I) passed the format check, then stopped DALI's pipeline
    mid-epoch ("Invalid sample_type: 8197"), as did PIL's bilevel TIFF (no BitsPerSample tag). Both
    are skipped and reported up front; the modes DALI does decode (16-bit, float, CMYK, LA TIFFs, a
    1-bit PNG) are read, not skipped."""
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    refused = [folder / "int32.tif", folder / "bilevel.tif"]
    Image.fromarray(rng.integers(0, 2**20, (40, 40), dtype=np.int32)).save(refused[0])
    rgb.convert("1").save(refused[1])
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(folder / "gray16.tif")
    Image.fromarray(rng.random((40, 40), dtype=np.float32)).save(folder / "float.tif")
    for mode in ("CMYK", "LA"):
        rgb.convert(mode).save(folder / f"{mode.lower()}.tif")
    rgb.convert("1").save(folder / "bilevel_lzw.tif", compression="tiff_lzw")
    rgb.convert("1").save(folder / "bilevel.png")
    loader = make_loader("dali", data=tmp_path / "images", recipe=two_view_recipe(), batch_size=7, num_workers=1, device="cpu", drop_last=False)
    assert sorted(Path(p) for p, _ in loader.unreadable) == sorted(refused)
    assert [b.batch_size for b in loader] == [6] and sorted(Path(p) for p, _ in loader.skipped) == sorted(refused)
    assert "32-bit integer TIFF" in dict(loader.skipped)[str(refused[0])]


# --------------------------------------------------------------------------------------------- FFCV


def test_write_beton_command_line(coordinate_pngs, tmp_path, capsys):  # runs first among FFCV tests
    root, _ = coordinate_pngs
    out = tmp_path / "cli.beton"
    assert ffcv_backend.main(["write", str(root), str(out), "--jpeg-quality", "80", "--num-workers", "1"]) == 0
    assert out.is_file() and "wrote 3 images" in capsys.readouterr().out
    for option, value in (("write_mode", "png"), ("jpeg_quality", 0), ("jpeg_quality", 101), ("max_resolution", 0)):
        with pytest.raises(ValueError, match=f"{option} must be"):  # before anything is decoded or written
            ffcv_backend.write_beton(root, tmp_path / "x.beton", **{option: value})
    assert not (tmp_path / "x.beton").exists()
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        ffcv_backend.write_beton(tmp_path / "missing_folder", tmp_path / "y.beton")
    capsys.readouterr()
    for folder, message in ((tmp_path / "missing_folder", "does not exist"), (tmp_path, "holds no image")):
        with pytest.raises(SystemExit) as exit_info:  # the command says what is wrong, without a traceback
            ffcv_backend.main([str(folder), str(tmp_path / "z.beton")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_write_beton_command_skips_a_file_damaged_inside(tmp_path):
    """A JPEG whose middle is overwritten passes the cheap checks (header, end marker) but fails to
    decode: the command skips and lists it. FFCV's writer process died on it and the write waited
    forever."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    (tmp_path / "images" / "a").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / "a" / f"{k}.jpg", quality=90)
    damaged = tmp_path / "images" / "a" / "1.jpg"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2: len(data) // 2 + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    damaged.write_bytes(bytes(data))
    assert validate.check_image_file(damaged) is None  # the cheap checks cannot see it
    out = tmp_path / "out.beton"
    done = subprocess.run([sys.executable, "-m", "fastdense.pipelines.ffcv_backend", "write", str(tmp_path / "images"), str(out), "--num-workers", "1"],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and "wrote 2 images" in done.stdout and "skipped 1" in done.stdout, done.stdout + done.stderr[-2000:]
    assert [Path(p) for p, _ in json.loads(Path(str(out) + ".skipped.json").read_text())] == [damaged]
    assert ffcv_backend.stored_size(1, 2000, 256) == (1, 256)  # never a side of 0 pixels


def test_ffcv_data_that_is_not_a_whole_beton_is_named(raw_beton, tmp_path, capsys):
    """A --data file that is no .beton (a JPEG, random bytes, an empty file) or one cut short gave
    FFCV's AssertionError "file format mismatch", an IndexError or "negative dimensions are not
    allowed", none naming the file; now a ValueError names it, which the CLI prints as one line."""
    beton = raw_beton[0].read_bytes()
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(coordinate_image(16, 16)).save(jpeg)
    cases = {jpeg: jpeg.read_bytes(), tmp_path / "random.beton": np.random.default_rng(0).bytes(5000), tmp_path / "empty.beton": b"",
             tmp_path / "half.beton": beton[: len(beton) // 2], tmp_path / "tail_cut.beton": beton[:-8],
             tmp_path / "entry_cut.beton": beton[:-24]}
    # A one-sample .beton cut by one allocation-table entry (its source_size's) still lists one
    # entry for its one sample: it was read, with a source_size of whatever the bytes held.
    (tmp_path / "one" / "a").mkdir(parents=True)
    Image.fromarray(coordinate_image(9, 7)).save(tmp_path / "one" / "a" / "0.png")
    ffcv_backend.write_beton(tmp_path / "one", tmp_path / "one.beton", write_mode="raw", num_workers=1)
    capsys.readouterr()  # the writer's progress bars
    one = (tmp_path / "one.beton").read_bytes()
    cases.update({tmp_path / "one_entry_cut.beton": one[:-24], tmp_path / "one_tail_cut.beton": one[:-8]})
    for path, content in cases.items():
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{path.name}.* is not a .beton written by write_beton, or it was cut short"):
            make_loader("ffcv", data=path, recipe=two_view_recipe(), batch_size=1, num_workers=1, device="cpu")
    from fastdense import train

    assert train.main(["--method", "scrl", "--backend", "ffcv", "--data", str(jpeg), "--device", "cpu", "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert "photo.jpg" in error and "is not a .beton" in error and len(error.splitlines()) == 1 and "Traceback" not in error


def test_ffcv_round_trip_raw_storage(raw_beton):
    path, sources = raw_beton
    recipe = two_view_recipe()
    loader = make_loader("ffcv", data=path, recipe=recipe, batch_size=2, num_workers=1, device="cpu",
                         photometric=False, drop_last=False, shuffle=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    assert torch.cat([b.index for b in batches]).tolist() == [0, 1, 2]
    for batch in batches:
        assert bool((batch.matrices[:, 0, 0, 0] < 0).all()) and bool((batch.matrices[:, 1, 0, 0] > 0).all())
        assert [tuple(s) for s in batch.source_size.tolist()] == [SIZES[i] for i in batch.index.tolist()]
        roundtrip_check(batch, sources, recipe.mean, recipe.std, noise_levels=0.5)
    # Epoch 1 draws new windows; set_epoch(0) brings epoch 0 back exactly.
    again = list(loader)
    assert not all(torch.equal(a.matrices, b.matrices) for a, b in zip(batches, again))
    loader.set_epoch(0)
    assert all(torch.equal(a.matrices, b.matrices) for a, b in zip(batches, list(loader)))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_ffcv_resizes_with_inter_area_whatever_the_recipe_says(raw_beton, interpolation):
    """A deliberate choice (README, Performance; benchmarks/bench_ffcv_resize.py): FFCV's compiled
    ``resize_crop`` resizes with OpenCV's INTER_AREA only, the closest of OpenCV's modes to the
    recipes' antialiased resize when shrinking. Each view is exactly INTER_AREA of its window,
    flipped when its matrix says so, for a bicubic and a bilinear recipe alike."""
    import cv2

    path, sources = raw_beton
    recipe = two_view_recipe(interpolation, flip_p=(0.5, 0.5))
    loader = make_loader("ffcv", data=path, recipe=recipe, batch_size=len(SIZES), num_workers=1, device="cpu",
                         photometric=False, drop_last=False, shuffle=False)
    batch = next(iter(loader))
    flips = set()
    for b, index in enumerate(batch.index.tolist()):
        source = coordinate_image(*sources[index])
        for v, spec in enumerate(recipe.views):
            m = batch.matrices[b, v].double()
            width, height = round(abs(float(m[0, 0])) * spec.size), round(float(m[1, 1]) * spec.size)
            flipped = bool(m[0, 0] < 0)
            x0 = round(float(m[0, 2])) - (width if flipped else 0)
            y0 = round(float(m[1, 2]))
            expected = cv2.resize(source[y0:y0 + height, x0:x0 + width], (spec.size, spec.size), interpolation=cv2.INTER_AREA)
            expected = expected[:, ::-1] if flipped else expected
            view = unnormalize(batch.views[v][b], recipe.mean, recipe.std)
            assert np.abs(view - expected).max() < 0.1, f"sample {index} view {v}: not INTER_AREA of window {(x0, y0, width, height)}"
            flips.add(flipped)
    assert flips == {False, True}


def test_write_beton_skips_reports_and_downscales(corpus_beton, raw_beton, caplog):
    corpus, out, summary, report = corpus_beton
    assert summary["written"] == len(corpus["readable"])
    assert {Path(p) for p, _ in summary["skipped"]} == set(corpus["unreadable"])
    assert all(str(p) in report for p in corpus["unreadable"])
    assert {Path(p) for p, _ in json.loads(Path(str(out) + ".skipped.json").read_text())} == set(corpus["unreadable"])

    recipe = two_view_recipe(flip_p=(0.5, 0.5))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdense.pipelines"):
        loader = make_loader("ffcv", data=out, recipe=recipe, batch_size=8, num_workers=1, device="cpu", drop_last=False)
        batches = list(loader)
    assert {Path(p) for p, _ in loader.skipped} == set(corpus["unreadable"])
    assert all(str(p) in caplog.text for p in corpus["unreadable"])
    sizes = {int(i): tuple(s) for b in batches for i, s in zip(b.index, b.source_size.tolist())}
    from fastdense.pipelines.folder import scan_image_folder

    paths = [p for p, _ in scan_image_folder(corpus["root"]).samples]
    for index, size in sizes.items():
        h, w = corpus["readable"][paths[index]]["size"]
        assert size == ffcv_backend.stored_size(h, w, 256), paths[index]
    assert max(max(s) for s in sizes.values()) == 256  # the 6000x4000 image was cut to 256


def test_ffcv_writer_reads_16_bit_images_as_the_other_backends(tmp_path):
    """A 16-bit sample ``v`` is ``v / 257`` in every backend: the writer took a dark 16-bit image
    (all samples below 256) for an 8-bit one and stored it up to 255 times too bright."""
    from fastdense.pipelines.torch_backend import to_rgb

    for value, expected in ((200, 1), (40000, 156), (65535, 255)):
        path = tmp_path / f"deep_{value}.png"
        Image.fromarray(np.full((6, 5), value, np.uint16)).save(path)
        stored = ffcv_backend.load_rgb(path)
        assert stored.shape == (6, 5, 3) and stored.dtype == np.uint8 and (stored == expected).all(), (value, stored[0, 0])
        with Image.open(path) as image:
            assert np.array_equal(stored, np.asarray(to_rgb(image)))


def test_ffcv_crop_sampler_follows_random_resized_crop():
    """The compiled sampler draws RandomResizedCrop's distribution, keyed by (seed, epoch, index, view)."""
    spec = ViewSpec(224, (0.08, 1.0))
    height, width, draws = 375, 500, 1500
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))

    def draw(seed, epoch, index, view):
        state = np.uint64(ffcv_backend._stream(seed, epoch, index, view))
        return ffcv_backend._sample_window(state, height, width, spec.scale[0], spec.scale[1], *log_ratio, spec.flip_p)[1:]

    ours = np.array([draw(0, 0, i, 0) for i in range(draws)], dtype=np.float64)
    assert draw(0, 0, 7, 0) == tuple(ours[7].astype(int))  # same key, same window
    assert draw(0, 1, 7, 0) != draw(0, 0, 7, 0) and draw(1, 0, 7, 0) != draw(0, 0, 7, 0) and draw(0, 0, 7, 1) != draw(0, 0, 7, 0)
    # No window fits a 10 x 1000 image: the centred fallback, flipped with probability flip_p.
    state = np.uint64(ffcv_backend._stream(0, 0, 0, 0))
    assert ffcv_backend._sample_window(state, 10, 1000, 0.9, 1.0, *log_ratio, 1.0)[1:] == (493, 0, 13, 10, 1)
    x0, y0, w, h, flip = ours.T
    assert (x0 >= 0).all() and (x0 + w <= width).all() and (y0 >= 0).all() and (y0 + h <= height).all()
    rng = np.random.default_rng(0)
    theirs = np.array([sample_crop(height, width, spec, rng) for _ in range(draws)], dtype=np.float64)
    for column in (lambda c: c[:, 2] * c[:, 3] / (height * width), lambda c: np.log(c[:, 2] / c[:, 3]), lambda c: c[:, 0]):
        a, b = column(ours), column(theirs)
        quantiles = np.linspace(0.1, 0.9, 9)
        spread = np.quantile(b, 0.9) - np.quantile(b, 0.1)
        assert np.abs(np.quantile(a, quantiles) - np.quantile(b, quantiles)).max() < 0.1 * spread
    assert abs(flip.mean() - spec.flip_p) < 0.05


@pytest.mark.parametrize("height,width,scale", SMALL_IMAGE_CROPS)
def test_ffcv_crop_sampler_on_small_images_follows_random_resized_crop(height, width, scale):
    """As test_small_image_crops_follow_torchvision for the compiled sampler: windows as wide or as
    high as the image fit, and positions reach the far sides."""
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    keys = iter(range(10**6))

    def draw():
        state = np.uint64(ffcv_backend._stream(0, 0, next(keys), 0))
        return ffcv_backend._sample_window(state, height, width, scale[0], scale[1], *log_ratio, 0.5)[1:]

    size_gap, side_gap = crop_sampler_gaps(draw, height, width, scale)
    assert size_gap < 0.06 and side_gap < 0.05, (size_gap, side_gap)


def test_ffcv_loaders_leave_numba_types_alone(raw_beton):
    """Loader after loader in one process: each compiles and finishes, and numba's shared
    contiguous-uint8 type keeps its identity (FFCV 1.0.2 marks it read-only in place)."""
    import numba

    path, _ = raw_beton
    shared = numba.uint8[::1]
    key = shared.key
    for seed in range(3):
        loader = make_loader("ffcv", data=path, recipe=two_view_recipe(), batch_size=2, seed=seed, num_workers=1,
                             device="cpu", photometric=False, drop_last=False)
        assert sum(b.batch_size for b in loader) == len(SIZES)
    assert numba.uint8[::1] is shared and shared.key == key and shared.mutable


def test_ffcv_folder_is_converted_again_when_a_file_changes(tmp_path, monkeypatch):
    """An image folder given to the ffcv backend is converted once into the cache (FfcvLoader calls
    beton_for_folder); a file rewritten since (same name, new pixels) gives a new .beton, not the stale one."""
    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(coordinate_image(30, 41)).save(folder / "0.png")
    Image.fromarray(coordinate_image(20, 20)).save(folder / "1.png")
    (folder / "2.jpg").write_bytes(b"not an image")
    first = ffcv_backend.beton_for_folder(folder.parent)
    # its skipped files go with it, for the loader to report
    assert [Path(p).name for p, _ in json.loads(Path(str(first) + ".skipped.json").read_text())] == ["2.jpg"]
    written = first.stat().st_mtime_ns
    assert ffcv_backend.beton_for_folder(folder.parent) == first and first.stat().st_mtime_ns == written  # reused
    Image.fromarray(coordinate_image(25, 33)).save(folder / "1.png")
    second = ffcv_backend.beton_for_folder(folder.parent)
    assert second != first and ffcv_backend.read_beton(second).num_samples == 2


def test_dali_pass_resumes_from_its_state_without_decoding_the_batches_before(coordinate_pngs, tmp_path, monkeypatch):
    """A fresh loader (a resumed process) continues an interrupted pass with the crops and colours
    of the uninterrupted one, building its pipeline from DALI's checkpoint; a checkpoint DALI cannot
    read falls back to decoding the batches before, with a warning."""
    from fastdense.pipelines import dali_backend

    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    root, _ = coordinate_pngs
    recipe = dataclasses.replace(two_view_recipe(), views=tuple(dataclasses.replace(v, jitter_p=1.0, flip_p=0.5) for v in two_view_recipe().views))

    def loader():
        made = make_loader("dali", data=root, recipe=recipe, batch_size=1, num_workers=1, device="cpu", seed=3)
        made.set_epoch(1)
        return made

    def same(a, b):
        return torch.equal(a.index, b.index) and torch.equal(a.matrices, b.matrices) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))

    whole = list(loader())
    assert len(whole) == 3
    interrupted = loader()
    passing = iter(interrupted)
    next(passing)
    state = interrupted.resume_state()
    next(passing)  # moves on past the state taken; the state stays that of one batch
    assert state["epoch"] == 1 and state["batch"] == 1
    del passing

    builds, build = [], dali_backend.DaliLoader._build
    monkeypatch.setattr(dali_backend.DaliLoader, "_build", lambda self, epoch, checkpoint=None: builds.append(checkpoint is not None) or build(self, epoch, checkpoint))
    resumed = loader()
    resumed.resume_from(state)
    rest = list(resumed)
    assert builds == [True] and len(rest) == 2 and all(same(a, b) for a, b in zip(whole[1:], rest))
    other_epoch = loader()
    other_epoch.resume_from(state)
    other_epoch.set_epoch(2)  # not the state's epoch: the pass runs whole, from no checkpoint
    assert len(list(other_epoch)) == 3 and builds[-1] is False

    broken = loader()
    broken.resume_from(dict(state, dali="not a checkpoint"))
    with pytest.warns(UserWarning, match="could not restore its checkpoint"):
        rest = list(broken)
    assert len(rest) == 2 and all(same(a, b) for a, b in zip(whole[1:], rest))
    with pytest.raises(ValueError, match="resume_state"):
        broken.resume_from({"batch": 1})


def test_dali_and_ffcv_loaders_describe_their_data_for_resume(coordinate_pngs, raw_beton, tmp_path):
    """What a checkpoint records of the data, so that --resume refuses other data: DALI lists its
    readable files (a renamed one changes the fingerprint), FFCV's .beton gives its sample count."""
    import shutil

    from fastdense.training.loop import data_changes, describe_data

    root, _ = coordinate_pngs
    dali = make_loader("dali", data=root, recipe=two_view_recipe(), batch_size=1, num_workers=1, device="cpu")
    record = describe_data(dali)
    assert record["num_samples"] == len(SIZES) and record["fingerprint"] and record["steps_per_epoch"] == len(dali) == len(SIZES)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    same = describe_data(make_loader("dali", data=moved, recipe=two_view_recipe(), batch_size=1, num_workers=1, device="cpu"))
    assert data_changes(record, same, same_world_size=True) is None  # the same files, wherever the folder is
    renamed = sorted(p for p in moved.rglob("*.png"))[0]
    renamed.rename(renamed.with_name("renamed.png"))
    other = describe_data(make_loader("dali", data=moved, recipe=two_view_recipe(), batch_size=1, num_workers=1, device="cpu"))
    assert "not the same files" in data_changes(record, other, same_world_size=True)

    path, _ = raw_beton
    ffcv_record = describe_data(make_loader("ffcv", data=path, recipe=two_view_recipe(), batch_size=1, num_workers=1, device="cpu"))
    assert ffcv_record["num_samples"] == len(SIZES) and ffcv_record["fingerprint"] is None
    assert "now holds 2 images" in data_changes(ffcv_record, dict(ffcv_record, num_samples=2), same_world_size=True)
