"""Exact resume after SIGKILL, atomic checkpoints, the non-finite stop, and run-directory checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_doubles
from fastdense.train import main
from fastdense.training import NonFiniteLossError, RunDirError, Trainer, load_checkpoint, save_checkpoint
from fastdense.training import checkpoint as ckpt
from fastdense.training import config as cfg
from fastdense.training import loop

ROOT = Path(__file__).resolve().parent.parent
DOUBLES = Path(train_doubles.__file__)


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())]


def _run(config, resume=False):
    trainer = Trainer(config, resume=resume)
    trainer.setup()
    trainer.fit()
    return trainer


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, monkeypatch):
    # Bit-identical sums need the same thread count in this process and the killed one, whatever
    # earlier tests or libraries in this process did to it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sigkill_then_resume(tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _sigkill_then_resume(tmp_path, monkeypatch):
    train_doubles.install(monkeypatch)
    reference = _run(train_doubles.tiny_config(tmp_path / "reference", epochs=2))
    assert reference.step == 20

    run_dir = tmp_path / "killed"
    args = [sys.executable, str(DOUBLES), "--run-dir", str(run_dir), "--epochs", "2", "--batch-size", "4",
            "--device", "cpu", "--preset", "full", "--no-progress", "--checkpoint-every", "3",
            "--set", "log_every=1", "--set", "optimizer.lr=2.0", "--set", "optimizer.warmup_epochs=0.5",
            "--set", "method_options.sleep=0.2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # one thread, as in this process
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 6 <= killed_at < 20  # killed mid-run

    # The saved config as it is (a resume refuses a changed one), but without the sleep, which
    # changes nothing but time.
    config = cfg.load_yaml(run_dir / "config.yaml")
    build = loop.build_method

    def without_sleep(config):
        method = build(config)
        method.sleep = 0.0
        return method

    monkeypatch.setattr(loop, "build_method", without_sleep)
    resumed = _run(config, resume=True)
    assert resumed.step == 20
    assert _losses(run_dir) == _losses(tmp_path / "reference")
    ref_state, state = reference.method.state_dict(), resumed.method.state_dict()
    assert ref_state.keys() == state.keys()
    for name in ref_state:
        assert torch.equal(ref_state[name], state[name]), name
    ref_opt = reference.optimizer.state_dict()["state"]
    opt = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(ref_opt[k]["momentum_buffer"], opt[k]["momentum_buffer"]) for k in ref_opt)


def test_checkpoint_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    """The temporary is written beside the checkpoint, as ``.last.pt.*.tmp``: the rename stays on one
    filesystem (atomic), and what a killed write left is what set-up clears. config.yaml, which
    --resume reads back, is written the same way."""
    path = tmp_path / "last.pt"
    renames, real_replace = [], os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst))[1])
    save_checkpoint({"step": 1, "w": torch.arange(5)}, path)
    cfg.save({"epochs": 1}, tmp_path / "config.yaml")
    for (temporary, target), name in zip(renames, ["last.pt", "config.yaml"], strict=True):
        assert target == tmp_path / name and temporary.parent == tmp_path and temporary.match(f".{name}.*.tmp"), temporary

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"step": 2, "w": torch.zeros(10**6)}, path)
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "last.pt"]  # no temporary left behind


def test_rng_states_round_trip_through_a_checkpoint_and_seeds_are_per_rank(tmp_path):
    """python's, numpy's (its cached second gaussian included) and torch's streams continue exactly
    after a save and load, though no fastdense code draws from the first two (a user's method may);
    seed_everything seeds all three; rank_seed differs per rank and per seed."""
    import random

    import numpy as np

    outside = ckpt.rng_state(include_cuda=False)
    try:
        ckpt.seed_everything(3)
        np.random.standard_normal()  # leaves the pair's second gaussian cached
        save_checkpoint({"rng": ckpt.rng_state()}, tmp_path / "rng.pt")
        draws = lambda: (random.random(), np.random.standard_normal(), int(np.random.randint(1 << 30)), torch.rand(3))  # noqa: E731
        first = draws()
        ckpt.set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
        second = draws()
        assert first[:3] == second[:3] and torch.equal(first[3], second[3])
        ckpt.seed_everything(5)
        again = draws()
        ckpt.seed_everything(5)
        assert draws()[:3] == again[:3]
    finally:
        ckpt.set_rng_state(outside)
    seeds = {ckpt.rank_seed(seed, rank) for seed in (0, 1) for rank in (0, 1, 2)}
    assert len(seeds) == 6 and ckpt.rank_seed(1, 2) == ckpt.rank_seed(1, 2)


def test_an_fp16_runs_loss_scale_resumes_with_it(tmp_path, monkeypatch):
    """fp16 (CPU autocast here): the GradScaler's scale and growth count come back from the checkpoint."""
    train_doubles.install(monkeypatch)
    first = _run(train_doubles.tiny_config(tmp_path, precision="fp16", max_steps=3))
    resumed = Trainer(train_doubles.tiny_config(tmp_path, precision="fp16", max_steps=4), resume=True)
    resumed.setup()
    assert resumed.scaler.is_enabled() and resumed.scaler.state_dict() == first.scaler.state_dict()
    assert first.scaler.state_dict() != torch.amp.GradScaler("cpu").state_dict()  # the run moved it


def test_fp16_gradients_are_unscaled_before_they_are_clipped(tmp_path, monkeypatch):
    """fp16's GradScaler multiplies the loss by its scale: clipping (and the logged grad_norm) must see
    the gradients without that factor, as an fp32 run does. (A scale of 16: the default 2**16
    overflows this model's fp16 gradients in the first steps, which the scaler then skips.)"""
    train_doubles.install(monkeypatch)
    norms = {}
    for precision in ("fp32", "fp16"):
        trainer = Trainer(train_doubles.tiny_config(tmp_path / precision, precision=precision, max_steps=1, **{"optimizer.clip_grad": 0.5}))
        trainer.setup()
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=16.0, enabled=precision == "fp16")
        trainer.fit()
        norms[precision] = json.loads((tmp_path / precision / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.05) and norms["fp32"] > 0, norms


def test_resume_clears_temporaries_of_a_killed_write(tmp_path, monkeypatch):
    train_doubles.install(monkeypatch)
    _run(train_doubles.tiny_config(tmp_path, max_steps=3))
    stale = tmp_path / "checkpoints" / ".last.pt.abc.tmp"
    stale.write_bytes(b"half a checkpoint")
    trainer = _run(train_doubles.tiny_config(tmp_path, max_steps=5), resume=True)
    assert trainer.step == 5 and not stale.exists()


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    train_doubles.install(monkeypatch)
    config = train_doubles.tiny_config(tmp_path, checkpoint_every=2, method_options={"nan_at_call": 5})
    trainer = Trainer(config)
    trainer.setup()
    with pytest.raises(NonFiniteLossError, match=r"at step 6 .*last good checkpoint \(step 4\)"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    code = main(["--run-dir", str(tmp_path / "cli"), "--preset", "full", "--device", "cpu", "--batch-size", "4",
                 "--no-progress", "--set", "method_options.nan_at_call=0"])
    assert code == 4
    assert "non-finite loss (nan) at step 1 " in capsys.readouterr().err


def test_an_infinite_loss_stops_training_as_a_nan_does(tmp_path, monkeypatch):
    train_doubles.install(monkeypatch)
    forward = train_doubles.TinyMethod.forward

    def infinite_from_call_3(self, batch):
        out = forward(self, batch)
        return dict(out, loss=out["loss"] + (float("inf") if int(self.calls) >= 3 else 0.0))

    monkeypatch.setattr(train_doubles.TinyMethod, "forward", infinite_from_call_3)
    trainer = Trainer(train_doubles.tiny_config(tmp_path, checkpoint_every=2))
    trainer.setup()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(inf\) at step 3 .*last good checkpoint \(step 2\)"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2


def test_a_resumed_run_names_the_checkpoint_it_resumed_from_as_the_last_good(tmp_path, monkeypatch):
    """A NaN before the resumed run's first checkpoint names the one it resumed from, not "no
    checkpoint had been written yet"."""
    train_doubles.install(monkeypatch)
    _run(train_doubles.tiny_config(tmp_path, max_steps=3))
    trainer = Trainer(train_doubles.tiny_config(tmp_path, max_steps=5), resume=True)
    trainer.setup()
    trainer.method.nan_at_call = 0  # not a config key: the resumed run's first step is NaN
    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*last good checkpoint \(step 3\) is kept"):
        trainer.fit()


def test_a_non_finite_loss_between_log_rows_is_read_a_step_late_and_stops_before_the_next_checkpoint(tmp_path, monkeypatch):
    """Steps between log rows and checkpoints have their loss read once the next step is queued (no
    wait on the device a step); a NaN there still names its own step and never reaches a checkpoint."""
    train_doubles.install(monkeypatch)
    config = train_doubles.tiny_config(tmp_path, log_every=4, checkpoint_every=3, method_options={"nan_at_call": 4})
    trainer = Trainer(config)
    trainer.setup()
    events = []
    train_step, settle = trainer.train_step, trainer.settle
    monkeypatch.setattr(trainer, "train_step", lambda batch: (events.append(("step", trainer.step + 1)), train_step(batch))[1])
    monkeypatch.setattr(trainer, "settle", lambda readback: (events.append(("read", readback.step)), settle(readback))[1])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5 \(epoch 0\).*last good checkpoint \(step 3\)"):
        trainer.fit()
    # Steps counted from 1, as the rows count them. Steps 1 and 4 (rows) and 3 (a checkpoint) are read
    # at once, step 2 once step 3 is queued, step 5 (a NaN) once step 6 is, and the run stops
    # before step 6's checkpoint.
    assert events == [("step", 1), ("read", 1), ("step", 2), ("step", 3), ("read", 2), ("read", 3), ("step", 4), ("read", 4),
                      ("step", 5), ("step", 6), ("read", 5)]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3


def test_losses_read_a_step_late_are_the_losses_logged(tmp_path, monkeypatch):
    """Reading between rows a step late changes no figure: the rows of a run logging every 3 steps
    are the rows at those steps of the same run logging every step. Its max_steps lies beyond the
    run's 20 steps: the run still ends, and logs its last step, at the end of its last epoch."""
    train_doubles.install(monkeypatch)
    every = dict(_losses(_run(train_doubles.tiny_config(tmp_path / "every", log_every=1)).run_dir))
    sparse = _losses(_run(train_doubles.tiny_config(tmp_path / "sparse", log_every=3, max_steps=1000)).run_dir)
    assert len(sparse) >= 3 and all(every[step] == loss for step, loss in sparse), (sparse, every)
    assert [step for step, _ in sparse] == [1, 3, 6, 9, 12, 15, 18, 20]  # the first step, every third, the last


def test_a_checkpoint_that_cannot_be_written_mid_run_stops_training_and_keeps_the_last_good(tmp_path, monkeypatch, capsys):
    """A write that fails mid-run (the disk filled up since the start) is a message and exit code 3
    naming the checkpoint, the step and the last good checkpoint, which is left as it was."""
    train_doubles.install(monkeypatch)
    real_save = ckpt.save_checkpoint

    def fill_the_disk_at_step_4(state, path):
        if state["step"] == 4:
            raise OSError(28, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr(ckpt, "save_checkpoint", fill_the_disk_at_step_4)
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--preset", "full", "--device", "cpu", "--batch-size", "4", "--no-progress", "--checkpoint-every", "2"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "could not be written (OSError: [Errno 28] No space left on device)" in err and str(run_dir / "checkpoints" / "last.pt") in err
    assert "stopped after 4 steps" in err and "last good checkpoint (step 2)" in err
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2


def test_unwritable_run_dir_is_reported_before_training(tmp_path, monkeypatch, capsys):
    train_doubles.install(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = ["--preset", "full", "--device", "cpu", "--batch-size", "4", "--no-progress"]
    assert main(["--run-dir", str(blocker / "run")] + args) == 3
    assert "is not writable" in capsys.readouterr().err


def test_full_disk_is_reported_before_training(tmp_path, monkeypatch, capsys):
    train_doubles.install(monkeypatch)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 4096})())
    steps = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, batch: steps.append(1))
    args = ["--run-dir", str(tmp_path / "run"), "--preset", "full", "--device", "cpu", "--batch-size", "4", "--no-progress"]
    assert main(args) == 3
    assert "GiB free" in capsys.readouterr().err and not steps
    with pytest.raises(RunDirError, match="needs at least 1.00 GiB"):
        ckpt.check_run_dir(tmp_path / "other", needed_bytes=10, min_free_bytes=2**30)


def test_min_free_gb_is_the_free_space_demanded(tmp_path, monkeypatch):
    """min_free_gb counts GiB: with half a GiB free, 1 is refused and 0.25 accepted; without it the
    demand follows the state's size in bytes."""
    train_doubles.install(monkeypatch)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 2**29})())
    with pytest.raises(RunDirError, match="has 0.50 GiB free; this run needs at least 1.00 GiB"):
        Trainer(train_doubles.tiny_config(tmp_path / "a", min_free_gb=1)).setup()
    Trainer(train_doubles.tiny_config(tmp_path / "b", min_free_gb=0.25)).setup()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoints", "config.yaml"]  # the write probe removed
    assert ckpt.state_bytes(torch.nn.Linear(3, 2).double()) == 8 * 8  # the default demand counts bytes, not elements


def test_a_run_dir_that_is_a_file_is_reported_as_such(tmp_path, monkeypatch, capsys):
    train_doubles.install(monkeypatch)
    existing_file = tmp_path / "run"
    existing_file.write_text("not a directory")
    args = ["--preset", "full", "--device", "cpu", "--batch-size", "4", "--no-progress"]
    assert main(["--run-dir", str(existing_file)] + args) == 3
    err = capsys.readouterr().err
    assert f"{str(existing_file)!r} is a file, not a directory" in err and "File exists" not in err, err


@pytest.mark.parametrize("failure", ["full-disk", "run-dir-removed"])
def test_a_metrics_write_that_fails_mid_run_stops_training_naming_the_last_good_checkpoint(failure, tmp_path, monkeypatch, capsys):
    """Like a failed checkpoint write: a message and exit code 3, not a raw OSError traceback."""
    import shutil

    from fastdense.training.logs import MetricsLog

    train_doubles.install(monkeypatch)
    run_dir = tmp_path / "run"
    real_log = MetricsLog.log

    def fail_at_step_3(self, row):
        if row["step"] == 3:
            if failure == "full-disk":
                raise OSError(28, "No space left on device")
            shutil.rmtree(run_dir)
        real_log(self, row)

    monkeypatch.setattr(MetricsLog, "log", fail_at_step_3)
    args = ["--run-dir", str(run_dir), "--preset", "full", "--device", "cpu", "--batch-size", "4", "--no-progress",
            "--checkpoint-every", "2", "--set", "log_every=1"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"fastdense-train: the metrics in {str(run_dir)!r} could not be written (") and len(err.strip().splitlines()) == 1, err
    assert ("No space left on device" if failure == "full-disk" else "FileNotFoundError") in err
    assert "stopped after 3 steps" in err and "last good checkpoint (step 2)" in err


@pytest.mark.gpu
def test_a_non_finite_loss_on_cuda_is_read_a_step_late_and_stops_before_the_next_checkpoint(tmp_path, monkeypatch):
    """The CUDA form of the CPU test above: the pinned readback names the NaN's step, and the last
    good checkpoint stays."""
    train_doubles.install(monkeypatch)
    config = train_doubles.tiny_config(tmp_path, device="cuda", log_every=4, checkpoint_every=3, method_options={"nan_at_call": 4})
    trainer = Trainer(config)
    trainer.setup()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5 \(epoch 0\).*last good checkpoint \(step 3\)"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3


@pytest.mark.gpu
def test_a_cuda_loss_reaches_the_host_through_pinned_memory_behind_an_event():
    values = torch.tensor([1.5, 0.0], device="cuda") * torch.ones(2, device="cuda")
    readback = loop.LossReadback(7, 1, values)
    assert readback.host.is_pinned() and readback.done is not None
    assert readback.values() == [1.5, 0.0] and (readback.step, readback.epoch) == (7, 1)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_checkpoints_and_config_get_the_umasks_mode_like_every_other_run_file(tmp_path, umask):
    """A checkpoint another user of the group reads (an eval job) must not come out 0600, as
    tempfile.mkstemp's temporaries do; a replaced file takes the new write's mode."""
    previous = os.umask(umask)
    try:
        save_checkpoint({"step": 1}, tmp_path / "last.pt")
        save_checkpoint({"step": 2}, tmp_path / "last.pt")
        cfg.save({"seed": 0}, tmp_path / "config.yaml")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(("last.pt", "config.yaml", "plain.txt"), 0o666 & ~umask), modes
