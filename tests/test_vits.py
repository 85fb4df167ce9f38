"""Model families record the residual stream with the token counts the shard metadata promises."""

import pytest
import torch

from saev_core import vits


def test_tiny_records_cls_then_patches():
    recorder, transform = vits.load("tiny", "vit-tiny-p8-64", [-2, -1])
    acts = recorder(torch.randn(2, 3, 64, 64))
    assert acts.shape == (2, 2, 65, 64)


def test_siglip_code_path_offline_with_random_weights():
    """Same open_clip/timm code path as `hf-hub:timm/ViT-B-16-SigLIP2-256`, no download."""
    recorder, transform = vits.load("siglip", "ViT-B-16-SigLIP2-256/webli", [-2], pretrained=False)
    acts = recorder(torch.randn(1, 3, 256, 256))
    assert acts.shape == (1, 1, 256, 768)  # no [CLS]: 16x16 patches, d_vit 768


def test_layer_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="layer 4 is out of range for a ViT with 4 blocks"):
        vits.load("tiny", "vit-tiny-p8-64", [4])


def test_unknown_family_is_an_error():
    with pytest.raises(
        ValueError, match="vit family must be 'tiny', 'clip' or 'siglip', got 'vgg'"
    ):
        vits.load("vgg", "x", [0])
