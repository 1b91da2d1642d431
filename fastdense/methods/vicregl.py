"""VICRegL (Bardes, Ponce, LeCun, 2022): VICReg on global embeddings and on matched local features.

Pseudo-code (``METHODS.md``)::

    maps[v] = backbone(view[v])                           # [B, C, h, w]; one pass per view, as the reference
    z[v] = expander(avgpool(maps[v]))                     # global embeddings
    l[v] = local_projector(maps[v]) per cell              # [B, h*w, D]
    p[v] = source position of each cell centre            # from the view matrices, flips included
    global = mean_{i in globals, j != i} inv(z_i, z_j) + mean_v (var(z_v) + cov(z_v))   (coefficients 25/25/1)
    for i in globals, j != i:                             # each ordered pair
        for match in (nearest in feature space, nearest in source position):
            x_i, y_i = match(i -> j, keep k=20);  x_j, y_j = match(j -> i, keep k=4)
            local += (vicreg(x_i, y_i) + vicreg(x_j, y_j)) / 2
    loss = alpha * global + (1 - alpha) * local / pairs

Invariance uses the per-GPU batch; variance and covariance the batch of every GPU, per slot for the
local ``[B, k, D]`` features (:func:`fastdense.methods.ranks.variance_covariance_over_ranks`: each
GPU computes its own rows' share of the covariance).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from fastdense.geometry import cell_centers_in_source
from fastdense.methods.base import Method
from fastdense.methods.ranks import variance_covariance_over_ranks
from fastdense.methods.options import check_range, resized_recipe, resolve_options
from fastdense.models import build_backbone
from fastdense.models.heads import mlp, parse_spec, per_location
from fastdense.ops import nearest_neighbor_pairs_many, vicreg_invariance

Terms = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # invariance, variance, covariance


def vicreg_terms(x: torch.Tensor, y: torch.Tensor) -> Terms:
    """VICReg's three unweighted terms for paired rows ``x, y`` (``[n, D]`` or ``[n, S, D]``); the
    variance and covariance of ``x`` and ``y`` are averaged."""
    invariance = vicreg_invariance(x, y)
    (variance_x, covariance_x), (variance_y, covariance_y) = (variance_covariance_over_ranks(v) for v in (x, y))
    return invariance, (variance_x + variance_y) / 2, (covariance_x + covariance_y) / 2


class VICRegL(Method):
    """VICRegL. Options: ``backbone``; ``expander`` and ``local_projector`` specs (``"8192-8192-8192"``,
    ``"512-512-512"``; Linear-BN-ReLU, last Linear without bias); ``alpha`` (0.75; 0.9 favours
    classification); ``inv_coeff``/``var_coeff``/``cov_coeff`` (25/25/1); ``num_matches``
    (``[20, 4]``: locations kept when matching a global view to another view, and back; clamped to
    the number of cells); ``l2_all_matches`` (``False``: top-k in feature space as the authors
    intend; ``True``: the reference code's default, every location); ``multi_crop`` (``None``: the
    reference's recipe for the backbone, two 224 px views of scale (0.08, 1) for ResNets and
    2 x 224 (0.4, 1) + 6 x 96 (0.08, 0.4) for ConvNeXts; ``True`` / ``False``: that multi-crop or
    two-view recipe whatever the backbone); ``view_sizes``.

    >>> from fastdense.methods import build_method
    >>> [v.size for v in build_method("vicregl", preset="cpu").recipe.views]
    [128, 128, 64, 64, 64, 64, 64, 64]
    """

    name = "vicregl"
    num_global_views = 2
    # Variance and covariance are taken over the batch (unbiased: over n - 1), and the ResNet heads'
    # BatchNorm1d sees one row per image: one image per process cannot train.
    min_batch_size = 2

    @classmethod
    def default_options(cls) -> Dict:
        return {
            "backbone": "resnet50",
            "expander": "8192-8192-8192",
            "local_projector": "512-512-512",
            "alpha": 0.75,
            "inv_coeff": 25.0,
            "var_coeff": 25.0,
            "cov_coeff": 1.0,
            "num_matches": [20, 4],
            "l2_all_matches": False,
            "multi_crop": None,
            "view_sizes": {},
        }

    PRESETS = {
        "cpu": {
            "backbone": "resnet18",
            "expander": "512-512-128",
            "local_projector": "128-128-128",
            "multi_crop": True,
            "view_sizes": {224: 128, 96: 64},
        },
    }

    def __init__(self, preset=None, **options):
        super().__init__()
        self.options = opts = resolve_options(self.name, self.default_options(), self.PRESETS, options, preset)
        check_range(self.name, "alpha", opts["alpha"], 0.0, 1.0)
        for coeff in ("inv_coeff", "var_coeff", "cov_coeff"):
            check_range(self.name, coeff, opts[coeff], 0.0)
        matches = list(opts["num_matches"])
        if len(matches) != 2 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in matches):
            raise ValueError(f"vicregl: option num_matches must be two positive ints, got {opts['num_matches']!r}")
        if opts["multi_crop"] not in (None, True, False):
            raise ValueError(f"vicregl: option multi_crop must be None, True or False, got {opts['multi_crop']!r}")
        self.recipe = resized_recipe(self.recipe_name(opts), opts["view_sizes"])
        self.backbone = build_reference_backbone(opts["backbone"])
        # The reference's heads normalise as its backbone does: BatchNorm on ResNets, LayerNorm on ConvNeXts.
        norm = "layer" if self.backbone.kind == "convnext" else "batch"
        self.expander = mlp(self.backbone.out_channels, parse_spec(opts["expander"]), last_bias=False, norm=norm)
        self.local_projector = mlp(self.backbone.out_channels, parse_spec(opts["local_projector"]), last_bias=False, norm=norm)

    @classmethod
    def recipe_name(cls, options: Dict) -> str:
        multi_crop = options["multi_crop"]
        if multi_crop is None:  # the reference trains ResNets on two views, ConvNeXts on eight
            multi_crop = not str(options["backbone"]).startswith("resnet")
        return "vicregl" if multi_crop else "vicregl_two_views"

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        if batch.num_views < 2:
            raise ValueError(f"VICRegL needs at least 2 views, got {batch.num_views}")
        embeddings, local_features, positions = self.encode(batch)
        global_loss = self.global_loss(embeddings)
        local_loss = self.local_loss(local_features, positions)
        alpha = self.options["alpha"]
        loss = alpha * global_loss + (1 - alpha) * local_loss
        return {"loss": loss, "global_loss": global_loss.detach(), "local_loss": local_loss.detach()}

    def encode(self, batch) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """Per view: global embedding ``[B, D]``, local features ``[B, hw, D_l]`` and cell positions
        in source pixels ``[B, hw, 2]``. Each view has its own pass through the backbone and heads, as
        in the reference (``main_vicregl.py`` ``forward_networks``), so batch-norm statistics run over
        one view's ``B`` images (``B * hw`` locations in the local projector), never over several views."""
        embeddings, local_features, positions = [], [], []
        for v, view in enumerate(batch.views):
            maps = self.backbone(view)  # [B, C, h, w]
            h, w = maps.shape[-2:]
            embeddings.append(self.expander(maps.mean(dim=(2, 3))))
            # Row-major [B, hw, D_l]: the matching kernel reads its inputs in place when contiguous.
            local_features.append(per_location(self.local_projector, maps.flatten(2)).transpose(1, 2).contiguous())
            positions.append(cell_centers_in_source(batch.matrices[:, v].float(), h, w, tuple(view.shape[-2:])))
        return embeddings, local_features, positions

    def weighted(self, terms: Terms) -> torch.Tensor:
        invariance, variance, covariance = terms
        o = self.options
        return o["inv_coeff"] * invariance + o["var_coeff"] * variance + o["cov_coeff"] * covariance

    def ordered_pairs(self, num_views: int) -> List[Tuple[int, int]]:
        return [(i, j) for i in range(min(self.num_global_views, num_views)) for j in range(num_views) if j != i]

    def global_loss(self, z: List[torch.Tensor]) -> torch.Tensor:
        pairs = self.ordered_pairs(len(z))
        invariance = sum(vicreg_invariance(z[i], z[j]) for i, j in pairs) / len(pairs)
        # One pass of column statistics per view serves both terms.
        variances, covariances = zip(*(variance_covariance_over_ranks(zv) for zv in z))
        variance, covariance = sum(variances) / len(z), sum(covariances) / len(z)
        return self.weighted((invariance, variance, covariance))

    def local_loss(self, features: List[torch.Tensor], positions: List[torch.Tensor]) -> torch.Tensor:
        pairs = self.ordered_pairs(len(features))
        forward_k, backward_k = self.options["num_matches"]
        # Every ordered pair is matched in feature space and in location, both ways; all those
        # matchings go to the op at once (one or two kernel launches, not one per matching).
        keys = {"features": [f.detach() for f in features], "positions": [p.detach() for p in positions]}
        requests = []  # (features of the kept rows, their candidates, keys, candidate keys, k)
        for i, j in pairs:
            for space in ("features", "positions"):
                all_rows = space == "features" and self.options["l2_all_matches"]
                for a, b, k in ((i, j, forward_k), (j, i, backward_k)):
                    query = keys[space][a]
                    requests.append((a, b, query, keys[space][b], query.shape[1] if all_rows else min(k, query.shape[1])))
        matches = nearest_neighbor_pairs_many([r[2] for r in requests], [r[3] for r in requests], [r[4] for r in requests])
        matched = [(pick_rows(features[a], rows), pick_rows(features[b], nearest)) for (a, b, *_), (rows, nearest) in zip(requests, matches)]
        totals = [0.0, 0.0, 0.0]
        for forward, backward in zip(matched[::2], matched[1::2]):
            for t, (x, y) in enumerate(zip(vicreg_terms(*forward), vicreg_terms(*backward))):
                totals[t] = totals[t] + (x + y) / 2
        return self.weighted(tuple(total / len(pairs) for total in totals))


def build_reference_backbone(name: str):
    """The backbone as VICRegL's reference builds it: ResNets with every residual branch starting at
    zero (``zero_init_residual=True``); ConvNeXts with drop-path 0.1 and no layer scale
    (``layer_scale_init_value=0``, which the reference reads as "no scale", where timm would
    start a learnable scale at 1e-6)."""
    if name.startswith("resnet"):
        return build_backbone(name, zero_init_residual=True)
    if name.startswith("convnext"):
        backbone = build_backbone(name, drop_path_rate=0.1)
        for stage in backbone.trunk.stages:
            for block in stage.blocks:
                if not hasattr(block, "gamma"):  # timm's ConvNeXtBlock keeps its layer scale there
                    raise NotImplementedError(f"vicregl: cannot remove the layer scale of this timm version's {type(block).__name__}")
                block.gamma = None
        return backbone
    return build_backbone(name)


def pick_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N, D]`` at rows ``index [B, k]``: ``[B, k, D]``, differentiable in ``x``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
