"""timm backbones behind one contract: a list of NCHW feature maps with known channels and strides.

Any `timm.create_model(name, features_only=True)` works: CNNs (ResNet, ConvNeXt, HRNet) and
transformers (ViT, Swin), whose token or NHWC outputs are returned as NCHW maps. Pretrained weights
come from the timm hub (`pretrained=True`, needs network once) or from a local file
(`checkpoint_path=`, no network), so cluster jobs never download at run time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from mtl_vision.models.moe_backbone import apply_moe_layers
from mtl_vision.models.task_context import TaskConditioned, task_scope


class Backbone(nn.Module):
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
    ) -> None:
        super().__init__()
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
        try:
            self.model = timm.create_model(name, pretrained=pretrained, features_only=True, **kwargs)
        except IndexError as err:
            # timm indexes its feature levels with out_indices and fails without saying so.
            raise ValueError(
                f"backbone.out_indices={list(out_indices or [])} is out of range for {name}: {err}"
            ) from err
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = list(info.reduction())
        self._module_names: list[str] = list(info.module_name())
        self._nhwc = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)
        self.freeze(freeze_stages)
        if moe_layers:
            if self.tasks is None:
                raise ValueError(
                    f"backbone.moe_layers={list(moe_layers)} needs the trained `tasks` (one router per task)"
                )
            apply_moe_layers(self, list(moe_layers), self.tasks, **dict(moe or {}))

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

    @property
    def task_conditioned(self) -> bool:
        """True when a module inside makes the features task-specific (MoE routers, MTLoRA)."""
        return any(isinstance(m, TaskConditioned) for m in self.model.modules())

    def forward(self, image: Tensor) -> list[Tensor] | dict[str, list[Tensor]]:
        """Feature maps; `{task: maps}` from one pass per task when the backbone is task-conditioned."""
        if self.task_conditioned:
            if not self.tasks:
                raise ValueError(f"backbone {self.name} has task-conditioned layers but was built without `tasks`")
            out = {}
            for task in self.tasks:
                with task_scope(task):
                    out[task] = self._features(image)
            return out
        return self._features(image)

    def _features(self, image: Tensor) -> list[Tensor]:
        features = self.model(image)
        if self._nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return [f.contiguous() for f in features]
