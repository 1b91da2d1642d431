"""LEWEL (Huang et al., 2022): BYOL with learned alignment maps that pool object-like embeddings.

Pseudo-code, for one image (``METHODS.md``)::

    x = backbone(view)                                  # [C, P] layer4 pixels (P = 49 at 224 px)
    out = neck([x, mean(x)])                            # 1x1-conv MLP on P + 1 positions -> [256, P + 1]
    g = out[:, P]                                       # image embedding (the pooled column)
    maps = softmax_P(l2_normalise_channels(out[:, :P]) / scale)    # 256 alignment maps
    objects[h] = x[h-th group of C/4 channels] @ maps[h-th group of 64 maps].T   # 4 heads
    o = object_projector(concat_h objects[h])           # [256, 64]: one embedding per map
    loss(a -> b) = 0.5 (2 - 2 mean cos(predictor(g_a), g'_b)) + 0.5 (2 - 2 mean cos(object_predictor(o_a), o'_b))
    loss = loss(1 -> 2) + loss(2 -> 1)                  # primes: the EMA target, no gradient

Map ``j`` of one view is compared with map ``j`` of the other; no coordinates are needed.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdense.methods.ema import EmaTargetMethod, byol_loss, make_target
from fastdense.methods.options import check_range, resized_recipe, resolve_options
from fastdense.models import build_backbone
from fastdense.models.heads import mlp, per_location


def init_like_reference(head: nn.Module) -> nn.Module:
    """The reference's initialisation of its heads' 1x1 convolutions (``c2_msra_fill``): He-normal
    weights over the outputs (``fan_out``, ReLU gain: std ``sqrt(2 / out)``), no bias (here: zero
    biases, where ``mlp`` has them before a BatchNorm); BatchNorms at PyTorch's 1 and 0. Returns ``head``."""
    for layer in head.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return head


class LEWELEncoder(nn.Module):
    """Backbone + neck + object projector: ``image -> (g [B, D], objects [B, D, maps_per_head])``."""

    def __init__(self, backbone_name: str, neck_dims, object_projector_dims, num_heads: int, map_scale: float):
        super().__init__()
        self.backbone = build_backbone(backbone_name)
        channels = self.backbone.out_channels
        num_maps = neck_dims[-1]
        if channels % num_heads or num_maps % num_heads:
            raise ValueError(f"lewel: num_heads ({num_heads}) must divide the backbone channels ({channels}) and the number of maps (neck output, {num_maps})")
        self.num_heads = num_heads
        self.map_scale = map_scale
        # The reference's MLPs are bias-free 1x1 convolutions; the last layer's bias is the one that
        # would matter (the hidden ones feed a BatchNorm).
        self.neck = mlp(channels, neck_dims, last_bias=False)
        self.object_projector = mlp(channels, object_projector_dims, last_bias=False)

    def alignment_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, M, P]``: each map L2-normalised over the ``M`` maps at every pixel, then a softmax over pixels."""
        return torch.softmax(F.normalize(pixels, dim=1) / self.map_scale, dim=2)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.backbone(images).flatten(2)  # [B, C, P]
        batch, channels, num_pixels = x.shape
        out = per_location(self.neck, torch.cat([x, x.mean(dim=2, keepdim=True)], dim=2))
        image_embedding, maps = out[:, :, num_pixels], self.alignment_maps(out[:, :, :num_pixels])
        heads = self.num_heads
        grouped_pixels = x.reshape(batch, heads, channels // heads, num_pixels)
        grouped_maps = maps.reshape(batch, heads, -1, num_pixels).transpose(2, 3)  # [B, H, P, M / H]
        objects = (grouped_pixels @ grouped_maps).reshape(batch, channels, -1)  # channels head-major
        return image_embedding, per_location(self.object_projector, objects)


class LEWEL(EmaTargetMethod):
    """LEWEL. Options: ``backbone``; ``neck_dims`` (hidden, number of maps; 4096/256),
    ``predictor_dims``, ``object_projector_dims``, ``object_predictor_dims`` (4096/256 each);
    ``num_heads`` (4); ``map_scale`` (1.0); ``base_momentum`` (0.98); ``eman`` (``True``: LEWEL's
    EMAN variant, eval-mode target and the whole state dict averaged, the default because the
    reference's 200-epoch recipe that m0 = 0.98, lr 3.6 at batch 1024 and weight decay 1.5e-6 come
    from is that variant (``scripts/srun_lewelb_eman.sh``); ``False``: parameters only and a
    train-mode target as in BYOL, the reference's 400-epoch SyncBN run, which used m0 = 0.996; with
    several processes, ``sync_batchnorm: auto`` synchronises BatchNorm for that run only);
    ``target_init`` is always a copy (the reference's); ``view_sizes``.

    >>> from fastdense.methods import build_method
    >>> build_method("lewel", preset="cpu").encoder.num_heads
    4
    """

    name = "lewel"

    @property
    def synchronises_batchnorm(self) -> bool:
        # The reference's EMAN run (srun_lewelb_eman.sh) keeps main.py's --norm None: per-process
        # BatchNorm; only its 400-epoch BYOL-style run passes --norm SyncBN.
        return not self.eman
    # The neck's and projectors' BatchNorm1d see one row per image; with one image per process
    # PyTorch refuses to train them.
    min_batch_size = 2

    @classmethod
    def default_options(cls) -> Dict:
        return {
            "backbone": "resnet50",
            "neck_dims": [4096, 256],
            "predictor_dims": [4096, 256],
            "object_projector_dims": [4096, 256],
            "object_predictor_dims": [4096, 256],
            "num_heads": 4,
            "map_scale": 1.0,
            "base_momentum": 0.98,
            "eman": True,
            "view_sizes": {},
        }

    PRESETS = {
        "cpu": {
            "backbone": "resnet18",
            "neck_dims": [512, 128],
            "predictor_dims": [512, 128],
            "object_projector_dims": [512, 128],
            "object_predictor_dims": [512, 128],
            "view_sizes": {224: 96},
        },
    }

    def __init__(self, preset=None, **options):
        super().__init__()
        self.options = opts = resolve_options(self.name, self.default_options(), self.PRESETS, options, preset)
        check_range(self.name, "base_momentum", opts["base_momentum"], 0.0, 1.0)
        check_range(self.name, "num_heads", opts["num_heads"], 1)
        check_range(self.name, "map_scale", opts["map_scale"], 1e-12)
        if opts["neck_dims"][-1] != opts["predictor_dims"][-1] or opts["object_projector_dims"][-1] != opts["object_predictor_dims"][-1]:
            raise ValueError("lewel: predictors must output the size of the embeddings they predict (neck_dims[-1] == predictor_dims[-1], object_projector_dims[-1] == object_predictor_dims[-1])")
        self.recipe = resized_recipe("lewel", opts["view_sizes"])
        self.base_momentum = float(opts["base_momentum"])
        self.eman = bool(opts["eman"])
        self.encoder = LEWELEncoder(opts["backbone"], opts["neck_dims"], opts["object_projector_dims"], int(opts["num_heads"]), float(opts["map_scale"]))
        self.predictor = mlp(opts["neck_dims"][-1], opts["predictor_dims"], last_bias=False)
        self.object_predictor = mlp(opts["object_projector_dims"][-1], opts["object_predictor_dims"], last_bias=False)
        for head in (self.encoder.neck, self.encoder.object_projector, self.predictor, self.object_predictor):
            init_like_reference(head)
        self.target_encoder = make_target(self.encoder)
        self.train(self.training)

    @property
    def backbone(self):
        return self.encoder.backbone

    def ema_pairs(self):
        return [(self.encoder, self.target_encoder)]

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        if batch.num_views < 2:
            raise ValueError(f"LEWEL needs 2 views, got {batch.num_views}")
        online = [self.encoder(view) for view in batch.views[:2]]
        with torch.no_grad():
            target = [self.target_encoder(view) for view in batch.views[:2]]
        global_terms, object_terms = zip(*(self.pair_loss(online[a], target[b]) for a, b in ((0, 1), (1, 0))))
        global_loss, object_loss = sum(global_terms), sum(object_terms)
        return {"loss": 0.5 * global_loss + 0.5 * object_loss, "global_loss": global_loss.detach(), "object_loss": object_loss.detach()}

    def pair_loss(self, online, target) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(2 - 2 mean cos)`` of the image embedding and of the object embeddings, online -> target."""
        (g, objects), (g_target, objects_target) = online, target
        global_loss = byol_loss(self.predictor(g), g_target).mean()
        predicted_objects = per_location(self.object_predictor, objects)  # [B, D, M / H]
        object_loss = byol_loss(predicted_objects.transpose(1, 2), objects_target.transpose(1, 2)).mean()
        return global_loss, object_loss
