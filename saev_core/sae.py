"""The sparse autoencoder (SPEC §6) and its checkpoint format.

Shape key: B = batch, D = d_vit, F = d_sae (latents).

`sae.pt` follows the saev layout: one line of JSON (`{"schema": 1, "cls": ..., "cfg": {...}}`),
then a `torch.save` of the state dict, so saev's checkpoints load here and ours load there.
"""

import dataclasses
import io
import json
import pathlib
import typing

import torch

SCHEMA = 1
ACTIVATIONS = ("relu", "topk")


@dataclasses.dataclass(frozen=True)
class SaeConfig:
    """Shape and sparsity of one SAE."""

    d_vit: int
    """Input width."""
    exp_factor: int = 8
    """d_sae = d_vit * exp_factor."""
    activation: str = "relu"
    """`relu` (with an L1 penalty) or `topk` (keep the k largest pre-activations)."""
    sparsity_coeff: float = 0.0
    """Weight of the L1 penalty (relu)."""
    k: int = 0
    """Latents kept per example (topk)."""
    seed: int = 0
    """Seed of the weight initialisation."""

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"topk needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")

    @property
    def d_sae(self) -> int:
        return self.d_vit * self.exp_factor


class Loss(typing.NamedTuple):
    """Loss terms of one batch, each averaged over examples."""

    loss: torch.Tensor
    """What the optimiser minimises: mse + sparsity_coeff * l1 (relu) or mse (topk)."""
    mse: torch.Tensor
    """Mean squared reconstruction error per element."""
    l0: torch.Tensor
    """Latents firing per example."""
    l1: torch.Tensor
    """Sum of latent values per example."""


class SparseAutoencoder(torch.nn.Module):
    def __init__(self, cfg: SaeConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec_FD = torch.randn(cfg.d_sae, cfg.d_vit, generator=gen)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(W_dec_FD.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = torch.nn.Parameter(W_dec_FD)
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_vit))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = (x_BD - self.b_dec) @ self.W_enc + self.b_enc
        if self.cfg.activation == "topk":
            vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre_BF).scatter(-1, idx_BK, vals_BK.relu())
        return pre_BF.relu()

    def decode(self, f_x_BF: torch.Tensor) -> torch.Tensor:
        return f_x_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_x_BF = self.encode(x_BD)
        return self.decode(f_x_BF), f_x_BF

    def loss(self, x_BD: torch.Tensor) -> Loss:
        x_hat_BD, f_x_BF = self(x_BD)
        mse = (x_hat_BD - x_BD).pow(2).mean()
        l1 = f_x_BF.abs().sum(dim=-1).mean()
        l0 = (f_x_BF > 0).float().sum(dim=-1).mean()
        loss = mse + self.cfg.sparsity_coeff * l1 if self.cfg.activation == "relu" else mse
        return Loss(loss=loss, mse=mse, l0=l0, l1=l1)

    @torch.no_grad()
    def remove_parallel_grads(self):
        """Drop the gradient component along each decoder row, which only rescales it."""
        parallel_F = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel_F * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)


def save(fpath: pathlib.Path, sae: SparseAutoencoder, **extra):
    """Write `sae.pt`: a JSON header line then the state dict. `extra` goes into the header."""
    header = {
        "schema": SCHEMA,
        "cls": "SparseAutoencoder",
        "cfg": dataclasses.asdict(sae.cfg),
        **extra,
    }
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in sae.state_dict().items()}, buffer)
    fpath = pathlib.Path(fpath)
    tmp_fpath = fpath.with_name(f".{fpath.name}.tmp")
    tmp_fpath.write_bytes((json.dumps(header) + "\n").encode() + buffer.getvalue())
    tmp_fpath.replace(fpath)


def read_header(fpath: pathlib.Path) -> dict:
    """The JSON header line of a checkpoint, without loading the weights."""
    with open(fpath, "rb") as fd:
        return json.loads(fd.readline().decode())


def load(fpath: pathlib.Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load a checkpoint in the saev layout (ours, or saev's schema-1 ReLU SAEs)."""
    with open(fpath, "rb") as fd:
        header = json.loads(fd.readline().decode())
        if header.get("schema") != SCHEMA:
            raise ValueError(
                f"{fpath}: checkpoint schema must be {SCHEMA}, got {header.get('schema')!r}"
            )
        if header.get("cls") != "SparseAutoencoder":
            raise ValueError(f"{fpath}: unknown checkpoint class {header.get('cls')!r}")
        state = torch.load(io.BytesIO(fd.read()), weights_only=True, map_location=device)
    fields = {f.name for f in dataclasses.fields(SaeConfig)}
    cfg = SaeConfig(**{k: v for k, v in header["cfg"].items() if k in fields})
    sae = SparseAutoencoder(cfg)
    sae.load_state_dict(state)
    return sae.to(device)


def load_trained(
    fpath: pathlib.Path, device: str | torch.device = "cpu"
) -> tuple[SparseAutoencoder, dict]:
    """An SAE trained by this workflow and its training configuration (layer, tokens, ...)."""
    header = read_header(fpath)
    if "train" not in header:
        raise ValueError(
            f"{fpath} has no 'train' section in its header: not trained by this workflow"
        )
    return load(fpath, device), header["train"]
