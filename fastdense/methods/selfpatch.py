"""SelfPatch (Yun et al., 2022): DINO on the image and on every patch, whose teacher target is the
aggregate of the patch's most similar neighbours.

Pseudo-code (``METHODS.md``)::

    x = vit(view)                                   # patch tokens [N, C]: no class token, no final norm
    image = class_attention(token, x)               # 2 CaiT blocks; keys include the query token
    student patches = x
    teacher patches[n] = class_attention(token, top4_cos(x[n], x[3x3 window of n, wrapping]))
    t, s = DINO heads (image: 65536-way, patches: 4096-way) of LayerNorm(tokens)
    image_loss = mean_{i global, v != i} H(softmax((t_i - c) / 0.04), log_softmax(s_v / 0.1))
    patch_loss = mean_v mean_n H(softmax((tp_v[n] - c_p) / 0.04), log_softmax(sp_v[n] / 0.1))
    loss = image_loss + 0.1 * patch_loss;  c, c_p <- 0.9 c + 0.1 mean(teacher outputs)
"""

from __future__ import annotations

from itertools import groupby
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastdense.methods.ema import EmaTargetMethod, make_target
from fastdense.methods.options import check_choice, check_range, resized_recipe, resolve_options
from fastdense.models import build_backbone
from fastdense.models.backbones import use_reference_pos_embed
from fastdense.models.heads import DINOHead


def window_neighbours(height: int, width: int, device=None) -> torch.Tensor:
    """``[height * width, 8]``: row-major indices of the 8 other cells of each cell's 3x3 window,
    wrapping around the grid edges, in ascending order.

    >>> window_neighbours(3, 3)[0].tolist()
    [1, 2, 3, 4, 5, 6, 7, 8]
    """
    if height < 3 or width < 3:
        raise ValueError(f"a 3x3 neighbour window needs a token grid of at least 3 x 3, got {height} x {width}")
    rows = torch.arange(height, device=device)[:, None, None, None]
    cols = torch.arange(width, device=device)[None, :, None, None]
    offsets = torch.tensor([-1, 0, 1], device=device)
    window = ((rows + offsets[:, None]) % height) * width + (cols + offsets[None, :]) % width  # [h, w, 3, 3]
    window = window.reshape(height * width, 9)
    own = torch.arange(height * width, device=device)[:, None]
    others = window[window != own].reshape(height * width, 8)
    return others.sort(dim=1).values


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention block: a query token attends to ``[query, tokens]`` and is updated;
    the tokens are left as they are. Pre-norm, LayerNorm eps 1e-6, MLP ratio 4, GELU."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``tokens [N, T, C]``, ``query [N, 1, C]`` -> updated query ``[N, 1, C]``."""
        n, _, dim = tokens.shape
        u = self.norm1(torch.cat([query, tokens], dim=1))
        heads = lambda x: x.reshape(n, x.shape[1], self.num_heads, dim // self.num_heads).transpose(1, 2)  # noqa: E731
        attended = F.scaled_dot_product_attention(heads(self.q(u[:, :1])), heads(self.k(u)), heads(self.v(u)))
        query = query + self.proj(attended.transpose(1, 2).reshape(n, 1, dim))
        return query + self.mlp(self.norm2(query))


class SelfPatchHead(nn.Module):
    """A learnable token refined by 2 class-attention blocks, over all patches (the image token) or
    over each patch's ``num_neighbours`` most similar window neighbours (the teacher's patch targets)."""

    def __init__(self, dim: int, num_heads: int, num_neighbours: int = 4, depth: int = 2):
        super().__init__()
        self.num_neighbours = num_neighbours
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(ClassAttentionBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.token.expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            query = block(tokens, query)
        return query

    def neighbour_tokens(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """``[B, N, k, C]``: for each patch, its ``k`` window neighbours of highest cosine similarity."""
        batch, num, dim = x.shape
        window = window_neighbours(*grid, device=x.device)  # [N, 8]
        unit = F.normalize(x, dim=-1)
        similarity = (unit[:, window] * unit[:, :, None]).sum(-1)  # [B, N, 8]
        best = window[torch.arange(num, device=x.device)[:, None], similarity.topk(self.num_neighbours, dim=-1).indices]  # [B, N, k]
        return x.gather(1, best.reshape(batch, -1, 1).expand(-1, -1, dim)).reshape(batch, num, self.num_neighbours, dim)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int], aggregate_neighbours: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [B, N, C]`` -> normalised ``(image token [B, C], patch tokens [B, N, C])``."""
        image = self.attend(x)
        if aggregate_neighbours:
            neighbours = self.neighbour_tokens(x, grid)
            patches = self.attend(neighbours.flatten(0, 1)).reshape(x.shape)
        else:
            patches = x
        out = self.norm(torch.cat([image, patches], dim=1))
        return out[:, 0], out[:, 1:]


class SelfPatchNetwork(nn.Module):
    """ViT + SelfPatch head + the two DINO heads: images -> (image logits, patch logits)."""

    def __init__(self, backbone: nn.Module, num_heads: int, num_neighbours: int, image_head: DINOHead, patch_head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = SelfPatchHead(backbone.out_channels, num_heads, num_neighbours)
        self.image_head = image_head
        self.patch_head = patch_head

    def forward(self, images: torch.Tensor, aggregate_neighbours: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        stride = self.backbone.stride
        grid = (images.shape[-2] // stride, images.shape[-1] // stride)
        image_token, patch_tokens = self.head(self.backbone(images), grid, aggregate_neighbours)
        return self.image_head(image_token), self.patch_head(patch_tokens)


def dino_cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """``mean over rows of -sum_k p_k log softmax(s / temp)_k``."""
    return -(teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1)).sum(-1).mean()


class SelfPatch(EmaTargetMethod):
    """SelfPatch. Options: ``backbone`` (a timm ViT; built without class token and final norm);
    ``image_out_dim`` (65536), ``patch_out_dim`` (4096), ``head_hidden_dim`` (2048),
    ``head_bottleneck_dim`` (256); ``num_neighbours`` (4); ``teacher_temp`` (0.04), ``student_temp``
    (0.1), ``center_momentum`` (0.9), ``patch_loss_weight`` (0.1); ``base_momentum`` (0.996);
    ``freeze_last_layer`` (1: epochs during which the DINO heads' last layers are not updated, the
    reference's ``cancel_gradients_last_layer``);
    ``drop_path_rate`` (0.1, student only); ``backbone_options`` (more ``timm.create_model`` arguments,
    e.g. ``{"depth": 6}``); ``pos_embed_resize`` (``"reference"``: the position embedding of the
    224 px grid resized for smaller views as SelfPatch's ViT does, bicubic at the scale factor
    ``(n + 0.1) / 14``, no antialiasing; ``"timm"``: timm's antialiased resize to the grid);
    ``view_sizes``. The teacher starts as a copy of the student.

    >>> from fastdense.methods import build_method
    >>> build_method("selfpatch", preset="cpu").backbone.out_channels
    192
    """

    name = "selfpatch"

    @classmethod
    def default_options(cls) -> Dict:
        return {
            "backbone": "vit_small_patch16_224",
            "image_out_dim": 65536,
            "patch_out_dim": 4096,
            "head_hidden_dim": 2048,
            "head_bottleneck_dim": 256,
            "num_neighbours": 4,
            "teacher_temp": 0.04,
            "student_temp": 0.1,
            "center_momentum": 0.9,
            "patch_loss_weight": 0.1,
            "base_momentum": 0.996,
            "freeze_last_layer": 1,
            "drop_path_rate": 0.1,
            "backbone_options": {},
            "pos_embed_resize": "reference",
            "view_sizes": {},
        }

    PRESETS = {
        "cpu": {
            "backbone": "vit_tiny_patch16_224",
            "image_out_dim": 1024,
            "patch_out_dim": 256,
            "head_hidden_dim": 256,
            "head_bottleneck_dim": 64,
            "view_sizes": {224: 112, 96: 48},
        },
    }

    def __init__(self, preset=None, **options):
        super().__init__()
        self.options = opts = resolve_options(self.name, self.default_options(), self.PRESETS, options, preset)
        if not str(opts["backbone"]).startswith("vit_"):
            raise ValueError(f"selfpatch: option backbone must be a timm ViT name (vit_...), got {opts['backbone']!r}")
        for option in ("teacher_temp", "student_temp"):
            check_range(self.name, option, opts[option], 1e-12)
        for option in ("center_momentum", "base_momentum", "drop_path_rate"):
            check_range(self.name, option, opts[option], 0.0, 1.0)
        check_range(self.name, "patch_loss_weight", opts["patch_loss_weight"], 0.0)
        check_range(self.name, "num_neighbours", opts["num_neighbours"], 1, 8)
        check_range(self.name, "freeze_last_layer", opts["freeze_last_layer"], 0)
        check_choice(self.name, "pos_embed_resize", opts["pos_embed_resize"], ("reference", "timm"))
        self.recipe = resized_recipe("selfpatch", opts["view_sizes"])
        self.base_momentum = float(opts["base_momentum"])
        self.student = self.build_network(opts, drop_path_rate=float(opts["drop_path_rate"]))
        self.teacher = make_target(self.student, fresh=self.build_network(opts, drop_path_rate=0.0))
        self.teacher.load_state_dict(self.student.state_dict())
        self.register_buffer("center", torch.zeros(1, opts["image_out_dim"]))
        self.register_buffer("patch_center", torch.zeros(1, opts["patch_out_dim"]))
        self.train(self.training)

    @staticmethod
    def build_network(opts, drop_path_rate: float) -> SelfPatchNetwork:
        backbone = build_backbone(
            opts["backbone"], class_token=False, global_pool="", dynamic_img_size=True, drop_path_rate=drop_path_rate, **dict(opts["backbone_options"])
        )
        backbone.trunk.norm = nn.Identity()  # SelfPatch's ViT has no final norm; the head normalises
        if opts["pos_embed_resize"] == "reference":
            use_reference_pos_embed(backbone.trunk)
        head = lambda out_dim: DINOHead(backbone.out_channels, out_dim, opts["head_hidden_dim"], opts["head_bottleneck_dim"])  # noqa: E731
        return SelfPatchNetwork(backbone, backbone.trunk.blocks[0].attn.num_heads, int(opts["num_neighbours"]), head(opts["image_out_dim"]), head(opts["patch_out_dim"]))

    @property
    def backbone(self):
        return self.student.backbone

    def ema_pairs(self):
        return [(self.student, self.teacher)]

    def frozen_parameters(self, epoch: int):
        if epoch >= self.options["freeze_last_layer"]:
            return []
        return [self.student.image_head.last_direction, self.student.patch_head.last_direction]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no dropout or drop-path in the teacher, as in the reference
        return self

    def run(self, network: SelfPatchNetwork, views: List[torch.Tensor], aggregate_neighbours: bool):
        """Per view ``(image logits [B, K], patch logits [B, N, K_p])``; views of one size share a pass."""
        outputs = []
        for _, group in groupby(views, key=lambda view: tuple(view.shape[-2:])):
            group = list(group)
            image, patches = network(torch.cat(group), aggregate_neighbours)
            outputs += zip(image.chunk(len(group)), patches.chunk(len(group)))
        return outputs

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        if batch.num_views < 2:
            raise ValueError(f"SelfPatch needs at least 2 views, got {batch.num_views}")
        o = self.options
        student = self.run(self.student, batch.views, aggregate_neighbours=False)
        with torch.no_grad():
            teacher = self.run(self.teacher, batch.views, aggregate_neighbours=True)
            image_targets = [F.softmax((t - self.center) / o["teacher_temp"], dim=-1) for t, _ in teacher]
            patch_targets = [F.softmax((tp - self.patch_center) / o["teacher_temp"], dim=-1) for _, tp in teacher]
        num_views = len(batch.views)
        image_terms = [dino_cross_entropy(image_targets[i], student[v][0], o["student_temp"]) for i in range(min(2, num_views)) for v in range(num_views) if v != i]
        patch_terms = [dino_cross_entropy(patch_targets[v], student[v][1], o["student_temp"]) for v in range(num_views)]
        image_loss = sum(image_terms) / len(image_terms)
        patch_loss = sum(patch_terms) / len(patch_terms)
        if self.training:
            self.update_centers([t for t, _ in teacher], [tp for _, tp in teacher])
        return {"loss": image_loss + o["patch_loss_weight"] * patch_loss, "image_loss": image_loss.detach(), "patch_loss": patch_loss.detach()}

    @torch.no_grad()
    def update_centers(self, image_logits: List[torch.Tensor], patch_logits: List[torch.Tensor]) -> None:
        """``c <- m c + (1 - m) mean(teacher outputs)``, the mean over every view, image (and patch) and rank."""
        momentum = self.options["center_momentum"]
        for center, outputs in ((self.center, image_logits), (self.patch_center, patch_logits)):
            rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in outputs])
            total = torch.stack([rows.sum(0), torch.full_like(rows[0], rows.shape[0])])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(total)
            center.mul_(momentum).add_(total[0] / total[1], alpha=1 - momentum)
