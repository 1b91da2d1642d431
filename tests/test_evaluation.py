import torch
import torchvision

from fastdense.evaluation import confusion_matrix, knn_accuracy, linear_probe_accuracy, mean_iou, train_dense_probe
from fastdense.evaluation.export import export_backbone
from fastdense.models import build_backbone


def _separable(centres, n_per_class, generator):
    labels = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return centres[labels] + 0.1 * torch.randn(len(labels), centres.shape[1], generator=generator), labels


def test_linear_probe_and_knn_reach_100_percent_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    x, y = _separable(centres, 40, g)
    xt, yt = _separable(centres, 10, g)
    assert linear_probe_accuracy(x, y, xt, yt, 4, epochs=20) == 100.0
    assert knn_accuracy(x, y, xt, yt, 4, k=5) == 100.0


def test_linear_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(200, 8, generator=g), torch.randn(400, 8, generator=g)
    y, yt = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (400,), generator=g)
    assert linear_probe_accuracy(x, y, xt, yt, 4, epochs=20) < 40.0


def test_miou_matches_a_hand_count_with_ignore_and_absent_classes():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 2]])
    cm = confusion_matrix(pred, target, num_classes=5)
    expected = torch.zeros(5, 5, dtype=cm.dtype)  # rows: ground truth, columns: prediction
    for truth, predicted, count in ((0, 0, 1), (0, 1, 1), (1, 1, 2), (2, 2, 1), (2, 0, 1)):
        expected[truth, predicted] = count
    assert torch.equal(cm, expected)
    # class 0: tp 1, fp 1 (a 2 predicted 0), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3;
    # class 2: tp 1, fn 1 -> 1/2; class 3 predicted only on ignored pixels -> absent; class 4 absent.
    miou, per_class = mean_iou(cm)
    assert torch.allclose(per_class[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert torch.isnan(per_class[3]) and torch.isnan(per_class[4])
    assert abs(miou - (1 / 3 + 2 / 3 + 1 / 2) / 3) < 1e-12


def test_dense_probe_segments_separable_maps():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (12, 4, 4), generator=g)
    centres = torch.randn(3, 8, generator=g) * 3
    maps = centres[masks].permute(0, 3, 1, 2) + 0.05 * torch.randn(12, 8, 4, 4, generator=g)
    scores = train_dense_probe(maps[:8], masks[:8], maps[8:], masks[8:], 3, epochs=60, batch_size=4)
    assert scores["miou"] == 100.0


def test_export_loads_into_torchvision(tmp_path):
    backbone = build_backbone("resnet18")
    path = export_backbone(backbone, tmp_path / "r18.pth")
    model = torchvision.models.resnet18()
    missing, unexpected = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    model.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    backbone.eval(), model.eval()
    assert torch.equal(model(x), backbone(x).mean(dim=(2, 3)))


def test_fastdense_eval_runs_every_task_on_a_trained_checkpoint(tmp_path):
    """End to end: a 2-step SCRL run on a tiny built-in dataset, then every task of the CLI, each
    writing its JSON next to the checkpoint; the random-init baseline is reproducible."""
    import json

    from fastdense.evaluate import main as evaluate
    from fastdense.pipelines.builtin import ensure_builtin_dataset
    from fastdense.train import main as train

    data = ensure_builtin_dataset(tmp_path / "builtin", num_images=20, image_size=64, num_classes=4)
    run_dir = tmp_path / "run"
    assert train(["--method", "scrl", "--data", str(data), "--preset", "cpu", "--backend", "torch", "--batch-size", "4",
                  "--workers", "0", "--max-steps", "2", "--device", "cpu", "--no-progress", "--run-dir", str(run_dir)]) == 0
    checkpoint = run_dir / "checkpoints" / "last.pt"
    common = ["--checkpoint", str(checkpoint), "--num-workers", "0", "--image-size", "64", "--epochs", "2"]
    for task in ("linear", "knn", "dense"):
        result = evaluate(common + ["--task", task])
        assert json.loads((checkpoint.parent / f"eval_{task}.json").read_text()) == json.loads(json.dumps(result))
        score = result["miou"] if task == "dense" else result["top1"]
        assert 0.0 <= score <= 100.0
    import shutil

    first = evaluate(common + ["--task", "knn", "--random-init"])
    shutil.rmtree(checkpoint.parent / "eval_cache")  # recompute the features, not reload them
    assert evaluate(common + ["--task", "knn", "--random-init"]) == first
    exported = evaluate(["--checkpoint", str(checkpoint), "--task", "export"])
    model = torchvision.models.resnet18()
    missing, unexpected = model.load_state_dict(torch.load(exported["path"], weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
