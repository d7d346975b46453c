"""Parameters and FLOPs of a model's backbone and decoder, for the startup summary and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter has no formula for the CPU kernel of scaled_dot_product_attention and counts
# it as 0, which left out the attention of every timm ViT on the CPU
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * int(torch.Size(out_shape).numel()) * int(a_shape[-1])


# nor for the grouped matmul of TaskMoE's grouped dispatch (its experts)
_CPU_ATTENTION[torch.ops.aten._grouped_mm] = _grouped_mm_flops


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, with fused attention counted on the CPU as on the GPU."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


def _flops(fn, *args):
    """(FLOPs of `fn(*args)`, its output)."""
    counter = flop_counter()
    with counter:
        out = fn(*args)
    return int(counter.get_total_flops()), out


@torch.no_grad()
def model_summary(model: nn.Module, image_size: Sequence[int]) -> dict[str, float]:
    """Parameters and forward FLOPs of one (1, 3, H, W) image through `model.backbone` and `model.decoder`.

    FLOPs are counted by `torch.utils.flop_counter` (matrix multiplies, convolutions and attention,
    two FLOPs per multiply-add); papers that print fvcore "FLOPs" (InvPT, TaskPrompter) count
    multiply-adds, i.e. half of these. Returns `{<part>/params, <part>/trainable_params,
    <part>/gflops}` for part in backbone, decoder, and their total.
    """
    from mtl_vision.models.model import encode_with

    height, width = (int(v) for v in image_size)
    backbone, decoder = model.backbone, model.decoder
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        image = torch.rand(1, 3, height, width, device=device)
        x = (image - backbone.mean) / backbone.std
        # (a decoder that runs the backbone itself, TaskPrompter, has the encoder's FLOPs counted
        # as the backbone's, prompts included)
        encoder_flops, features = _flops(encode_with, backbone, decoder, x)
        # a task-conditioned backbone gives {task: maps} and each task is decoded from its own
        per_task = list(features.values()) if isinstance(features, dict) else [features]
        if isinstance(features, dict) and getattr(decoder, "per_task_features", False):
            per_task = [features]  # a decoder that reads every task's maps in one call (MTLoRA's)
        if isinstance(features, dict) and per_task[0] is not features and hasattr(decoder, "forward_task"):
            # MultiTaskModel decodes each task alone from its features (decoders with `forward_task`)
            decoder_flops = sum(_flops(decoder.forward_task, f, t)[0] for t, f in features.items())
        else:
            decoder_flops = sum(_flops(decoder, f)[0] for f in per_task)
        flops = {"backbone": encoder_flops, "decoder": decoder_flops}
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    for part, module in (("backbone", backbone), ("decoder", decoder)):
        trainable, total = count_parameters(module)
        out[f"{part}/params"] = float(total)
        out[f"{part}/trainable_params"] = float(trainable)
        out[f"{part}/gflops"] = flops[part] / 1e9
    for key in ("params", "trainable_params", "gflops"):
        out[f"total/{key}"] = out[f"backbone/{key}"] + out[f"decoder/{key}"]
    return out


def format_summary(summary: dict[str, float], image_size: Sequence[int]) -> str:
    """A few aligned lines: parameters (M) and GFLOPs per part at the given input size."""
    lines = [f"model at {image_size[0]}x{image_size[1]}: params (M), trainable (M), GFLOPs (2 per multiply-add)"]
    for part in ("backbone", "decoder", "total"):
        lines.append(
            f"  {part:<9}{summary[f'{part}/params'] / 1e6:>9.2f}{summary[f'{part}/trainable_params'] / 1e6:>9.2f}"
            f"{summary[f'{part}/gflops']:>10.2f}"
        )
    return "\n".join(lines)
