"""Local weights files: every family loads them, bad ones are named, and they decide the hash.

Built from real architectures with random weights (no download): a file saved from one model
instance must give exactly that instance's activations.
"""

import pathlib

import pytest
import torch
import yaml
from safetensors.torch import save_file

from saev_core import vits, weights
from saev_core.planning import plan

CONFIG_FPATH = pathlib.Path(__file__).parent / "configs" / "tiny.yaml"


def random_vit(family: str, ckpt: str):
    if family == "tiny":
        return vits.build_tiny(ckpt)[0]
    if family == "dinov2":
        return vits.build_dinov2(ckpt, pretrained=False)[0]
    import open_clip

    return open_clip.create_model_and_transforms(vits.parse_open_clip_ckpt(ckpt)[0])[0]


@pytest.mark.parametrize(
    "family, ckpt, img_px",
    [
        ("tiny", "vit-tiny-p8-64", 64),
        ("clip", "ViT-B-32/openai", 224),
        ("dinov2", "dinov2_vits14", 224),
    ],
)
def test_every_family_records_with_a_local_weights_file(family, ckpt, img_px, tmp_path):
    torch.manual_seed(1)
    source = random_vit(family, ckpt)
    with torch.no_grad():  # weights no default initialisation would give
        for param in source.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    fpath = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(fpath))
    recorder, _ = vits.load(family, ckpt, [-1], pretrained=False, weights_fpath=fpath)
    imgs = torch.randn(2, 3, img_px, img_px)
    expected = vits.make_recorder(source.visual if family == "clip" else source, [-1])
    with torch.no_grad():
        torch.testing.assert_close(recorder(imgs), expected.eval()(imgs))


def tiny_state() -> dict:
    return vits.build_tiny("vit-tiny-p8-64")[0].state_dict()


@pytest.mark.parametrize(
    "state, expected",
    [
        (
            lambda s: {k: v for k, v in s.items() if k != "conv1.weight"},
            r"Missing key\(s\) in state_dict: \"conv1.weight\"",
        ),
        (
            lambda s: {**s, "extra.weight": torch.zeros(3)},
            r"Unexpected key\(s\) in state_dict: \"extra.weight\"",
        ),
        (
            lambda s: {**s, "ln_post.weight": torch.zeros(7)},
            r"size mismatch for ln_post.weight: .*torch.Size\(\[7\]\)",
        ),
    ],
    ids=["missing key", "unexpected key", "wrong shape"],
)
def test_weights_that_do_not_fit_name_the_file_and_the_key(state, expected, tmp_path):
    fpath = tmp_path / "model.pt"
    torch.save(state(tiny_state()), fpath)
    with pytest.raises(
        weights.WeightsFileError,
        match=rf"(?s)model.pt does not fit tiny vit-tiny-p8-64: .*{expected}",
    ):
        vits.load("tiny", "vit-tiny-p8-64", [-1], weights_fpath=fpath)


def test_a_file_that_is_not_a_state_dict_is_named(tmp_path):
    fpath = tmp_path / "model.pt"
    fpath.write_bytes(b"\xff\xd8\xff a JPEG, not weights")
    with pytest.raises(
        weights.WeightsFileError, match=r"model.pt: cannot read a state dict from it"
    ):
        vits.load("tiny", "vit-tiny-p8-64", [-1], weights_fpath=fpath)


def config_with_weights(fpath) -> dict:
    config = yaml.safe_load(CONFIG_FPATH.read_text())
    config["models"]["tiny"]["weights"] = str(fpath)
    plan.validate_config(config)
    return config


def test_missing_or_wrong_kind_of_file_fails_at_plan_time(tmp_path):
    with pytest.raises(
        plan.PlanError, match=rf"models.tiny.weights: {tmp_path}/nope.pt does not exist"
    ):
        plan.make_plan(config_with_weights(tmp_path / "nope.pt"))
    (tmp_path / "photo.jpg").write_bytes(b"jpeg")
    with pytest.raises(
        plan.PlanError, match=r"models.tiny.weights: .*photo.jpg is not a weights file"
    ):
        plan.make_plan(config_with_weights(tmp_path / "photo.jpg"))


def test_the_shard_hash_covers_the_weights_identity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the SHA-256 cache goes under ./results/.cache
    torch.save(tiny_state(), tmp_path / "a.pt")
    state = tiny_state()
    state["ln_post.bias"] = state["ln_post.bias"] + 1
    torch.save(state, tmp_path / "b.pt")
    hashes = {
        name: plan.make_plan(config_with_weights(tmp_path / name)).activations[
            "tiny-synthetic-train"
        ]
        for name in ("a.pt", "b.pt")
    }
    without = yaml.safe_load(CONFIG_FPATH.read_text())
    plan.validate_config(without)
    hashes["none"] = plan.make_plan(without).activations["tiny-synthetic-train"]
    assert len(set(hashes.values())) == 3
    md = plan.make_plan(config_with_weights(tmp_path / "a.pt")).shard_jobs[hashes["a.pt"]].metadata
    assert md.vit_ckpt == f"vit-tiny-p8-64@sha256:{weights.file_sha256(tmp_path / 'a.pt')[:16]}"
