"""SCRL (Roh et al., 2021): BYOL on boxes shared by two views.

Pseudo-code, per batch (``METHODS.md``)::

    rois1, rois2 = sample_scrl_boxes(M)             # the same source boxes, seen in view 1 and view 2
    f = backbone(cat(v1, v2)); t = target_backbone(cat(v1, v2))
    q1, q2 = predictor(projector(roi_pool(f, cat(rois1, rois2))))   # online, both views' boxes in one batch
    z1, z2 = target_projector(roi_pool(t, cat(rois1, rois2)))       # target, no gradient
    loss = mean_boxes[(2 - 2 cos(q1, z2)) + (2 - 2 cos(q2, z1))]

RoI pooling is RoIAlign with a 1x1 output, ``aligned=False``, adaptive sampling, in float32. As in
the reference, the heads see the boxes of both views as one batch (one set of BatchNorm statistics),
and their last Linear has no bias (BYOL's heads).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from fastdense.methods.ema import EmaTargetMethod, byol_loss, make_target
from fastdense.methods.ranks import sum_over_ranks, world_size
from fastdense.methods.options import check_choice, check_range, resized_recipe, resolve_options
from fastdense.models import build_backbone
from fastdense.models.heads import mlp
from fastdense.ops import roi_pool_vectors
from fastdense.pipelines.batch import to_device_async

# Where :meth:`SCRL.prepare` leaves a batch's boxes.
ROIS_KEY = "scrl_rois"
# A torchvision ResNet's residual-block BatchNorm weights (layer3.5.bn2.weight): the ones SCRL's
# name filter exempts from weight decay and LARS (SCRL.exempt_from_decay).
RESIDUAL_BLOCK_NORM = re.compile(r"(^|\.)layer\d+\.\d+\.bn\d+\.weight$")


class SCRL(EmaTargetMethod):
    """Spatially consistent representation learning: box-level BYOL.

    Options (``default_options()``): ``backbone``; ``projector_dims`` / ``predictor_dims`` (hidden,
    out); ``base_momentum`` (0.97 for 200 epochs, 0.996 for 1000); ``num_boxes`` (10);
    ``box_min_size`` (32 px at 224; ``None`` scales 32 px with the view width, which the CPU preset
    relies on: 96 px views get 13.7 px boxes so the 3x3 feature map still holds several);
    ``box_iou_threshold`` / ``box_max_tries``; ``target_init`` (``"random"``: the reference
    initialises the target independently; ``"copy"``: start from the online weights);
    ``view_sizes`` (recipe resize map).

    Boxes are drawn on the host by the C++ sampler. In training, :meth:`prepare` draws them as the
    trainer fetches the batch, overlapping the device's work on the step before; called directly,
    :meth:`forward` draws them itself. Distributed, one step equals the whole batch in one process:
    an image's boxes depend on its dataset index, ``box_seed`` (an int in the state dict) and the
    training step (the counter ``box_draws`` when called outside the trainer), not on its rank, and
    the loss is the mean over the boxes of all ranks.

    >>> from fastdense.methods import build_method
    >>> method = build_method("scrl", preset="cpu")
    >>> method.recipe.views[0].size
    96
    """

    name = "scrl"

    @classmethod
    def default_options(cls) -> Dict:
        return {
            "backbone": "resnet50",
            "projector_dims": [4096, 256],
            "predictor_dims": [4096, 256],
            "base_momentum": 0.97,
            "num_boxes": 10,
            "box_min_size": None,
            "box_iou_threshold": 0.5,
            "box_max_tries": 50,
            "target_init": "random",
            "view_sizes": {},
        }

    PRESETS = {
        "cpu": {
            "backbone": "resnet18",
            "projector_dims": [512, 128],
            "predictor_dims": [512, 128],
            "view_sizes": {224: 96},
        },
    }

    def __init__(self, preset=None, **options):
        super().__init__()
        self.options = opts = resolve_options(self.name, self.default_options(), self.PRESETS, options, preset)
        check_choice(self.name, "target_init", opts["target_init"], ("random", "copy"))
        check_range(self.name, "base_momentum", opts["base_momentum"], 0.0, 1.0)
        check_range(self.name, "num_boxes", opts["num_boxes"], 1)
        if opts["box_min_size"] is not None:
            check_range(self.name, "box_min_size", opts["box_min_size"], 0.0)
        self.recipe = resized_recipe("scrl", opts["view_sizes"])
        self.base_momentum = float(opts["base_momentum"])

        self.backbone = build_backbone(opts["backbone"])
        self.projector = mlp(self.backbone.out_channels, opts["projector_dims"], last_bias=False)
        self.predictor = mlp(opts["projector_dims"][-1], opts["predictor_dims"], last_bias=False)
        fresh = opts["target_init"] == "random"
        self.target_backbone = make_target(self.backbone, build_backbone(opts["backbone"]) if fresh else None)
        self.target_projector = make_target(self.projector, mlp(self.backbone.out_channels, opts["projector_dims"], last_bias=False) if fresh else None)
        # Box randoms are keyed by (box_seed, step or box_draws, dataset index): an image gets the
        # same boxes whichever rank holds it. The seed stays a host int, kept in the state dict as
        # extra state for exact resume: as a device buffer, every read would wait for the device.
        self.box_seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
        self.register_buffer("box_draws", torch.zeros((), dtype=torch.int64))

    def ema_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def exempt_from_decay(self, name: str, param: nn.Parameter) -> Optional[bool]:
        """SCRL's code exempts by name: parameters whose names hold "bn" or "bias"
        (``optim/getters.py``). Its ResNet is a ``Sequential`` of torchvision's children and its heads
        ``Sequential`` MLPs, so that spares the residual blocks' BatchNorms (``layer1.0.bn1``) but not
        the stem's (``encoder.1``), the downsample paths' (``downsample.1``) or the heads'
        (``net.1``), whose weights it decays and LARS-adapts; so does this. Other backbones than its
        ResNets: the trainer's rule."""
        if self.backbone.kind != "resnet":
            return None
        return name.endswith(".bias") or RESIDUAL_BLOCK_NORM.search(name) is not None

    def box_min_size(self, view_width: int) -> float:
        """32 px at 224 px views unless set: the reference's minimum, scaled with the view."""
        size = self.options["box_min_size"]
        return 32.0 * view_width / 224.0 if size is None else float(size)

    def sample_boxes(self, batch, generator=None, draw: Optional[int] = None):
        """SCRL boxes for ``batch``, on the CPU, from its host matrices and indices (no device sync).
        With ``generator`` the keys come from it (:func:`draw_scrl_randoms`); else they hash
        ``(box_seed, draw, dataset index)``, ``draw`` being the trainer's step or, when None, this
        method's draw counter, which then advances by one."""
        from fastdense.boxes import keyed_scrl_randoms, sample_scrl_boxes

        if batch.num_views < 2:
            raise ValueError(f"SCRL needs 2 views, got {batch.num_views}")
        height, width = batch.views[0].shape[-2:]
        keys = None
        if generator is None:
            if draw is None:
                draw = int(self.box_draws)
                self.box_draws += 1
            keys = keyed_scrl_randoms(self.box_seed, draw, batch.on_host("index"))
        return sample_scrl_boxes(
            batch.on_host("matrices")[:, :2].float(),
            view_size=(height, width),
            num_boxes=self.options["num_boxes"],
            min_size=self.box_min_size(width),
            iou_threshold=self.options["box_iou_threshold"],
            max_tries=self.options["box_max_tries"],
            generator=generator,
            random=keys,
        )

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.box_seed, dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        self.box_seed = int(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the seed became extra state hold it as a buffer.
        if prefix + "box_seed" in state_dict and prefix + "_extra_state" not in state_dict:
            state_dict[prefix + "_extra_state"] = state_dict.pop(prefix + "box_seed")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def prepare(self, batch, step: int) -> None:
        """Draw ``batch``'s boxes for training step ``step`` on the host, ahead of the step: the
        trainer calls this as it fetches the batch, while the device still runs the step before.
        They reach the device without the host waiting and :meth:`forward` takes them from
        ``batch.extras``. Keyed by the step, a resumed run draws the boxes the uninterrupted one did."""
        batch.extras[ROIS_KEY] = self._on_device(self.sample_boxes(batch, draw=step).rois, batch.views[0].device)

    @staticmethod
    def _on_device(rois, device) -> List[torch.Tensor]:
        return [to_device_async(r, device) for r in rois]

    def forward(self, batch, rois: Sequence[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Box-level BYOL on views 0 and 1. ``rois`` (two ``[K, 5]`` tensors in view pixels, batch
        index first) overrides the boxes; else those :meth:`prepare` drew, else the sampler's."""
        if batch.num_views < 2:
            raise ValueError(f"SCRL needs 2 views, got {batch.num_views}")
        if rois is None:
            rois = batch.extras.get(ROIS_KEY)
        if rois is None:
            rois = self._on_device(self.sample_boxes(batch).rois, batch.views[0].device)
        return {**self.box_loss(batch.views[0], batch.views[1], rois), "boxes_per_image": torch.tensor(rois[0].shape[0] / batch.batch_size)}

    def box_loss(self, view1: torch.Tensor, view2: torch.Tensor, rois: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        batch = view1.shape[0]
        online = self.backbone(torch.cat([view1, view2]))
        with torch.no_grad():
            target = self.target_backbone(torch.cat([view1, view2]))
        # The mean over the boxes of the global batch. Each rank returns its share of the sum, scaled
        # by the number of ranks, because DDP averages gradients over ranks; ranks may hold
        # different numbers of boxes, even none, and still run the heads (their BatchNorms may be
        # synchronised collectives).
        all_boxes = sum_over_ranks(rois[0].shape[0], online.device)
        if all_boxes == 0:  # no image had a large enough overlap: nothing to learn this step
            return {"loss": online.sum() * 0.0}
        # One head batch for both views' boxes, as the reference: the heads' BatchNorm statistics run
        # over the boxes of both views (view 2's boxes index images B..2B-1 of the stacked maps).
        boxes = torch.cat([rois[0], rois[1] + rois[1].new_tensor([batch, 0, 0, 0, 0])])
        first = rois[0].shape[0]
        q1, q2 = self.predictor(self.projector(self.pool(online, boxes))).split([first, boxes.shape[0] - first])
        with torch.no_grad():
            z1, z2 = self.target_projector(self.pool(target, boxes)).split([first, boxes.shape[0] - first])
        loss = (byol_loss(q1, z2) + byol_loss(q2, z1)).sum() / (all_boxes / world_size())
        return {"loss": loss}

    def pool(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """One vector per box: RoIAlign 1x1 in at least float32 (the reference keeps pooling out of autocast)."""
        dtype = torch.promote_types(features.dtype, torch.float32)
        with torch.autocast(features.device.type, enabled=False):
            # The sampler's boxes are valid by construction: no value check, so no host sync per call.
            return roi_pool_vectors(features.to(dtype), rois.to(features.device, dtype), spatial_scale=1.0 / self.backbone.stride, sampling_ratio=-1,
                                    aligned=False, check_boxes=False)
