"""Model families record the residual stream with the token counts the shard metadata promises.

Real architectures with random weights (`pretrained=False`): the same code path as the released
checkpoints, without a download.
"""

import os
import subprocess
import sys

import pytest
import timm
import torch

from saev_core import vits


def test_tiny_records_cls_then_patches():
    recorder, transform = vits.load("tiny", "vit-tiny-p8-64", [-2, -1])
    acts = recorder(torch.randn(2, 3, 64, 64))
    assert acts.shape == (2, 2, 65, 64)


def test_clip_code_path_offline_with_random_weights():
    """Same open_clip code path as `ViT-B-16/openai`: [CLS] + 14x14 patches, d_vit 768."""
    recorder, transform = vits.load("clip", "ViT-B-16/openai", [-2], pretrained=False)
    acts = recorder(torch.randn(1, 3, 224, 224))
    assert acts.shape == (1, 1, 197, 768)


def test_siglip_code_path_offline_with_random_weights():
    """Same open_clip/timm code path as `hf-hub:timm/ViT-B-16-SigLIP2-256`, no download."""
    recorder, transform = vits.load("siglip", "ViT-B-16-SigLIP2-256/webli", [-2], pretrained=False)
    acts = recorder(torch.randn(1, 3, 256, 256))
    assert acts.shape == (1, 1, 256, 768)  # no [CLS]: 16x16 patches, d_vit 768


@pytest.mark.parametrize("ckpt", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_dinov2_keeps_cls_and_patches_and_drops_registers(ckpt):
    recorder, transform = vits.load("dinov2", ckpt, [-3, -1], pretrained=False)
    x = transform.transforms[-1](torch.rand(1, 3, 224, 224))
    acts = recorder(x)
    assert acts.shape == (1, 2, 257, 384)  # [CLS] + 16x16 patches at 224 px

    # timm's own intermediate outputs, with [CLS] and registers returned separately.
    with torch.inference_mode():
        inter = recorder.vit.forward_intermediates(
            x, indices=[9, 11], norm=False, intermediates_only=True, return_prefix_tokens=True
        )
    for layer_i, (patches_BDHW, prefix_BRD) in enumerate(inter):
        assert prefix_BRD.shape[1] == (5 if ckpt.endswith("_reg") else 1)
        torch.testing.assert_close(acts[:, layer_i, 0], prefix_BRD[:, 0])
        torch.testing.assert_close(acts[:, layer_i, 1:], patches_BDHW.flatten(2).transpose(1, 2))


def test_dinov2_names_map_to_timm():
    assert vits.dinov2_timm_name("dinov2_vitb14_reg") == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert vits.dinov2_timm_name("dinov2_vitg14") == "vit_giant_patch14_dinov2.lvd142m"
    assert timm.is_model("vit_giant_patch14_dinov2.lvd142m")
    with pytest.raises(ValueError, match="dinov2 ckpt must look like 'dinov2_vitb14'"):
        vits.dinov2_timm_name("dinov2_vitb16")


@pytest.mark.parametrize(
    "family,ckpt",
    [("clip", "ViT-B-16/openai"), ("dinov2", "dinov2_vits14_reg")],
)
def test_missing_weights_offline_name_the_checkpoint_and_cache(family, ckpt, tmp_path):
    """No network and an empty cache: a prompt error naming the checkpoint and HF_HOME."""
    # An endpoint that never resolves stands for "no network" even on a machine that has one.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "https://hub.invalid"}
    code = f"from saev_core import vits; vits.load({family!r}, {ckpt!r}, [-1])"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("saev_core.vits.WeightsError")
    assert f"checkpoint {ckpt!r}" in last_line and "HF_HOME" in last_line


def test_layer_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="layer 4 is out of range for a ViT with 4 blocks"):
        vits.load("tiny", "vit-tiny-p8-64", [4])


def test_unknown_family_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"vit family must be one of \['tiny', 'clip', 'siglip', 'dinov2'\], got 'vgg'",
    ):
        vits.load("vgg", "x", [0])
