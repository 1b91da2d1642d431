"""The evaluation protocols against independent float64 numpy oracles, and fastdense-eval's refusals
of bad input. (tests/test_evaluation.py has the end-to-end run and the basic probe checks.)"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdense.evaluation import confusion_matrix, knn_accuracy, linear_probe_accuracy, mean_iou, train_dense_probe
from fastdense.evaluation.export import export_backbone, load_exported
from fastdense.evaluation.features import extract
from fastdense.evaluation.probes import nearest_first


def knn_oracle(train, train_labels, test, num_classes, k, temperature=0.07):
    """DINO's weighted k-NN in float64: cosine similarity, the k most similar training rows (ties
    at the k-th place to the earlier row), votes exp(sim / T), equal votes to the lower class."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = test @ train.T
    predictions = []
    for row in sim:
        nearest = np.argsort(-row, kind="stable")[: min(k, len(train))]
        votes = np.zeros(num_classes)
        np.add.at(votes, np.asarray(train_labels)[nearest], np.exp(row[nearest] / temperature))
        predictions.append(int(np.argmax(votes)))
    return torch.tensor(predictions)


def knn_predicts(train, train_labels, test, num_classes, k, predictions):
    """k-NN predicts exactly ``predictions`` iff scoring them as the test labels gives 100%."""
    return knn_accuracy(train, train_labels, test, predictions, num_classes, k=k) == 100.0


@pytest.mark.parametrize("k", [1, 7, 20, 500])
def test_knn_matches_a_float64_oracle_including_k_beyond_the_train_set_and_a_class_absent_from_it(k):
    g = torch.Generator().manual_seed(k)
    centres = torch.randn(5, 12, generator=g)
    train_labels = torch.randint(0, 4, (60,), generator=g)  # class 4 has no training sample
    train = centres[train_labels] + 0.8 * torch.randn(60, 12, generator=g)
    test_labels = torch.randint(0, 5, (40,), generator=g)
    test = centres[test_labels] + 0.8 * torch.randn(40, 12, generator=g)
    expected = knn_oracle(train, train_labels, test, 5, k)
    assert knn_predicts(train, train_labels, test, 5, k, expected)
    assert knn_accuracy(train, train_labels, test, test_labels, 5, k=k) == pytest.approx(100.0 * float((expected == test_labels).double().mean()))
    assert not (expected == 4).any()  # nothing votes for the absent class


def test_knn_breaks_similarity_ties_by_training_order_and_vote_ties_by_class():
    """40 training rows equally similar to the query, the first three of class 1 and the rest of
    class 2: with k = 3 the first three vote, so class 1 wins whatever topk's order among equals."""
    query = torch.tensor([[1.0, 0.0, 0.0]])
    tied = torch.tensor([[1.0, 1.0, 0.0]]).repeat(40, 1)
    far = torch.tensor([[0.0, 0.0, 1.0]]).repeat(5, 1)
    train = torch.cat([far[:2], tied, far[2:]])
    labels = torch.cat([torch.zeros(2), torch.tensor([1, 1, 1]), torch.full((37,), 2), torch.zeros(3)]).long()
    assert knn_oracle(train, labels, query, 3, k=3).tolist() == [1]
    assert knn_predicts(train, labels, query, 3, 3, torch.tensor([1]))
    # Two equally similar rows of classes 2 and 1 cast equal votes: the lower class wins.
    two = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert knn_predicts(two, torch.tensor([2, 1]), query, 3, 2, torch.tensor([1]))
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1, 0.5] * 9])
    values, index = nearest_first(sim, 3)
    assert index.tolist() == [[1, 7, 13]] and torch.equal(values, sim[:, [1, 7, 13]])


def test_knn_votes_in_float32_for_half_precision_features():
    """exp(sim / 0.07) overflows float16 above sim = 0.78: every close neighbour's vote was inf and
    the lowest class among the neighbours won. Features sharing a large common component (all
    similarities near 1) and overlapping classes make that visible."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    labels = torch.arange(4).repeat_interleave(15)
    train = (4 + centres[labels] + 0.8 * torch.randn(60, 16, generator=g)).half()
    test_labels = torch.arange(4).repeat_interleave(5)
    test = (4 + centres[test_labels] + 0.8 * torch.randn(20, 16, generator=g)).half()
    expected = knn_oracle(train.double(), labels, test.double(), 4, k=10)
    assert len(set(expected.tolist())) == 4
    assert knn_predicts(train, labels, test, 4, 10, expected)


def test_probes_refuse_empty_splits_and_labels_out_of_range():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="test_features"):
        knn_accuracy(x, y, x[:0], y[:0], 3)
    with pytest.raises(ValueError, match="train_features"):
        knn_accuracy(x[:0], y[:0], x, y, 3)
    with pytest.raises(ValueError, match="train_labels"):
        linear_probe_accuracy(x, y + 1, x, y, 3, epochs=1)


def _separable(generator, per_class, channels=16, classes=4):
    centres = torch.randn(classes, channels, generator=torch.Generator().manual_seed(7)).abs() * 5
    labels = torch.arange(classes).repeat_interleave(per_class)
    return (centres[labels] + 0.1 * torch.randn(len(labels), channels, generator=generator)).clamp(min=0), labels


def test_linear_probe_ignores_a_channel_constant_on_the_training_split():
    """A post-ReLU channel that is 0 on every training image but not on a test image: dividing by
    its clamped spread (1e-6) multiplied the test value by a million into the logits (25%, chance)."""
    g = torch.Generator().manual_seed(0)
    x, y = _separable(g, 40)
    xt, yt = _separable(g, 10)
    x[:, 0] = 0
    xt[:, 0] = torch.rand(len(xt), generator=g)
    assert linear_probe_accuracy(x, y, xt, yt, 4, epochs=20) == 100.0


def test_linear_probe_is_seeded_inductive_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 3, (120,), generator=g)
    a, ya = torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    b, yb = torch.randn(17, 6, generator=g) * 50, torch.randint(0, 3, (17,), generator=g)
    torch.manual_seed(123)
    first = linear_probe_accuracy(x, y, a, ya, 3, epochs=3)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the probe drew nothing from the global RNG
    assert linear_probe_accuracy(x, y, a, ya, 3, epochs=3) == first
    # Test rows are scored one by one (no statistics of the test split): the joint score is the
    # size-weighted mean of the separate ones.
    joint = linear_probe_accuracy(x, y, torch.cat([a, b]), torch.cat([ya, yb]), 3, epochs=3)
    separate_b = linear_probe_accuracy(x, y, b, yb, 3, epochs=3)
    assert joint * 47 == pytest.approx(first * 30 + separate_b * 17)


def test_extract_leaves_a_train_mode_backbone_frozen():
    """Features come from eval mode without gradients: BatchNorm uses (and keeps) its running
    statistics, even when the backbone arrives in train mode."""
    from fastdense.models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet18")
    with torch.no_grad():
        backbone.train()(torch.randn(4, 3, 64, 64) * 3 + 1)  # running stats away from their init
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.randn(5, 3, 64, 64)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(5))
    out = extract(backbone, dataset, dense=False, batch_size=2, num_workers=0)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not out["features"].requires_grad
    with torch.no_grad():
        expected = backbone.eval()(images).mean(dim=(2, 3))
    torch.testing.assert_close(out["features"], expected)
    assert out["labels"].tolist() == [0, 1, 2, 3, 4]


def miou_oracle(preds, targets, num_classes, ignore_index=255):
    """Confusion over the whole set in numpy, IoU = TP / (TP + FP + FN) over classes seen in either."""
    p = np.concatenate([np.asarray(x).ravel() for x in preds])
    t = np.concatenate([np.asarray(x).ravel() for x in targets])
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    ious = {}
    for c in range(num_classes):
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        if tp + fp + fn:
            ious[c] = tp / (tp + fp + fn)
    return float(np.mean(list(ious.values()))), ious


def test_miou_over_batches_matches_a_whole_set_numpy_oracle():
    g = torch.Generator().manual_seed(0)
    num_classes = 7  # 5 never in the ground truth (predicted sometimes: IoU 0), 6 nowhere
    targets = [torch.randint(0, 5, (3, 9, 11), generator=g) for _ in range(4)]
    for t in targets:
        t[torch.rand(t.shape, generator=g) < 0.2] = 255
    preds = [torch.randint(0, 6, t.shape, generator=g) for t in targets]
    confusion = sum(confusion_matrix(p, t, num_classes) for p, t in zip(preds, targets))
    miou, per_class = mean_iou(confusion)
    expected_miou, expected = miou_oracle(preds, targets, num_classes)
    assert miou == pytest.approx(expected_miou, abs=1e-12)
    assert set(expected) == {0, 1, 2, 3, 4, 5} and expected[5] == 0.0
    for c in range(num_classes):
        assert (c not in expected and torch.isnan(per_class[c])) or per_class[c].item() == pytest.approx(expected.get(c), abs=1e-12)


def test_dense_probe_places_cell_centres_as_the_conventions_do():
    """Maps of 3 columns over 12-pixel-wide masks whose 4-pixel stripes are the columns' classes.
    With cell centres at (j + 0.5) * 4 (align_corners=False) the upsampled logits switch class
    exactly on the stripe edges; centres at j * 5.5 (align_corners=True) would move the edges to
    2.75 and 8.25 and misclassify a pixel column on each."""
    g = torch.Generator().manual_seed(0)
    cells = torch.stack([torch.randperm(3, generator=g).repeat(2, 1) for _ in range(24)])  # [24, 2, 3]
    masks = cells.repeat_interleave(4, 1).repeat_interleave(4, 2)  # [24, 8, 12]
    maps = (torch.eye(3) * 4)[cells].permute(0, 3, 1, 2).contiguous()
    scores = train_dense_probe(maps[:16], masks[:16], maps[16:], masks[16:], 3, epochs=15, batch_size=8, lr=0.05)
    assert scores["miou"] == 100.0 and scores["pixel_accuracy"] == 100.0


@pytest.fixture(scope="module")
def selfpatch():
    pytest.importorskip("timm")
    from fastdense.methods import build_method

    torch.manual_seed(0)
    return build_method("selfpatch", preset="cpu").eval()


@pytest.fixture(scope="module")
def scrl_config():
    from fastdense.training.config import resolve
    from fastdense.training.loop import build_method

    config = resolve("scrl")
    torch.manual_seed(0)
    return config, build_method(config)


def test_selfpatch_vit_exports_strictly_into_plain_timm_with_the_same_features(tmp_path, selfpatch):
    """SelfPatch's ViT has no class token and no final norm: the plain timm model the sidecar
    describes loads the file strictly (the bare ``create_model(name, num_classes=0)`` refused it:
    pos_embed 196 vs 197 rows) and gives the backbone's tokens."""
    backbone = selfpatch.backbone
    path = export_backbone(backbone, tmp_path / "vit.pth")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["create_kwargs"]["class_token"] is False and sidecar["create_kwargs"]["final_norm"] is False
    assert sidecar["pos_embed_resize"] == "reference"
    model = load_exported(path).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), backbone(x))
        # a bare timm model (no fastdense at load time): the same tokens at the trained 224 px grid
        import timm

        bare = timm.create_model(sidecar["arch"], num_classes=0, **sidecar["create_kwargs"]).eval()
        bare.load_state_dict(torch.load(path, weights_only=True), strict=True)
        x = torch.randn(1, 3, 224, 224)
        assert torch.equal(bare.forward_features(x), backbone(x))


def test_resnet_export_loads_strictly_once_fc_is_dropped(tmp_path):
    from fastdense.models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet18").eval()
    model = load_exported(export_backbone(backbone, tmp_path / "r18.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x).mean(dim=(2, 3)))


# --- fastdense-eval on bad input: one clear line naming the file or argument, before any work ---


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, scrl_config):
    """What fastdense-train writes, minus the optimiser: SCRL's CPU preset at initialisation."""
    config, method = scrl_config
    path = tmp_path_factory.mktemp("run") / "last.pt"
    torch.save({"format": 1, "step": 0, "config": config, "model": method.state_dict()}, path)
    return path


def _eval_error(argv):
    from fastdense.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return str(exit_info.value.code)


def test_eval_refuses_missing_truncated_and_foreign_checkpoints(tmp_path, checkpoint):
    missing = tmp_path / "nope.pt"
    assert str(missing) in _eval_error(["--checkpoint", str(missing), "--task", "knn"])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    message = _eval_error(["--checkpoint", str(truncated), "--task", "knn"])
    assert str(truncated) in message and "cannot read" in message
    foreign = tmp_path / "resnet18.pth"
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), foreign)
    message = _eval_error(["--checkpoint", str(foreign), "--task", "export"])
    assert str(foreign) in message and "not a fastdense-train checkpoint" in message
    other_backbone = tmp_path / "other.pt"
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["method_options"] = {**(state["config"].get("method_options") or {}), "backbone": "resnet34"}
    torch.save(state, other_backbone)
    message = _eval_error(["--checkpoint", str(other_backbone), "--task", "export"])
    assert str(other_backbone) in message and "do not fit scrl with backbone resnet34" in message


def test_eval_asks_for_data_when_the_run_trained_on_a_beton_file(tmp_path, checkpoint):
    """A run on an ffcv .beton saves that file as its data; evaluation reads image folders only, and
    said "data folder '...beton' is not a directory" without telling where to go from there."""
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"beton")
    state = torch.load(checkpoint, weights_only=False)
    state["config"] = {**state["config"], "backend": "ffcv", "data": str(beton)}
    run = tmp_path / "run.pt"
    torch.save(state, run)
    message = _eval_error(["--checkpoint", str(run), "--task", "knn", "--num-workers", "0"])
    assert str(beton) in message and "pass --data" in message


def test_eval_refuses_bad_data_folders_before_extracting(tmp_path, checkpoint):
    common = ["--checkpoint", str(checkpoint), "--num-workers", "0", "--image-size", "32"]
    cache = checkpoint.parent / "eval_cache"
    cached_before = set(cache.glob("*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in _eval_error(common + ["--task", "knn", "--data", str(empty)])
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "a.png")
    message = _eval_error(common + ["--task", "dense", "--data", str(images.parent)])
    assert "--masks" in message and str(images.parent) in message
    masks = tmp_path / "masks" / "cls"
    masks.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(masks / "a.png")
    message = _eval_error(common + ["--task", "dense", "--data", str(images.parent), "--masks", str(masks.parent)])
    assert str(masks / "a.png") in message and "single-channel" in message
    assert "multiple of resnet18's stride 32" in _eval_error(common[:-1] + ["100", "--task", "knn", "--data", str(images.parent)])
    assert set(cache.glob("*")) == cached_before  # nothing was extracted


def test_eval_cache_is_keyed_by_the_images_not_the_folder_name(tmp_path, checkpoint):
    from fastdense.evaluate import main

    def folder_of(n):
        for i in range(n):
            (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (40 * i, 255 - 30 * i, 7 * i)).save(tmp_path / "data" / f"c{i % 2}" / f"{i}.png")
        return ["--checkpoint", str(checkpoint), "--num-workers", "0", "--image-size", "32", "--task", "knn", "--k", "3", "--data", str(tmp_path / "data")]

    cache = checkpoint.parent / "eval_cache"
    before = len(list(cache.glob("features-*.pt")))
    main(folder_of(10))
    assert len(list(cache.glob("features-*.pt"))) == before + 2  # train and test
    main(folder_of(20))  # same folder, twice the images: new features, not the cached ones
    assert len(list(cache.glob("features-*.pt"))) == before + 4
    fresh = torch.load(sorted(cache.glob("features-*.pt"), key=lambda f: f.stat().st_mtime)[-1], weights_only=True)
    assert len(fresh["features"]) in (16, 4)


def test_eval_cache_sees_images_and_masks_rewritten_in_place(tmp_path, checkpoint):
    """The key named each file by its path only: val images overwritten with copies of training
    images of the other class (same paths) kept their old features, and the old score, until
    eval_cache was deleted; so did rewritten masks. Each file's size and mtime are in the key now."""
    import shutil

    from fastdense.evaluate import main

    data = tmp_path / "data"
    colours = {"c0": [(250, 10, 10), (200, 60, 0), (230, 0, 90)], "c1": [(10, 10, 250), (0, 90, 200), (60, 0, 230)]}
    for split in ("train", "val"):
        for cls, rgb in colours.items():
            (data / split / cls).mkdir(parents=True)
            for i, colour in enumerate(rgb if split == "train" else rgb[:2]):
                Image.new("RGB", (32, 32), colour).save(data / split / cls / f"{i}.png")
    common = ["--checkpoint", str(checkpoint), "--num-workers", "0", "--image-size", "32"]
    knn = common + ["--task", "knn", "--k", "1", "--data", str(data)]
    assert main(knn)["top1"] == 100.0  # each val image is a copy of a training image of its class
    for i in range(2):  # val/c0 now holds c1's pictures
        shutil.copyfile(data / "train" / "c1" / f"{i}.png", data / "val" / "c0" / f"{i}.png")
    assert main(knn)["top1"] == 50.0

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(images / f"{i}.png")
        Image.fromarray(np.full((32, 32), 1, dtype=np.uint8)).save(masks / f"{i}.png")
    dense = common + ["--task", "dense", "--epochs", "1", "--data", str(images), "--masks", str(masks)]
    cache = checkpoint.parent / "eval_cache"
    main(dense)
    before = set(cache.glob("features-*.pt"))
    Image.fromarray(np.full((32, 32), 2, dtype=np.uint8)).save(masks / "4.png")  # the test split's mask
    main(dense)
    written = set(cache.glob("features-*.pt")) - before
    assert len(written) == 2  # train and test extracted again
    test_masks = [torch.load(f, weights_only=True)["masks"] for f in written]
    assert any(m.shape[0] == 1 and bool((m == 2).all()) for m in test_masks)


def test_network_target_is_the_ema_copy_and_refused_without_one(scrl_config, selfpatch):
    from fastdense.evaluation.checkpoint import select_backbone
    from fastdense.methods import build_method

    scrl = scrl_config[1]
    assert select_backbone(scrl, "online") is scrl.backbone
    assert select_backbone(scrl, "target") is scrl.target_backbone
    assert select_backbone(selfpatch, "target") is selfpatch.teacher.backbone
    with pytest.raises(ValueError, match="no EMA target"):
        select_backbone(build_method("vicregl", preset="cpu"), "target")


def test_an_image_and_its_mask_must_cover_the_same_pixels(tmp_path):
    from fastdense.evaluation.data import EvalImages, EvalSample

    Image.new("RGB", (40, 30)).save(tmp_path / "image.png")
    Image.new("L", (40, 30)).save(tmp_path / "mask.png")
    Image.new("L", (30, 40)).save(tmp_path / "other.png")
    image, mask, problem = EvalImages([EvalSample(tmp_path / "image.png", mask=tmp_path / "mask.png")], 16)[0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16) and problem == ""
    with pytest.raises(ValueError, match="other.png is 30x40"):
        EvalImages([EvalSample(tmp_path / "image.png", mask=tmp_path / "other.png")], 16)[0]


def _dense_folders(tmp_path, n=10):
    """``n`` 32 px images and their single-channel masks, in parallel folders."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(images / f"{i:02d}.png")
        Image.fromarray(np.full((32, 32), i % 3, dtype=np.uint8)).save(masks / f"{i:02d}.png")
    return images, masks


def test_dense_pairs_images_of_every_extension_training_reads_with_their_masks(tmp_path):
    """A dense --data folder of TIFF (or PPM, PGM) images is read as linear, knn and training read
    it; the dense task listed .jpg/.jpeg/.png/.bmp/.webp only and said no image had a mask."""
    from fastdense.evaluation.data import segmentation_splits
    from fastdense.pipelines.folder import IMAGE_EXTENSIONS

    images, masks = _dense_folders(tmp_path, n=len(IMAGE_EXTENSIONS))
    for extension, path in zip(IMAGE_EXTENSIONS, sorted(images.iterdir())):
        if extension != path.suffix:
            Image.open(path).convert("L" if extension == ".pgm" else "RGB").save(path.with_suffix(extension))
            path.unlink()
    train, test = segmentation_splits(images, masks)
    assert sorted(s.image.suffix for s in train + test) == sorted(IMAGE_EXTENSIONS)
    assert all(s.mask == masks / f"{s.image.stem}.png" for s in train + test)


def test_eval_refuses_a_colour_or_wrongly_sized_mask_anywhere_before_extracting(tmp_path, checkpoint):
    """Only the first mask was checked up front: a later RGB mask, or a mask of another size than
    its image, stopped extraction part-way with a traceback through the DataLoader."""
    images, masks = _dense_folders(tmp_path)
    common = ["--checkpoint", str(checkpoint), "--num-workers", "0", "--image-size", "32", "--task", "dense", "--epochs", "1", "--data", str(images), "--masks", str(masks)]
    cache = checkpoint.parent / "eval_cache"
    cached_before = set(cache.glob("*"))
    Image.new("RGB", (32, 32), (1, 2, 3)).save(masks / "07.png")  # a training mask, not the first
    message = _eval_error(common)
    assert f"mask {masks / '07.png'} has mode RGB" in message and "single-channel" in message and "\n" not in message
    Image.fromarray(np.full((32, 32), 1, dtype=np.uint8)).save(masks / "07.png")
    Image.fromarray(np.full((16, 24), 1, dtype=np.uint8)).save(masks / "08.png")
    message = _eval_error(common)
    assert f"image {images / '08.png'} is 32x32 but its mask {masks / '08.png'} is 24x16" in message and "\n" not in message
    assert set(cache.glob("*")) == cached_before  # both refused before any feature was extracted


def test_a_mask_that_stops_extraction_ends_as_one_line(tmp_path, checkpoint, monkeypatch):
    """A mask found wrong only while extracting (here the up-front check is switched off; in use, a
    file rewritten between the check and its turn) ends as the CLI's one-line error, also when a
    loader process raised it, not as the DataLoader's traceback."""
    import fastdense.evaluate

    images, masks = _dense_folders(tmp_path)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(masks / "07.png")
    monkeypatch.setattr(fastdense.evaluate, "check_masks", lambda samples: None)
    message = _eval_error(["--checkpoint", str(checkpoint), "--num-workers", "1", "--image-size", "32", "--task", "dense", "--epochs", "1", "--data", str(images), "--masks", str(masks)])
    assert message == f"fastdense-eval: mask {masks / '07.png'} has mode RGB; masks must be single-channel PNGs of class indices (mode L or P)"


def test_the_mask_check_takes_a_mask_on_either_grid_of_an_exif_rotated_image(tmp_path):
    """A phone JPEG stored 40x30 with orientation 6 shows 30x40: a mask of either size covers it, as
    EvalImages decides; a third size does not, and the up-front check agrees with EvalImages."""
    from fastdense.evaluation.data import EvalImages, EvalSample, check_masks

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    for size in ((40, 30), (30, 40), (40, 40)):
        Image.new("L", size).save(tmp_path / "mask.png")
        sample = EvalSample(tmp_path / "phone.jpg", mask=tmp_path / "mask.png")
        if size == (40, 40):
            for load in (lambda: check_masks([sample]), lambda: EvalImages([sample], 16)[0]):
                with pytest.raises(ValueError, match="phone.jpg is 40x30 but its mask .*mask.png is 40x40"):
                    load()
        else:
            check_masks([sample])
            assert EvalImages([sample], 16)[0][2] == ""


@pytest.mark.gpu
def test_probes_run_where_the_training_features_are():
    """fastdense-eval hands the probes GPU features (an ImageNet linear probe on the CPU would take
    days); each probe computes there and scores as the oracle / the CPU does."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 12, generator=g)
    train_labels = torch.randint(0, 5, (300,), generator=g)
    train = centres[train_labels] + 0.8 * torch.randn(300, 12, generator=g)
    test_labels = torch.randint(0, 5, (2000,), generator=g)
    test = centres[test_labels] + 0.8 * torch.randn(2000, 12, generator=g)
    expected = knn_oracle(train, train_labels, test, 5, 20)
    assert knn_predicts(train.cuda(), train_labels.cuda(), test, 5, 20, expected)
    x, y = _separable(g, 40)
    xt, yt = _separable(g, 10)
    assert linear_probe_accuracy(x.cuda(), y, xt, yt, 4, epochs=20) == 100.0
    masks = torch.randint(0, 3, (12, 4, 4), generator=g)
    maps = (torch.eye(3) * 4)[masks].permute(0, 3, 1, 2).contiguous()
    assert train_dense_probe(maps[:8].cuda(), masks[:8], maps[8:], masks[8:], 3, epochs=30, batch_size=4)["miou"] == 100.0


def test_the_console_script_exits_0(checkpoint, monkeypatch, capsys):
    """What the installed ``fastdense-eval`` does: ``sys.exit(entry_point())``. The entry point was
    ``main``, whose result dict made every successful run print it to stderr and exit 1."""
    import importlib
    import sys
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["fastdense-eval"].split(":")
    entry_point = getattr(importlib.import_module(module), function)
    monkeypatch.setattr(sys, "argv", ["fastdense-eval", "--checkpoint", str(checkpoint), "--task", "export"])
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(entry_point())
    assert exit_info.value.code in (0, None)
    assert "'task': 'export'" not in capsys.readouterr().err


def test_eval_converts_16_bit_images_as_training_does(tmp_path):
    """A 16-bit grayscale PNG (PIL mode I;16 or I) is scaled from 0-65535 to 0-255 as the training
    loaders' to_rgb does: 40000 -> 156. PIL's convert("RGB") clipped it to white (255)."""
    from fastdense.evaluation.data import EvalImages, EvalSample
    from fastdense.pipelines.torch_backend import to_rgb

    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((12, 10), 40000, dtype=np.uint16)).save(path)
    with Image.open(path) as stored:
        assert stored.mode in ("I;16", "I")
        assert np.asarray(to_rgb(stored)).max() == 156
    dataset = EvalImages([EvalSample(path, label=0)], 8)
    image, label, _ = dataset[0]
    pixels = image * dataset.std + dataset.mean  # undo the normalisation: 0-1 per channel
    torch.testing.assert_close(pixels, torch.full((3, 8, 8), 156 / 255), rtol=0, atol=1e-6)


def _argparse_error(argv, capsys):
    """What argparse prints when it refuses ``argv`` (exit status 2): its last line."""
    from fastdense.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_eval_refuses_a_device_it_cannot_run_on(checkpoint, monkeypatch, capsys):
    """--device cuda without a GPU (as fastdense-train says it) and a device that is no device were
    torch's RuntimeErrors, raised from deep in main."""
    common = ["--checkpoint", str(checkpoint), "--task", "export"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:1"):
        message = _eval_error(common + ["--device", device])
        assert f"--device {device} but torch sees no CUDA device" in message and "\n" not in message
    for device in ("foo", "cuda:x", "meta"):
        message = _argparse_error(common + ["--device", device], capsys)
        assert "--device" in message and repr(device) in message
    from fastdense.evaluate import main

    assert main(common + ["--device", "auto"])["task"] == "export"  # auto falls back to the CPU


def test_eval_refuses_a_negative_num_workers_when_parsing(checkpoint, capsys):
    """It reached the DataLoader, whose ValueError came after the checkpoint was loaded."""
    message = _argparse_error(["--checkpoint", str(checkpoint), "--task", "knn", "--num-workers", "-1"], capsys)
    assert "--num-workers" in message and "-1" in message


def test_eval_creates_the_output_folder_and_refuses_an_unusable_output_before_extracting(tmp_path, checkpoint):
    """A JSON path in a missing folder raised FileNotFoundError after every feature was computed."""
    from fastdense.evaluate import main

    nested = tmp_path / "new" / "deeper" / "result.json"
    result = main(["--checkpoint", str(checkpoint), "--task", "export", "--output", str(nested)])
    assert json.loads(nested.read_text())["task"] == result["task"] == "export"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    data = _five_images(tmp_path)
    cache = checkpoint.parent / "eval_cache"
    cached_before = set(cache.glob("*"))
    common = ["--checkpoint", str(checkpoint), "--task", "knn", "--num-workers", "0", "--image-size", "32", "--data", str(data)]
    for output in (blocker / "result.json", tmp_path / "new"):
        message = _eval_error(common + ["--output", str(output)])
        assert f"--output {output}" in message and "\n" not in message
    assert set(cache.glob("*")) == cached_before  # refused before any feature was extracted


def _five_images(tmp_path):
    """An ImageFolder of five 32 px images in one class."""
    data = tmp_path / "data" / "cls"
    data.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (32, 32), (50 * i, 0, 0)).save(data / f"{i}.png")
    return data.parent


def test_eval_refuses_an_output_its_permission_bits_allow_but_that_cannot_be_created(tmp_path, checkpoint):
    """The check read only permission bits, which root passes everywhere: an --output under /proc
    went through, and the features were computed before the JSON write failed with a traceback."""
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc")
    output = Path("/proc") / "fastdense-eval-result.json"
    data = _five_images(tmp_path)
    cache = checkpoint.parent / "eval_cache"
    cached_before = set(cache.glob("*"))
    message = _eval_error(["--checkpoint", str(checkpoint), "--task", "knn", "--num-workers", "0", "--image-size", "32", "--data", str(data), "--output", str(output)])
    assert f"--output {output}" in message and "\n" not in message
    assert set(cache.glob("*")) == cached_before  # refused before any feature was extracted


def _unreadable_files(folder):
    """A JPEG cut short, random bytes named .jpg and an empty file: what a bad copy leaves behind."""
    import io

    folder.mkdir(parents=True, exist_ok=True)
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(encoded, "JPEG")
    (folder / "truncated.jpg").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    (folder / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(300))
    (folder / "empty.jpg").write_bytes(b"")
    return [folder / "truncated.jpg", folder / "noise.jpg", folder / "empty.jpg"]


def test_eval_leaves_out_unreadable_images_and_names_them(tmp_path, checkpoint, monkeypatch, capsys):
    """The first unreadable file stopped extraction with PIL's UnidentifiedImageError, even in the
    training run's own folder, whose bad files training skips; a folder of bad files only was
    reported as '4 training and 0 test images'."""
    from fastdense.evaluate import main

    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    for i in range(10):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (25 * i, 200 - 20 * i, 3 * i)).save(data / f"c{i % 2}" / f"{i}.png")
    bad = _unreadable_files(data / "c0")
    common = ["--checkpoint", str(checkpoint), "--num-workers", "0", "--image-size", "32", "--task", "knn", "--k", "3"]
    result = main(common + ["--data", str(data)])
    assert result["train_images"] + result["test_images"] == 10
    err = capsys.readouterr().err
    assert "skipped 3 files that could not be read, leaving out 3 of 13 images" in err
    assert all(str(path) in err for path in bad)
    only_bad = tmp_path / "only_bad"
    _unreadable_files(only_bad / "c0")
    _unreadable_files(only_bad / "c1")
    message = _eval_error(common + ["--data", str(only_bad)])
    assert f"--data {only_bad} holds no readable image (6 unreadable files)" in message and "\n" not in message


def _damaged_mid_file_png(path, shape=(32, 32, 3)):
    """A PNG whose compressed pixels are scrambled with its chunk checksum made to match: it passes
    the up-front check (header, CRCs) and fails only when decoded."""
    import io
    import struct
    import zlib

    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)).save(encoded, "PNG")
    data = bytearray(encoded.getvalue())
    chunk = data.find(b"IDAT")
    length = struct.unpack(">I", data[chunk - 4 : chunk])[0]
    for k in range(chunk + 14, chunk + length):
        data[k] ^= 0x5A
    data[chunk + 4 + length : chunk + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[chunk : chunk + 4 + length])))
    path.write_bytes(bytes(data))
    return path


def test_eval_leaves_out_an_image_that_fails_only_while_decoding(tmp_path, checkpoint, monkeypatch, capsys):
    """Damage inside the pixel data passes the cheap up-front check; extraction stopped with PIL's
    OSError on it. It is left out and named, and the counts say what was scored."""
    from fastdense.evaluate import main
    from fastdense.pipelines.validate import check_image_file

    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    for i in range(10):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (25 * i, 200 - 20 * i, 3 * i)).save(data / f"c{i % 2}" / f"{i}.png")
    damaged = _damaged_mid_file_png(data / "c1" / "damaged.png")
    assert check_image_file(damaged) is None
    result = main(["--checkpoint", str(checkpoint), "--num-workers", "0", "--image-size", "32", "--task", "knn", "--k", "3", "--data", str(data)])
    assert result["train_images"] + result["test_images"] == 10
    err = capsys.readouterr().err
    assert "left out 1 images that failed to decode" in err and str(damaged) in err


def test_extract_drops_the_samples_that_failed_to_decode(tmp_path):
    from fastdense.evaluation.data import EvalImages, EvalSample
    from fastdense.models import build_backbone

    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
        Image.fromarray(np.full((32, 32), i, dtype=np.uint8)).save(tmp_path / f"{i}_mask.png")
    damaged = _damaged_mid_file_png(tmp_path / "damaged.png")
    backbone = build_backbone("resnet18")
    samples = [EvalSample(tmp_path / "0.png", label=0), EvalSample(damaged, label=1), EvalSample(tmp_path / "2.png", label=2)]
    out = extract(backbone, EvalImages(samples, 32), dense=False, batch_size=2, num_workers=0)
    assert out["labels"].tolist() == [0, 2] and out["features"].shape[0] == 2
    expected = extract(backbone, EvalImages([samples[0], samples[2]], 32), dense=False, batch_size=2, num_workers=0)
    torch.testing.assert_close(out["features"], expected["features"])
    pairs = [EvalSample(tmp_path / "0.png", mask=tmp_path / "0_mask.png"), EvalSample(damaged, mask=tmp_path / "1_mask.png")]
    dense = extract(backbone, EvalImages(pairs, 32), dense=True, batch_size=2, num_workers=0)
    assert dense["maps"].shape[0] == 1 and torch.equal(dense["masks"], torch.zeros(1, 32, 32, dtype=torch.int64))
    damaged_mask = _damaged_mid_file_png(tmp_path / "damaged_mask.png", shape=(32, 32))  # a class-index (L) mask
    *_, problem = EvalImages([EvalSample(tmp_path / "0.png", mask=damaged_mask)], 32)[0]
    assert f"or its mask {damaged_mask}" in problem  # the mask decodes first: both files are named


def test_eval_dense_leaves_out_pairs_with_an_unreadable_image_or_mask(tmp_path, checkpoint, monkeypatch, capsys):
    """Dense: an unreadable image or mask leaves its pair out, named; the colour-mask check reads the
    first readable mask (it opened the first mask of all, and an unreadable one raised PIL's error)."""
    from fastdense.evaluate import main

    monkeypatch.setenv("FASTDENSE_CACHE", str(tmp_path / "cache"))
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(images / f"{i:02d}.png")
        Image.fromarray(np.full((32, 32), i % 3, dtype=np.uint8)).save(masks / f"{i:02d}.png")
    (masks / "00.png").write_bytes(b"")  # the first mask
    (images / "05.png").write_bytes(b"not a png")
    common = ["--checkpoint", str(checkpoint), "--num-workers", "0", "--image-size", "32", "--task", "dense", "--epochs", "1"]
    result = main(common + ["--data", str(images), "--masks", str(masks)])
    assert 0.0 <= result["miou"] <= 100.0
    err = capsys.readouterr().err
    assert "skipped 2 files that could not be read, leaving out 2 of 12 image/mask pairs" in err
    assert str(masks / "00.png") in err and str(images / "05.png") in err
    for i in range(12):
        (masks / f"{i:02d}.png").write_bytes(b"")
    message = _eval_error(common + ["--data", str(images), "--masks", str(masks)])
    assert f"--data {images} and --masks {masks} hold no readable image with a readable mask" in message
