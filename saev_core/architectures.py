"""What a model entry's checkpoint name says about its ViT, without torch or weights.

The planner uses it to refuse, while `snakemake -n` runs, a checkpoint name its family cannot
build and a layer beyond the model's depth (both would otherwise fail only once the dump starts).
`vits` builds the models; the tiny architectures are defined here, so both read one table.
"""

import dataclasses
import difflib
import importlib.util
import json
import pathlib
import re

DINOV2_DEPTHS = {"s": 12, "b": 12, "l": 24, "g": 40}


@dataclasses.dataclass(frozen=True)
class TinyArch:
    """A small ViT with random weights: its outputs say nothing about real models."""

    img_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    seed: int


TINY_ARCHS = {
    "vit-tiny-p8-64": TinyArch(img_size=64, patch_size=8, width=64, layers=4, heads=4, seed=0),
    # CLIP ViT-B/16's architecture: realistic compute for benchmarks, still no download.
    "vit-b16-224": TinyArch(img_size=224, patch_size=16, width=768, layers=12, heads=12, seed=0),
    # DINOv2 ViT-S/14's shape: the random-weight baseline for the real-model comparison.
    "vit-s14-224": TinyArch(img_size=224, patch_size=14, width=384, layers=12, heads=6, seed=0),
}


class ArchitectureError(ValueError):
    """A checkpoint name its family cannot build."""


def parse_open_clip_ckpt(ckpt: str) -> tuple[str, str | None]:
    """`ARCH/PRETRAINED` (e.g. `ViT-B-16/openai`) or `hf-hub:ORG/NAME` -> open_clip arguments."""
    if ckpt.startswith("hf-hub:"):
        return ckpt, None
    if "/" in ckpt:
        arch, pretrained = ckpt.split("/", 1)
        return arch, pretrained
    raise ArchitectureError(
        f"open_clip ckpt must look like 'ViT-B-16/openai' or 'hf-hub:ORG/NAME', not {ckpt!r}"
    )


def dinov2_size(ckpt: str) -> str:
    """The size letter of a DINOv2 torch-hub name (`dinov2_vitb14`, `dinov2_vitl14_reg`)."""
    match = re.fullmatch(r"dinov2_vit([sblg])14(_reg)?", ckpt)
    if match is None:
        raise ArchitectureError(
            f"dinov2 ckpt must look like 'dinov2_vitb14' or 'dinov2_vitb14_reg' "
            f"(sizes s, b, l, g), not {ckpt!r}"
        )
    return match[1]


def open_clip_configs_dpath() -> pathlib.Path | None:
    """open_clip's model_configs folder, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def depth(family: str, ckpt: str) -> int | None:
    """The number of transformer blocks of `family`'s `ckpt`, or None where the name alone does
    not say (a Hugging Face hub model, a timm tower); an ArchitectureError for a name the family
    cannot build."""
    ckpt = ckpt.split("@", 1)[0]
    if family == "tiny":
        if ckpt not in TINY_ARCHS:
            raise ArchitectureError(f"tiny ckpt must be one of {sorted(TINY_ARCHS)}, got {ckpt!r}")
        return TINY_ARCHS[ckpt].layers
    if family == "dinov2":
        return DINOV2_DEPTHS[dinov2_size(ckpt)]
    if family in ("clip", "siglip"):
        arch, _ = parse_open_clip_ckpt(ckpt)
        configs_dpath = open_clip_configs_dpath()
        if arch.startswith("hf-hub:") or configs_dpath is None:
            return None
        fpath = configs_dpath / f"{arch}.json"
        if not fpath.exists():
            known = sorted(p.stem for p in configs_dpath.glob("*.json"))
            close = difflib.get_close_matches(arch, known, n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ArchitectureError(f"open_clip has no architecture {arch!r}{hint}")
        return json.loads(fpath.read_text())["vision_cfg"].get("layers")
    return None
