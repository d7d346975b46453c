"""TaskPrompter: spatial-channel multi-task prompts inside a ViT, as its authors' code computes it.

Ye & Xu, "TaskPrompter: Spatial-Channel Multi-Task Prompting for Dense Scene Understanding"
(ICLR 2023); code prismformore/Multi-Task-Transformer (TaskPrompter/models/transformers/
taskprompter.py, models/taskprompter_wrapper.py, commit 870c6be), against which
tests/test_reference_taskprompter.py checks this module to 1e-5.

TaskPrompter is not a decoder on finished features: its prompts take part in the encoder. So this
module owns the prompts and runs the backbone's timm ViT itself (`encode`, called by
`MultiTaskModel.encode`), reusing every weight of the ViT's blocks:

1. `prompt_len` learnable tokens per task (D wide) are normalised and attend jointly with the
   patch tokens in every block (one softmax attention over prompts and patches, the block's own
   qkv/proj/MLP/norms, with separate residual paths for prompts and patches).
2. Channel prompts: per block a linear map turns each normalised prompt into one value per patch
   (D -> P, the patch count of the fixed crop grid) and another maps it back (P -> D), added to
   the prompt's attention output. The raw dot products of the per-patch prompt with each channel
   of the normalised patch tokens, within `channel_windows` equal square-arranged windows, are
   the channel scores.
3. At every returned backbone level (the last one through the ViT's final norm) each task reads
   a feature: the patch tokens scaled per head group by the raw (unscaled, unnormalised) spatial
   attention scores of the task's prompt to the patches, and per channel and window by its
   channel scores, each plus the tokens and projected by a 1x1 conv; both concatenated and fused
   (1x1 conv, 3x3 conv, BN, GELU, 1x1 conv). Optionally (PASCAL) each task's feature is replaced by
   a mix of all tasks' features, weighted by a 1x1-conv MLP of the prompts' raw scores to each
   other (cross-task reweighting).
4. The levels' task features are summed, upsampled x4 (bilinear) and decoded by a per-task head
   (3x3 conv, BN, GELU, 1x1 conv; or the authors' deconvolution head).

Where the authors' code fixes the grid (its channel prompts are D -> P linear layers), so does
this one: inputs must have the size the decoder was built for (`image_size`). The authors index
the channel scores by the task's position, not its first prompt, which differs for
`prompt_len > 1`; kept as they compute it. Their ViT has no class token; timm's is kept (so its
pretrained weights load as for any ViT) but left out of the sequence, and gets a zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

__all__ = ["TaskPrompterDecoder"]


class TaskPrompterHead(nn.Module):
    """The authors' ConvHead (3x3 conv, BN, GELU, 1x1 prediction) or, with `deconv`, their
    DEConvHead (x2 transposed conv to half the width, BN, GELU, 3x3 conv, BN, GELU, 1x1)."""

    def __init__(self, in_channels: int, out_channels: int, *, deconv: bool = False) -> None:
        super().__init__()
        if deconv:
            half = in_channels // 2
            self.proj = nn.Sequential(
                nn.ConvTranspose2d(in_channels, half, 2, stride=2),
                nn.BatchNorm2d(half),
                nn.GELU(),
                nn.Conv2d(half, half, 3, padding=1),
                nn.BatchNorm2d(half),
                nn.GELU(),
            )
            self.pred = nn.Conv2d(half, out_channels, 1)
            for conv in (self.proj[0], self.proj[3], self.pred):
                trunc_normal_(conv.weight, std=0.02)
        else:
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.BatchNorm2d(in_channels), nn.GELU()
            )
            self.pred = nn.Conv2d(in_channels, out_channels, 1)
            trunc_normal_(self.proj[0].weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.pred(self.proj(x))


class TaskFeature(nn.Module):
    """One task's feature at one level: spatial and channel readings, fused (see module docstring)."""

    def __init__(self, dim: int, channels: int, fused_channels: int, *, reweight_heads: int | None) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(dim, channels, 1)
        self.channel = nn.Conv2d(dim, channels, 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * channels, fused_channels, 1),
            nn.Conv2d(fused_channels, fused_channels, 3, padding=1),
            nn.BatchNorm2d(fused_channels),
            nn.GELU(),
            nn.Conv2d(fused_channels, fused_channels, 1),
        )
        # cross-task reweighting: per head the prompt's raw scores to every prompt -> one weight per task
        self.reweight = (
            nn.Sequential(nn.Conv2d(reweight_heads, reweight_heads, 1), nn.GELU(), nn.Conv2d(reweight_heads, 1, 1))
            if reweight_heads
            else None
        )

    def forward(self, x: Tensor, spatial: Tensor, channel: Tensor) -> Tensor:
        """x (N,D,h,w); spatial (N,G,h,w) scores per head group; channel (N,D,h,w) scores per channel."""
        by_space = x * spatial.repeat_interleave(x.shape[1] // spatial.shape[1], dim=1) + x
        by_channel = x * channel + x
        return self.fuse(torch.cat([self.spatial(by_space), self.channel(by_channel)], dim=1))


class Prompter(nn.Module):
    """The encoder-side parameters: the task prompts and each block's channel-prompt maps."""

    def __init__(self, tasks: Sequence[str], *, dim: int, depth: int, pixels: int, prompt_len: int) -> None:
        super().__init__()
        self.prompts = nn.ParameterDict({t: nn.Parameter(torch.ones(prompt_len, dim)) for t in tasks})
        for p in self.prompts.values():
            trunc_normal_(p, mean=1.0, std=1.0)
        self.to_pixels = nn.ModuleList(nn.Linear(dim, pixels) for _ in range(depth))
        self.from_pixels = nn.ModuleList(nn.Linear(pixels, dim) for _ in range(depth))
        for linear in [*self.to_pixels, *self.from_pixels]:
            trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)


class TaskPrompterDecoder(nn.Module):
    """Args:
        in_channels, strides: of the backbone levels (bound at run time): a timm ViT's blocks, the
            last one the final block (`backbone.final_norm=true`); one feature reading per level.
        task_channels: {task: output channels} (bound at run time); their order is the prompts'.
        image_size: [H, W] of every input (the crop size): the channel prompts have one value per
            patch of this grid.
        depth, num_heads: of the backbone's ViT (checked when it runs).
        channels: width of each spatial and channel reading (the authors' `embed_dim`).
        fused_channels: width of the fused task features and of the heads (`final_embed_dim`).
        prompt_len: prompts per task.
        channel_windows: windows of the channel scores, a square number (`chan_nheads`).
        cross_task_reweighting: mix the tasks' features by the prompts' affinities (`use_ctr`);
            needs `prompt_len == 1`.
        head: "conv" (ConvHead, every released config) or "deconv" (DEConvHead).

    `encode(backbone, image (N,3,H,W) normalised) -> features`: for each level, the patch tokens
    (N,D,h,w), the prompts' raw spatial scores (N,heads,T*prompt_len,T*prompt_len+h*w) and the
    channel scores (N,T*prompt_len,D,windows_h,windows_w), as one list (maps, then spatial, then channel).
    `forward(features) -> {task: (N, C_t, 4h, 4w)}`, stride 4 for patch-16 ViTs (2x that with "deconv").
    """

    aux_names: tuple[str, ...] = ()
    # modules used inside `encode`: gradient balancers of the features count them as shared
    encoder_modules: tuple[str, ...] = ("prompter",)
    backbone_kind = "vit"  # reads the blocks of a plain ViT (tests pick a ViT backbone for it)

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        image_size: Sequence[int] | None,
        depth: int = 24,
        num_heads: int = 16,
        channels: int = 300,
        fused_channels: int = 350,
        prompt_len: int = 1,
        channel_windows: int = 1,
        cross_task_reweighting: bool = True,
        head: Literal["conv", "deconv"] = "conv",
    ) -> None:
        super().__init__()
        if not in_channels or len(set(in_channels)) != 1 or len(set(strides)) != 1:
            raise ValueError(
                f"taskprompter reads the blocks of a ViT (equal width and stride at every level), got "
                f"in_channels={list(in_channels)}, strides={list(strides)}"
            )
        if image_size is None or len(image_size) != 2:
            raise ValueError(f"decoder.image_size={image_size}: expected the fixed input size [H, W] (the crop size)")
        patch = strides[-1]
        if any(s % patch for s in image_size):
            raise ValueError(f"decoder.image_size={list(image_size)} is not a multiple of the patch size {patch}")
        self.grid = (image_size[0] // patch, image_size[1] // patch)
        dim = in_channels[-1]
        windows = math.isqrt(channel_windows)
        if channel_windows < 1 or windows * windows != channel_windows or any(g % windows for g in self.grid):
            raise ValueError(
                f"decoder.channel_windows={channel_windows} must be a square number n*n with n dividing the "
                f"patch grid {list(self.grid)}"
            )
        if dim % num_heads or dim % (num_heads * prompt_len):
            raise ValueError(
                f"the ViT width {dim} must be divisible by num_heads * prompt_len = {num_heads} * {prompt_len}"
            )
        if cross_task_reweighting and prompt_len != 1:
            raise ValueError("decoder.cross_task_reweighting=true needs decoder.prompt_len=1")
        if head not in ("conv", "deconv"):
            raise ValueError(f"decoder.head={head!r}: expected 'conv' or 'deconv'")
        self.tasks = list(task_channels)
        self.depth, self.num_heads, self.prompt_len, self.windows = depth, num_heads, prompt_len, windows
        self.prompter = Prompter(self.tasks, dim=dim, depth=depth, pixels=self.grid[0] * self.grid[1],
                                 prompt_len=prompt_len)  # fmt: skip
        reweight = num_heads * prompt_len if cross_task_reweighting else None
        self.levels = nn.ModuleList(
            nn.ModuleDict({t: TaskFeature(dim, channels, fused_channels, reweight_heads=reweight) for t in self.tasks})
            for _ in in_channels
        )
        self.heads = nn.ModuleDict(
            {t: TaskPrompterHead(fused_channels, c, deconv=head == "deconv") for t, c in task_channels.items()}
        )

    # ------------------------------------------------------------------ encoder
    def encode(self, backbone: nn.Module, image: Tensor) -> list[Tensor]:
        """Run the backbone's ViT with the prompts (see the class docstring for the output)."""
        vit, levels = self._check(backbone)
        n = image.shape[0]
        x = vit._pos_embed(vit.patch_embed(image))
        # timm's class token and position embeddings; the authors' sequence has patches only
        x = vit.norm_pre(x[:, vit.num_prefix_tokens :])
        if x.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"taskprompter is built for {self.grid[0]}x{self.grid[1]} patches (decoder.image_size), "
                f"the input {tuple(image.shape[-2:])} gives {x.shape[1]}"
            )
        prompts = torch.cat([self.prompter.prompts[t] for t in self.tasks])[None].expand(n, -1, -1)
        maps, spatial, channel = [], [], []
        for index, block in enumerate(vit.blocks):
            x, prompts, scores, channel_scores = self._block(index, block, x, prompts)
            if index in levels:
                tokens = vit.norm(x) if index == levels[-1] else x
                maps.append(tokens.transpose(1, 2).reshape(n, -1, *self.grid).contiguous())  # NCHW memory
                spatial.append(scores)
                channel.append(channel_scores)
        return [*maps, *spatial, *channel]

    def _check(self, backbone: nn.Module) -> tuple[VisionTransformer, list[int]]:
        vit = getattr(getattr(backbone, "model", None), "model", None)
        if not isinstance(vit, VisionTransformer):
            raise TypeError(
                f"decoder=taskprompter needs a timm ViT backbone, got {getattr(backbone, 'name', backbone)}"
            )
        if getattr(backbone, "task_conditioned", False):
            raise ValueError("decoder=taskprompter runs the ViT itself and cannot use task-conditioned backbone layers")
        if not all(isinstance(b, Block) for b in vit.blocks):
            raise ValueError(f"decoder=taskprompter needs timm's standard ViT blocks, {backbone.name} has others")
        depth, heads = len(vit.blocks), vit.blocks[0].attn.num_heads
        levels = [int(i) % depth for i in backbone.model.out_indices]
        if (depth, heads) != (self.depth, self.num_heads):
            raise ValueError(
                f"decoder.depth={self.depth}, decoder.num_heads={self.num_heads}, but the ViT {backbone.name} has "
                f"{depth} blocks of {heads} heads"
            )
        if len(levels) != len(self.levels) or levels[-1] != depth - 1 or isinstance(vit.norm, nn.Identity):
            raise ValueError(
                f"decoder=taskprompter reads {len(self.levels)} levels, the last one the final block through the "
                f"final norm: set backbone.final_norm=true and backbone.out_indices ending in {depth - 1} "
                f"(got {levels})"
            )
        return vit, levels

    def _block(self, index: int, block: Block, x: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One ViT block over prompts and patches; returns both, the prompts' raw attention scores
        (N, heads, T, T+P) and the channel scores (N, T, D, windows, windows)."""
        attn = block.attn
        t = prompts.shape[1]
        normed_prompts, normed_x = block.norm1(prompts), block.norm1(x)
        tokens = torch.cat([normed_prompts, normed_x], dim=1)
        n, length, dim = tokens.shape
        qkv = attn.qkv(tokens).reshape(n, length, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        scores = q @ k.transpose(-2, -1)
        weights = attn.attn_drop((scores * attn.scale).softmax(dim=-1))
        mixed = attn.proj_drop(attn.proj(attn.norm((weights @ v).transpose(1, 2).reshape(n, length, dim))))
        pixel_prompts = self.prompter.to_pixels[index](normed_prompts)  # (N, T, P)
        prompt_out, patch_out = mixed[:, :t], mixed[:, t:]
        # in place on a view of the attention output, as the authors add it: the last block's
        # prompt update, unused by any output, then still gets a (zero) gradient, so DDP sees it used
        prompt_out += self.prompter.from_pixels[index](pixel_prompts)
        x = x + block.drop_path1(block.ls1(patch_out))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        prompts = prompts + block.drop_path1(block.ls1(prompt_out))
        prompts = prompts + block.drop_path2(block.ls2(block.mlp(block.norm2(prompts))))
        return x, prompts, scores[:, :, :t], self._channel_scores(pixel_prompts, normed_x)

    def _channel_scores(self, pixel_prompts: Tensor, normed_x: Tensor) -> Tensor:
        """Per window, the dot products of each prompt's per-patch values with each channel's."""
        n, t, _ = pixel_prompts.shape
        w = self.windows
        wh, ww = self.grid[0] // w, self.grid[1] // w

        def windowed(rows: Tensor) -> Tensor:  # (N, R, P) -> (N, w*w, R, wh*ww), in that memory order
            r = rows.shape[1]
            return rows.reshape(n, r, w, wh, w, ww).permute(0, 2, 4, 1, 3, 5).reshape(n, w * w, r, wh * ww).contiguous()

        scores = windowed(pixel_prompts) @ windowed(normed_x.transpose(1, 2)).transpose(-2, -1)  # (N, w*w, T, D)
        return scores.permute(0, 2, 3, 1).reshape(n, t, -1, w, w)

    # ------------------------------------------------------------------ task features and heads
    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        count = len(self.levels)
        if len(features) != 3 * count:
            raise ValueError(
                f"taskprompter decodes the {3 * count} tensors of its own `encode` (MultiTaskModel calls it), "
                f"got {len(features)} feature maps"
            )
        total: dict[str, Tensor | int] = {t: 0 for t in self.tasks}
        for level, x, spatial, channel in zip(
            self.levels, features[:count], features[count : 2 * count], features[2 * count :]
        ):
            for task, feature in self._level(level, x, spatial, channel).items():
                total[task] = total[task] + feature
        return {
            t: self.heads[t](F.interpolate(total[t], scale_factor=4, mode="bilinear", align_corners=False))
            for t in self.tasks
        }

    def _level(self, level: nn.ModuleDict, x: Tensor, spatial: Tensor, channel: Tensor) -> dict[str, Tensor]:
        n, _, h, w = x.shape
        count = len(self.tasks) * self.prompt_len
        win_h, win_w = h // self.windows, w // self.windows
        out = {}
        for i, task in enumerate(self.tasks):
            rows = spatial[:, :, i * self.prompt_len : (i + 1) * self.prompt_len, count:]  # (N, heads, len, P)
            by_head = rows.reshape(n, -1, h, w)  # groups head-major, then prompt
            # indexed by task position, as the authors do (their first prompt only when prompt_len = 1)
            by_channel = channel[:, i].repeat_interleave(win_h, dim=2).repeat_interleave(win_w, dim=3)
            out[task] = level[task](x, by_head, by_channel)
        if level[self.tasks[0]].reweight is None:
            return out
        mixed = {}
        for i, task in enumerate(self.tasks):
            weights = level[task].reweight(spatial[:, :, i : i + 1, :count])  # (N, 1, 1, T)
            mixed[task] = sum(weights[..., j : j + 1] * out[other] for j, other in enumerate(self.tasks))
        return mixed
