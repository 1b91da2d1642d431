"""fastdense-train: the loop end to end, config layering, LARS and schedules, DDP on gloo."""

import json
import math
import re

import numpy as np
import pytest
import torch
import yaml

import train_doubles
from fastdense.train import main, parser
from fastdense.training import LARS, Schedule, Trainer, build_optimizer, param_groups, scaled_lr
from fastdense.training.optim import clip_each_gradient
from fastdense.training import config as cfg


def test_loop_end_to_end_writes_every_output(tmp_path, monkeypatch, capsys):
    train_doubles.install(monkeypatch)
    run_dir = tmp_path / "run"
    code = main(["--run-dir", str(run_dir), "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--no-progress",
                 "--preset", "full", "--set", "log_every=1", "--set", "optimizer.lr=1.0", "--set", "optimizer.warmup_epochs=0.2"])
    assert code == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))  # 40 images / 4 per batch x 2 epochs
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 and 0 <= r["data_wait"] for r in rows)
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]])
    assert (run_dir / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch")
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 21
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 20 and state["position"] == {"epoch": 2, "batch": 0}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["optimizer"]["lr"] == 1.0 and saved["run_dir"] == str(run_dir)
    final = capsys.readouterr().out.strip().splitlines()[-1]
    for path in ("last.pt", "config.yaml", "metrics.csv", "metrics.jsonl", "loss.png"):
        assert path in final
    first, last = f"{rows[0]['loss']:.4f}", f"{rows[-1]['loss']:.4f}"
    assert first != last and f" loss {first} -> {last};" in final, final  # the first row's loss, then the last's


def test_training_changes_online_and_target(tmp_path, monkeypatch):
    train_doubles.install(monkeypatch)
    trainer = Trainer(train_doubles.tiny_config(tmp_path, max_steps=1))
    trainer.setup()
    online = trainer.method.backbone.conv.weight.clone()
    target = trainer.method.target_backbone.conv.weight.clone()
    trainer.fit()
    assert not torch.equal(online, trainer.method.backbone.conv.weight)
    # EMA with m = 0.9: target' = 0.9 target + 0.1 online'
    expected = 0.9 * target + 0.1 * trainer.method.backbone.conv.weight
    torch.testing.assert_close(trainer.method.target_backbone.conv.weight, expected)


def test_config_layers_and_overrides(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("epochs: 7\noptimizer: {lr: 0.5, momentum: 0.8}\n")
    args = parser().parse_args(["--method", "lewel", "--config", str(user), "--set", "optimizer.lr=0.25",
                                "--set", "optimizer.betas=[0.9, 0.95]", "--batch-size", "12"])
    from fastdense.train import resolve_config

    config = resolve_config(args, has_gpu=False)
    assert config["method"] == "lewel" and config["preset"] == "cpu"  # no --data, no GPU
    assert re.fullmatch(r"runs/lewel-\d{8}-\d{6}", config["run_dir"]), config["run_dir"]  # no --run-dir: runs/<method>-<UTC time>
    assert cfg.resolve("lewel", overrides={"data": ""})["data"] == ""  # empty: the built-in dataset, not the working directory
    assert config["method_options"] == {"preset": "cpu"}
    assert config["epochs"] == 7 and config["batch_size"] == 12
    assert config["optimizer"]["lr"] == 0.25 and config["optimizer"]["momentum"] == 0.8
    assert config["optimizer"]["betas"] == [0.9, 0.95]
    assert config["optimizer"]["weight_decay"] == 1.5e-6  # from lewel.yaml
    with_data = cfg.resolve("lewel", overrides={"data": "/some/folder"})
    assert with_data["preset"] == "full" and with_data["batch_size"] == 256 and with_data["method_options"] == {}
    assert cfg.resolve("lewel", has_gpu=True)["preset"] == "full"
    with pytest.raises(ValueError, match="optimizer.lr"):
        cfg.resolve("scrl", overrides={"lr": 1.0})
    with pytest.raises(ValueError, match="method must be one of"):
        cfg.resolve("simclr")
    with pytest.raises(ValueError, match="key=value"):
        cfg.parse_override("lr0.1")
    assert cfg.parse_override("run_dir=runs/lr=0.1") == ("run_dir", "runs/lr=0.1")  # the value may hold '='
    with pytest.raises(ValueError, match="preset must be 'auto', 'full' or one of \\['cpu'\\], got 'gpu'"):
        cfg.resolve("scrl", overrides={"preset": "gpu"})


def test_config_files_layer_in_order_may_name_the_method_and_may_be_empty(tmp_path):
    first, second, empty = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "empty.yaml"
    first.write_text("method: lewel\nepochs: 7\noptimizer: {lr: 0.5, momentum: 0.8}\n")
    second.write_text("optimizer: {lr: 0.25}\n")
    empty.write_text("")
    config = cfg.resolve(user_files=[first, second, empty])
    assert config["method"] == "lewel" and config["epochs"] == 7
    assert config["optimizer"]["lr"] == 0.25 and config["optimizer"]["momentum"] == 0.8


def test_resume_layers_config_files_and_overrides_over_the_saved_config_and_flags_over_set(tmp_path):
    """--resume: the saved config, then --config files, then --set and the flags; an explicit flag
    wins over --set for its key; --workers is num_workers."""
    from fastdense.train import resolve_config

    saved = cfg.resolve("lewel", overrides={"log_every": 3})
    user = tmp_path / "more.yaml"
    user.write_text("log_every: 5\noptimizer: {lr: 0.7, eta: 0.002}\n")
    config = cfg.resolve(user_files=[user], overrides={"optimizer.lr": 0.9}, base=saved)
    assert config["method"] == "lewel" and config["log_every"] == 5 and config["optimizer"]["eta"] == 0.002
    assert config["optimizer"]["lr"] == 0.9 and config["optimizer"]["momentum"] == saved["optimizer"]["momentum"]
    args = parser().parse_args(["--set", "optimizer.lr=0.25", "--lr", "0.5", "--workers", "3", "--set", "num_workers=5"])
    config = resolve_config(args, has_gpu=False)
    assert config["optimizer"]["lr"] == 0.5 and config["num_workers"] == 3


def test_every_flag_sets_its_config_key():
    from fastdense.train import resolve_config

    args = parser().parse_args(["--method", "vicregl", "--data", "/data/x", "--backend", "dali", "--epochs", "3", "--batch-size", "16",
                                "--run-dir", "/runs/r", "--workers", "2", "--seed", "5", "--device", "cpu", "--precision", "bf16",
                                "--preset", "full", "--max-steps", "9", "--checkpoint-every", "4", "--lr", "0.7", "--compile", "--no-progress"])
    config = resolve_config(args, has_gpu=False)
    expected = {"method": "vicregl", "data": "/data/x", "backend": "dali", "epochs": 3, "batch_size": 16, "run_dir": "/runs/r",
                "num_workers": 2, "seed": 5, "device": "cpu", "precision": "bf16", "preset": "full", "max_steps": 9,
                "checkpoint_every": 4, "compile": True, "progress": False}
    assert {key: config[key] for key in expected} == expected and config["optimizer"]["lr"] == 0.7


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for key in cfg.OPTIONS:
        assert f"  {key} " in text


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path, monkeypatch, capsys):
    train_doubles.install(monkeypatch)  # were it to train, the doubles would, in a second
    run_dir = tmp_path / "run"
    assert main(["--print-config", "--run-dir", str(run_dir), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                 "--preset", "full", "--no-progress", "--set", "optimizer.lr=0.25"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run_dir"] == str(run_dir) and printed["optimizer"]["lr"] == 0.25 and printed["preset"] == "full"
    assert not run_dir.exists()


def test_every_method_yaml_resolves():
    for method in cfg.METHODS:
        for has_gpu in (False, True):
            config = cfg.resolve(method, has_gpu=has_gpu)
            assert config["method"] == method
            assert config["optimizer"]["name"] in ("lars", "adamw")


def test_lars_matches_hand_computed_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    w0, b0 = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    opt = LARS(param_groups(model, weight_decay=0.1), lr=0.5, momentum=0.9, eta=0.02)
    x = torch.randn(4, 3, dtype=torch.float64)
    w, b = w0.copy(), b0.copy()
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
    for _ in range(2):
        opt.zero_grad()
        (model(x) ** 2).sum().backward()
        y = x.numpy() @ w.T + b
        gw, gb = 2 * y.T @ x.numpy(), 2 * y.sum(0)
        gw = gw + 0.1 * w  # decay, then trust ratio, for weights only
        gw = gw * 0.02 * np.linalg.norm(w) / np.linalg.norm(gw)
        buf_w, buf_b = 0.9 * buf_w + gw, 0.9 * buf_b + gb  # the bias: plain momentum SGD
        w, b = w - 0.5 * buf_w, b - 0.5 * buf_b
        opt.step()
        np.testing.assert_allclose(model.weight.detach().numpy(), w, rtol=1e-12)
        np.testing.assert_allclose(model.bias.detach().numpy(), b, rtol=1e-12)


def test_lars_takes_plain_momentum_steps_where_a_norm_is_zero():
    """The trust ratio applies only where both ||p|| and ||g|| are > 0 (BYOL's LARS): a zero-initialised
    weight still moves by lr x its gradient, a weight with no gradient and no decay stays put (no
    0/0), and a negative lr is refused."""
    zero = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    still = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
    opt = LARS([{"params": [zero, still], "weight_decay": 0.0}], lr=0.5, momentum=0.9, eta=0.02)
    zero.grad, still.grad = torch.full_like(zero, 2.0), torch.zeros_like(still)
    opt.step()
    assert torch.equal(zero.detach(), torch.full_like(zero, -1.0))
    assert torch.equal(still.detach(), torch.ones_like(still))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        LARS(param_groups(torch.nn.Linear(2, 2), 0.0), lr=-0.1)


def test_build_optimizer_takes_every_option():
    """lr scaled by the global batch (and kept as base_lr), LARS's momentum and eta, AdamW's betas, the
    decay on the decayed group only; an unknown name refused."""
    model = torch.nn.Linear(3, 2)
    options = dict(cfg.defaults()["optimizer"], name="lars", lr=0.3, lr_batch=1024, momentum=0.8, eta=0.005, weight_decay=1e-4)
    decayed, exempt = build_optimizer(model, options, global_batch=512).param_groups
    assert decayed["lr"] == exempt["lr"] == decayed["base_lr"] == exempt["base_lr"] == pytest.approx(0.15)  # 0.3 x 512 / 1024
    assert decayed["momentum"] == exempt["momentum"] == 0.8 and decayed["eta"] == 0.005
    assert decayed["weight_decay"] == 1e-4 and exempt["weight_decay"] == 0.0
    adamw = build_optimizer(model, dict(options, name="adamw", betas=[0.8, 0.95]), global_batch=128).param_groups
    assert [g["betas"] for g in adamw] == [(0.8, 0.95)] * 2 and adamw[0]["lr"] == pytest.approx(0.0375)
    with pytest.raises(ValueError, match="'lars' or 'adamw'"):
        build_optimizer(model, dict(options, name="sgd"), global_batch=256)


def test_clip_each_gradient_is_dinos_clip_gradients():
    """Each gradient scaled by clip / (|g| + 1e-6) where that is below 1 and left alone elsewhere
    (DINO's utils.clip_gradients), in float64; the norm returned is the global one before clipping."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64)) for shape in ((3, 4), (5,), (2, 2, 2))]
    grads = [torch.randn_like(p) * scale for p, scale in zip(params, (10.0, 0.01, 1.0))]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = clip_each_gradient(params, 0.5)
    for p, g in zip(params, grads):
        rate = 0.5 / (float(g.norm()) + 1e-6)
        torch.testing.assert_close(p.grad, g * rate if rate < 1 else g, rtol=1e-12, atol=0)
    assert sum(rate < 1 for rate in (0.5 / (float(g.norm()) + 1e-6) for g in grads)) == 2  # one gradient below the clip
    assert float(total) == pytest.approx(math.sqrt(sum(float(g.norm()) ** 2 for g in grads)), rel=1e-12)


def test_param_groups_exclude_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decayed, excluded = param_groups(model, weight_decay=1e-6)
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert excluded["weight_decay"] == 0.0 and not excluded["lars_adapt"] and len(excluded["params"]) == 4


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_scrl_exempts_from_decay_what_scrls_name_filter_exempts(backbone):
    """SCRL's code (optim/getters.py) exempts parameters whose names hold "bn" or "bias", named as in
    its modules: the encoder a Sequential of torchvision's ResNet children but the classifier, the
    heads TwoLayerLinearHeads (``net`` a Sequential). The same parameters, renamed that way, must
    fall in the same groups here: the block BatchNorms and biases exempt, the stem's, downsample
    paths' and heads' BatchNorm weights decayed and LARS-adapted."""
    from fastdense.methods import build_method

    method = build_method("scrl", backbone=backbone, projector_dims=[64, 16], predictor_dims=[64, 16])
    reference = torch.nn.ModuleDict({
        "encoder": torch.nn.Sequential(*[c for c in method.backbone.trunk.children() if not isinstance(c, torch.nn.Identity)]),
        "projector": torch.nn.ModuleDict({"net": method.projector}),
        "predictor": torch.nn.ModuleDict({"net": method.predictor}),
    })
    reference_exempt = {id(p) for name, p in reference.named_parameters() if "bn" in name or "bias" in name}
    decayed, exempt = param_groups(method, weight_decay=1e-6)
    assert {id(p) for p in exempt["params"]} == reference_exempt
    assert {id(p) for p in decayed["params"]} == {id(p) for p in reference.parameters()} - reference_exempt
    stem_norm = method.backbone.trunk.bn1.weight
    assert id(stem_norm) in {id(p) for p in decayed["params"]}  # the quirk: "encoder.1.weight" holds no "bn"
    # Other methods keep the trainer's rule: every 1-D parameter exempt.
    vicregl = build_method("vicregl", preset="cpu")
    _, exempt = param_groups(vicregl, weight_decay=1e-6)
    assert {id(p) for p in exempt["params"]} == {id(p) for p in vicregl.parameters() if p.requires_grad and p.ndim <= 1}


def test_schedules_and_lr_scaling():
    assert scaled_lr(0.45, 4096) == pytest.approx(0.45 * 16)
    opt = torch.optim.SGD(param_groups(torch.nn.Linear(2, 2), 0.04), lr=1.0)
    schedule = Schedule(opt, total_steps=110, warmup_steps=10, lr=2.0, min_lr=0.1, weight_decay=0.04, weight_decay_end=0.4)
    assert schedule.lr_at(0) == pytest.approx(0.2) and schedule.lr_at(9) == pytest.approx(2.0)
    assert schedule.lr_at(10) == pytest.approx(2.0) and schedule.lr_at(60) == pytest.approx(1.05)
    assert schedule.lr_at(110) == pytest.approx(0.1)
    hyper = schedule.apply(55)
    assert hyper["weight_decay"] == pytest.approx(0.22)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.22) and opt.param_groups[1]["weight_decay"] == 0.0


def test_schedule_warm_up_longer_than_the_run_ends_at_the_peak_and_weight_decay_stays_constant_by_default():
    """Warm-up is cut to the run's length (a short run still reaches the peak lr on its last step);
    without weight_decay_end the decay is constant and the exempt group's stays 0."""
    opt = torch.optim.SGD(param_groups(torch.nn.Linear(2, 2), 0.04), lr=1.0)
    schedule = Schedule(opt, total_steps=4, warmup_steps=10, lr=2.0, min_lr=0.1, weight_decay=0.04)
    assert [schedule.lr_at(s) for s in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0], rel=1e-12)
    assert [schedule.lr_at(s) for s in (5, 6)] == pytest.approx([0.1, 0.1], rel=1e-12)  # past the end: min_lr
    assert [schedule.weight_decay_at(s) for s in range(5)] == pytest.approx([0.04] * 5, rel=1e-12)
    assert schedule.apply(3) == pytest.approx({"lr": 2.0, "weight_decay": 0.04}, rel=1e-12)
    assert [g["weight_decay"] for g in opt.param_groups] == [pytest.approx(0.04), 0.0]
    # Its state is every setting: a schedule built otherwise (another world size's scaling) continues it.
    resumed = Schedule(opt, total_steps=8, warmup_steps=1, lr=4.0, min_lr=0.2, weight_decay=0.1, weight_decay_end=0.3)
    resumed.load_state_dict(schedule.state_dict())
    assert [(resumed.lr_at(s), resumed.weight_decay_at(s)) for s in range(6)] == [(schedule.lr_at(s), schedule.weight_decay_at(s)) for s in range(6)]


def test_per_parameter_clipping_and_frozen_parameters(tmp_path, monkeypatch):
    """``optimizer.clip_grad_per_parameter`` clips each gradient on its own, as DINO's and SelfPatch's
    ``utils.clip_gradients`` (``g * clip / (|g| + 1e-6)`` where that is below 1); the parameters that
    the method names in ``frozen_parameters(epoch)`` (SelfPatch: its heads' last layers during the
    first epoch, ``cancel_gradients_last_layer``) are not updated at all."""
    train_doubles.install(monkeypatch)
    config = train_doubles.tiny_config(tmp_path, **{"optimizer.clip_grad": 1e-3, "optimizer.clip_grad_per_parameter": True})
    trainer = Trainer(config)
    trainer.setup()
    frozen = trainer.method.predictor.weight
    monkeypatch.setattr(trainer.method, "frozen_parameters", lambda epoch: [frozen] if epoch < 1 else [], raising=False)
    grads = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({name: p.grad.clone() for name, p in trainer.method.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", recording_step)
    before = frozen.detach().clone()
    batch = train_doubles.fixed_batch(batch_size=4)
    out = trainer.train_step(batch)
    assert "predictor.weight" not in grads and torch.equal(frozen, before)
    norms = [float(g.norm()) for g in grads.values()]
    assert len(norms) >= 4 and max(norms) <= 1e-3 * (1 + 1e-5)
    assert sum(n * n for n in norms) ** 0.5 > 1.5e-3  # each clipped alone: together above the clip
    assert float(out["grad_norm"]) > 1e-3  # the norm before clipping
    trainer.epoch = 1
    trainer.train_step(batch)
    assert "predictor.weight" in grads and not torch.equal(frozen, before)


def test_ddp_two_processes_equal_full_batch(tmp_path, monkeypatch):
    out_path = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(train_doubles.ddp_step_worker, args=(2, train_doubles.free_port(), str(tmp_path / "ddp"), str(out_path)),
                                nprocs=2, join=True)
    ddp = torch.load(out_path, weights_only=False)
    train_doubles.install(monkeypatch)
    trainer = Trainer(train_doubles.tiny_config(tmp_path / "single", batch_size=8))
    trainer.setup()
    torch.manual_seed(5)
    out = trainer.train_step(train_doubles.fixed_batch(8))
    torch.testing.assert_close(ddp["loss"], out["loss"].detach(), rtol=1e-6, atol=1e-7)
    grads = {n: p.grad for n, p in trainer.method.named_parameters() if p.grad is not None}
    assert grads.keys() == ddp["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, value in trainer.method.state_dict().items():
        torch.testing.assert_close(ddp["params"][name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def tiny_image_folder(tmp_path_factory):
    from fastdense.pipelines.builtin import ensure_builtin_dataset

    return ensure_builtin_dataset(tmp_path_factory.mktemp("builtin"), num_images=16, image_size=64, num_classes=4)


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
@pytest.mark.parametrize("method", cfg.METHODS)
def test_every_method_trains_end_to_end(method, backend, tiny_image_folder, tmp_path):
    run_dir = tmp_path / method
    code = main(["--method", method, "--data", str(tiny_image_folder), "--preset", "cpu", "--backend", backend,
                 "--batch-size", "4", "--workers", "0", "--max-steps", "2", "--device", "cpu", "--no-progress",
                 "--run-dir", str(run_dir), "--set", "log_every=1"])
    assert code == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
