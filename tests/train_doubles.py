"""Small stand-ins for a method and a loader, so the trainer's tests need neither real backbones nor
image decoding. ``python3 tests/train_doubles.py ARGS`` runs ``fastdense-train ARGS`` with them."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastdense.methods.base import Method  # noqa: E402
from fastdense.pipelines.batch import ViewBatch  # noqa: E402


class TinyBackbone(nn.Module):
    kind = "resnet"
    out_channels = 8
    stride = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class TinyMethod(Method):
    """BYOL in miniature: online trunk + projector + predictor, an EMA target, a cosine loss on
    randomly sampled cells (random so that the tests see whether the global RNG is restored).

    ``nan_at_call``: from that forward call on, the loss is NaN (for the non-finite test).
    ``sleep``: seconds to sleep per forward (so a subprocess can be killed mid-run).
    """

    name = "tiny"
    recipe = "scrl"

    def __init__(self, nan_at_call: int = -1, sleep: float = 0.0, cells: int = 6, preset: str = "full"):
        super().__init__()
        self.backbone = TinyBackbone()
        self.projector = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.predictor = nn.Linear(8, 8)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.nan_at_call, self.sleep, self.cells = nan_at_call, sleep, cells

    def embed(self, backbone, projector, view):
        fmap = backbone(view).flatten(2).transpose(1, 2)  # [B, HW, C]
        pick = torch.randint(0, fmap.shape[1], (self.cells,))
        return projector(fmap[:, pick])

    def forward(self, batch):
        if self.sleep:
            import time

            time.sleep(self.sleep)
        self.calls += 1
        v1, v2 = batch.views[0], batch.views[1]
        q1 = self.predictor(self.embed(self.backbone, self.projector, v1))
        with torch.no_grad():
            z2 = self.embed(self.target_backbone, self.target_projector, v2)
        loss = (2 - 2 * nn.functional.cosine_similarity(q1, z2, dim=-1)).mean()
        if self.nan_at_call >= 0 and int(self.calls) > self.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss, "q_std": q1.detach().std()}

    @torch.no_grad()
    def update_target(self, step, total_steps):
        m = 0.9
        for online, target in ((self.backbone, self.target_backbone), (self.projector, self.target_projector)):
            for p, t in zip(online.parameters(), target.parameters()):
                t.mul_(m).add_(p, alpha=1 - m)


class TinyLoader:
    """``num_images`` fixed random images; each epoch a seeded permutation of this shard's images;
    two 16 px random crops per image drawn from the *global* torch RNG (as a careless loader would)."""

    def __init__(self, num_images=40, batch_size=4, seed=0, shard_id=0, num_shards=1, size=24, **_):
        generator = torch.Generator().manual_seed(1234)
        self.images = torch.rand(num_images, 3, size, size, generator=generator)
        self.indices = list(range(shard_id, num_images, num_shards))
        self.batch_size, self.seed, self.epoch, self.size = batch_size, seed, 0, size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.indices) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for b in range(len(self)):
            idx = torch.tensor([self.indices[i] for i in order[b * self.batch_size:(b + 1) * self.batch_size]])
            views, mats = [], []
            for _ in range(2):
                x0, y0 = torch.randint(0, self.size - 16 + 1, (2,)).tolist()
                views.append(self.images[idx, :, y0:y0 + 16, x0:x0 + 16])
                mats.append(torch.tensor([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1.0]]).expand(len(idx), 3, 3))
            yield ViewBatch(
                views=views, matrices=torch.stack(mats, 1), source_size=torch.full((len(idx), 2), self.size),
                index=idx,
            )


def install(monkeypatch=None, **loader_kw):
    """Route the trainer's method and loader builders to the doubles."""
    from fastdense.training import loop

    def method(config):
        return TinyMethod(**dict(config.get("method_options") or {}))

    def loader(config, method, rank, world_size, device):
        return TinyLoader(batch_size=config["batch_size"], seed=config["seed"], shard_id=rank, num_shards=world_size, **loader_kw)

    if monkeypatch is not None:
        monkeypatch.setattr(loop, "build_method", method)
        monkeypatch.setattr(loop, "build_loader", loader)
    else:
        loop.build_method, loop.build_loader = method, loader


def fixed_batch(batch_size=8, size=16, seed=99):
    """A batch whose content depends only on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.rand(batch_size, 3, size, size, generator=g) for _ in range(2)]
    eye = torch.eye(3).expand(batch_size, 2, 3, 3).clone()
    return ViewBatch(views=views, matrices=eye, source_size=torch.full((batch_size, 2), size), index=torch.arange(batch_size))


def free_port() -> int:
    """A TCP port that was free a moment ago, for MASTER_PORT."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(run_dir, **overrides):
    """A resolved config for the doubles (the scrl YAML underneath, CPU, no progress bar)."""
    from fastdense.training import config as cfg

    base = {"run_dir": str(run_dir), "device": "cpu", "progress": False, "batch_size": 4, "epochs": 2,
            "log_every": 1, "checkpoint_every": 3, "preset": "full", "optimizer.warmup_epochs": 0.5,
            "optimizer.lr": 2.0}
    base.update(overrides)
    return cfg.resolve("scrl", overrides=base)


def ddp_step_worker(rank, world_size, port, run_dir, out_path):
    """One process of the gloo test: one train_step on this rank's half of :func:`fixed_batch`."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    install()
    from fastdense.training import Trainer

    full = fixed_batch(8)
    per_rank = 8 // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    shard = ViewBatch(views=[v[rows] for v in full.views], matrices=full.matrices[rows],
                      source_size=full.source_size[rows], index=full.index[rows])
    trainer = Trainer(tiny_config(run_dir, batch_size=per_rank))
    trainer.setup()
    torch.manual_seed(5)
    out = trainer.train_step(shard)
    from fastdense.training.distributed import all_reduce_mean

    loss = all_reduce_mean(out["loss"], trainer.dist)
    result = {"loss": loss, "grads": {n: p.grad.clone() for n, p in trainer.method.named_parameters() if p.grad is not None},
              "params": {n: t.clone() for n, t in trainer.method.state_dict().items()}}
    if rank == 0:
        torch.save(result, out_path)
    import torch.distributed as dist

    from fastdense.training.distributed import shutdown

    dist.barrier()
    del trainer
    shutdown()


if __name__ == "__main__":
    install()
    from fastdense.train import main

    sys.exit(main(sys.argv[1:]))
