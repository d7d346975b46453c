"""InvPT: an inverted-pyramid transformer decoder in which all tasks attend to each other.

After Ye & Xu, "Inverted Pyramid Multi-task Transformer for Dense Scene Understanding" (ECCV 2022).

1. Preliminary decoder: from one coarse backbone level (stride `stage_strides[0]`), each task gets
   its own two conv blocks and a 1x1 preliminary prediction (deep supervision, aux set
   "preliminary"). Feature and prediction are mixed by a 1x1 conv into the task's tokens.
2. Inverted pyramid: the tokens of *all* tasks at *all* positions form one sequence, refined by
   transformer blocks whose self-attention mixes tasks and positions. Each stage runs at a finer
   stride than the last (default 32 -> 16 -> 8) with half the width; between stages every task's
   map is upsampled and refined by convs (the "UP-Transformer" block), and a backbone level of
   matching scale is added (encoder feature aggregation).
3. Efficient attention: `F.scaled_dot_product_attention`, with queries taken from a strided
   depthwise conv (per task, as the paper) and keys/values average-pooled per task map by
   `kv_strides` (2, 4, 8 in the paper: the key grid stays at stride 64 whatever the stage).
4. Multi-scale aggregation: every stage's task maps are projected to the first stage's width,
   upsampled to `output_stride` (4), summed, and fed to per-task heads.

Differences from the reference code: the cross-scale attention message passing (adding the
previous stage's attention scores to the current ones) is left out, since it needs materialised
attention maps, which fused attention kernels never build; the LayerNorm after each stage normalises
each task's token on its own instead of all tasks' channels jointly; plain 3x3 convs replace the
dilated ones of the upsampling blocks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from mtl_vision.layers import ConvBNReLU
from mtl_vision.models.decoders.common import resize_to, task_head

__all__ = ["InvPTDecoder"]


def _grouped_conv_bn_relu(in_per_group: int, out_per_group: int, groups: int, kernel_size: int = 3) -> nn.Sequential:
    """`groups` independent conv-BN-ReLU blocks (one per task) as one grouped convolution on the
    tasks' maps stacked along channels."""
    return nn.Sequential(
        nn.Conv2d(
            in_per_group * groups,
            out_per_group * groups,
            kernel_size,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_per_group * groups),
        nn.ReLU(inplace=True),
    )


def _nearest_level(strides: Sequence[int], target: int, rank: int = 0) -> int:
    """Backbone level whose stride is nearest `target` (log scale). Among equally near levels (all
    the levels of a ViT), `rank` 0 takes the deepest, 1 the one before it, and so on."""
    best = min(abs(math.log2(s / target)) for s in strides)
    ties = [i for i, s in enumerate(strides) if abs(math.log2(s / target)) == best]
    return ties[max(0, len(ties) - 1 - rank)]


def _to_maps(x: Tensor) -> Tensor:
    """(N, T, h, w, C) tokens -> (N, T*C, h, w) task maps stacked along channels."""
    n, t, h, w, c = x.shape
    return x.permute(0, 1, 4, 2, 3).reshape(n, t * c, h, w)


def _to_tokens(x: Tensor, tasks: int) -> Tensor:
    """(N, T*C, h, w) -> (N, T, h, w, C)."""
    n, tc, h, w = x.shape
    return x.view(n, tasks, tc // tasks, h, w).permute(0, 1, 3, 4, 2)


class TaskAttention(nn.Module):
    """Multi-head self-attention over the tokens of all tasks and positions.

    Queries come from a per-task depthwise conv with stride `q_stride` (then BN, as the paper's
    convolutional projection), keys and values from each task map average-pooled to
    ceil(h / kv_stride) x ceil(w / kv_stride); the attention output is upsampled back to (h, w).
    The sequence concatenates the tasks, so every query sees every task's keys.

    `forward(x (N, T, h, w, C)) -> (N, T, h, w, C)`.
    """

    def __init__(
        self, num_tasks: int, dim: int, num_heads: int, q_stride: int = 2, kv_stride: int = 1, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"invpt: {num_heads} attention heads do not divide the stage width {dim}")
        if q_stride < 1 or kv_stride < 1:
            raise ValueError(f"invpt: strides must be >= 1, got q_stride={q_stride}, kv_stride={kv_stride}")
        self.num_tasks, self.num_heads = num_tasks, num_heads
        self.q_stride, self.kv_stride = q_stride, kv_stride
        # kernel 2s-1 (3 for s <= 2) with padding s-1 gives ceil(h / s) rows, as the key pooling
        kernel = max(3, 2 * q_stride - 1)
        self.q_conv = nn.Sequential(
            nn.Conv2d(
                dim * num_tasks,
                dim * num_tasks,
                kernel,
                stride=q_stride,
                padding=kernel // 2,
                groups=dim * num_tasks,
                bias=False,
            ),
            nn.BatchNorm2d(dim * num_tasks),
        )
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def key_grid(self, size: Sequence[int]) -> tuple[int, int]:
        """Spatial size of each task's keys for a stage of `size`."""
        return math.ceil(size[0] / self.kv_stride), math.ceil(size[1] / self.kv_stride)

    def _heads(self, tokens: Tensor) -> Tensor:
        n, length, c = tokens.shape
        return tokens.view(n, length, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        n, t, h, w, c = x.shape
        maps = _to_maps(x)
        queries = _to_tokens(self.q_conv(maps), t)
        hq, wq = queries.shape[2:4]
        keys = _to_tokens(F.adaptive_avg_pool2d(maps, self.key_grid((h, w))), t) if self.kv_stride > 1 else x
        queries, keys = queries.reshape(n, -1, c), keys.reshape(n, -1, c)
        out = F.scaled_dot_product_attention(
            self._heads(self.q(queries)), self._heads(self.k(keys)), self._heads(self.v(keys))
        )
        out = self.proj(out.transpose(1, 2).reshape(n, -1, c)).view(n, t, hq, wq, c)
        if (hq, wq) != (h, w):
            out = _to_tokens(resize_to(_to_maps(out), (h, w)), t)
        return out


class TaskTransformerBlock(nn.Module):
    """Pre-norm transformer block on (N, T, h, w, C) tokens: task-and-position attention, MLP."""

    def __init__(
        self,
        num_tasks: int,
        dim: int,
        num_heads: int,
        *,
        q_stride: int,
        kv_stride: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TaskAttention(num_tasks, dim, num_heads, q_stride=q_stride, kv_stride=kv_stride)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class InvPTStage(nn.Module):
    """One level of the inverted pyramid.

    Stages after the first upsample each task's map to their size and refine it with two conv
    blocks (per task) that also change the width (`up`), then add the projected backbone level of
    this scale (`skip`, optional). Then `depth` transformer blocks over all tasks' tokens.

    `forward(x (N, T, h', w', C_in), size, skip=None) -> (N, T, size[0], size[1], C)`.
    """

    def __init__(
        self,
        num_tasks: int,
        in_dim: int,
        dim: int,
        *,
        upsample: bool,
        skip_channels: int | None,
        depth: int,
        num_heads: int,
        q_stride: int,
        kv_stride: int,
        mlp_ratio: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.up = (
            nn.Sequential(
                _grouped_conv_bn_relu(in_dim, dim, num_tasks),
                _grouped_conv_bn_relu(dim, dim, num_tasks),
            )
            if upsample
            else None
        )
        if not upsample and in_dim != dim:
            raise ValueError("invpt: the first stage keeps the width of its input tokens")
        self.skip = nn.Conv2d(skip_channels, dim, 3, padding=1) if skip_channels else None
        self.blocks = nn.ModuleList(
            TaskTransformerBlock(
                num_tasks,
                dim,
                num_heads,
                q_stride=q_stride,
                kv_stride=kv_stride,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path,
            )
            for _ in range(depth)
        )

    def forward(self, x: Tensor, size: Sequence[int], skip: Tensor | None = None) -> Tensor:
        if self.up is not None:
            maps = self.up(resize_to(_to_maps(x), size))
            if self.skip is not None:
                assert skip is not None
                # the same encoder map joins every task, as in the paper
                maps = maps + resize_to(self.skip(skip), size).repeat(1, self.num_tasks, 1, 1)
            x = _to_tokens(maps, self.num_tasks)
        for block in self.blocks:
            x = block(x)
        return x


class InvPTDecoder(nn.Module):
    """InvPT decoder (see the module docstring).

    Args:
        in_channels, strides: of the backbone levels.
        task_channels: output channels per task.
        channels: token width of the first stage, and of the preliminary decoder, the multi-scale
            aggregation and the heads; stage i has width channels / 2**i (InvPT: 512 + 64 = 576).
        stage_strides: stride of each stage, coarse to fine (InvPT: 32, 16, 8).
        num_heads: attention heads per stage; each must divide its stage's width.
        depths: transformer blocks per stage.
        q_strides: stride of the query projection per stage (attention at 1/q of the stage's
            resolution, upsampled back).
        kv_strides: average-pooling factor of keys/values per stage.
        mlp_ratio: MLP hidden width / token width.
        drop_path: stochastic depth rate of every block.
        output_stride: stride at which the stages are aggregated and the heads predict.
        fuse_backbone: add a backbone level of matching scale to every stage after the first.
        input_level: backbone level feeding the preliminary decoder (default: nearest to
            stage_strides[0], the deepest of equals).
        fuse_levels: backbone level added to each stage, one entry per stage, None for the default
            (nearest stride; on a ViT, where all levels are equally near, earlier blocks for finer
            stages); entry 0 is unused, the first stage starts from `input_level`.

    `forward(features)` returns {task: (N, C_t, H/output_stride, W/output_stride)} and
    `"aux": {"preliminary": {task: (N, C_t, H/stage_strides[0], W/stage_strides[0])}}`.
    """

    aux_names: tuple[str, ...] = ("preliminary",)

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int = 576,
        stage_strides: Sequence[int] = (32, 16, 8),
        num_heads: Sequence[int] = (2, 2, 2),
        depths: Sequence[int] = (1, 1, 1),
        q_strides: Sequence[int] = (2, 2, 2),
        kv_strides: Sequence[int] = (2, 4, 8),
        mlp_ratio: float = 4.0,
        drop_path: float = 0.15,
        output_stride: int = 4,
        fuse_backbone: bool = True,
        input_level: int | None = None,
        fuse_levels: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} differ in length")
        if not task_channels:
            raise ValueError("invpt: no tasks")
        n_stages = len(stage_strides)
        per_stage = {"num_heads": num_heads, "depths": depths, "q_strides": q_strides, "kv_strides": kv_strides}
        for name, values in per_stage.items():
            if len(values) != n_stages:
                raise ValueError(f"invpt: {name} has {len(values)} entries for {n_stages} stage_strides")
        if n_stages < 1 or any(b >= a for a, b in itertools.pairwise(stage_strides)):
            raise ValueError(f"invpt: stage_strides must decrease (an inverted pyramid), got {list(stage_strides)}")
        if channels % 2 ** (n_stages - 1):
            raise ValueError(
                f"invpt: channels={channels} must be divisible by 2**{n_stages - 1}: each stage halves the width"
            )
        self.dims = [channels // 2**i for i in range(n_stages)]
        for i, (dim, heads) in enumerate(zip(self.dims, num_heads)):
            if heads < 1 or dim % heads:
                raise ValueError(
                    f"invpt: num_heads[{i}]={heads} does not divide the width {dim} of stage {i} "
                    f"(channels={channels} halved per stage); choose channels or num_heads to fit"
                )
        self.tasks = list(task_channels)
        num_tasks = len(self.tasks)
        self.stage_strides = [int(s) for s in stage_strides]
        self.output_stride = int(output_stride)
        self._finest = min(range(len(strides)), key=lambda i: strides[i])
        self._finest_stride = strides[self._finest]

        # 1. preliminary decoder on one coarse level
        self.input_level = (
            _nearest_level(strides, self.stage_strides[0]) if input_level is None else input_level % len(strides)
        )
        c_in = in_channels[self.input_level]
        self.preliminary = nn.ModuleDict(
            {t: nn.Sequential(ConvBNReLU(c_in, channels), ConvBNReLU(channels, channels)) for t in self.tasks}
        )
        self.preliminary_heads = nn.ModuleDict({t: nn.Conv2d(channels, c, 1) for t, c in task_channels.items()})
        self.mix = nn.ModuleDict({t: nn.Conv2d(channels + c, channels, 1) for t, c in task_channels.items()})

        # 2. the stages, with the backbone levels they take in
        if fuse_levels is not None and len(fuse_levels) != n_stages:
            raise ValueError(f"invpt: fuse_levels has {len(fuse_levels)} entries for {n_stages} stages")
        self.fuse_levels: list[int | None] = [None]
        for i in range(1, n_stages):
            level = fuse_levels[i] if fuse_levels is not None else None
            if not fuse_backbone:
                level = None
            elif level is None:
                level = _nearest_level(strides, self.stage_strides[i], rank=i)
            else:
                level = level % len(strides)
            self.fuse_levels.append(level)
        self.stages = nn.ModuleList(
            InvPTStage(
                num_tasks,
                self.dims[max(i - 1, 0)],
                self.dims[i],
                upsample=i > 0,
                skip_channels=in_channels[self.fuse_levels[i]] if self.fuse_levels[i] is not None else None,
                depth=depths[i],
                num_heads=num_heads[i],
                q_stride=q_strides[i],
                kv_stride=kv_strides[i],
                mlp_ratio=mlp_ratio,
                drop_path=drop_path,
            )
            for i in range(n_stages)
        )

        # 3. multi-scale aggregation and heads
        self.stage_norms = nn.ModuleList(nn.LayerNorm(d) for d in self.dims)
        self.reduce = nn.ModuleList(
            nn.Conv2d(d * num_tasks, channels * num_tasks, 1, groups=num_tasks) if i > 0 else nn.Identity()
            for i, d in enumerate(self.dims)
        )
        self.heads = nn.ModuleDict({t: task_head(channels, c) for t, c in task_channels.items()})
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def plan(self, image_size: Sequence[int]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        """(stage sizes, output size) for an image of `image_size`: ceil(H / stride) per stage."""
        h, w = image_size
        sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in self.stage_strides]
        return sizes, (math.ceil(h / self.output_stride), math.ceil(w / self.output_stride))

    def forward(self, features: Sequence[Tensor]) -> dict:
        finest = features[self._finest]
        image_size = (finest.shape[-2] * self._finest_stride, finest.shape[-1] * self._finest_stride)
        sizes, out_size = self.plan(image_size)

        x = resize_to(features[self.input_level], sizes[0])
        tokens, preliminary = [], {}
        for t in self.tasks:
            feat = self.preliminary[t](x)
            preliminary[t] = self.preliminary_heads[t](feat)
            tokens.append(self.mix[t](torch.cat([feat, preliminary[t]], dim=1)))
        x = _to_tokens(torch.cat(tokens, dim=1), len(self.tasks))

        aggregated = None
        for stage, level, size, norm, reduce in zip(
            self.stages, self.fuse_levels, sizes, self.stage_norms, self.reduce
        ):
            x = stage(x, size, None if level is None else features[level])
            maps = resize_to(reduce(_to_maps(norm(x))), out_size)
            aggregated = maps if aggregated is None else aggregated + maps

        per_task = aggregated.chunk(len(self.tasks), dim=1)
        out: dict = {t: self.heads[t](m) for t, m in zip(self.tasks, per_task)}
        out["aux"] = {"preliminary": preliminary}
        return out
