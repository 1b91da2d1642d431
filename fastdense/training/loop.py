"""The training loop: one process of a (possibly torchrun-launched) run, resumable step for step.

Determinism on resume rests on three things saved in every checkpoint: the global RNG states (for
the method: box sampling, dropout), a separate RNG state that the loader runs under (so iterating
the loader never moves the method's random stream and vice versa), and the loader position (epoch
and batches consumed). A resumed run re-creates the epoch's iterator from the same seed and skips
the consumed batches (without decoding them where the loader can start mid-epoch, ``start_at``:
the torch and ffcv backends; the dali backend continues from its own state instead, saved with each
mid-epoch checkpoint), then continues with every state exactly as the interrupted run had it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from fastdense.training import checkpoint as ckpt
from fastdense.training import config as cfg
from fastdense.training import distributed
from fastdense.training.logs import MetricsLog, plot_loss
from fastdense.training.optim import Schedule, build_optimizer, clip_each_gradient, scaled_lr


def config_changes(saved: Dict, config: Dict) -> List[Tuple[str, object, object]]:
    """``(key, saved value, new value)`` for every key, method options included, that differs between
    a checkpoint's config and ``config``, except :data:`fastdense.training.config.RESUMABLE_CHANGES`."""
    try:
        saved = cfg.validate(copy.deepcopy(saved))  # numbers written as text, as the run read them
    except ValueError:
        pass

    def flat(tree: Dict, prefix: str = "") -> Dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):  # an empty section holds no key
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    old, new = flat(saved), flat(config)
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in cfg.RESUMABLE_CHANGES and old.get(key) != new.get(key)]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without saving the bad state."""


class LossReadback:
    """A step's loss (and, with several processes, every rank's pending-failure flag) on its way to
    the host without the host waiting for the device: on CUDA a copy into pinned memory behind an
    event, so the host queues the next step while this one still runs; elsewhere the values as they
    are (a CPU step has finished when its loss exists)."""

    def __init__(self, step: int, epoch: int, values: torch.Tensor):
        self.step, self.epoch = step, epoch
        self.done = None
        if values.device.type == "cuda":
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(values.device))
        else:
            self.host = values

    def values(self) -> List[float]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


def build_method(config: Dict) -> nn.Module:
    from fastdense.methods import build_method as build

    return build(config["method"], **dict(config.get("method_options") or {}))


def build_loader(config: Dict, method: nn.Module, rank: int, world_size: int, device: torch.device):
    """The configured pipeline over ``config['data']`` (empty: the built-in dataset), sharded by rank."""
    from fastdense.pipelines import make_loader

    return make_loader(
        backend=config["backend"], data=str(config["data"]) if config.get("data") else None, recipe=method.recipe,
        batch_size=config["batch_size"], seed=config["seed"], shard_id=rank, num_shards=world_size,
        num_workers=config["num_workers"], device=device, photometric=config["photometric"],
    )


def describe_data(loader) -> Dict:
    """What an exact resume needs unchanged about the data: the loader's ``num_samples``, a
    ``fingerprint`` of its ``sample_names()`` (None where it names none, as a ``.beton`` file does,
    or where a loader provides neither) and ``steps_per_epoch``."""
    names = loader.sample_names() if hasattr(loader, "sample_names") else None
    fingerprint = hashlib.sha256("\n".join(names).encode()).hexdigest() if names is not None else None
    return {"num_samples": getattr(loader, "num_samples", None), "fingerprint": fingerprint, "steps_per_epoch": len(loader)}


def data_changes(saved: Optional[Dict], now: Dict, same_world_size: bool) -> Optional[str]:
    """How the data differs from the checkpoint's (``saved``, from :func:`describe_data`), or None.
    ``steps_per_epoch`` is compared only when the number of processes is unchanged (it is per process)."""
    def known(key):
        return saved.get(key) is not None and now.get(key) is not None

    if known("num_samples") and saved["num_samples"] != now["num_samples"]:
        return f"the data now holds {now['num_samples']} images, the checkpoint was trained on {saved['num_samples']}"
    if known("fingerprint") and saved["fingerprint"] != now["fingerprint"]:
        return (f"the data holds as many images ({now['num_samples']}) as the checkpoint was trained on, but not the same "
                "files (some were added, removed or renamed)")
    if same_world_size and known("steps_per_epoch") and saved["steps_per_epoch"] != now["steps_per_epoch"]:
        return f"an epoch is now {now['steps_per_epoch']} steps, the checkpoint's was {saved['steps_per_epoch']}"
    return None


class RngSandbox:
    """Private CPU RNG states (python, numpy, torch) for the loader; ``with sandbox:`` runs code on them.

    :meth:`reseed` at each epoch start makes the loader's random stream a function of (seed, rank,
    epoch) and the number of batches drawn, whatever the method did with the global RNG meanwhile.
    """

    def __init__(self):
        self.state = ckpt.rng_state(include_cuda=False)

    def reseed(self, seed: int) -> None:
        outside = ckpt.rng_state(include_cuda=False)
        ckpt.seed_everything(seed)
        self.state = ckpt.rng_state(include_cuda=False)
        ckpt.set_rng_state(outside)

    def __enter__(self):
        self._outside = ckpt.rng_state(include_cuda=False)
        ckpt.set_rng_state(self.state)

    def __exit__(self, *exc):
        self.state = ckpt.rng_state(include_cuda=False)
        ckpt.set_rng_state(self._outside)


def _to_device(batch, device: torch.device, channels_last: bool):
    batch = batch.to(device, non_blocking=True) if hasattr(batch, "to") else batch
    if channels_last and hasattr(batch, "views"):
        batch.views = [v.contiguous(memory_format=torch.channels_last) for v in batch.views]
    return batch


class Prefetcher:
    """Fetches batches from ``iterator`` under the loader's RNG and moves them to the device; on a GPU
    the copy runs on a side stream, so fetching batch k+1 overlaps the queued kernels of step k.
    ``prepare(batch, step)`` (a method's :meth:`~fastdense.methods.base.Method.prepare`) runs on each
    fetched batch, so its host work overlaps them too."""

    def __init__(self, iterator: Iterator, device: torch.device, channels_last: bool, sandbox: RngSandbox, prepare=None):
        self.iterator, self.device, self.channels_last, self.sandbox = iterator, device, channels_last, sandbox
        self.prepare = prepare
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fetch(self, step: int = 0):
        """``(batch for training step `step` or None at the end, seconds spent on it: blocked in the
        loader and preparing it)``."""
        start = time.perf_counter()
        with self.sandbox:
            batch = next(self.iterator, None)
        if batch is None:
            return None, time.perf_counter() - start
        if self.stream is None:
            batch = _to_device(batch, self.device, self.channels_last)
        else:
            with torch.cuda.stream(self.stream):
                batch = _to_device(batch, self.device, self.channels_last)
        if self.prepare is not None:
            self.prepare(batch, step)
        return batch, time.perf_counter() - start

    def ready(self, batch):
        """Make the compute stream wait for ``batch``'s copy before it is used."""
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for view in getattr(batch, "views", []):
                view.record_stream(current)
        return batch


class Trainer:
    """Runs ``config`` (see :mod:`fastdense.training.config`) in this process."""

    def __init__(self, config: Dict, resume: bool = False):
        self.config = config
        self.resume = resume
        pref = config["device"]
        if pref == "auto":
            pref = "cuda" if torch.cuda.is_available() else "cpu"
        if pref == "cuda" and not torch.cuda.is_available():
            raise ValueError("device is cuda but torch sees no CUDA device here; use --device cpu (or auto)")
        self.dist = distributed.init_distributed(pref)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if pref == "cuda" else pref)
        precision = config["precision"]
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
        self.run_dir = Path(config["run_dir"])
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"

    # -- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        config, device = self.config, self.device
        resumed = self.check_resume()
        ckpt.seed_everything(config["seed"])
        method = build_method(config).to(device)
        sync_bn = config["sync_batchnorm"]
        synced = self.dist.enabled and (sync_bn is True or (sync_bn == "auto" and method.synchronises_batchnorm))
        min_batch = getattr(method, "min_batch_size", 1)
        # Synchronised BatchNorm (and VICRegL's gathered variance) take their statistics over every process's images.
        if config["batch_size"] * (self.dist.world_size if synced else 1) < min_batch:
            per = "images across its processes" if synced else "images per process"
            raise ValueError(
                f"batch_size {config['batch_size']} is too small for {config['method']}: it trains on at least "
                f"{min_batch} {per} (its batch statistics need more than one); set --batch-size {min_batch} or more"
            )
        channels_last = config["channels_last"]
        is_cnn = getattr(getattr(method, "backbone", None), "kind", "resnet") != "vit"
        self.channels_last = (device.type == "cuda" and is_cnn) if channels_last == "auto" else bool(channels_last)
        if self.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if synced or sync_bn is True:
            method = distributed.convert_sync_batchnorm(method, device)
        self.method = method
        if self.dist.enabled:
            # Every rank built the same weights from `seed`; from here on each rank draws its own
            # stream (drop-path masks and the like), as one process does for different images.
            ckpt.seed_everything(ckpt.rank_seed(config["seed"], self.dist.rank))
        self.loader = build_loader(config, method, self.dist.rank, self.dist.world_size, device)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the loader yields no batch per epoch: the dataset is smaller than batch_size x world size")
        self.data = describe_data(self.loader)
        if resumed is not None:
            self.check_resume_data(resumed)
        self.total_steps = config["epochs"] * self.steps_per_epoch
        self.global_batch = config["batch_size"] * self.dist.world_size
        opt_cfg = config["optimizer"]
        self.optimizer = build_optimizer(method, opt_cfg, self.global_batch)
        base_lr = self.optimizer.param_groups[0]["base_lr"]
        self.schedule = Schedule(
            self.optimizer, self.total_steps, round(opt_cfg["warmup_epochs"] * self.steps_per_epoch),
            lr=base_lr, min_lr=scaled_lr(opt_cfg["min_lr"], self.global_batch, opt_cfg["lr_batch"]) if opt_cfg["scale_min_lr"] else opt_cfg["min_lr"],
            weight_decay=opt_cfg["weight_decay"], weight_decay_end=opt_cfg["weight_decay_end"],
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.loader_rng = RngSandbox()
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        # Loaders whose random streams run on from batch to batch (dali) continue a pass from their
        # own state: taken at each mid-epoch checkpoint, restored on resume.
        self.loader_state: Optional[Dict] = None
        self.loader_resume: Optional[Dict] = None
        self.last_good: Optional[int] = None
        self.pending_failure: Optional[ckpt.RunDirError] = None  # a failed metrics write, raised at the next collective
        refusal = None
        if self.dist.is_main:
            try:
                self.prepare_run_dir()
            except ckpt.RunDirError as e:
                refusal = str(e)
            except OSError as e:
                refusal = f"run directory {str(self.run_dir)!r} cannot be prepared: {e}"
        # Rank 0 alone writes the run directory; every rank stops when it cannot, rather than
        # the others failing in (or, with NCCL, waiting at) their next collective.
        refusal = distributed.gather_objects(refusal, self.dist)[0]
        if refusal:
            raise ckpt.RunDirError(refusal)
        if resumed is not None:
            self.load(resumed)
        self.model = method
        if self.dist.enabled:
            self.model = distributed.wrap_ddp(method, device, bool(config.get("ddp_find_unused_parameters", True)))
        if config["compile"]:
            self.model = torch.compile(self.model)

    def prepare_run_dir(self) -> None:
        """Probe the run directory (writable, enough free disk), clear what a killed checkpoint write
        left, and save the resolved config."""
        # Checkpoint = weights + optimiser state (about 3x the state dict); the old one and the
        # temporary copy coexist while a new one is written.
        needed = 2 * 3 * ckpt.state_bytes(self.method) + (1 << 20)
        free_gb = self.config.get("min_free_gb")
        ckpt.check_run_dir(self.run_dir, needed, None if free_gb is None else free_gb * 2**30)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        for stale in (self.run_dir / "checkpoints").glob(".*.tmp"):  # left by a run killed mid-write
            stale.unlink()
        cfg.save(self.config, self.run_dir / "config.yaml")

    def check_resume(self) -> Optional[Dict]:
        """The checkpoint to continue from (None for a new run), read and checked before any work:
        ``--resume`` needs a readable checkpoint written under the same config, and a new run must
        not overwrite another run's checkpoint."""
        path = self.checkpoint_path
        if not self.resume:
            if path.exists():
                raise ckpt.RunDirError(
                    f"run directory {str(self.run_dir)!r} already holds a checkpoint ({path}); pass --resume to "
                    "continue that run, or choose another --run-dir"
                )
            return None
        if not path.exists():
            raise ckpt.CheckpointError(
                f"--resume: there is no checkpoint {str(path)!r} to continue from (wrong --run-dir, or the run "
                "stopped before its first checkpoint); run without --resume to start"
            )
        state = ckpt.load_training_checkpoint(path, map_location="cpu")
        changed = config_changes(state["config"], self.config)
        if changed:
            raise ValueError(
                f"--resume: the config differs from the one {str(path)!r} was trained with, in "
                + ", ".join(f"{key} ({old!r} -> {new!r})" for key, old, new in changed)
                + "; an exact continuation needs the same settings (schedules span all epochs), so set them back "
                "or start a new --run-dir. Only " + ", ".join(cfg.RESUMABLE_CHANGES) + " may change on resume"
            )
        return state

    def check_resume_data(self, state: Dict) -> None:
        """Refuse to resume on data other than the checkpoint's: the schedules' length, the EMA
        momentum and each epoch's order all follow from the number of samples."""
        saved = state.get("data")
        if saved is None:  # written before checkpoints recorded their data
            warnings.warn(f"{str(self.checkpoint_path)!r} does not record the data it was trained on; "
                          "resuming without checking that the data is unchanged")
            return
        changed = data_changes(saved, self.data, same_world_size=state.get("world_size") == self.dist.world_size)
        if changed:
            raise ValueError(
                f"--resume: {changed} ({str(self.checkpoint_path)!r}); an exact continuation needs the same data "
                "(the learning-rate schedule, the EMA momentum and each epoch's order depend on it), so restore it "
                "or start a new --run-dir"
            )

    def state(self) -> Dict:
        rngs = distributed.gather_objects(ckpt.rng_state(), self.dist)
        return {
            "format": 1,
            "step": self.step,
            "position": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng_per_rank": rngs,
            "loader_per_rank": distributed.gather_objects(self.loader_state if self.batch_in_epoch else None, self.dist),
            "world_size": self.dist.world_size,
            "data": self.data,
            "config": self.config,
        }

    def load(self, state: Dict) -> None:
        self.method.load_state_dict(state["model"])
        saved = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
        now = [len(group["params"]) for group in self.optimizer.param_groups]
        if saved != now:
            raise ckpt.CheckpointError(
                f"the checkpoint's optimiser groups hold {saved} parameters (weight-decayed, exempt) where this "
                f"version of {self.config['method']} puts {now}: which parameters get weight decay changed since "
                "the run started, so it cannot continue exactly; start a new run"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        self.step = state["step"]
        self.epoch, self.batch_in_epoch = state["position"]["epoch"], state["position"]["batch"]
        rngs = state["rng_per_rank"]
        if len(rngs) == self.dist.world_size:
            ckpt.set_rng_state(rngs[self.dist.rank])
            self.loader_resume = state.get("loader_per_rank", [None] * len(rngs))[self.dist.rank]
        else:
            # Shards and per-rank streams cannot continue exactly; give each rank a fresh stream of
            # its own rather than one rank's stream to all.
            warnings.warn(
                f"the checkpoint was written by {len(rngs)} processes and this run has {self.dist.world_size}: "
                "training continues from the checkpoint's weights, step and epoch, but not bit-exactly"
            )
            ckpt.seed_everything(ckpt.rank_seed(self.config["seed"] + self.step, self.dist.rank))
        self.last_good = self.step

    def save(self) -> None:
        """Rank 0 writes the checkpoint; every rank returns once it is on disk, so that nothing a rank
        does next (a resume, an evaluation of ``last.pt``) can read the one before. A write that
        fails (a full disk, say) stops every rank together with a :class:`RunDirError`, rather than
        leaving the others waiting in their next collective."""
        self.check_state_finite()
        state = self.state()  # every rank joins the RNG gather
        failure = None
        # Not over a pending metrics failure (this step's row is missing: resumed from here, it would
        # stay missing): last.pt stays the last good checkpoint that the error below names.
        if self.dist.is_main and self.pending_failure is None:
            try:
                ckpt.save_checkpoint(state, self.checkpoint_path)
            except OSError as e:
                failure = e
        if self.dist.enabled:  # the wait for rank 0's write, and its outcome (and a pending metrics failure), in one collective
            flags = torch.tensor([float(failure is not None), float(self.pending_failure is not None)], device=self.device)
            failed, pending = distributed.all_reduce_mean(flags, self.dist).tolist()
            failed_somewhere = failed > 0
            if not failed_somewhere:
                self._raise_pending(pending > 0)
        else:
            failed_somewhere = failure is not None
        if failed_somewhere:
            reason = f"{type(failure).__name__}: {failure}" if failure is not None else "on rank 0"
            raise self.write_failure(f"the checkpoint {str(self.checkpoint_path)!r}", reason)
        self.last_good = self.step

    def write_failure(self, what: str, reason: str) -> ckpt.RunDirError:
        return ckpt.RunDirError(f"{what} could not be written ({reason}); training stopped after {self.step} steps; "
                                f"{self.last_good_note()}")

    def write_metrics(self, write, deferred: bool = False):
        """``write()`` (a metrics, TensorBoard or plot write by rank 0); a full disk or a run directory
        removed mid-run stops training as a failed checkpoint write does, naming the last good one.
        ``deferred`` (writes inside the loop): with several processes the failure is kept and raised
        on every rank together after the next collective they all make (:meth:`read_loss`, read by
        :meth:`settle`; :meth:`save`), so the others are not left waiting in it."""
        try:
            return write()
        except OSError as e:
            failure = self.write_failure(f"the metrics in {str(self.run_dir)!r}", f"{type(e).__name__}: {e}")
            if deferred and self.dist.enabled:
                self.pending_failure = self.pending_failure or failure
                return None
            raise failure from e

    def _raise_pending(self, pending_somewhere: bool) -> None:
        """After a collective that carried every rank's pending-failure flag: raise on every rank together."""
        if pending_somewhere:
            raise self.pending_failure or self.write_failure(f"the metrics in {str(self.run_dir)!r}", "on rank 0")

    # -- the loop ------------------------------------------------------------------------------
    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, batch) -> Dict[str, torch.Tensor]:
        """One optimisation step on ``batch`` (already on the device); returns the method's outputs."""
        self.method.train()
        hyper = self.schedule.apply(self.step)
        with self.autocast():
            out = self.model(batch)
        loss = out["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.config["optimizer"]["clip_grad"]
        if clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.method.parameters() if p.grad is not None]
            clip_grad = clip_each_gradient if self.config["optimizer"].get("clip_grad_per_parameter") else torch.nn.utils.clip_grad_norm_
            out = dict(out, grad_norm=clip_grad(params, clip))
        for param in self.method.frozen_parameters(self.epoch):  # after clipping, as DINO cancels them
            param.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.update_target(self.step, self.total_steps)
        # The same on every rank (the loss is averaged in read_loss); the method's other outputs
        # are per rank, and averaged over ranks when logged.
        self.shared_outputs = {"loss", "grad_norm", *hyper}
        # float64, so metrics show the schedules' values, not their float32 roundings.
        return dict(out, **{k: torch.tensor(v, dtype=torch.float64) for k, v in hyper.items()})

    def logged_outputs(self, out: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """The step's scalar outputs besides the loss; the method's own ones averaged over ranks
        (a collective: every rank calls this at the same steps)."""
        scalars = {k: v for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}
        per_rank = sorted(k for k in scalars if k not in self.shared_outputs)
        values = {k: float(v.detach()) for k, v in scalars.items() if k in self.shared_outputs}
        if per_rank:
            stacked = torch.stack([scalars[k].detach().to(out["loss"].device, torch.float64).reshape(()) for k in per_rank])
            values.update(zip(per_rank, distributed.all_reduce_mean(stacked, self.dist).tolist()))
        return values

    def read_loss(self, step: int, out: Dict[str, torch.Tensor]) -> LossReadback:
        """Starts the loss of step ``step`` (counted from 1, as metrics rows and checkpoints count
        steps) over the global batch (the mean of every rank's) on its way to the host, with any
        rank's pending metrics-write failure in the same collective; nothing waits for the device
        until :meth:`settle`."""
        values = out["loss"].detach().float().reshape(1)
        if self.dist.enabled:  # new_full: a fill on the device; a tensor made from a host float would wait for the stream
            values = distributed.all_reduce_mean(torch.cat([values, values.new_full((1,), float(self.pending_failure is not None))]), self.dist)
        return LossReadback(step, self.epoch, values)

    def settle(self, readback: LossReadback) -> float:
        """The loss of :meth:`read_loss`; raises on every rank together when it is not finite (or a
        rank's metrics write failed), so no rank is left waiting in a collective."""
        values = readback.values()
        if self.dist.enabled:
            self._raise_pending(values[1] > 0)
        if not math.isfinite(values[0]):
            raise NonFiniteLossError(
                f"non-finite loss ({values[0]}) at step {readback.step} (epoch {readback.epoch}); training stopped; {self.last_good_note()}"
            )
        return values[0]

    def check_state_finite(self) -> None:
        """Before a checkpoint: raise on every rank together when a weight or buffer is NaN or
        infinite (an overflowing gradient can do that while the loss is still finite), so the last
        good checkpoint is never replaced by a broken one."""
        tensors = {name: t for name, t in self.method.state_dict().items() if t.is_floating_point()}
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).cpu() if tensors else torch.ones(0)  # one device sync
        broken = [name for name, ok in zip(tensors, finite.tolist()) if not ok]
        flag = torch.tensor(float(bool(broken)), device=self.device)
        if float(distributed.all_reduce_mean(flag, self.dist)) > 0:
            which = f" ({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''})" if broken else " on another rank"
            raise NonFiniteLossError(
                f"non-finite weights or buffers{which} after {self.step} steps; training "
                f"stopped; {self.last_good_note()}"
            )

    def finished(self) -> bool:
        """Whether :meth:`fit` has nothing left to do: its end step or its last epoch reached (a run
        resumed on another number of processes reaches one without the other)."""
        return self.step >= self.end_step() or self.epoch >= self.config["epochs"]

    def end_step(self) -> int:
        """The step this run stops at: its last epoch's end, or max_steps when that comes first."""
        return min(self.config.get("max_steps") or self.total_steps, self.total_steps)

    def last_good_note(self) -> str:
        if self.last_good is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint (step {self.last_good}) is kept at {self.checkpoint_path}"

    def fit(self) -> Dict:
        config = self.config
        main = self.dist.is_main
        end_step = self.end_step()
        # deferred: with several processes a failure here too stops every rank at the first step's collective.
        log = self.write_metrics(lambda: MetricsLog(self.run_dir, resume_step=self.step if self.step else None), deferred=True) if main else None
        bar = None
        if main and config["progress"]:
            from tqdm.auto import tqdm

            bar = tqdm(total=end_step, initial=self.step, desc=f"{config['method']}", unit="step", dynamic_ncols=True)
        window = {"wait": 0.0, "time": 0.0, "images": 0}
        started, first_step = time.perf_counter(), self.step
        try:
            while self.step < end_step and self.epoch < config["epochs"]:
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                skip = self.batch_in_epoch
                self.loader_rng.reseed(self.config["seed"] + 1_000_003 * self.epoch + 7919 * self.dist.rank)
                resume, self.loader_resume = self.loader_resume, None
                if skip and hasattr(self.loader, "start_at"):
                    self.loader.start_at(skip)  # the consumed batches are not decoded again
                    skip = 0
                elif skip and resume and resume.get("epoch") == self.epoch and resume.get("batch") == skip and hasattr(self.loader, "resume_from"):
                    self.loader.resume_from(resume)  # nor here: the loader continues from its own state
                    skip = 0
                with self.loader_rng:
                    iterator = iter(self.loader)
                    for _ in range(skip):
                        next(iterator)
                prefetcher = Prefetcher(iterator, self.device, self.channels_last, self.loader_rng, prepare=self.method.prepare)
                tick = time.perf_counter()
                batch, waited = prefetcher.fetch(self.step)
                last = False
                # The loss of a step between log rows and checkpoints is read one step late: the host
                # queues step k+1 before it waits for step k's loss, so the device never idles on
                # the read. Nothing is lost by the wait: a non-finite loss still stops the run before
                # any checkpoint, naming its own step.
                unread = None
                while batch is not None and not last:
                    out = self.train_step(prefetcher.ready(batch))
                    images = batch.batch_size * self.dist.world_size
                    self.step += 1
                    self.batch_in_epoch += 1
                    last = self.step >= end_step
                    epoch_done = self.batch_in_epoch >= self.steps_per_epoch
                    save_mid_epoch = not epoch_done and (last or (config["checkpoint_every"] and self.step % config["checkpoint_every"] == 0))
                    if save_mid_epoch and hasattr(self.loader, "resume_state"):
                        self.loader_state = self.loader.resume_state()  # before the next fetch moves it on
                    # Fetch the next batch while the device still works on this step.
                    batch, next_wait = (None, 0.0) if (last or epoch_done) else prefetcher.fetch(self.step)
                    readback = self.read_loss(self.step, out)
                    if unread is not None:
                        self.settle(unread)
                    unread = readback
                    log_now = self.step % config["log_every"] == 0 or last or self.step == 1
                    if log_now or epoch_done or save_mid_epoch:  # a row needs the loss; a checkpoint a finite one
                        loss, unread = self.settle(unread), None
                    now = time.perf_counter()
                    window["wait"] += waited
                    window["time"] += now - tick
                    window["images"] += images
                    tick, waited = now, next_wait
                    logged = self.logged_outputs(out) if log_now else {}
                    if main and log_now:
                        row = {"step": self.step, "epoch": self.epoch, "loss": loss}
                        row.update(logged)
                        row["images_per_s"] = window["images"] / max(window["time"], 1e-9)
                        row["data_wait"] = window["wait"] / max(window["time"], 1e-9)
                        if log is not None:  # None: its creation failed, and every rank stops at this step's collective
                            self.write_metrics(lambda: log.log(row), deferred=True)
                        window = {"wait": 0.0, "time": 0.0, "images": 0}
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{row['images_per_s']:.1f}", wait=f"{row['data_wait']:.0%}")
                    if bar is not None:
                        bar.update(1)
                    if epoch_done:
                        self.epoch += 1
                        self.batch_in_epoch = 0
                        self.save()
                    elif save_mid_epoch:
                        self.save()
                if unread is not None:  # the loader ran out after a step not yet read
                    self.settle(unread)
                if self.batch_in_epoch and not last:
                    # The loader ran out before len(loader) batches (a shorter shard): the epoch is over.
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.save()
        except BaseException:
            # Closing must not replace the error already stopping the run (a non-finite loss, Ctrl-C).
            if bar is not None:
                bar.close()
            if log is not None:
                with contextlib.suppress(OSError):
                    log.close()
            raise
        if bar is not None:
            bar.close()
        rows = plot = failure = None
        try:
            if log is not None:
                self.write_metrics(log.close, deferred=True)
                if self.pending_failure is None:
                    rows = self.write_metrics(lambda: MetricsLog.read(self.run_dir / "metrics.jsonl"), deferred=True)
                if rows is not None:
                    plot = self.write_metrics(lambda: plot_loss(rows, self.run_dir / "loss.png", title=f"{config['method']} training loss"), deferred=True)
        except Exception as error:  # not a write (a plotting bug): still raised after the collective below, not before it
            if not self.dist.enabled:
                raise
            failure = error
        if self.dist.enabled:  # a last collective, so that a write failed since the previous one stops every rank
            flag = torch.tensor(float(self.pending_failure is not None or failure is not None), device=self.device)
            failed_somewhere = float(distributed.all_reduce_mean(flag, self.dist)) > 0
            if failure is not None:
                raise failure
            self._raise_pending(failed_somewhere)
        summary = {"steps": self.step, "first_step": first_step, "epochs": self.epoch, "seconds": time.perf_counter() - started}
        rows = [row for row in rows or () if row["step"] > first_step]  # this run's rows, not those of the run it resumed
        if main:
            summary.update(
                run_dir=str(self.run_dir), checkpoint=str(self.checkpoint_path), config=str(self.run_dir / "config.yaml"),
                metrics_csv=str(self.run_dir / "metrics.csv"), metrics_jsonl=str(self.run_dir / "metrics.jsonl"),
                loss_curve=str(plot) if plot else None,
                tensorboard=str(self.run_dir / "tensorboard") if (self.run_dir / "tensorboard").exists() else None,
                first_loss=rows[0]["loss"] if rows else None, last_loss=rows[-1]["loss"] if rows else None,
            )
        return summary
