"""The ViT as the InvPT family reads it: raw block outputs with the last through the final norm,
the authors' input statistics, and pretrained weights resampled as their timm did (also into a
ViT without a class token, as MLoRE's)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from mtl_vision.models.backbone import Backbone

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A timm checkpoint file at the 384 grid (24x24), as the hub's vit_large_patch16_384."""
    torch.manual_seed(0)
    model = timm.create_model("vit_large_patch16_384", pretrained=False, **TINY)
    with torch.no_grad():
        model.pos_embed.normal_()
    path = tmp_path_factory.mktemp("w") / "vit.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def _grid(pos_embed: torch.Tensor, old=(24, 24), new=(8, 12), antialias=False) -> torch.Tensor:
    grid = pos_embed.reshape(1, *old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("resample", ["bicubic", "antialias"])
def test_pretrained_position_embeddings_reach_the_crop_grid(weights, class_token, resample):
    path, state = weights
    backbone = Backbone(
        name="vit_large_patch16_384",
        checkpoint_path=str(path),
        final_norm=True,
        out_indices=[0, 1],
        pos_embed_resample=resample,
        model_kwargs=dict(TINY, img_size=[128, 192], class_token=class_token, global_pool="token" if class_token else ""),
    )
    vit = backbone.model.model
    expected = _grid(state["pos_embed"][:, 1:], antialias=resample == "antialias")
    if class_token:
        expected = torch.cat([state["pos_embed"][:, :1], expected], dim=1)
        torch.testing.assert_close(vit.cls_token, state["cls_token"])
    else:
        assert vit.cls_token is None
    torch.testing.assert_close(vit.pos_embed.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(vit.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"], rtol=0, atol=0)
    # plain and antialiased bicubic differ: the choice matters for the first step of training
    assert not torch.allclose(_grid(state["pos_embed"][:, 1:]), _grid(state["pos_embed"][:, 1:], antialias=True))


def test_the_last_level_passes_the_final_norm_and_the_input_statistics_are_the_given_ones():
    torch.manual_seed(0)
    kwargs = {"name": "vit_large_patch16_384", "out_indices": [0, 1], "model_kwargs": {**TINY, "img_size": [64, 96]}}
    backbone = Backbone(final_norm=True, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], **kwargs).eval()
    assert backbone.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    x = torch.randn(1, 3, 64, 96)
    vit = backbone.model.model
    with torch.no_grad():
        raw = vit.forward_intermediates(x, indices=[0, 1], norm=False, intermediates_only=True)
        normed, _ = vit.forward_intermediates(x, indices=[1], norm=True)
        first, last = backbone(x)
    torch.testing.assert_close(first, raw[0])
    torch.testing.assert_close(last, normed[:, 1:].reshape(1, 4, 6, 32).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="last block"):
        Backbone(final_norm=True, **{**kwargs, "out_indices": [0]})
    with pytest.raises(ValueError, match="3 numbers"):
        Backbone(mean=[0.5, 0.5], **kwargs)
