"""Two gloo processes against one process: SyncBatchNorm on CPU, one training step of every method,
and a two-rank interrupted-then-resumed run.

Each test spawns a pair of processes (``torch.multiprocessing.spawn``; the resume test a second,
fresh pair to resume) and runs everything it needs inside it; rank 0 saves the results, and the
test process computes the single-process, full-batch reference. The method steps run in float64, so "equal" means equal to ~1e-10, far below
what any missing synchronisation (per-rank BatchNorm statistics, per-rank VICReg variance, a local
DINO centre, a per-rank box mean) would change.
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import train_doubles
from test_methods import tiny_resnet_like
from fastdense.geometry import crop_matrix
from fastdense.pipelines.batch import ViewBatch
from fastdense.training import CPUSyncBatchNorm, Trainer
from fastdense.training.distributed import shutdown
from fastdense.training.sync_batchnorm import convert
from fastdense.training import checkpoint as ckpt
from fastdense.training import config as cfg
from fastdense.training import loop

WORLD = 2


def _torchrun_env(rank, port):
    """The variables torchrun sets for each process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


# Ranks that wait in a collective another rank left (the failure these tests look for) would wait
# for gloo's 30 minute timeout: a spawn that runs past this fails instead.
SPAWN_LIMIT_S = 300


def _spawn(worker, *args):
    context = torch.multiprocessing.spawn(worker, args=(train_doubles.free_port(),) + args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_LIMIT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} ran past {SPAWN_LIMIT_S} s: a rank is waiting in a collective that another left")


def _rows(rank, n):
    per_rank = n // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _gather_objects(obj):
    pieces = [None] * WORLD
    dist.all_gather_object(pieces, obj)
    return pieces


def _all_gather_cat(x):
    return torch.cat(_gather_objects(x.detach()))


# --------------------------------------------------------------------------------- SyncBatchNorm

# (name, module, input shape, rows per rank, dtype, the input's mean): rank 1 of the third case holds
# no rows at all; the last case's float32 input has a mean 30 standard deviations from 0, where
# E[x^2] - E[x]^2 summed in float32 would lose the variance's leading digits (summed in float64, not).
BN_CASES = [
    ("bn2d_f64", lambda: nn.BatchNorm2d(5, momentum=0.3).double(), (8, 5, 3, 4), (4, 4), torch.float64, 5.0),
    ("bn2d_f32_cumulative", lambda: nn.BatchNorm2d(5, momentum=None), (8, 5, 3, 4), (4, 4), torch.float32, 5.0),
    ("bn1d_uneven_empty_rank", lambda: nn.BatchNorm1d(6).double(), (7, 6), (7, 0), torch.float64, 5.0),
    ("bn2d_f32_far_mean", lambda: nn.BatchNorm2d(5), (8, 5, 3, 4), (4, 4), torch.float32, 90.0),
]


def _bn_case(name, make, shape, dtype, mean):
    torch.manual_seed(sum(map(ord, name)))
    module = make()
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + mean).to(dtype)  # a mean far from 0
    upstream = [torch.randn(*shape, dtype=torch.float64).to(dtype) for _ in range(2)]
    return module, x, upstream


def _bn_steps(module, x, upstream):
    """Two training steps (the second sees the first's running statistics), then one in eval mode."""
    outs, input_grads, param_grads = [], [], []
    for g in upstream:
        x_step = x.clone().requires_grad_(True)
        module.zero_grad()
        y = module(x_step)
        (y * g).sum().backward()
        outs.append(y.detach())
        input_grads.append(x_step.grad)
        param_grads.append(torch.cat([module.weight.grad, module.bias.grad]))
    module.eval()
    with torch.no_grad():
        outs.append(module(x))
    module.train()
    stats = [module.running_mean.clone(), module.running_var.clone(), module.num_batches_tracked.clone()]
    return outs, input_grads, param_grads, stats


def sync_bn_worker(rank, port, out_path):
    _torchrun_env(rank, port)
    dist.init_process_group("gloo")
    results = {}
    for name, make, shape, split, dtype, mean in BN_CASES:
        module, x, upstream = _bn_case(name, make, shape, dtype, mean)
        module = convert(module)
        start = sum(split[:rank])
        rows = slice(start, start + split[rank])
        outs, input_grads, param_grads, stats = _bn_steps(module, x[rows], [g[rows] for g in upstream])
        for grad in param_grads:  # DDP's job: the objective is the sum of every rank's loss
            dist.all_reduce(grad)
        results[name] = ([_all_gather_cat(o) for o in outs], [_all_gather_cat(g) for g in input_grads], param_grads, stats)
    # One row over both ranks: no variance to normalise with; every rank refuses, as BatchNorm does.
    try:
        convert(nn.BatchNorm1d(3))(torch.randn(1 - rank, 3))
        refusal = None
    except ValueError as error:
        refusal = str(error)
    results["one_row"] = _gather_objects(refusal)
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    del module
    gc.collect()  # the modules hold the group: release it before leaving it (see distributed.shutdown)
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_full_batch_batchnorm(tmp_path):
    out_path = tmp_path / "bn.pt"
    _spawn(sync_bn_worker, str(out_path))
    synced = torch.load(out_path, weights_only=False)
    for rank, refusal in enumerate(synced["one_row"]):
        assert refusal and "Expected more than 1 value per channel when training over all ranks, got 1" in refusal, (rank, refusal)
    for name, make, shape, _, dtype, mean in BN_CASES:
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=2e-6)
        expected = _bn_steps(*_bn_case(name, make, shape, dtype, mean))
        for part, got, want in zip(("output", "input grad", "weight/bias grad", "running stats"), synced[name], expected):
            for step, (a, b) in enumerate(zip(got, want)):
                torch.testing.assert_close(a, b, **tol, msg=f"{name}: {part} {step}")


def test_shutdown_leaves_only_a_group_that_init_distributed_started(tmp_path):
    """fastdense-train ends the process group it joined (after collecting the trainers that hold
    it); a group its caller started stays the caller's."""
    from fastdense.training import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed.shutdown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    distributed._joined_here = True  # as init_distributed sets it when it starts the group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    distributed.shutdown()
    assert not dist.is_initialized() and not distributed._joined_here


@pytest.mark.parametrize("backend, exchanged_on", [("cpu:gloo,cuda:gloo", "cpu"), ("gloo", "cpu"), ("cuda:gloo", "meta")])
def test_host_known_numbers_travel_as_cpu_tensors_where_the_group_carries_them(tmp_path, backend, exchanged_on):
    """Row and box counts go through the group's CPU backend when it has one (no wait for queued
    GPU kernels when read back), else on the tensors' own device (NCCL alone; here "cuda:gloo")."""
    from fastdense.ops.vicreg_distributed import exchange_device

    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert exchange_device(dist.group.WORLD, torch.device("meta")) == torch.device(exchanged_on)
    finally:
        dist.destroy_process_group()


def test_fastdense_train_on_gpus_starts_a_group_with_a_cpu_backend(monkeypatch):
    from fastdense.training import distributed

    started = []
    monkeypatch.setenv("WORLD_SIZE", "4")  # the second machine's second process: rank 3, local rank 1
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: started.append(("device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: started.append(("backend", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(distributed, "_joined_here", False)
    assert distributed.init_distributed("cuda") == distributed.DistInfo(3, 4, 1)
    assert started == [("device", 1), ("backend", "cpu:gloo,cuda:nccl")]
    assert distributed._joined_here  # so shutdown() ends the group it started


def test_sync_batchnorm_is_plain_batchnorm_without_process_group():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    synced = convert(copy.deepcopy(plain))
    assert type(synced[1]) is CPUSyncBatchNorm
    x = torch.randn(3, 3, 5, 5)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    assert synced.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(synced[1].running_var, plain[1].running_var, rtol=0, atol=0)


# ------------------------------------------------------------------------ one step of each method

# SelfPatch's student uses drop-path: its per-image masks come from each process's random stream,
# so a split batch draws different (equally distributed) masks than the whole batch in one
# process. That is the only source of difference, so the exact statement is made without it.
METHOD_OPTIONS = {"scrl": {}, "vicregl": {}, "lewel": {}, "selfpatch": {"drop_path_rate": 0.0}}
VIEW_SIZES = {"scrl": [96, 96], "vicregl": [128, 128, 64, 64], "lewel": [96, 96], "selfpatch": [64, 64, 48, 48]}
BATCH = 8


def view_batch(sizes, seed, disjoint=()):
    """``BATCH`` images of float64 noise; random crops of a 256 px source, flipped at random. For the
    images in ``disjoint`` the two first views do not overlap (SCRL samples no boxes there)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    views = [torch.randn(BATCH, 3, s, s, generator=g, dtype=torch.float64) for s in sizes]
    x0, y0 = rand(BATCH, len(sizes)) * 60, rand(BATCH, len(sizes)) * 60
    width, height = 120 + rand(BATCH, len(sizes)) * 70, 120 + rand(BATCH, len(sizes)) * 70
    for b in disjoint:  # view 0 in the left half, view 1 in the right half
        width[b, :2], x0[b, 0], x0[b, 1] = 100.0, 10.0, 140.0
    flip = rand(BATCH, len(sizes)) < 0.5
    out = torch.tensor(sizes, dtype=torch.float64).expand(BATCH, -1)
    matrices = crop_matrix(x0, y0, width, height, out, out, flip=flip).float()
    return ViewBatch(views, matrices, torch.full((BATCH, 2), 256), torch.arange(100, 100 + BATCH))


def method_batches(method):
    sizes = VIEW_SIZES[method]
    if method == "scrl":  # 30 + 20 boxes over the two ranks, then 20 + 0
        return [view_batch(sizes, 1, disjoint=(1, 5, 6)), view_batch(sizes, 2, disjoint=(0, 2, 4, 5, 6, 7))]
    return [view_batch(sizes, 3)]


def shard(batch, rank):
    rows = _rows(rank, batch.batch_size)
    return ViewBatch([v[rows] for v in batch.views], batch.matrices[rows], batch.source_size[rows], batch.index[rows])


class _LengthOnlyLoader:
    """The trainer's schedules need ``len(loader)``; the tests feed batches to ``train_step`` directly."""

    def __len__(self):
        return 10


def _build_float64(config):
    from fastdense.methods import build_method

    return build_method(config["method"], **dict(config.get("method_options") or {})).double()


def _loader(config, method, rank, world_size, device):
    return _LengthOnlyLoader()


def _use_float64_methods(monkeypatch=None):
    """Float64 methods on their CPU presets, with test_methods' small ResNet-shaped trunk (BatchNorm
    in every stage) in place of ResNet-18, so that four methods train in seconds."""
    patches = [(loop, "build_method", _build_float64), (loop, "build_loader", _loader)]
    patches += [(importlib.import_module(f"fastdense.methods.{m}"), "build_backbone", tiny_resnet_like) for m in ("scrl", "vicregl", "lewel")]
    for module, name, value in patches:
        if monkeypatch is None:
            setattr(module, name, value)
        else:
            monkeypatch.setattr(module, name, value)


def method_config(method, run_dir, batch_size, sync_batchnorm=True):
    """Synchronised BatchNorm by default, so that N processes compute what one does on the whole
    batch (``auto`` follows the recipe: LEWEL's EMAN default keeps per-process statistics)."""
    options = {"preset": "cpu", **METHOD_OPTIONS[method]}
    return cfg.resolve(method, overrides={"run_dir": str(run_dir), "device": "cpu", "progress": False, "preset": "cpu",
                                          "batch_size": batch_size, "method_options": options, "sync_batchnorm": sync_batchnorm})


def run_steps(trainer, batches):
    """``train_step`` on each batch; the losses, the last step's gradients, the initial and the final state."""
    initial = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    losses, boxes = [], []
    for batch in batches:
        out = trainer.train_step(batch)
        losses.append(loop.distributed.all_reduce_mean(out["loss"].detach(), trainer.dist))
        if "boxes_per_image" in out:  # SCRL: boxes per rank
            boxes.append(loop.distributed.gather_objects(round(float(out["boxes_per_image"]) * batch.batch_size), trainer.dist))
        trainer.step += 1
    grads = {n: p.grad.clone() for n, p in trainer.method.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    return {"losses": losses, "boxes": boxes, "grads": grads, "initial": initial, "state": state}


def methods_worker(rank, port, run_dir, out_path):
    _torchrun_env(rank, port)
    _use_float64_methods()
    results = {}
    for method in METHOD_OPTIONS:
        trainer = Trainer(method_config(method, f"{run_dir}/{method}", BATCH // WORLD))
        trainer.setup()
        assert trainer.dist.world_size == WORLD
        synced = [type(m) for m in trainer.method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert all(t is CPUSyncBatchNorm for t in synced), f"{method}: {set(synced)}"
        results[method] = dict(run_steps(trainer, [shard(b, rank) for b in method_batches(method)]), num_bn=len(synced))
        recipe = Trainer(method_config(method, f"{run_dir}/{method}-auto", BATCH // WORLD, sync_batchnorm="auto"))
        recipe.setup()
        results[method]["auto_norms"] = {type(m).__name__ for m in recipe.method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    del trainer
    shutdown()


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory):
    pytest.importorskip("timm")
    tmp = tmp_path_factory.mktemp("ddp_methods")
    _spawn(methods_worker, str(tmp / "runs"), str(tmp / "out.pt"))
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_one_step_on_two_processes_equals_full_batch(method, two_process_steps, tmp_path, monkeypatch):
    _use_float64_methods(monkeypatch)
    trainer = Trainer(method_config(method, tmp_path, BATCH))
    trainer.setup()
    single = run_steps(trainer, method_batches(method))
    ddp = two_process_steps[method]
    assert (ddp["num_bn"] > 0) == (method != "selfpatch")
    # sync_batchnorm: auto follows the recipe: LEWEL's EMAN run keeps per-process BatchNorm (its
    # reference script passes no --norm SyncBN); SCRL and VICRegL synchronise.
    assert ddp["auto_norms"] == {"selfpatch": set(), "lewel": {"BatchNorm1d", "BatchNorm2d"}}.get(method, {"CPUSyncBatchNorm"})
    if method == "scrl":  # ranks with different numbers of boxes, and a rank with none
        assert ddp["boxes"] == [[30, 20], [20, 0]] and single["boxes"] == [[50], [20]]
    for step, (a, b) in enumerate(zip(ddp["losses"], single["losses"])):
        assert_relative(a, b, f"loss of step {step}")
    assert ddp["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        assert_relative(ddp["grads"][name], grad, f"gradient of {name}", tol=FLOAT32_INSIDE.get(name, 1e-10))
    assert ddp["state"].keys() == single["state"].keys()
    for name, value in single["state"].items():  # weights after the update, EMA targets, BN statistics, centres
        assert_relative(ddp["initial"][name], single["initial"][name], f"initial {name}")
        if name in FLOAT32_INSIDE:
            # its updates follow gradients held to float32 precision: what the steps changed, to that
            # precision (their error beside the whole weight sat at 1e-10 of it, machine-dependent)
            assert_relative(ddp["state"][name] - ddp["initial"][name], value - single["initial"][name], f"update of {name}", tol=FLOAT32_INSIDE[name])
        else:
            assert_relative(ddp["state"][name], value, name)


# timm resamples a ViT's position embedding to each view's grid in float32, even in a float64
# model, so the gradient reaching it is each process's partial sum rounded to float32 (relative
# 6e-8 here) rather than the whole batch's sum: the one tensor held to float32 precision.
FLOAT32_INSIDE = {"student.backbone.trunk.pos_embed": 1e-6}


def assert_relative(actual, expected, what, tol=1e-10, floor=1e-13):
    """``|actual - expected| <= tol |expected| + floor`` in the L2 norm (CONVENTIONS.md's measure;
    the floor covers float64 rounding noise in tensors that are zero in exact arithmetic, such as
    the gradient of a bias that a BatchNorm follows); integer buffers exactly."""
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    error, size = float((actual - expected).norm()), float(expected.norm())
    assert error <= tol * size + floor, f"{what}: error {error:.3g}, norm {size:.3g}"


# ------------------------------------------------------------------------- two-rank exact resume

STOP_AT = 7  # 5 steps per epoch and rank: the interrupted run stops inside the second epoch


class _StepClock:
    """The loop's ``time`` module in the whole run: a second passes in each training step and none
    elsewhere, so each row's images_per_s is the images one step trained on and its data_wait 0."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _recording(trainer, record, clock=None):
    """Wrap ``trainer.train_step`` to keep each step's batch indices, loss, per-rank metric and crop
    matrices (what the loader drew under the trainer's loader RNG); and advance ``clock`` a second."""
    step = trainer.train_step

    def train_step(batch):
        out = step(batch)
        record.append((batch.index.tolist(), out["loss"].detach().clone(), float(out["q_std"]), batch.matrices.clone()))
        if clock is not None:
            clock.now += 1.0
        return out

    trainer.train_step = train_step
    return trainer


def _resume_run(run_dir, record, resume=False, clock=None, **overrides):
    trainer = _recording(Trainer(train_doubles.tiny_config(run_dir, epochs=2, checkpoint_every=0, **overrides), resume=resume), record, clock)
    trainer.setup()
    rng_after_setup = ckpt.rng_state(include_cuda=False)
    trainer.fit()
    return trainer, rng_after_setup


def _final(trainer):
    opt = trainer.optimizer.state_dict()["state"]
    return {"model": trainer.method.state_dict(), "momentum": [opt[k]["momentum_buffer"] for k in sorted(opt)]}


def resume_worker(rank, port, root, phase):
    _torchrun_env(rank, port)
    train_doubles.install()
    out = {}
    if phase == "first":
        whole, interrupted = [], []
        real_time, loop.time = loop.time, _StepClock()
        try:
            out["whole_final"] = _final(_resume_run(f"{root}/whole", whole, clock=loop.time)[0])
        finally:
            loop.time = real_time
        trainer, _ = _resume_run(f"{root}/split", interrupted, max_steps=STOP_AT)
        assert trainer.step == STOP_AT
        out.update(whole=whole, interrupted=interrupted, rng_at_stop=ckpt.rng_state(include_cuda=False))
        out["non_finite"] = _non_finite_on_one_rank(f"{root}/nan", rank)
        out["metrics_failure"] = _metrics_write_fails_on_rank_0(f"{root}/disk", rank)
        out["metrics_log_failure"] = _metrics_write_fails_on_rank_0(f"{root}/disk-at-start", rank, "__init__", failing_call=1)
        out["metrics_close_failure"] = _metrics_write_fails_on_rank_0(f"{root}/disk-at-end", rank, "close", failing_call=1)
        out["metrics_save_failure"] = _metrics_write_fails_on_rank_0(f"{root}/disk-at-save", rank, failing_call=5, checkpoint_every=3)
        out["plot_failure"] = _plot_fails_on_rank_0(f"{root}/plot", rank)
    else:
        resumed = []
        trainer, rng = _resume_run(f"{root}/split", resumed, resume=True)
        out.update(resumed=resumed, rng_after_load=rng, resumed_final=_final(trainer), position=(trainer.epoch, trainer.step))
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, out)
    if rank == 0:
        torch.save(gathered, f"{root}/{phase}.pt")
    dist.barrier()
    del trainer
    shutdown()


def _non_finite_on_one_rank(run_dir, rank):
    """Rank 1's loss turns NaN in its fourth step (step 4, as rows count): every rank must stop there, none may wait."""
    trainer = Trainer(train_doubles.tiny_config(run_dir, epochs=2, checkpoint_every=2))
    trainer.setup()
    trainer.method.nan_at_call = 3 if rank == 1 else -1
    try:
        trainer.fit()
    except loop.NonFiniteLossError as error:
        return str(error)
    return None


def _metrics_write_fails_on_rank_0(run_dir, rank, name="log", failing_call=3, checkpoint_every=0):
    """Rank 0's ``failing_call``-th call of ``MetricsLog.<name>`` hits a full disk (``__init__``:
    creating the log, before the first step; ``log`` 3: the third row; ``log`` 5 with
    ``checkpoint_every`` 3: the row of the first epoch's last step, whose checkpoint follows at once;
    ``close``: after the last step): every rank must stop (the others were left waiting in the next
    step's collective or checkpoint, or finished as if nothing had failed), with the message of
    rank 0's failure there."""
    trainer = Trainer(train_doubles.tiny_config(run_dir, epochs=2, checkpoint_every=checkpoint_every))
    trainer.setup()
    original = getattr(loop.MetricsLog, name)
    if rank == 0:
        calls = [0]

        def write(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == failing_call:
                raise OSError(28, "No space left on device")
            return original(self, *args, **kwargs)

        setattr(loop.MetricsLog, name, write)
    try:
        trainer.fit()
    except ckpt.RunDirError as error:
        return str(error), trainer.step
    finally:
        setattr(loop.MetricsLog, name, original)
    return None


def _plot_fails_on_rank_0(run_dir, rank):
    """Rank 0's loss plot raises something other than an OSError (a plotting bug) after the last
    step: rank 0 raises it, and the other ranks, which wait in the run's last collective, stop too."""
    trainer = Trainer(train_doubles.tiny_config(run_dir, epochs=1, checkpoint_every=0))
    trainer.setup()
    original = loop.plot_loss

    def broken_plot(*args, **kwargs):
        raise ValueError("a plotting bug")

    if rank == 0:
        loop.plot_loss = broken_plot
    try:
        trainer.fit()
    except (ValueError, ckpt.RunDirError) as error:
        return type(error).__name__, str(error), trainer.step
    finally:
        loop.plot_loss = original
    return None


def _same_rng(a, b):
    return torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"] and all(
        (x == y).all() if hasattr(x, "shape") else x == y for x, y in zip(a["numpy"], b["numpy"]))


def test_two_rank_run_stopped_then_resumed_is_bit_identical_and_nan_stops_every_rank(tmp_path, monkeypatch):
    _spawn(resume_worker, str(tmp_path), "first")
    saved = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert saved["step"] == STOP_AT and saved["position"] == {"epoch": 1, "batch": 2} and saved["world_size"] == WORLD
    _spawn(resume_worker, str(tmp_path), "second")
    first = torch.load(tmp_path / "first.pt", weights_only=False)
    second = torch.load(tmp_path / "second.pt", weights_only=False)
    for rank in range(WORLD):
        assert "non-finite loss (nan) at step 4 " in first[rank]["non_finite"] and "(step 2)" in first[rank]["non_finite"], rank
    assert ckpt.load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")["step"] == 2
    failures = [first[rank]["metrics_failure"] for rank in range(WORLD)]
    assert all(f is not None and "the metrics in" in f[0] and "could not be written" in f[0] for f in failures), failures
    assert "No space left on device" in failures[0][0] and failures[0][1] == failures[1][1] == 4  # stopped together, a step later
    at_start = [first[rank]["metrics_log_failure"] for rank in range(WORLD)]  # the log could not even be made
    assert all(f is not None and "the metrics in" in f[0] for f in at_start) and "No space left on device" in at_start[0][0], at_start
    assert at_start[0][1] == at_start[1][1] == 1, at_start  # every rank stopped at the first step's collective
    at_end = [first[rank]["metrics_close_failure"] for rank in range(WORLD)]  # every step ran, then the log could not be closed
    assert all(f is not None and "the metrics in" in f[0] for f in at_end) and "No space left on device" in at_end[0][0], at_end
    assert at_end[0][1] == at_end[1][1] == 10, at_end
    # Row 5 failed; step 5's checkpoint came next: its collective stopped every rank at step 5 (not
    # the next step's loss read), and last.pt is still the last good one, step 3's.
    at_save = [first[rank]["metrics_save_failure"] for rank in range(WORLD)]
    assert all(f is not None and "the metrics in" in f[0] and "last good checkpoint (step 3)" in f[0] for f in at_save), at_save
    assert "No space left on device" in at_save[0][0] and at_save[0][1] == at_save[1][1] == 5, at_save
    assert ckpt.load_checkpoint(tmp_path / "disk-at-save" / "checkpoints" / "last.pt")["step"] == 3
    plot = [first[rank]["plot_failure"] for rank in range(WORLD)]  # not a write error, raised after the last collective
    assert plot[0][:2] == ("ValueError", "a plotting bug") and plot[1][0] == "RunDirError" and "on rank 0" in plot[1][1], plot
    assert plot[0][2] == plot[1][2] == 5, plot
    train_doubles.install(monkeypatch)
    alone = Trainer(train_doubles.tiny_config(tmp_path / "nan", epochs=2, max_steps=4), resume=True)
    with pytest.warns(UserWarning, match="written by 2 processes and this run has 1"):  # resumed by one process
        alone.setup()
    assert alone.step == 2 and alone.fit()["steps"] == 4
    rngs = saved["rng_per_rank"]
    assert not _same_rng(rngs[0], rngs[1]), "the ranks' random streams should differ"
    # Rank 0 logs each step's loss and the method's own metric (q_std) averaged over the ranks, and
    # the images per second of every rank (one step, of 4 images per rank, per second of _StepClock).
    logged = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(1, 11))
    assert [(row["images_per_s"], row["data_wait"]) for row in logged] == [(4.0 * WORLD, 0.0)] * 10
    for row in logged:
        per_rank = [first[rank]["whole"][row["step"] - 1] for rank in range(WORLD)]
        assert row["loss"] == pytest.approx(sum(float(loss) for _, loss, *_ in per_rank) / WORLD, rel=1e-6)
        assert row["q_std"] == pytest.approx(sum(q for _, _, q, _ in per_rank) / WORLD, rel=1e-12)
        assert per_rank[0][2] != per_rank[1][2]
    for rank in range(WORLD):
        mine, later = first[rank], second[rank]
        # Each rank's random state went into the checkpoint and came back to that rank.
        assert _same_rng(rngs[rank], mine["rng_at_stop"]), rank
        assert _same_rng(later["rng_after_load"], rngs[rank]), rank
        whole = mine["whole"]
        assert len(whole) == 10 and len(mine["interrupted"]) == STOP_AT and len(later["resumed"]) == 10 - STOP_AT
        # Loader position: the resumed rank continues with the batches the whole run saw next.
        split = mine["interrupted"] + later["resumed"]
        assert [indices for indices, *_ in split] == [indices for indices, *_ in whole], rank
        # Losses and final weights, bit for bit, on every rank.
        assert all(torch.equal(a, b) for (_, a, *_), (_, b, *_) in zip(split, whole)), rank
        assert later["position"] == (2, 10)
        final, expected = later["resumed_final"], mine["whole_final"]
        assert final["model"].keys() == expected["model"].keys()
        assert all(torch.equal(final["model"][k], expected["model"][k]) for k in expected["model"]), rank
        assert all(torch.equal(a, b) for a, b in zip(final["momentum"], expected["momentum"])), rank
        for other in range(rank + 1, WORLD):  # every step, the ranks trained on different images
            assert all(not set(a) & set(b) for (a, *_), (b, *_) in zip(whole, first[other]["whole"]))
            # and drew their own crops: the loader's seed has a rank term (without it both ranks
            # would crop their different images at the same places)
            same = [step for step, ((*_, a), (*_, b)) in enumerate(zip(whole, first[other]["whole"]), 1) if torch.equal(a, b)]
            assert not same, f"ranks {rank} and {other} drew the same crops at steps {same}"
