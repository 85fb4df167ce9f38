"""Vision transformers whose residual stream we record (SPEC §4).

Families: `tiny` (a small randomly initialised open_clip ViT built locally, for the embedded
default, tests and CI), `clip` and `siglip` (open_clip checkpoints such as `ViT-B-16/openai` or
`hf-hub:timm/ViT-L-16-SigLIP2-256`). Activations
are the outputs of the requested residual blocks, captured with forward hooks, [CLS] first.

Shape key: B = batch, L = recorded layers, T = tokens ([CLS] + patches), D = d_vit.
"""

import dataclasses

import torch
from open_clip.transformer import VisionTransformer
from torchvision import transforms

# OpenAI CLIP's normalisation constants, used for the tiny ViT too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
}


class Recorder(torch.nn.Module):
    """Runs a ViT and returns the residual stream after the requested blocks, (B, L, T, D)."""

    def __init__(self, vit: torch.nn.Module, blocks: torch.nn.ModuleList, layers: list[int]):
        super().__init__()
        self.vit = vit
        n_blocks = len(blocks)
        for layer in layers:
            if not -n_blocks <= layer < n_blocks:
                raise ValueError(f"layer {layer} is out of range for a ViT with {n_blocks} blocks")
        self.block_indices = [layer % n_blocks for layer in layers]
        self._outputs: dict[int, torch.Tensor] = {}
        for i in sorted(set(self.block_indices)):
            blocks[i].register_forward_hook(self._hook(i))

    def _hook(self, block_i: int):
        def hook(module, args, output):
            self._outputs[block_i] = output

        return hook

    @torch.inference_mode()
    def forward(self, imgs_BCHW: torch.Tensor) -> torch.Tensor:
        self._outputs.clear()
        self.vit(imgs_BCHW)
        acts_BLTD = torch.stack([self._outputs[i] for i in self.block_indices], dim=1)
        self._outputs.clear()
        return acts_BLTD


def build_tiny(ckpt: str) -> tuple[VisionTransformer, transforms.Compose]:
    """The tiny random-weight ViT named `ckpt` and its image transform; deterministic."""
    if ckpt not in TINY_ARCHS:
        raise ValueError(f"tiny ckpt must be one of {sorted(TINY_ARCHS)}, got {ckpt!r}")
    arch = TINY_ARCHS[ckpt]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(arch.seed)
        vit = VisionTransformer(
            image_size=arch.img_size,
            patch_size=arch.patch_size,
            width=arch.width,
            layers=arch.layers,
            heads=arch.heads,
            mlp_ratio=4.0,
            output_dim=arch.width,
        )
    transform = transforms.Compose(
        [
            transforms.Resize(arch.img_size),
            transforms.CenterCrop(arch.img_size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return vit.eval(), transform


def parse_open_clip_ckpt(ckpt: str) -> tuple[str, str | None]:
    """`ARCH/PRETRAINED` (e.g. `ViT-B-16/openai`) or `hf-hub:ORG/NAME` -> open_clip arguments."""
    if ckpt.startswith("hf-hub:"):
        return ckpt, None
    if "/" in ckpt:
        arch, pretrained = ckpt.split("/", 1)
        return arch, pretrained
    raise ValueError(
        f"open_clip ckpt must look like 'ViT-B-16/openai' or 'hf-hub:ORG/NAME', not {ckpt!r}"
    )


def build_open_clip(
    ckpt: str, pretrained: bool = True
) -> tuple[torch.nn.Module, transforms.Compose]:
    """An open_clip vision tower (CLIP or SigLIP) and its transform.

    `pretrained=False` builds the same architecture with random weights (tests, no download).
    """
    import open_clip

    arch, tag = parse_open_clip_ckpt(ckpt)
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            arch, pretrained=tag if pretrained else None
        )
    except Exception as err:
        raise RuntimeError(
            f"could not load open_clip checkpoint {ckpt!r} ({err}). Without network access the "
            "weights must already be cached: download them once on a machine with network "
            '(e.g. `python -c "import open_clip; open_clip.create_model_and_transforms('
            f"'{arch}', pretrained={tag!r})\"`) with HF_HOME pointing at a shared cache."
        ) from err
    return model.visual.eval(), transform


def residual_blocks(visual: torch.nn.Module) -> torch.nn.ModuleList:
    """open_clip's own ViTs keep blocks in `transformer.resblocks`; timm-backed towers (SigLIP)
    in `trunk.blocks`."""
    if hasattr(visual, "transformer"):
        return visual.transformer.resblocks
    return visual.trunk.blocks


def load(
    family: str, ckpt: str, layers: list[int], pretrained: bool = True
) -> tuple[Recorder, transforms.Compose]:
    """A Recorder for `layers` of the named model, and the transform its images need."""
    if family == "tiny":
        vit, transform = build_tiny(ckpt)
    elif family in ("clip", "siglip"):
        vit, transform = build_open_clip(ckpt, pretrained)
    else:
        raise ValueError(f"vit family must be 'tiny', 'clip' or 'siglip', got {family!r}")
    return Recorder(vit, residual_blocks(vit), layers), transform
