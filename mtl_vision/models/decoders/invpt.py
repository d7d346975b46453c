"""InvPT: the inverted-pyramid multi-task transformer decoder, as its authors' code computes it.

Ye & Xu, "Inverted Pyramid Multi-task Transformer for Dense Scene Understanding" (ECCV 2022);
code prismformore/Multi-Task-Transformer (InvPT/models/transformers/{transformer_decoder,invpt}.py,
commit 870c6be), against which tests/test_reference_models.py checks this module to 1e-5.

1. Preliminary decoder: the last backbone level (the ViT's normalised output) is resized to half
   the grid of a stride-16 map (stride 32); per task two conv-BN-ReLU blocks give the task feature
   (`channels`) and a 1x1 conv the preliminary prediction (aux set "preliminary"). Feature and
   prediction, concatenated, are mixed by a 1x1 conv into `channels + extra_channels` wide tokens.
2. Three transformer stages, each on a grid twice as fine with half the width. Stages after the
   first upsample every task's map (x2 bilinear, two dilated 3x3 conv-BN-ReLU) and add a
   projected backbone level (a 3x3 conv of the third-last level, a stride-2 transposed conv of
   the fourth-last: blocks 12 and 6 of ViT-L). Attention runs over the tokens of all tasks and
   positions together: queries from a per-task strided depthwise conv + BN, keys and values from
   per-task average pooling (2, 4, 8: the key grid is the first stage's query grid at every
   stage). Scores are scaled by the stage width (not the head width) and, from the second stage
   on, fused by a 1x1 conv with the previous stage's scores upsampled x2 over the query grid
   (cross-scale attention message passing). The attention output is upsampled back to the grid.
3. After each stage one LayerNorm normalises all tasks' channels of a position jointly; every
   stage's task maps are projected (1x1, stages after the first) to the first stage's width,
   upsampled to the final grid (stride 4) and summed; a 3x3 conv-BN-ReLU and a 1x1 head per task.

The authors' code also builds three modules its forward never uses (the projection of the
second-last backbone level, the first stage's score fusion and width reduction, a final
LayerNorm); they are not built here and `mtl_vision.importing.invpt` drops their weights.
Beyond the paper's ViT, other backbones work: the input level is resized to stride 32, and a
skip level whose grid differs from its stage's is resized bilinearly after projection (where the
authors' code would fail on the addition).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from mtl_vision.models.decoders.common import resize_to

__all__ = ["InvPTDecoder"]


def _conv_bn_relu(cin: int, cout: int, *, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class ConvBlock(nn.Module):
    """3x3 conv (no bias), BN, ReLU; named as in the authors' preliminary decoder."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv(x)))


class UpEmbed(nn.Module):
    """x2 bilinear upsampling, then two dilated (2) 3x3 conv-BN-ReLU blocks: (N,cin,h,w) -> (N,cout,2h,2w)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *_conv_bn_relu(cin, cout, dilation=2),
            *_conv_bn_relu(cout, cout, dilation=2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class QueryProjection(nn.Module):
    """Per-task depthwise 3x3 conv with stride `stride` and BN: (N,C,h,w) -> (N, ceil(h/s)*ceil(w/s), C)."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)


class TaskAttention(nn.Module):
    """Attention over all tasks' tokens with cross-scale score passing.

    `forward(maps: T x (N,C,h,w), previous: scores of the previous stage or None)` returns the
    attention output per task at the query grid (N, hq*wq, C) and this stage's scores
    (N, heads, T*hq*wq, T*hk*wk), which the next stage fuses with its own.
    """

    def __init__(
        self, num_tasks: int, dim: int, num_heads: int, *, q_stride: int, kv_stride: int, qkv_bias: bool, fuse: bool
    ) -> None:
        super().__init__()
        self.num_heads, self.q_stride, self.kv_stride = num_heads, q_stride, kv_stride
        self.scale = dim**-0.5  # the authors scale by the full width
        self.conv_proj_q = nn.ModuleList(QueryProjection(dim, q_stride) for _ in range(num_tasks))
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fuse_attn = nn.Conv2d(2 * num_heads, num_heads, 1) if fuse else None

    def _heads(self, x: Tensor) -> Tensor:
        n, length, c = x.shape
        return x.view(n, length, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _pool(self, x: Tensor) -> Tensor:
        s = self.kv_stride
        return F.avg_pool2d(x, s, s, ceil_mode=True).flatten(2).transpose(1, 2)

    def query_grid(self, h: int, w: int) -> tuple[int, int]:
        return -(-h // self.q_stride), -(-w // self.q_stride)

    def forward(self, maps: list[Tensor], previous: Tensor | None) -> tuple[list[Tensor], Tensor]:
        q = torch.cat([proj(x) for proj, x in zip(self.conv_proj_q, maps)], dim=1)
        pooled = torch.cat([self._pool(x) for x in maps], dim=1)
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(pooled)), self._heads(self.proj_v(pooled))
        scores = (q @ k.transpose(-2, -1)) * self.scale
        qh, qw = self.query_grid(*maps[0].shape[-2:])
        if previous is not None:
            if self.fuse_attn is None:
                raise RuntimeError("invpt: the first stage received attention scores")
            scores = self.fuse_attn(torch.cat([scores, self._upsample_scores(previous, len(maps), qh, qw)], dim=1))
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
        out = self.proj(out)
        return list(out.split(qh * qw, dim=1)), scores

    @staticmethod
    def _upsample_scores(scores: Tensor, tasks: int, qh: int, qw: int) -> Tensor:
        """The previous stage's scores, over its query grid (half this one's, x2 as the authors
        upsample), resized bilinearly to this stage's query grid (qh, qw)."""
        n, heads, length, keys = scores.shape
        sh, sw = -(-qh // 2), -(-qw // 2)
        if length != tasks * sh * sw:
            raise RuntimeError(f"invpt: previous scores cover {length} queries, expected {tasks}x{sh}x{sw}")
        grid = scores.view(n * heads, tasks, sh, sw, keys).permute(0, 1, 4, 2, 3).reshape(n * heads * tasks, keys, sh, sw)
        grid = F.interpolate(grid, size=(qh, qw), mode="bilinear", align_corners=False)
        grid = grid.view(n, heads, tasks, keys, qh * qw).permute(0, 1, 2, 4, 3)
        return grid.reshape(n, heads, tasks * qh * qw, keys)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InvPTBlock(nn.Module):
    """Pre-norm transformer block over the tokens of all tasks (per-token LayerNorm)."""

    def __init__(self, num_tasks: int, dim: int, num_heads: int, *, mlp_ratio: float, drop_path: float, **attn) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TaskAttention(num_tasks, dim, num_heads, **attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, maps: list[Tensor], previous: Tensor | None) -> tuple[list[Tensor], Tensor]:
        n, c, h, w = maps[0].shape
        tokens = [x.flatten(2).transpose(1, 2) for x in maps]
        x = torch.cat(tokens, dim=1)
        normed = self.norm1(x).split(h * w, dim=1)
        attended, scores = self.attn([t.transpose(1, 2).reshape(n, c, h, w) for t in normed], previous)
        qh, qw = self.attn.query_grid(h, w)
        attended = [
            F.interpolate(a.transpose(1, 2).reshape(n, c, qh, qw), size=(h, w), mode="bilinear", align_corners=False)
            .flatten(2)
            .transpose(1, 2)
            for a in attended
        ]
        x = x + self.drop_path(torch.cat(attended, dim=1))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return [t.transpose(1, 2).reshape(n, c, h, w) for t in x.split(h * w, dim=1)], scores


class InvPTStage(nn.Module):
    """One stage: (stages after the first) per-task upsampling plus a backbone skip, then a block."""

    def __init__(self, num_tasks: int, in_dim: int, dim: int, num_heads: int, *, upsample: bool, **block) -> None:
        super().__init__()
        self.patch_embed = nn.ModuleList(UpEmbed(in_dim, dim) for _ in range(num_tasks)) if upsample else None
        self.blocks = nn.ModuleList([InvPTBlock(num_tasks, dim, num_heads, fuse=upsample, **block)])

    def forward(self, maps: list[Tensor], previous: Tensor | None, skip: Tensor | None) -> tuple[list[Tensor], Tensor]:
        if self.patch_embed is not None:
            maps = [embed(x) for embed, x in zip(self.patch_embed, maps)]
            if skip is not None:
                skip = resize_to(skip, maps[0].shape[-2:])
                maps = [x + skip for x in maps]
        scores = previous
        for block in self.blocks:
            maps, scores = block(maps, scores)
        return maps, scores


def _nearest_level(strides: Sequence[int], stride: int, from_end: int) -> int:
    """The level whose stride is nearest `stride` (log scale); among equally near levels (all
    those of a ViT) the `from_end`-th last, or the first if there are fewer."""
    best = min(abs(math.log2(s / stride)) for s in strides)
    ties = [i for i, s in enumerate(strides) if abs(math.log2(s / stride)) == best]
    return ties[-from_end] if len(ties) >= from_end else ties[0]


def _skip_projection(cin: int, cout: int, ratio: float) -> nn.Module:
    """A backbone level at `ratio` times the stage's stride brought to the stage's width (and grid)."""
    if ratio == 2:
        return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
    return nn.Conv2d(cin, cout, 3, padding=1)


class InvPTDecoder(nn.Module):
    """Args:
        in_channels, strides: of the backbone levels (bound at run time); at least 3 levels.
        task_channels: {task: output channels} (bound at run time); the order of the tasks is
            the order of their tokens and of the joint LayerNorm's channels.
        channels: width of the preliminary task features (512 in the paper).
        extra_channels: added to `channels` for the first stage's tokens (64: 576 wide).
        num_heads, kv_strides: per stage; q_stride: the query conv's stride.
        mlp_ratio, qkv_bias: of the transformer blocks.
        drop_path: stochastic depth of the blocks; the authors configure 0.15, but their rule
            (linspace over each stage's depth of 1) gives 0, which is what they train with.
        input_stride: stride of the first stage's grid (32: half the ViT's grid).
        skip_levels: backbone levels added in the second and third stage (default: the
            third-last and fourth-last level, blocks 12 and 6 of a 24-block ViT).

    `forward(features) -> {task: (N, C_t, H/4, W/4), "aux": {"preliminary": {task: (N, C_t, H/32, W/32)}}}`.
    """

    aux_names = ("preliminary",)

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int = 512,
        extra_channels: int = 64,
        num_heads: Sequence[int] = (2, 2, 2),
        kv_strides: Sequence[int] = (2, 4, 8),
        q_stride: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        input_stride: int = 32,
        skip_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(in_channels) < 3 or len(strides) != len(in_channels):
            raise ValueError(f"invpt needs at least 3 backbone levels, got in_channels={list(in_channels)}")
        if len(num_heads) != 3 or len(kv_strides) != 3:
            raise ValueError(f"invpt has 3 stages: num_heads={list(num_heads)}, kv_strides={list(kv_strides)}")
        width = channels + extra_channels
        dims = [width, width // 2, width // 4]
        if width % 4 or any(d % h for d, h in zip(dims, num_heads)):
            raise ValueError(f"invpt: stage widths {dims} (channels + extra_channels halved twice) must be divisible "
                             f"by num_heads={list(num_heads)}")
        self.tasks = list(task_channels)
        self.dims, self.input_stride = dims, input_stride
        self.strides = list(strides)
        stage_strides = [input_stride // 2**i for i in range(3)]
        if skip_levels is None:
            skip_levels = [_nearest_level(strides, stage_strides[k], k + 2) for k in (1, 2)]
        if len(skip_levels) != 2 or not all(-len(strides) <= i < len(strides) for i in skip_levels):
            raise ValueError(f"invpt.skip_levels={skip_levels}: two indices of the {len(strides)} backbone levels")
        self.skip_levels = [i % len(strides) for i in skip_levels]
        top = in_channels[-1]
        self.preliminary_decoder = nn.ModuleDict(
            {t: nn.Sequential(ConvBlock(top, top), ConvBlock(top, channels)) for t in self.tasks}
        )
        self.intermediate_head = nn.ModuleDict({t: nn.Conv2d(channels, c, 1) for t, c in task_channels.items()})
        self.mix_proj = nn.ModuleDict(
            {t: nn.Sequential(nn.Conv2d(channels + c, width, 1)) for t, c in task_channels.items()}
        )
        # keys of the authors' `scale_embed`: index 1 for the second stage, 0 for the third
        self.scale_embed = nn.ModuleDict(
            {
                str(2 - stage): _skip_projection(in_channels[level], dims[stage], strides[level] / stage_strides[stage])
                for stage, level in zip((1, 2), self.skip_levels)
            }
        )
        block = {"mlp_ratio": mlp_ratio, "drop_path": drop_path, "q_stride": q_stride, "qkv_bias": qkv_bias}
        num = len(self.tasks)
        self.invpt_stages = nn.ModuleList(
            InvPTStage(num, dims[max(i - 1, 0)], dims[i], num_heads[i], upsample=i > 0, kv_stride=kv_strides[i], **block)
            for i in range(3)
        )
        self.norm_mts = nn.ModuleList(nn.LayerNorm(d * num) for d in dims)
        self.redu_chan = nn.ModuleDict(
            {str(i): nn.ModuleList(nn.Conv2d(dims[i], width, 1) for _ in self.tasks) for i in (1, 2)}
        )
        self.mt_proj = nn.ModuleDict(
            {t: nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(True))
             for t in self.tasks}
        )
        self.heads = nn.ModuleDict({t: nn.Conv2d(width, c, 1) for t, c in task_channels.items()})
        self._init_weights()

    def _init_weights(self) -> None:
        # as the authors: truncated normal for the transformer stages' linear layers and the final
        # 3x3 convs, unit/zero norms; every other layer keeps PyTorch's default initialisation
        for module in self.invpt_stages.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for proj in self.mt_proj.values():
            trunc_normal_(proj[0].weight, std=0.02)

    def _grid(self, top: Tensor) -> tuple[int, int]:
        """The first stage's grid: the last level's grid brought to `input_stride` (floor)."""
        factor = self.input_stride / self.strides[-1]
        h, w = top.shape[-2:]
        return max(1, math.floor(h / factor)), max(1, math.floor(w / factor))

    def forward(self, features: Sequence[Tensor]) -> dict:
        top = features[-1]
        x = resize_to(top, self._grid(top))
        task_features = {t: self.preliminary_decoder[t](x) for t in self.tasks}
        preliminary = {t: self.intermediate_head[t](f) for t, f in task_features.items()}
        maps = [self.mix_proj[t](torch.cat([task_features[t], preliminary[t]], dim=1)) for t in self.tasks]
        skips = [None, self.scale_embed["1"](features[self.skip_levels[0]]),
                 self.scale_embed["0"](features[self.skip_levels[1]])]
        h, w = maps[0].shape[-2:]
        final = (h * 8, w * 8)
        fused: list[Tensor | int] = [0] * len(self.tasks)
        scores = None
        for i, stage in enumerate(self.invpt_stages):
            maps, scores = stage(maps, scores, skips[i])
            n, c, sh, sw = maps[0].shape
            joint = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=2)
            joint = self.norm_mts[i](joint).transpose(1, 2).reshape(n, c * len(maps), sh, sw)
            for j, task_map in enumerate(joint.split(c, dim=1)):
                if i > 0:
                    task_map = self.redu_chan[str(i)][j](task_map)
                fused[j] = fused[j] + F.interpolate(task_map, size=final, mode="bilinear", align_corners=False)
        out: dict = {t: self.heads[t](self.mt_proj[t](fused[j])) for j, t in enumerate(self.tasks)}
        out["aux"] = {"preliminary": preliminary}
        return out
