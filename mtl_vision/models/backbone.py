"""timm backbones behind one contract: a list of NCHW feature maps with known channels and strides.

Any `timm.create_model(name, features_only=True)` works: CNNs (ResNet, ConvNeXt, HRNet) and
transformers (ViT, Swin), whose token or NHWC outputs are returned as NCHW maps. Pretrained weights
come from the timm hub (`pretrained=True`, needs network once) or from a local file
(`checkpoint_path=`, no network), so cluster jobs never download at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from mtl_vision.models.moe_backbone import apply_moe_layers
from mtl_vision.models.task_context import TaskConditioned, stacked_task_scope, task_scope

TASK_PASSES = ("stacked", "per_task")

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


# constructor arguments that shape the position embeddings or the class token, not the weights
_GRID_KWARGS = ("img_size", "dynamic_img_size", "class_token", "global_pool", "no_embed_class")


def _load_pretrained(model: nn.Module, name: str, kwargs: dict[str, Any], overlay: Any, *, antialias: bool) -> None:
    """Load timm's pretrained weights of `name` (or a local file through `overlay`) into `model`:
    position embeddings resampled bicubically from the weights' grid to the model's, the class
    token and its position dropped when the model has none."""
    import torch.nn.functional as F

    donor_kwargs = {k: v for k, v in kwargs.items() if k not in _GRID_KWARGS}
    if overlay is not None:
        donor_kwargs["pretrained_cfg_overlay"] = overlay
    donor = timm.create_model(name, pretrained=True, num_classes=0, **donor_kwargs)
    state = donor.state_dict()
    prefix = donor.num_prefix_tokens if not getattr(donor, "no_embed_class", False) else 0
    grid = state["pos_embed"][:, prefix:]
    old = donor.patch_embed.grid_size
    new = tuple(model.patch_embed.grid_size)
    grid = grid.reshape(1, *old, -1).permute(0, 3, 1, 2).float()
    if tuple(old) != new:
        grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)
    keep = getattr(model, "num_prefix_tokens", 0) if not getattr(model, "no_embed_class", False) else 0
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :keep], grid], dim=1).to(state["pos_embed"].dtype)
    if getattr(model, "cls_token", None) is None:
        state.pop("cls_token", None)
    model.load_state_dict(state, strict=True)


class FeatureBackbone(nn.Module):
    """What `MultiTaskModel` and the decoders read from a backbone, timm-based or not:
    `forward(image) -> list of NCHW maps` (or `{task: maps}` when `task_conditioned`), their
    `channels` and `strides`, the input normalisation `mean`/`std` ((1,3,1,1) buffers), `name`,
    and the trained `tasks` (bound at run time). `Backbone` wraps timm; a network timm lacks
    (MTAN's SegNet, `models/segnet.py`) subclasses this directly."""

    name: str
    tasks: list[str] | None
    channels: list[int]
    strides: list[int]
    mean: Tensor
    std: Tensor

    @property
    def task_conditioned(self) -> bool:
        return False


class Backbone(FeatureBackbone):
    """A timm model in `features_only` mode.

    Args:
        name: timm model name, e.g. `resnet50`, `vit_base_patch16_224`, `test_resnet`.
        pretrained: load the timm hub weights (requires network or a populated HF cache).
        checkpoint_path: local weights file (`.pth`, `.bin`, `.safetensors`) of the full timm model;
            takes precedence over the hub.
        out_indices: which feature levels to return (timm's `out_indices`); None = timm default.
        freeze_stages: freeze everything up to and including this many returned feature levels
            (0 = train all, -1 = freeze the whole backbone).
        model_kwargs: extra keyword arguments of the timm constructor (`img_size`,
            `dynamic_img_size`, `drop_path_rate`, `feature_location`, ...).
        tasks: the trained tasks (bound at run time); task-conditioned layers run once per task.
        moe_layers: indices of the transformer blocks whose MLP becomes a task-routed sparse MoE
            (`mtl_vision.models.moe_backbone.apply_moe_layers`, experts upcycled from the dense
            MLP); None/empty = none. Needs `tasks`; makes the backbone task-conditioned.
        moe: options of those MoE layers: num_experts, top_k, capacity_factor, mi_loss_weight
            (and hidden_ratio, router_noise).
        final_norm: pass the last returned level through the transformer's final norm (as InvPT,
            TaskPrompter and MLoRE read a ViT: raw block outputs, the last one normalised). The
            last returned level must then be the last block.
        mean, std: input normalisation, when the weights were trained with another one than
            timm's pretrained config says (InvPT's ViT-L uses ImageNet statistics, timm 0.5).
        pos_embed_resample: with `final_norm`, how pretrained position embeddings reach the
            configured grid: "antialias" (timm's bicubic with antialiasing) or "bicubic" (plain
            bicubic, as the timm 0.5 of InvPT, TaskPrompter and MLoRE). Pretrained weights also
            load into a ViT without a class token (`model_kwargs.class_token: false`, MLoRE),
            dropping the token and its position.
        bn_momentum: momentum of every BatchNorm of the timm model; None keeps timm's (0.1). The
            segmentation HRNet of MTI-Net/PAD-Net/CTAL trains its BatchNorms with 0.01.
        upsample_mode: mode of every `nn.Upsample` of the timm model (HRNet's fuse layers), e.g.
            "bilinear" (align_corners=False) as the segmentation HRNet of MTI-Net/PAD-Net/CTAL;
            None keeps timm's ("nearest").
        task_passes: how a task-conditioned backbone computes `{task: maps}`
            (`mtl_vision.models.task_context`): "stacked" (default) runs a timm ViT once up to the
            first block with task-conditioned layers and from there all tasks stacked in the batch,
            when every task-conditioned layer supports it (MoE layers do); otherwise, or with
            "per_task", one full pass per task (the reference).

    `forward(image (N,3,H,W)) -> list[Tensor]`, map i of shape (N, channels[i], H/strides[i], W/strides[i]).
    `mean`/`std` are the normalisation the weights expect (from timm's pretrained config).
    """

    def __init__(
        self,
        *,
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        out_indices: Sequence[int] | None = None,
        freeze_stages: int = 0,
        model_kwargs: Mapping[str, Any] | None = None,
        tasks: Sequence[str] | None = None,
        moe_layers: Sequence[int] | None = None,
        moe: Mapping[str, Any] | None = None,
        final_norm: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pos_embed_resample: str = "antialias",
        bn_momentum: float | None = None,
        upsample_mode: str | None = None,
        task_passes: str = "stacked",
    ) -> None:
        super().__init__()
        if task_passes not in TASK_PASSES:
            raise ValueError(f"backbone.task_passes={task_passes!r}: expected one of {list(TASK_PASSES)}")
        self.task_passes = task_passes
        self.tasks = list(tasks) if tasks is not None else None
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if checkpoint_path:
            path = Path(checkpoint_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"backbone.checkpoint_path: no weights file at {path}")
            pretrained = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        if not timm.is_model(timm.models.split_model_name_tag(name)[0]):
            raise ValueError(f"backbone.name: {name!r} is not a timm model (see timm.list_models())")
        self.name = name
        self.final_norm = final_norm
        try:
            if pos_embed_resample not in ("antialias", "bicubic"):
                raise ValueError(f"backbone.pos_embed_resample={pos_embed_resample!r}: expected antialias or bicubic")
            self.model = self._create(name, pretrained, kwargs, pos_embed_resample) if final_norm else timm.create_model(
                name, pretrained=pretrained, features_only=True, **kwargs
            )
        except IndexError as err:
            # timm indexes its feature levels with out_indices and fails without saying so.
            raise ValueError(
                f"backbone.out_indices={list(out_indices or [])} is out of range for {name}: {err}"
            ) from err
        if bn_momentum is not None and not 0 <= bn_momentum <= 1:
            raise ValueError(f"backbone.bn_momentum={bn_momentum}: expected a number in [0, 1] or null")
        if upsample_mode not in (None, "nearest", "bilinear", "bicubic"):
            raise ValueError(f"backbone.upsample_mode={upsample_mode!r}: expected nearest, bilinear, bicubic or null")
        for module in self.model.modules():
            if bn_momentum is not None and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
            if upsample_mode is not None and isinstance(module, nn.Upsample):
                module.mode = upsample_mode
                module.align_corners = None if upsample_mode == "nearest" else False
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = list(info.reduction())
        self._module_names: list[str] = list(info.module_name())
        self._nhwc = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        for key, given in (("mean", mean), ("std", std)):
            value = tuple(given) if given is not None else cfg.get(key, IMAGENET[key])
            if len(value) != 3 or (key == "std" and min(value) <= 0):
                raise ValueError(f"backbone.{key}={list(value)}: expected 3 numbers (RGB){', all > 0' * (key == 'std')}")
            self.register_buffer(key, torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.freeze(freeze_stages)
        if moe_layers:
            if self.tasks is None:
                raise ValueError(
                    f"backbone.moe_layers={list(moe_layers)} needs the trained `tasks` (one router per task)"
                )
            apply_moe_layers(self, list(moe_layers), self.tasks, **dict(moe or {}))

    @staticmethod
    def _create(name: str, pretrained: bool, kwargs: dict[str, Any], resample: str) -> nn.Module:
        """A transformer whose final norm survives: timm's `features_only` prunes it when the
        features are returned without normalisation, so the feature wrapper is built here."""
        out_indices = kwargs.pop("out_indices", None)
        overlay = kwargs.pop("pretrained_cfg_overlay", None)
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        if not hasattr(model, "forward_intermediates") or not isinstance(getattr(model, "norm", None), nn.Module):
            raise ValueError(f"backbone.final_norm=true needs a transformer with a final norm; {name} has none")
        if pretrained:
            _load_pretrained(model, name, kwargs, overlay, antialias=resample == "antialias")
        depth = len(model.blocks)
        indices = tuple(out_indices) if out_indices is not None else tuple(range(depth - 4, depth))
        if indices[-1] % depth != depth - 1:
            raise ValueError(
                f"backbone.final_norm=true normalises the last returned level, which must be the last block "
                f"({depth - 1}); backbone.out_indices={list(indices)}"
            )
        return FeatureGetterNet(model, out_indices=indices, prune=False)

    def freeze(self, stages: int) -> None:
        """Stop gradients for the parameters that come before the end of feature level `stages`."""
        if stages == 0:
            return
        if stages < 0:
            frozen = list(self.model.parameters())
        else:
            if stages > len(self._module_names):
                raise ValueError(
                    f"backbone.freeze_stages={stages}, but {self.name} returns {len(self._module_names)} levels"
                )
            frozen = self._parameters_through(self._module_names[stages - 1])
        for p in frozen:
            p.requires_grad_(False)

    def _parameters_through(self, stage: str) -> list[nn.Parameter]:
        """Parameters registered before or inside module `stage` (timm registers in forward order)."""
        # FeatureListNet renames "stages.0" to "stages_0"; compare with dots throughout.
        want = "." + stage.replace("_", ".")
        seen: list[nn.Parameter] = []
        for name, module in self.model.named_modules():
            seen.extend(module.parameters(recurse=False))
            if ("." + name.replace("_", ".")).endswith(want):
                seen.extend(module.parameters())
                return list({id(p): p for p in seen}.values())
        raise ValueError(f"backbone.freeze_stages: stage {stage!r} not found in {self.name}")

    # set by a PEFT scheme whose task-specific layers branch off one shared pass (MTLoRA):
    # `task_features(backbone, normalised image) -> {task: maps}` replaces the plain forward
    task_features: Callable[[Backbone, Tensor], dict[str, list[Tensor]]] | None = None

    @property
    def task_conditioned(self) -> bool:
        """True when the features are task-specific (MoE routers, MTLoRA's task branches)."""
        return self.task_features is not None or any(isinstance(m, TaskConditioned) for m in self.model.modules())

    def forward(self, image: Tensor) -> list[Tensor] | dict[str, list[Tensor]]:
        """Feature maps; `{task: maps}` from `task_features` (one shared pass with task branches)
        or else, when the backbone is task-conditioned, from one pass with the tasks stacked in the
        batch (`task_passes="stacked"`, where supported) or one pass per task."""
        if self.task_features is not None:
            return self.task_features(self, image)
        if self.task_conditioned:
            if not self.tasks:
                raise ValueError(f"backbone {self.name} has task-conditioned layers but was built without `tasks`")
            first = self._stack_point()
            if first is not None:
                return self._stacked_features(image, first)
            out = {}
            for task in self.tasks:
                with task_scope(task):
                    out[task] = self._features(image)
            return out
        return self._features(image)

    def _stack_point(self) -> int | None:
        """Index of the first ViT block with task-conditioned layers when the stacked pass applies: a timm
        ViT, several tasks, `task_passes="stacked"`, and every task-conditioned module inside a block
        and declaring `stacks_tasks`. None: one pass per task."""
        vit = getattr(self.model, "model", None)
        if self.task_passes != "stacked" or len(self.tasks or ()) < 2:
            return None
        if not (isinstance(self.model, FeatureGetterNet) and isinstance(vit, VisionTransformer)):
            return None
        conditioned = [m for m in self.model.modules() if isinstance(m, TaskConditioned)]
        in_blocks = [[m for m in b.modules() if isinstance(m, TaskConditioned)] for b in vit.blocks]
        if not all(m.stacks_tasks for m in conditioned) or sum(map(len, in_blocks)) != len(conditioned):
            return None
        return next(i for i, found in enumerate(in_blocks) if found)

    def _stacked_features(self, image: Tensor, first: int) -> dict[str, list[Tensor]]:
        """{task: maps} of a timm ViT in one pass: the blocks before `first` (and, for a standard block
        whose MLP alone is task-conditioned, the attention half of `first`) run once on the batch,
        then the tokens are repeated once per task and the remaining blocks see all tasks stacked in
        the batch, inside `stacked_task_scope` (timm's `forward_intermediates`, otherwise unchanged)."""
        tasks = list(self.tasks or ())
        getter, vit = self.model, self.model.model
        take, _ = feature_take_indices(len(vit.blocks), getter.out_indices)
        n, _, height, width = image.shape
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image))))
        levels = []
        with stacked_task_scope(tasks):
            for i, block in enumerate(vit.blocks):
                if i == first:
                    if type(block) is Block and not any(isinstance(m, TaskConditioned) for m in block.attn.modules()):
                        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
                        x = x.repeat(len(tasks), 1, 1)
                        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
                    else:
                        x = block(x.repeat(len(tasks), 1, 1))
                elif vit.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(block, x)
                else:
                    x = block(x)
                if i in take:
                    levels.append(vit.norm(x) if getter.norm else x)
        grid = vit.patch_embed.dynamic_feat_size((height, width))
        prefix = vit.num_prefix_tokens
        maps = [y[:, prefix:].reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in levels]
        out: dict[str, list[Tensor]] = {t: [] for t in tasks}
        for level in self._finish(maps):
            chunks = level.chunk(len(tasks)) if level.shape[0] != n else [level] * len(tasks)
            for task, chunk in zip(tasks, chunks, strict=True):
                out[task].append(chunk)
        return out

    def _features(self, image: Tensor) -> list[Tensor]:
        return self._finish(self.model(image))

    def _finish(self, features: list[Tensor]) -> list[Tensor]:
        """timm's outputs as NCHW maps, the last through the final norm with `final_norm`."""
        if self._nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        if self.final_norm:
            last = self.model.model.norm(features[-1].permute(0, 2, 3, 1))
            features = [*features[:-1], last.permute(0, 3, 1, 2)]
        return [f.contiguous() for f in features]
