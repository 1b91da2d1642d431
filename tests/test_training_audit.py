"""fastdense-train as a researcher meets it: every method resumed exactly (mid-epoch and at an epoch
boundary), schedules against their formulas, what the CLI refuses before any work (bad config
values, a missing or unreadable checkpoint, a changed config on resume, another run's checkpoint),
weights that turn non-finite, TensorBoard on resume, and two gloo ranks refusing together."""

import csv
import json
import math
import time
from pathlib import Path

import pytest
import torch

import train_doubles
from fastdense.train import main
from fastdense.training import CheckpointError, Trainer, load_checkpoint
from fastdense.training import checkpoint as ckpt
from fastdense.training import config as cfg
from fastdense.training.distributed import shutdown
from fastdense.methods.ema import cosine_momentum

# The CPU presets, shrunk further (smaller views, a 2-block ViT) so four methods resume in seconds.
SMALL = {
    "scrl": {"view_sizes": {224: 64}},
    "lewel": {"view_sizes": {224: 64}},
    "vicregl": {"view_sizes": {224: 64, 96: 32}, "multi_crop": False, "num_matches": [2, 1]},
    "selfpatch": {"view_sizes": {224: 64, 96: 48}, "backbone_options": {"depth": 2}},  # >= 3x3 tokens
}
STEPS_PER_EPOCH, EPOCHS = 2, 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from fastdense.pipelines.builtin import ensure_builtin_dataset

    return ensure_builtin_dataset(tmp_path_factory.mktemp("builtin"), num_images=8, image_size=48, num_classes=2)


def _method_config(method, folder, run_dir, **overrides):
    values = {"data": str(folder), "preset": "cpu", "device": "cpu", "progress": False, "batch_size": 4,
              "epochs": EPOCHS, "num_workers": 0, "log_every": 1, "checkpoint_every": 0,
              "optimizer.warmup_epochs": 0.5, "method_options": dict(SMALL[method], preset="cpu"), "run_dir": str(run_dir)}
    values.update(overrides)
    return cfg.resolve(method, overrides=values)


def _train(config, resume=False):
    trainer = Trainer(config, resume=resume)
    trainer.setup()
    trainer.fit()
    return trainer, ckpt.rng_state(include_cuda=False)


def _rows(run_dir, timings=False):
    drop = () if timings else ("images_per_s", "data_wait")
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _csv_rows(run_dir):
    with (Path(run_dir) / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in ("images_per_s", "data_wait")} for row in csv.DictReader(f)]


def _assert_same_state(a: Trainer, b: Trainer):
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["state"].keys() == ob["state"].keys()
    for index, state in oa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ob["state"][index][key]) if torch.is_tensor(value) else value == ob["state"][index][key], (index, key)
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]
    assert [g["weight_decay"] for g in oa["param_groups"]] == [g["weight_decay"] for g in ob["param_groups"]]


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two cores' worth of contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", cfg.METHODS)
def test_every_method_resumes_bit_identically_mid_epoch_and_at_an_epoch_boundary(method, tiny_folder, tmp_path, one_thread):
    whole, whole_rng = _train(_method_config(method, tiny_folder, tmp_path / "whole"))
    total = STEPS_PER_EPOCH * EPOCHS
    assert whole.step == total
    split_dir = tmp_path / "split"
    _train(_method_config(method, tiny_folder, split_dir, max_steps=1))  # stopped inside epoch 0
    assert load_checkpoint(split_dir / "checkpoints" / "last.pt")["position"] == {"epoch": 0, "batch": 1}
    # Resumed to the end of epoch 0, then again to the end (for SCRL with a loader worker, which
    # changes nothing; starting one costs seconds, so only once).
    _train(_method_config(method, tiny_folder, split_dir, max_steps=STEPS_PER_EPOCH), resume=True)
    assert load_checkpoint(split_dir / "checkpoints" / "last.pt")["position"] == {"epoch": 1, "batch": 0}
    resumed, resumed_rng = _train(_method_config(method, tiny_folder, split_dir, num_workers=int(method == "scrl")), resume=True)
    assert resumed.step == total
    _assert_same_state(whole, resumed)
    assert _rows(split_dir) == _rows(tmp_path / "whole")  # every step's loss, metrics, lr and weight decay
    assert [r["step"] for r in _rows(split_dir)] == list(range(1, total + 1))
    assert _csv_rows(split_dir) == _csv_rows(tmp_path / "whole")
    assert torch.equal(whole_rng["torch"], resumed_rng["torch"]) and whole_rng["python"] == resumed_rng["python"]
    assert all((a == b).all() if hasattr(a, "shape") else a == b for a, b in zip(whole_rng["numpy"], resumed_rng["numpy"]))
    if hasattr(whole.method, "base_momentum"):  # the EMA momentum of the last update, from the step counter
        assert resumed.method.momentum == whole.method.momentum == cosine_momentum(whole.method.base_momentum, total - 1, total)

    # The logged schedules are the hand-computed ones: lr = base x global batch / lr_batch, linear
    # warm-up over round(warmup_epochs x steps per epoch) steps, then cosine to min_lr (scaled alike).
    opt = whole.config["optimizer"]
    peak = opt["lr"] * 4 / opt["lr_batch"]
    low = opt["min_lr"] * 4 / opt["lr_batch"] if method != "selfpatch" else opt["min_lr"]  # DINO does not scale min_lr
    assert opt["scale_min_lr"] == (method != "selfpatch")
    warmup = round(opt["warmup_epochs"] * STEPS_PER_EPOCH)
    wd_end = opt["weight_decay"] if opt["weight_decay_end"] is None else opt["weight_decay_end"]
    for row in _rows(tmp_path / "whole"):
        s = row["step"] - 1  # the row of step s (0-based) is logged as s + 1
        lr = peak * (s + 1) / warmup if s < warmup else low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        wd = wd_end + (opt["weight_decay"] - wd_end) * 0.5 * (1 + math.cos(math.pi * s / total))
        assert row["lr"] == pytest.approx(lr, rel=1e-12) and row["weight_decay"] == pytest.approx(wd, rel=1e-12)
    # Biases and norm parameters: no decay, and (LARS) no trust-ratio adaptation; SCRL follows its
    # code's name filter, under which the stem's, downsample paths' and heads' norm weights decay.
    decayed, excluded = whole.optimizer.param_groups
    assert decayed["lars_adapt" if opt["name"] == "lars" else "decays"] and decayed["weight_decay"] > 0
    assert excluded["weight_decay"] == 0.0 and not excluded.get("lars_adapt", False)
    names = {id(p): n for n, p in whole.method.named_parameters()}
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in excluded["params"])
    assert all(not names[id(p)].endswith(".bias") for p in decayed["params"])
    decayed_norms = sorted(names[id(p)] for p in decayed["params"] if p.ndim <= 1)
    if method == "scrl":
        assert decayed_norms and all(n == "backbone.trunk.bn1.weight" or ".downsample." in n or n.startswith(("projector.", "predictor."))
                                     for n in decayed_norms), decayed_norms
    else:
        assert not decayed_norms, decayed_norms


def test_scrl_resumes_exactly_from_a_checkpoint_saved_after_the_next_batch_was_prepared(tiny_folder, tmp_path, monkeypatch, one_thread):
    """SCRL draws a batch's boxes when the trainer fetches it, while the step before still runs, so a
    mid-epoch checkpoint of that step is written after the next batch's boxes were drawn. Keyed by
    the step they serve (not by a count of draws), the resumed run draws those boxes again."""
    snapshots = {}
    real_save = Trainer.save

    def save(self):
        real_save(self)
        snapshots.setdefault(self.step, self.checkpoint_path.read_bytes())

    monkeypatch.setattr(Trainer, "save", save)
    whole, _ = _train(_method_config("scrl", tiny_folder, tmp_path / "whole", checkpoint_every=1))
    assert whole.step == STEPS_PER_EPOCH * EPOCHS
    split_dir = tmp_path / "split"
    (split_dir / "checkpoints").mkdir(parents=True)
    (split_dir / "checkpoints" / "last.pt").write_bytes(snapshots[1])  # mid epoch 0, batch 2 fetched
    assert load_checkpoint(split_dir / "checkpoints" / "last.pt")["position"] == {"epoch": 0, "batch": 1}
    resumed, _ = _train(_method_config("scrl", tiny_folder, split_dir, checkpoint_every=1), resume=True)
    assert resumed.step == whole.step
    _assert_same_state(whole, resumed)



# ---------------------------------------------------------------------------- refused up front

def _no_trainer(monkeypatch):
    """Record any Trainer the CLI builds: a refused config must not get that far."""
    built = []
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError("trainer built")))
    return built


@pytest.mark.parametrize("override, key", [
    ("epochs=abc", "'epochs'"), ("optimizer.lr=fast", "'optimizer.lr'"), ("log_every=0", "'log_every'"),
    ("batch_size=-3", "'batch_size'"), ("backend=foo", "'backend'"), ("compile=maybe", "'compile'"),
    ("optimizer.betas=[0.9]", "'optimizer.betas'"), ("optimizer.clip_grad=0", "'optimizer.clip_grad'"),
    ("optimizr.lr=0.1", "'optimizr.lr'"), ("optimizer.betas=[0.9,", "optimizer.betas"),
    ("epochs=true", "'epochs'"), ("optimizer.lr=.inf", "'optimizer.lr'"), ("optimizer.lr_batch=0", "'optimizer.lr_batch'"),
    ("optimizer.betas=[0.9,1.0]", "'optimizer.betas'"), ("optimizer.betas=[0.9,0.99,0.9]", "'optimizer.betas'"),
    ("max_steps=0", "'max_steps'"), ("sync_batchnorm='true'", "'sync_batchnorm'"), ("num_workers=-1", "'num_workers'"),
    ("batch_size=0", "'batch_size'"), ("epochs=0", "'epochs'"), ("checkpoint_every=-1", "'checkpoint_every'"),
    ("optimizer.warmup_epochs=-0.5", "'optimizer.warmup_epochs'"), ("optimizer.weight_decay=-1e-6", "'optimizer.weight_decay'"),
    ("optimizer.min_lr=-0.1", "'optimizer.min_lr'"),
])
def test_bad_set_values_are_refused_naming_the_key_before_any_work(override, key, tmp_path, monkeypatch, capsys):
    built = _no_trainer(monkeypatch)
    assert main(["--run-dir", str(tmp_path / "run"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdense-train: ") and key in err and not built
    assert not (tmp_path / "run").exists()


def test_broken_yaml_config_file_is_a_message_naming_it(tmp_path, monkeypatch, capsys):
    built = _no_trainer(monkeypatch)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optimizer: {lr: 0.1\n")
    assert main(["--config", str(broken), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "not valid YAML" in err and not built


@pytest.mark.parametrize("value", ["3", "", "[0.1]", "fast"])
def test_a_section_given_a_value_that_is_not_a_mapping_is_named_as_such(value, tmp_path, monkeypatch, capsys):
    """``optimizer: 3`` names the section as needing a mapping (as ``method_options: 5`` does), not
    as an unknown key, in a config file and in --set alike, for every section."""
    built = _no_trainer(monkeypatch)
    sections = sorted({key.rsplit(".", 1)[0] for key in cfg.OPTIONS if "." in key})
    assert "optimizer" in sections
    for section in sections:
        user = tmp_path / f"{section}.yaml"
        user.write_text(f"{section}: {value}\n")
        for args in (["--config", str(user)], ["--set", f"{section}={value}"]):
            assert main(args + ["--run-dir", str(tmp_path / "run")]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"fastdense-train: config key {section!r} must be a mapping (key: value, ...)"), err
            assert "unknown" not in err and not built


def test_numbers_written_as_yaml_text_are_numbers(tmp_path):
    """YAML reads ``1e-6`` (no dot) as a string; from --set or a config file it is still a number."""
    user = tmp_path / "user.yaml"
    user.write_text("optimizer: {lr: 5e-4, min_lr: 1e-6}\n")
    config = cfg.resolve("selfpatch", [user], dict([cfg.parse_override("optimizer.weight_decay=1e-6")]))
    assert config["optimizer"]["lr"] == 5e-4 and config["optimizer"]["min_lr"] == 1e-6
    assert config["optimizer"]["weight_decay"] == 1e-6


def test_missing_or_empty_data_folder_fails_before_training(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for data, says in ((tmp_path / "absent", "does not exist"), (tmp_path / "empty", "holds no image")):
        run_dir = tmp_path / f"run-{data.name}"
        code = main(["--data", str(data), "--preset", "cpu", "--device", "cpu", "--run-dir", str(run_dir), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and str(data) in err and says in err, err
        assert not run_dir.exists()  # nothing written


def test_a_batch_larger_than_the_data_is_refused_with_advice_the_cli_takes(tiny_folder, tmp_path, capsys):
    """The loader's message advises make_loader's drop_last, which fastdense-train has no key for:
    the CLI names --batch-size instead (per process with several; fewer processes where one gets no
    image), and the loader's own message still advises its Python callers."""
    run_dir = tmp_path / "run"
    code = main(["--data", str(tiny_folder), "--preset", "cpu", "--device", "cpu", "--batch-size", "9",
                 "--workers", "0", "--run-dir", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastdense-train: an epoch would hold no batch: the data holds 8 samples"), err
    assert "set --batch-size 8 or less" in err and "drop_last" not in err and len(err.strip().splitlines()) == 1, err
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    from fastdense.pipelines.base import check_has_batches
    from fastdense.train import _no_batch_advice

    with pytest.raises(ValueError, match="pass drop_last=False or a smaller batch_size") as python:
        check_has_batches(8, 9, 0, 1, drop_last=True)
    for shard, shards, says in ((1, 3, "set --batch-size 2 or less"), (8, 9, "train on at most 8 processes")):
        with pytest.raises(ValueError) as refused:
            check_has_batches(8, 3, shard, shards, drop_last=True)
        assert says in _no_batch_advice(refused.value) and "drop_last" not in _no_batch_advice(refused.value)
    assert _no_batch_advice(python.value).endswith("--batch-size is 9 (training takes full batches only); set --batch-size 8 or less")


def _doubles_run(tmp_path, monkeypatch, *extra):
    train_doubles.install(monkeypatch)
    args = ["--run-dir", str(tmp_path / "run"), "--preset", "full", "--device", "cpu", "--batch-size", "4",
            "--no-progress", "--set", "log_every=1"]
    return main(args + list(extra))


def test_resume_after_the_weight_decay_groups_changed_is_refused_with_the_reason(tmp_path, monkeypatch, capsys):
    """A checkpoint whose optimiser split its parameters otherwise (an older version's rule for which
    ones get weight decay) cannot continue exactly: one line saying so, not torch's size mismatch."""
    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "2") == 0
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    decayed, exempt = state["optimizer"]["param_groups"]
    exempt["params"].append(decayed["params"].pop())
    ckpt.save_checkpoint(state, path)
    capsys.readouterr()
    assert _doubles_run(tmp_path, monkeypatch, "--resume", "--max-steps", "3") == 3
    err = capsys.readouterr().err
    assert "which parameters get weight decay changed since the run started" in err and err.count("\n") == 1, err
    assert load_checkpoint(path)["step"] == 2


def test_resume_without_a_checkpoint_is_an_error_naming_the_path(tmp_path, monkeypatch, capsys):
    steps = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, batch: steps.append(1))
    assert _doubles_run(tmp_path, monkeypatch, "--resume") == 3
    err = capsys.readouterr().err
    assert "no checkpoint" in err and str(tmp_path / "run" / "checkpoints" / "last.pt") in err and not steps


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-training-state"])
def test_unreadable_checkpoint_is_an_error_naming_the_file(damage, tmp_path, monkeypatch, capsys):
    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "2") == 0
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"garbage\n" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    capsys.readouterr()
    assert _doubles_run(tmp_path, monkeypatch, "--resume") == 3
    err = capsys.readouterr().err
    assert str(path) in err and ("cannot be read" in err or "not a fastdense-train checkpoint" in err), err
    with pytest.raises(CheckpointError, match="last.pt"):
        ckpt.load_training_checkpoint(path)


def test_resume_without_config_yaml_from_an_unreadable_checkpoint_exits_3_naming_it(tmp_path, monkeypatch, capsys):
    """With config.yaml gone the config comes from the checkpoint: one that cannot be read is the
    checkpoint error (exit 3) before any trainer, not a config error (2)."""
    built = _no_trainer(monkeypatch)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage\n")
    assert main(["--run-dir", str(tmp_path / "run"), "--resume"]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"fastdense-train: checkpoint {str(path)!r} cannot be read") and not built, err


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoints_load_without_unpickling_code(tmp_path, monkeypatch):
    """A checkpoint holds tensors and plain data only (the numpy RNG state included), so it loads with
    ``weights_only``; one carrying a pickled object is refused before that object's code can run."""
    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "2") == 0
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = load_checkpoint(path)
    payload = _RunsCodeWhenUnpickled()
    payload.marker = str(tmp_path / "code-ran")
    torch.save(dict(state, extra=payload), path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)
    assert not (tmp_path / "code-ran").exists()


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, monkeypatch, capsys):
    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "2", "--set", "method_options.cells=4") == 0
    capsys.readouterr()
    code = _doubles_run(tmp_path, monkeypatch, "--resume", "--lr", "9", "--epochs", "3", "--set", "method_options.cells=5",
                        "--seed", "3", "--batch-size", "8")
    err = capsys.readouterr().err
    assert code == 2
    for named in ("epochs (200 -> 3)", "optimizer.lr (0.45 -> 9.0)", "method_options.cells (4 -> 5)", "seed (0 -> 3)", "batch_size (4 -> 8)"):
        assert named in err, err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2  # untouched
    # What only changes logging, checkpoints or speed may differ.
    assert _doubles_run(tmp_path, monkeypatch, "--resume", "--max-steps", "3", "--workers", "0", "--checkpoint-every", "7") == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert final.startswith("fastdense-train: 1 step (resumed at step 2, now at step 3) in ")  # this run's steps
    rows = {row["step"]: row["loss"] for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert f" loss {rows[3]:.4f} -> {rows[3]:.4f};" in final and rows[1] != rows[3], (final, rows)  # and its losses, not the first run's


def test_resume_takes_the_runs_config_yaml_and_without_it_the_checkpoints_config(tmp_path, monkeypatch, capsys):
    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "2", "--set", "method_options.cells=4", "--lr", "0.3") == 0
    saved = tmp_path / "run" / "config.yaml"
    saved.write_text(saved.read_text().replace("max_steps: 2", "max_steps: 3"))  # the checkpoint's config says 2
    assert main(["--run-dir", str(tmp_path / "run"), "--resume"]) == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3
    saved.unlink()
    assert main(["--run-dir", str(tmp_path / "run"), "--resume", "--max-steps", "4"]) == 0, capsys.readouterr().err
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 4 and state["config"]["optimizer"]["lr"] == 0.3 and state["config"]["method_options"]["cells"] == 4


def test_a_relative_data_path_is_saved_absolute_so_the_run_resumes_from_another_directory(tmp_path, monkeypatch, capsys):
    """``--data`` given relative to the working directory is saved as the absolute path it names:
    --resume (and fastdense-eval, which reads the checkpoint's config) find it from any directory, a
    relative --data naming the same folder is the same data, and another folder is still refused. A
    run saved before (its path relative) resumes from the directory it was started in, as it did."""
    (tmp_path / "images").mkdir()
    (tmp_path / "elsewhere").mkdir()
    folder = str(tmp_path / "images")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "1", "--data", "images") == 0
    assert cfg.load_yaml(run / "config.yaml")["data"] == folder
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["data"] == folder

    monkeypatch.chdir(tmp_path / "elsewhere")
    assert _doubles_run(tmp_path, monkeypatch, "--resume", "--max-steps", "2") == 0, capsys.readouterr().err
    assert _doubles_run(tmp_path, monkeypatch, "--resume", "--max-steps", "3", "--data", "../images/") == 0, capsys.readouterr().err
    capsys.readouterr()
    assert _doubles_run(tmp_path, monkeypatch, "--resume", "--max-steps", "4", "--data", "images") == 2
    assert f"data ({folder!r} -> {str(tmp_path / 'elsewhere' / 'images')!r})" in capsys.readouterr().err

    # A run saved with a relative path (before this change), resumed from its own directory.
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state["config"]["data"] = "images"
    torch.save(state, run / "checkpoints" / "last.pt")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(f"data: {folder}", "data: images"))
    monkeypatch.chdir(tmp_path)
    assert _doubles_run(tmp_path, monkeypatch, "--resume", "--max-steps", "4") == 0, capsys.readouterr().err
    assert _doubles_run(tmp_path, monkeypatch, "--resume", "--max-steps", "5", "--data", folder) == 0, capsys.readouterr().err
    assert cfg.load_yaml(run / "config.yaml")["data"] == folder


def test_a_new_run_does_not_overwrite_another_runs_checkpoint(tmp_path, monkeypatch, capsys):
    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "2") == 0
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    before = path.read_bytes()
    capsys.readouterr()
    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "1") == 3
    assert "already holds a checkpoint" in capsys.readouterr().err and path.read_bytes() == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_broken_while_the_loss_is_finite_never_replace_the_last_good_checkpoint(bad, tmp_path, monkeypatch):
    """An overflowing gradient can make weights NaN or infinite in a step whose loss was finite; the
    checkpoint after that step must not be written over the last good one."""
    from fastdense.training import NonFiniteLossError

    train_doubles.install(monkeypatch)
    trainer = Trainer(train_doubles.tiny_config(tmp_path, checkpoint_every=2))
    trainer.setup()
    update = trainer.method.update_target

    def poisoning_update(step, total_steps):
        update(step, total_steps)
        if step == 3:
            trainer.method.target_projector[0].weight.data[0, 0] = bad

    trainer.method.update_target = poisoning_update
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights or buffers \(target_projector.0.weight\) after 4 steps.*\(step 2\)"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_message(tmp_path, capsys):
    assert main(["--device", "cuda", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "device is cuda but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- two processes

def _two_rank_worker(rank, port, root):
    """One of two gloo processes (torchrun's variables): a run directory that rank 0 cannot write,
    a run that checkpoints, a resume with a changed config, and a resume."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train_doubles.install()
    from fastdense.training import RunDirError

    result = {}
    try:
        Trainer(train_doubles.tiny_config(f"{root}/a-file/run", max_steps=2)).setup()
    except RunDirError as e:
        result["unwritable"] = str(e)
    saves = []
    save = ckpt.save_checkpoint
    ckpt.save_checkpoint = lambda state, path: saves.append(str(path)) or save(state, path)
    trainer = Trainer(train_doubles.tiny_config(f"{root}/run", max_steps=4, checkpoint_every=2))
    trainer.setup()
    trainer.fit()
    result["saves"] = list(saves)
    try:
        Trainer(train_doubles.tiny_config(f"{root}/run", max_steps=6, **{"optimizer.lr": 3.0}), resume=True).setup()
    except ValueError as e:
        result["changed"] = str(e)
    trainer = Trainer(train_doubles.tiny_config(f"{root}/run", max_steps=6), resume=True)
    trainer.setup()
    trainer.fit()
    result["resumed"] = (trainer.step, trainer.method.state_dict())
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, f"{root}/results.pt")
    del trainer
    shutdown()


def test_two_ranks_refuse_together_and_only_rank_0_writes_checkpoints(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    context = torch.multiprocessing.start_processes(_two_rank_worker, args=(train_doubles.free_port(), str(tmp_path)),
                                                    nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not context.join(timeout=1):  # raises when a process fails
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes did not finish: a rank waits in a collective the other left")
    ranks = torch.load(tmp_path / "results.pt", weights_only=False)
    for rank, result in enumerate(ranks):
        assert "is not writable" in result["unwritable"], rank  # both stop at set-up, neither crashes in DDP
        assert "optimizer.lr (2.0 -> 3.0)" in result["changed"], rank
        assert result["resumed"][0] == 6, rank
    assert ranks[0]["saves"] == [str(tmp_path / "run" / "checkpoints" / "last.pt")] * 2 and ranks[1]["saves"] == []
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 6 and state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    for name, value in ranks[0]["resumed"][1].items():  # the ranks stayed in lock step
        assert torch.equal(value, ranks[1]["resumed"][1][name]), name


def test_metrics_log_starts_afresh_keeps_rows_up_to_the_resume_step_and_widens_the_csv(tmp_path):
    """A new run's log replaces rows a run killed before its first checkpoint left; a resumed one keeps
    the rows up to its step (a last row cut short by a kill is dropped); a column first seen mid-run
    widens metrics.csv (earlier rows empty there); the loss curve draws finite losses only."""
    from fastdense.training.logs import MetricsLog, plot_loss

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 0, "loss": 9.0}) + "\n")
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log({"step": 1, "epoch": 0, "loss": 2.0})
    log.log({"step": 2, "epoch": 0, "loss": 1.5, "grad_norm": 0.5})
    log.log({"step": 3, "epoch": 0, "loss": 1.0, "grad_norm": 0.25})
    log.close()
    assert [r["loss"] for r in MetricsLog.read(tmp_path / "metrics.jsonl")] == [2.0, 1.5, 1.0]
    assert _csv_rows(tmp_path) == [{"step": "1", "epoch": "0", "grad_norm": "", "loss": "2.0"},
                                   {"step": "2", "epoch": "0", "grad_norm": "0.5", "loss": "1.5"},
                                   {"step": "3", "epoch": "0", "grad_norm": "0.25", "loss": "1.0"}]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "epoch": 0, "lo')  # a row cut short by a kill mid-write
    assert [r["step"] for r in MetricsLog.read(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    MetricsLog(tmp_path, resume_step=2, tensorboard=False).close()
    assert [r["step"] for r in MetricsLog.read(tmp_path / "metrics.jsonl")] == [1, 2] and len(_csv_rows(tmp_path)) == 2
    assert plot_loss([{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf")}], tmp_path / "loss.png") is None


def test_tensorboard_keeps_the_checkpoint_steps_row_on_resume(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "3") == 0
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:  # a row the killed run logged after its checkpoint
        f.write(json.dumps({"step": 4, "epoch": 0, "loss": 9.0}) + "\n")
    assert _doubles_run(tmp_path, monkeypatch, "--resume", "--max-steps", "5") == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4, 5] and _rows(tmp_path / "run")[3]["loss"] != 9.0


def test_dali_resumes_mid_epoch_bit_identically_without_decoding_again(tiny_folder, tmp_path, one_thread, monkeypatch):
    """DALI's random streams run on from batch to batch: a resumed run continues its pass from the
    pipeline checkpoint saved with the training checkpoint, not by decoding the consumed batches."""
    pytest.importorskip("nvidia.dali")
    from fastdense.pipelines import dali_backend

    builds, build = [], dali_backend.DaliLoader._build

    def spy(self, epoch, checkpoint=None):
        builds.append((epoch, checkpoint is not None))
        return build(self, epoch, checkpoint=checkpoint)

    monkeypatch.setattr(dali_backend.DaliLoader, "_build", spy)
    whole, _ = _train(_method_config("scrl", tiny_folder, tmp_path / "whole", backend="dali"))
    split_dir = tmp_path / "split"
    _train(_method_config("scrl", tiny_folder, split_dir, backend="dali", max_steps=1))
    saved = load_checkpoint(split_dir / "checkpoints" / "last.pt")
    assert saved["position"] == {"epoch": 0, "batch": 1} and saved["loader_per_rank"][0]["batch"] == 1
    builds.clear()
    resumed, _ = _train(_method_config("scrl", tiny_folder, split_dir, backend="dali"), resume=True)
    assert builds == [(0, True), (1, False)]  # epoch 0 continued from its checkpoint, epoch 1 afresh
    _assert_same_state(whole, resumed)
    assert _rows(split_dir) == _rows(tmp_path / "whole")


# ---------------------------------------------------------------------------- resume on other data

def _image_folder(root, count, start=0):
    """``count`` 64 px images in two classes under ``root``, named img<start>... (so more can be added)."""
    from PIL import Image

    for i in range(start, start + count):
        (Path(root) / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (i * 13 % 256, i * 29 % 256, i * 71 % 256)).save(Path(root) / f"c{i % 2}" / f"img{i}.png")
    return Path(root)


def test_resume_on_changed_data_is_refused_saying_what_changed(tmp_path, capsys, one_thread):
    """The schedules, the EMA momentum and each epoch's order follow from the number of images: a
    resume on more, fewer or other images cannot continue the run exactly, and says so."""
    folder = _image_folder(tmp_path / "data", 16)
    run_dir = tmp_path / "run"
    _train(_method_config("scrl", folder, run_dir, max_steps=1))
    checkpoint = run_dir / "checkpoints" / "last.pt"
    saved = checkpoint.read_bytes()
    assert load_checkpoint(checkpoint)["data"]["num_samples"] == 16
    resume = ["--resume", "--run-dir", str(run_dir), "--set", "max_steps="]

    _image_folder(folder, 8, start=16)
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdense-train: --resume: the data now holds 24 images, the checkpoint was trained on 16")
    assert "exact continuation needs the same data" in err and len(err.strip().splitlines()) == 1

    for added in folder.glob("c*/img*.png"):
        if int(added.stem[3:]) >= 16:
            added.unlink()
    (folder / "c0" / "img0.png").rename(folder / "c0" / "renamed.png")
    assert main(resume) == 2
    assert "as many images (16) as the checkpoint was trained on, but not the same files" in capsys.readouterr().err
    assert checkpoint.read_bytes() == saved  # refused before any work

    # A checkpoint written before checkpoints recorded their data still resumes, with a warning.
    (folder / "c0" / "renamed.png").rename(folder / "c0" / "img0.png")
    state = load_checkpoint(checkpoint)
    del state["data"]
    torch.save(state, checkpoint)
    with pytest.warns(UserWarning, match="does not record the data"):
        Trainer(_method_config("scrl", folder, run_dir, max_steps=1), resume=True).setup()


def test_steps_per_epoch_is_compared_only_on_the_same_number_of_processes():
    """steps_per_epoch is per process: another world size changes it without changing the data."""
    from fastdense.training.loop import data_changes

    saved = {"num_samples": 16, "fingerprint": "a", "steps_per_epoch": 4}
    now = dict(saved, steps_per_epoch=2)
    assert data_changes(saved, now, same_world_size=False) is None
    assert data_changes(saved, now, same_world_size=True) == "an epoch is now 2 steps, the checkpoint's was 4"
    assert data_changes(dict(saved, fingerprint=None), dict(saved, fingerprint="b"), same_world_size=True) is None  # a .beton names none


# ---------------------------------------------------------------------------- batch size 1

@pytest.mark.parametrize("method", ["vicregl", "lewel"])
def test_a_batch_too_small_for_the_methods_batch_statistics_is_refused_at_setup(method, tiny_folder, tmp_path, capsys):
    """VICRegL's and LEWEL's BatchNorm1d heads (and VICRegL's variance and covariance) see one row per
    image: batch_size 1 used to crash at step 1 inside BatchNorm."""
    run_dir = tmp_path / "run"
    code = main(["--method", method, "--data", str(tiny_folder), "--preset", "cpu", "--device", "cpu", "--workers", "0",
                 "--batch-size", "1", "--run-dir", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"fastdense-train: batch_size 1 is too small for {method}") and "--batch-size 2" in err, err
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("method", ["scrl", "selfpatch"])
def test_methods_without_per_image_batch_statistics_train_on_one_image(method, tiny_folder, tmp_path, one_thread):
    """SCRL's heads see every box of the batch (about ten per image) and SelfPatch has no BatchNorm:
    batch_size 1 trains."""
    trainer, _ = _train(_method_config(method, tiny_folder, tmp_path, batch_size=1, max_steps=1))
    assert trainer.step == 1


# ---------------------------------------------------------------------------- set-up and the loop

def test_setup_reads_its_settings_from_the_config(tmp_path, monkeypatch):
    """auto precision is fp32 on a CPU, and bf16 and fp16 autocast to their own dtypes; auto
    channels_last is off on a CPU; warm-up is round(warmup_epochs x steps per epoch) steps; a batch of
    exactly the method's minimum trains, one less is refused; a loader without a batch is refused."""
    train_doubles.install(monkeypatch)
    trainer = Trainer(train_doubles.tiny_config(tmp_path / "a", **{"optimizer.warmup_epochs": 0.36}))
    assert trainer.precision == "fp32" and Trainer(train_doubles.tiny_config(tmp_path / "b", precision="bf16")).precision == "bf16"
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with Trainer(train_doubles.tiny_config(tmp_path / "b", precision=precision)).autocast():
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == dtype, precision
    trainer.setup()
    assert not trainer.channels_last  # auto: on GPUs only
    assert (trainer.steps_per_epoch, trainer.total_steps, trainer.schedule.warmup_steps) == (10, 20, 4)  # round(3.6)
    monkeypatch.setattr(train_doubles.TinyMethod, "min_batch_size", 4, raising=False)
    Trainer(train_doubles.tiny_config(tmp_path / "c", batch_size=4)).setup()
    with pytest.raises(ValueError, match="batch_size 3 is too small for scrl: it trains on at least 4 images per process"):
        Trainer(train_doubles.tiny_config(tmp_path / "d", batch_size=3)).setup()
    with pytest.raises(ValueError, match="the loader yields no batch per epoch"):
        Trainer(train_doubles.tiny_config(tmp_path / "e", batch_size=41)).setup()


def test_the_loaders_random_stream_runs_on_from_batch_to_batch_is_new_each_epoch_and_the_same_in_every_run(tmp_path, monkeypatch):
    """The loader's RNG is reseeded from (seed, epoch, rank) at every epoch start and carried from one
    fetch to the next: no two batches of a run draw the same augmentations, and a second run draws
    the same ones again."""
    train_doubles.install(monkeypatch)
    states = []
    real_iter = train_doubles.TinyLoader.__iter__

    def recording(self):
        batches = real_iter(self)
        while True:
            states.append(torch.get_rng_state())  # each fetch runs this, under the loader's RNG
            batch = next(batches, None)
            if batch is None:
                return
            yield batch

    monkeypatch.setattr(train_doubles.TinyLoader, "__iter__", recording)
    for run in ("first", "second"):
        _train(train_doubles.tiny_config(tmp_path / run, batch_size=8, log_every=10, checkpoint_every=0))
    first, second = states[: len(states) // 2], states[len(states) // 2:]
    assert len(first) == 10  # 2 epochs of 5 batches (the trainer stops fetching at an epoch's end)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert len({bytes(state.numpy()) for state in first}) == 10


def test_a_loader_that_runs_out_before_its_length_ends_the_epoch_with_a_checkpoint(tmp_path, monkeypatch):
    """A shard shorter than len(loader) (uneven shards): the epoch ends when the loader does."""
    import itertools

    train_doubles.install(monkeypatch)
    passes = []
    real_iter = train_doubles.TinyLoader.__iter__

    def one_batch_short(self):
        passes.append(self.epoch)
        if len(passes) > 2:
            raise RuntimeError(f"a third pass over the data for 2 epochs ({passes})")
        return itertools.islice(real_iter(self), len(self) - 1)

    monkeypatch.setattr(train_doubles.TinyLoader, "__iter__", one_batch_short)
    trainer, _ = _train(train_doubles.tiny_config(tmp_path, checkpoint_every=0))
    assert (trainer.step, trainer.epoch, passes) == (18, 2, [0, 1])
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 18 and state["position"] == {"epoch": 2, "batch": 0}
    assert [r["epoch"] for r in _rows(tmp_path)] == [0] * 9 + [1] * 9
    # Every row: the method's own outputs (TinyMethod's q_std) besides the loss, schedules and timings.
    assert all({"loss", "q_std", "lr", "weight_decay", "images_per_s", "data_wait"} <= row.keys() for row in _rows(tmp_path, timings=True))


def test_a_nan_in_the_last_step_of_a_loader_that_runs_out_early_stops_before_the_epochs_checkpoint(tmp_path, monkeypatch):
    """Step 9 ends a shard of 9 batches (len 10) and is no log row: its loss, read a step late,
    has no next step to be read behind; it is still read before the epoch's checkpoint, and named."""
    import itertools

    from fastdense.training import NonFiniteLossError

    train_doubles.install(monkeypatch)
    real_iter = train_doubles.TinyLoader.__iter__
    monkeypatch.setattr(train_doubles.TinyLoader, "__iter__", lambda self: itertools.islice(real_iter(self), len(self) - 1))
    trainer = Trainer(train_doubles.tiny_config(tmp_path, log_every=4, checkpoint_every=0, method_options={"nan_at_call": 8}))
    trainer.setup()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 9 \(epoch 0\).*no checkpoint had been written"):
        trainer.fit()
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


# ---------------------------------------------------------------------------- stops mid-run

def test_a_loader_error_after_training_started_is_one_line_not_a_traceback(tmp_path, capsys):
    """The torch backend finds out only while decoding that nothing in the folder is an image."""
    for i in range(8):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / f"c{i % 2}" / f"img{i}.png").write_bytes(b"not an image")
    code = main(["--method", "scrl", "--data", str(tmp_path / "data"), "--backend", "torch", "--preset", "cpu", "--device", "cpu",
                 "--workers", "0", "--batch-size", "4", "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastdense-train: data folder ") and "no readable image among its 8 files" in err, err
    assert "training stopped after 0 steps; no checkpoint had been written yet" in err and len(err.strip().splitlines()) == 1
    log = tmp_path / "run" / "error.log"
    assert f"(traceback in {log})" in err and "Traceback (most recent call last)" in log.read_text()  # kept for a bug report


def test_an_os_error_from_the_loader_mid_run_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_iter = train_doubles.TinyLoader.__iter__

    def fail_at_the_second_epoch(self):
        if self.epoch == 1:
            raise OSError(5, "Input/output error", "/data/c0/img3.png")
        yield from real_iter(self)

    monkeypatch.setattr(train_doubles.TinyLoader, "__iter__", fail_at_the_second_epoch)
    assert _doubles_run(tmp_path, monkeypatch, "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdense-train: [Errno 5] Input/output error: '/data/c0/img3.png'; training stopped after 10 steps") and len(err.strip().splitlines()) == 1, err
    assert "last good checkpoint (step 10)" in err


def test_ctrl_c_is_one_line_naming_the_last_checkpoint_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    real_step = Trainer.train_step

    def interrupted_in_step_4(self, batch):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted_in_step_4)
    run_dir = tmp_path / "run"
    assert _doubles_run(tmp_path, monkeypatch, "--checkpoint-every", "2", "--epochs", "1") == 130
    err = capsys.readouterr().err
    assert err.strip() == (f"fastdense-train: interrupted at step 3; the last good checkpoint (step 2) is kept at "
                           f"{run_dir / 'checkpoints' / 'last.pt'}; continue with --resume --run-dir {run_dir}")
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2  # the handler wrote nothing
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert _doubles_run(tmp_path, monkeypatch, "--resume") == 0
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 10


def test_resuming_a_run_that_reached_its_max_steps_says_there_is_nothing_to_do(tmp_path, monkeypatch, capsys):
    assert _doubles_run(tmp_path, monkeypatch, "--max-steps", "3") == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    saved = checkpoint.read_bytes()
    capsys.readouterr()
    assert _doubles_run(tmp_path, monkeypatch, "--resume") == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("fastdense-train: nothing to do: the run in ") and "reached its max_steps (3) at step 3" in out, out
    assert "--set max_steps= to continue" in out
    assert checkpoint.read_bytes() == saved and (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert _doubles_run(tmp_path, monkeypatch, "--resume", "--max-steps", "5") == 0
    assert load_checkpoint(checkpoint)["step"] == 5


def test_ctrl_c_during_setup_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "setup", interrupted)
    assert _doubles_run(tmp_path, monkeypatch) == 130
    assert capsys.readouterr().err.strip() == "fastdense-train: interrupted during set-up, before any training step"


def test_a_run_is_finished_at_its_end_step_or_after_its_last_epoch(capsys):
    """A run resumed on another number of processes can reach its last epoch before its end step
    (total_steps follows the new steps per epoch): fit has nothing left to do then either, and
    --resume says so instead of reporting a run of 0 steps."""
    trainer = Trainer.__new__(Trainer)
    trainer.config, trainer.total_steps = {"epochs": 2, "max_steps": None}, 40
    for step, epoch, finished in ((10, 1, False), (40, 1, True), (20, 2, True), (39, 1, False)):
        trainer.step, trainer.epoch = step, epoch
        assert trainer.finished() is finished, (step, epoch)
    trainer.config["max_steps"], trainer.step, trainer.epoch = 5, 5, 0
    assert trainer.finished()
    from fastdense.train import _nothing_to_do

    trainer.run_dir = "runs/r"
    assert "reached its max_steps (5) at step 5" in _nothing_to_do(trainer)
    trainer.config["max_steps"], trainer.step, trainer.epoch = None, 20, 2  # its last epoch, short of total_steps
    assert _nothing_to_do(trainer) == "nothing to do: the run in runs/r finished all 2 epochs (20 steps); start a new --run-dir to train further"
    assert main(["--resume"]) == 2  # a usage error, as every other one
    assert "fastdense-train: --resume needs --run-dir" in capsys.readouterr().err
