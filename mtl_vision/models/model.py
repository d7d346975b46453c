"""Backbone + decoder, with input normalisation and outputs brought back to the input size."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl_vision.models.backbone import FeatureBackbone
from mtl_vision.models.decoders.common import resize_to


def encode_with(backbone: FeatureBackbone, decoder: nn.Module, x: Tensor) -> list[Tensor] | dict[str, list[Tensor]]:
    """The backbone's features of a normalised batch; a decoder that works inside the encoder
    (TaskPrompter's prompts join the ViT's attention) declares `encode(backbone, x)` and runs the
    backbone's modules itself."""
    encode = getattr(decoder, "encode", None)
    return encode(backbone, x) if encode is not None else backbone(x)


class MultiTaskModel(nn.Module):
    """Args:
        backbone: feature extractor with `channels`, `strides`, `mean`, `std`.
        decoder: `forward(features) -> {task: (N,C,h,w)}`, optionally with an "aux" entry
            {name: {task: map}} of intermediate predictions for deep supervision.

    `forward(image (N,3,H,W) RGB in [0,1]) -> {task: (N,C,H,W) raw outputs}` (and "aux" likewise).
    Images stay in [0,1] through the data pipeline so pictures need no de-normalisation; the
    normalisation the backbone's weights expect is applied here, so swapping a backbone can never
    pair it with the wrong mean/std.
    """

    def __init__(self, *, backbone: FeatureBackbone, decoder: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.channels_last = False  # set by `cli.build.apply_performance_switches`

    def encode(self, image: Tensor) -> list[Tensor] | dict[str, list[Tensor]]:
        """Backbone features of an image batch: a list of maps, or {task: maps} for a
        task-conditioned backbone. The shared representation of `mode: features` balancers."""
        x = (image - self.backbone.mean) / self.backbone.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return encode_with(self.backbone, self.decoder, x)

    def decode(self, features: list[Tensor] | dict[str, list[Tensor]], size: tuple[int, int]) -> dict:
        """Decoder outputs brought to the input `size` (aux sets likewise). Task-specific features
        {task: maps} go to the decoder in one call if it declares `per_task_features = True`,
        else each task is decoded from its own maps (`_per_task`)."""
        per_task = isinstance(features, dict) and not getattr(self.decoder, "per_task_features", False)
        out = self._per_task(features) if per_task else self.decoder(features)
        preds = {task: resize_to(pred, size) for task, pred in out.items() if task != "aux"}
        if "aux" in out:
            preds["aux"] = {name: {t: resize_to(p, size) for t, p in maps.items()} for name, maps in out["aux"].items()}
        return preds

    def forward(self, image: Tensor) -> dict:
        return self.decode(self.encode(image), tuple(image.shape[-2:]))

    def _per_task(self, features: dict) -> dict:
        """Task-conditioned backbone: decode every task from its own features (aux sets likewise). A
        decoder with `forward_task(maps, task)` computes that task alone; any other decoder (one whose
        tasks exchange information, e.g. PAD-Net's distillation) runs whole on each task's maps and
        that task's outputs are kept."""
        forward_task = getattr(self.decoder, "forward_task", None)
        out: dict = {}
        for task, maps in features.items():
            decoded = forward_task(maps, task) if forward_task is not None else self.decoder(maps)
            if task in decoded:  # an auxiliary-only task (decoder.auxiliary_tasks) has no final map
                out[task] = decoded[task]
            for name, preds in decoded.get("aux", {}).items():
                if task in preds:
                    out.setdefault("aux", {}).setdefault(name, {})[task] = preds[task]
        return out
