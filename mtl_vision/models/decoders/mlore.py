"""MLoRE: Yang et al., "Multi-Task Dense Prediction via Mixture of Low-Rank Experts", CVPR 2024
(arXiv 2403.17749; code YuqiYang213/MLoRE), computing what the authors' model computes.

The decoder reads every backbone level (on the authors' ViT-L: the outputs of blocks 6, 12 and 18
and of the last block after the ViT's final LayerNorm, `backbone.final_norm`; levels of another
size, on a CNN, are resized to the last one). Each level is projected to `channels` and passes two
mixture-of-low-rank-experts blocks per task (`LowRankMoE`). For task t and input x a block computes

    y = conv1x1_t(x)
    gates, noise, mix = router_t(y)                      one set per image, from a global summary
    e = BN_t(sum_i gates_i * up_i(down_i(y)))            shared experts: 3x3 down to rank r_i, 1x1 up
    z = e + mix * up_t(down_t(y)) + conv3x3(y.detach())  task expert + the generic convolution
    out = conv1x1_t(GELU(BN'_t(z)))

The gates keep the `top_k` largest expert logits (plus noise of a learned scale while training):
masked before a softmax (`pre_softmax`), or a softmax whose other entries are then set to zero.
The generic convolution is shared by every task and passes no gradient into its input. Per task a
convolutional gate softmax-weights the levels; the weighted sum is upsampled x4 and a ConvHead
(3x3 conv, BatchNorm, GELU, 1x1 conv) predicts at stride 4.

Load balancing (`pop_aux_loss`): per block, the squared coefficient of variation over the experts
of their mean gate (over the batch and every task), summed over all blocks.

`reparameterize()` switches to the authors' inference form: every low-rank expert becomes one 3x3
convolution, and per image the gated experts, their BatchNorm, the task expert and the generic
convolution are folded into a single 3x3 convolution.

The router summarises its input with a linear layer over the positions of the feature grid, so
the model is built for one input size (`input_size`, as the authors' ViT). At another grid size
(our extension, never reached by the authors' fixed-size pipeline) that layer's weights are
resampled bilinearly and rescaled so that the summary keeps its scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_vision.models.decoders.common import resize_to

__all__ = ["ConvHead", "LowRankConv", "LowRankMoE", "MLoREDecoder", "RouterContext"]


class LowRankConv(nn.Module):
    """A kxk convolution through `rank` channels: kxk `down` then 1x1 `up`."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.down = nn.Conv2d(in_channels, rank, kernel_size, padding=kernel_size // 2)
        self.up = nn.Conv2d(rank, out_channels, 1)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def merged(self) -> tuple[Tensor, Tensor]:
        """The single kxk convolution (weight (out, in, k, k), bias (out,)) equal to this module."""
        up = self.up.weight.flatten(1)  # (out, rank)
        weight = torch.einsum("or,rikl->oikl", up, self.down.weight)
        return weight, self.up.bias + up @ self.down.bias


class RouterContext(nn.Module):
    """Global summary of a (N, C, h, w) map -> (N, C/2): a local branch (1x1 conv, LayerNorm, GELU,
    1x1 conv, mean over positions) beside a spatial one (a learned weighting of the positions,
    LayerNorm, GELU, 1x1 conv)."""

    def __init__(self, channels: int, grid: Sequence[int]) -> None:
        super().__init__()
        quarter = channels // 4
        self.grid = (int(grid[0]), int(grid[1]))
        self.local_proj = nn.Conv2d(channels, quarter, 1)
        self.local_norm = nn.LayerNorm(quarter)
        self.local_mix = nn.Conv2d(quarter, quarter, 1)
        self.pool = nn.Linear(self.grid[0] * self.grid[1], 1)
        self.pool_norm = nn.LayerNorm(channels)
        self.global_proj = nn.Conv2d(channels, quarter, 1)
        nn.init.trunc_normal_(self.pool.weight, std=0.02)
        nn.init.zeros_(self.pool.bias)

    def _pool_weight(self, size: tuple[int, int]) -> Tensor:
        if size == self.grid:
            return self.pool.weight
        grid = self.pool.weight.view(1, 1, *self.grid)
        scale = (self.grid[0] * self.grid[1]) / (size[0] * size[1])
        return (F.interpolate(grid, size=size, mode="bilinear", align_corners=False) * scale).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        local = self.local_norm(self.local_proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        local = self.local_mix(F.gelu(local)).flatten(2).mean(dim=2)
        pooled = F.linear(x.reshape(n, c, h * w), self._pool_weight((h, w)), self.pool.bias).squeeze(2)
        pooled = F.gelu(self.pool_norm(pooled))
        pooled = self.global_proj(pooled[:, :, None, None]).flatten(1)
        return torch.cat([local, pooled], dim=1)


class _Router(nn.Module):
    """(N, C, h, w) -> (N, 2E+1): E expert logits, E noise scales, one task-expert weight."""

    def __init__(self, channels: int, grid: Sequence[int], num_experts: int) -> None:
        super().__init__()
        self.context = RouterContext(channels, grid)
        self.logits = nn.Conv2d(2 * (channels // 4), 2 * num_experts + 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.context(x)[:, :, None, None]).flatten(1)


class LowRankMoE(nn.Module):
    """One MLoRE block: task-routed mixture of low-rank experts with a task expert and a generic
    convolution (see the module docstring).

    Args:
        channels: input and output channels.
        tasks: task names (one router, task expert, projections and BatchNorms each).
        ranks: rank of each shared expert.
        specific_rank: rank of each task's own expert.
        top_k: experts kept per image.
        pre_softmax: drop the other experts before the softmax (else zero them after it).
        grid: (h, w) of the feature maps the router is built for.

    `forward(x (N,C,h,w), task) -> (out (N,C,h,w), gates (N,E))`.
    """

    def __init__(
        self,
        channels: int,
        tasks: Sequence[str],
        ranks: Sequence[int],
        specific_rank: int,
        top_k: int,
        pre_softmax: bool,
        grid: Sequence[int],
    ) -> None:
        super().__init__()
        self.ranks = [int(r) for r in ranks]
        self.top_k = int(top_k)
        self.pre_softmax = bool(pre_softmax)
        self.experts = nn.ModuleList(LowRankConv(channels, channels, r) for r in self.ranks)
        self.shared = nn.Conv2d(channels, channels, 3, padding=1)
        self.task_in = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1) for t in tasks})
        self.task_out = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1) for t in tasks})
        self.task_expert = nn.ModuleDict({t: LowRankConv(channels, channels, specific_rank) for t in tasks})
        self.expert_norm = nn.ModuleDict({t: nn.BatchNorm2d(channels) for t in tasks})
        self.norm = nn.ModuleDict({t: nn.BatchNorm2d(channels) for t in tasks})
        self.routers = nn.ModuleDict({t: _Router(channels, grid, len(self.ranks)) for t in tasks})
        self.merged = False

    def gates(self, logits: Tensor) -> Tensor:
        """(N, E) expert logits -> gate weights with all but the `top_k` largest at zero."""
        dropped = logits.shape[1] - self.top_k
        if dropped <= 0:
            return logits.softmax(dim=1)
        lowest = logits.topk(dropped, dim=1, largest=False).indices
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, lowest, True)
        if self.pre_softmax:
            return logits.masked_fill(mask, float("-inf")).softmax(dim=1)
        return logits.softmax(dim=1).masked_fill(mask, 0.0)

    def forward(self, x: Tensor, task: str) -> tuple[Tensor, Tensor]:
        y = self.task_in[task](x)
        logits = self.routers[task](y)
        e = len(self.ranks)
        expert_logits, noise_scale, mix = logits[:, :e], logits[:, e : 2 * e], logits[:, 2 * e :]
        if self.training:
            expert_logits = expert_logits + torch.randn_like(expert_logits) * noise_scale
        gates = self.gates(expert_logits)
        if self.merged:
            z = self._merged_forward(y, gates, mix, task)
        else:
            z = self.expert_norm[task](self._mixture(y, gates))
            z = z + self.task_expert[task](y) * mix[:, :, None, None] + self.shared(y.detach())
        return self.task_out[task](F.gelu(self.norm[task](z))), gates

    def _mixture(self, y: Tensor, gates: Tensor) -> Tensor:
        """sum_i gates_i * expert_i(y), with every expert's down and up projection in one conv each."""
        down_w = torch.cat([ex.down.weight for ex in self.experts])
        down_b = torch.cat([ex.down.bias for ex in self.experts])
        hidden = F.conv2d(y, down_w, down_b, padding=1)
        scale = gates.repeat_interleave(torch.tensor(self.ranks, device=gates.device), dim=1)
        up_w = torch.cat([ex.up.weight for ex in self.experts], dim=1)
        up_b = gates @ torch.stack([ex.up.bias for ex in self.experts])
        return F.conv2d(hidden * scale[:, :, None, None], up_w) + up_b[:, :, None, None]

    # ------------------------------------------------------------------ inference form
    @torch.no_grad()
    def reparameterize(self, enabled: bool = True) -> None:
        """Switch to (or back from) the merged inference form, from the current weights."""
        self.merged = enabled
        if not enabled:
            return
        weights, biases = zip(*(ex.merged() for ex in self.experts))
        self.register_buffer("merged_weight", torch.stack(weights), persistent=False)
        self.register_buffer("merged_bias", torch.stack(biases), persistent=False)
        for task, expert in self.task_expert.items():
            weight, bias = expert.merged()
            self.register_buffer(f"merged_weight_{task}", weight, persistent=False)
            self.register_buffer(f"merged_bias_{task}", bias, persistent=False)

    def _merged_forward(self, y: Tensor, gates: Tensor, mix: Tensor, task: str) -> Tensor:
        if self.training:
            raise RuntimeError(
                "the re-parameterised MLoRE block is for inference only (BatchNorm is folded with its running "
                "statistics): call reparameterize(False) before training"
            )
        n, c, h, w = y.shape
        weight = torch.einsum("ne,eoikl->noikl", gates, self.merged_weight)
        bias = gates @ self.merged_bias
        norm = self.expert_norm[task]
        scale = norm.weight / (norm.running_var + norm.eps).sqrt()
        weight = weight * scale[None, :, None, None, None]
        bias = norm.bias + (bias - norm.running_mean) * scale
        weight = weight + mix[:, :, None, None, None] * getattr(self, f"merged_weight_{task}") + self.shared.weight
        bias = bias + mix * getattr(self, f"merged_bias_{task}") + self.shared.bias
        out = F.conv2d(y.reshape(1, n * c, h, w), weight.reshape(n * c, c, 3, 3), bias.reshape(-1), padding=1, groups=n)
        return out.view(n, c, h, w)


class ConvHead(nn.Module):
    """3x3 conv, BatchNorm, GELU, then a 1x1 prediction layer."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.GELU())
        self.pred = nn.Conv2d(channels, out_channels, 1)
        nn.init.trunc_normal_(self.proj[0].weight, std=0.02)
        nn.init.normal_(self.pred.bias, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.pred(self.proj(x))


def _balance(gates: Sequence[Tensor]) -> Tensor:
    """Squared coefficient of variation over the experts of the mean gate of (N, E) maps."""
    mean = torch.cat(list(gates)).mean(dim=0)
    if mean.numel() < 2:
        return mean.new_zeros(())
    return (mean.std() / mean.mean()) ** 2


class MLoREDecoder(nn.Module):
    """MLoRE on backbone levels of one stride (a ViT's blocks), see the module docstring.

    Args:
        in_channels: channels of each backbone level (the authors tap four).
        strides: stride of each backbone level; levels of other sizes than the last are resized to it.
        task_channels: output channels per task.
        input_size: (H, W) of the images the model is built for; with the last level's stride it
            gives the grid of the routers' spatial summary.
        channels: width of the experts (the authors' `final_embed_dim`); a multiple of 4.
        ranks: rank of each shared low-rank expert (`rank_list`).
        specific_rank: rank of each task's own expert (`spe_rank`).
        top_k: experts kept per image (`topk`).
        pre_softmax: drop the other experts before the softmax (True) or zero them after it.

    `forward(features)` returns {task: (N, task_channels[task], 4h, 4w)} for levels of size (h, w).
    """

    aux_names: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        input_size: Sequence[int] = (448, 576),
        channels: int = 768,
        ranks: Sequence[int] = tuple(range(16, 241, 16)),
        specific_rank: int = 16,
        top_k: int = 9,
        pre_softmax: bool = True,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides) or not in_channels:
            raise ValueError(
                f"in_channels {list(in_channels)} and strides {list(strides)} must be non-empty and of one length"
            )
        if channels % 4:
            raise ValueError(
                f"decoder.channels must be a multiple of 4 (the router splits it in quarters), got {channels}"
            )
        if not ranks or min(ranks) < 1 or specific_rank < 1:
            raise ValueError(f"decoder.ranks {list(ranks)} and decoder.specific_rank {specific_rank} must be positive")
        if not 1 <= top_k <= len(ranks):
            raise ValueError(f"decoder.top_k must be in 1..{len(ranks)} (the number of ranks), got {top_k}")
        if len(input_size) != 2:
            raise ValueError(f"decoder.input_size must be [height, width], got {list(input_size)}")
        self.tasks = list(task_channels)
        self.num_levels = len(in_channels)
        self.grid = tuple(int(s) // int(strides[-1]) for s in input_size)
        if min(self.grid) < 1:
            raise ValueError(f"decoder.input_size {list(input_size)} is smaller than the stride {strides[-1]}")
        self.project = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        args = (channels, self.tasks, ranks, specific_rank, top_k, pre_softmax, self.grid)
        self.experts_1 = nn.ModuleList(LowRankMoE(*args) for _ in in_channels)
        self.experts_2 = nn.ModuleList(LowRankMoE(*args) for _ in in_channels)
        self.level_gates = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Conv2d(channels * self.num_levels, channels, 1),
                    nn.BatchNorm2d(channels),
                    nn.GELU(),
                    nn.Conv2d(channels, self.num_levels, 3, padding=1),
                )
                for t in self.tasks
            }
        )
        self.heads = nn.ModuleDict({t: ConvHead(channels, n) for t, n in task_channels.items()})
        self.last_gates: dict[str, list[dict[str, Tensor]]] = {}
        self.last_balance_loss: Tensor | None = None
        self._pending: list[Tensor] = []

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        if len(features) != self.num_levels:
            raise ValueError(f"MLoRE decoder built for {self.num_levels} backbone levels, got {len(features)}")
        size = features[-1].shape[-2:]
        levels: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        gates: dict[str, list[dict[str, Tensor]]] = {"route_1": [], "route_2": []}
        for proj, first, second, level in zip(self.project, self.experts_1, self.experts_2, features):
            shared = proj(resize_to(level, size))
            gates["route_1"].append({})
            gates["route_2"].append({})
            for task in self.tasks:
                x, gates["route_1"][-1][task] = first(shared, task)
                x, gates["route_2"][-1][task] = second(x, task)
                levels[task].append(x)
        out = {}
        for task in self.tasks:
            weights = self.level_gates[task](torch.cat(levels[task], dim=1)).softmax(dim=1)
            fused = weights[:, :1] * levels[task][0]
            for i in range(1, self.num_levels):
                fused = fused + weights[:, i : i + 1] * levels[task][i]
            fused = F.interpolate(fused, scale_factor=4, mode="bilinear", align_corners=False)
            out[task] = self.heads[task](fused)
        self._record(gates)
        return out

    def _record(self, gates: dict[str, list[dict[str, Tensor]]]) -> None:
        loss = torch.stack([_balance(list(layer.values())) for sets in gates.values() for layer in sets]).sum()
        self.last_balance_loss = loss.detach()
        self.last_gates = {k: [{t: g.detach() for t, g in layer.items()} for layer in v] for k, v in gates.items()}
        if torch.is_grad_enabled():
            self._pending.append(loss)

    def pop_aux_loss(self) -> Tensor | None:
        """The load-balancing losses of the forwards since the last call, summed (None if none)."""
        pending, self._pending = self._pending, []
        return torch.stack(pending).sum() if pending else None

    def reparameterize(self, enabled: bool = True) -> None:
        """Switch every MLoRE block to the authors' merged inference form (or back with False).
        Uses the weights and BatchNorm statistics of now: call it after loading, in eval mode."""
        for block in [*self.experts_1, *self.experts_2]:
            block.reparameterize(enabled)
