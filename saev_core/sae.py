"""Sparse autoencoders (SPEC §6): the activation kinds, stacked training, saving and loading.

Shape key: M = SAEs in a stack, B = batch, D = d_vit, F = d_sae (latents), K = kept latents.

Each activation kind is one `Activation` class (`ACTIVATIONS`): its encoding, its sparsity loss,
what it learns from the data and the tensors it stores. Training runs a `StackedSaes` per
(activation, width) in a sweep group: its SAEs as one batched computation over a leading M axis
(one `baddbmm` per matrix product for all of them). `SparseAutoencoder` is one trained SAE for
inference; both use the same activation, so a member exported from a stack encodes exactly as it
did in training's inference mode. `save` and `load` write and read `sae.pt` in the layouts that
`checkpoints` describes (saev's headers, read without torch there).
"""

import dataclasses
import io
import json
import math
import pathlib
import typing

import torch

from . import checkpoints, shards
from .config import MATRYOSHKA_N_PREFIXES, MATRYOSHKA_PARETO_POWER, SaeConfig

JUMPRELU_INIT_THRESHOLD = 1e-3
"""Before training sees data; `init_from_batch` replaces it."""
JUMPRELU_INIT_FIRING = 0.02
"""JumpReLU thresholds start where each latent fires on this fraction of the first batch. A
sparse start trains at about the sparsity the penalty settles on, as TopK does: on
`benchmarks/quality.py` held-out NMSE at L0 32 was 0.079 starting from 2 % and 0.086 from 10 %
(the penalty then spends most of training pulling L0 down from ~300)."""
JUMPRELU_THRESHOLD_LR_SCALE = 10.0
"""JumpReLU's log-thresholds learn this much faster than the weights: Adam moves a parameter by
about lr per step whatever its gradient, and at the weights' rate a threshold moves by a factor
of 1.5 over the embedded default's 128 steps, too little to reach the coefficient's balance."""
JUMPRELU_BANDWIDTH = 1.0
"""Width of the straight-through estimator's window around each threshold, in units of the
pre-activations' RMS on the first batch. The published 0.001 (for unit-scale inputs) held 0.01 %
of the pre-activations: a latent's threshold got a gradient on a few steps in a hundred, each
moving it by Adam's fixed step whatever the coefficient, so L0 stopped following it (the same at
coefficients 0.1 and 3). At 1 RMS every step carries the balance of penalty and reconstruction
(0.1-27 % inside); 0.5 and 2 gave the same NMSE at equal L0."""
JUMPRELU_FLOOR = 0.01
"""Weight, relative to the L0 penalty, of a pull on each threshold towards the pre-activations
below it: a threshold stops rising where fewer than about this share of its latent's
pre-activations per RMS sit at it, so no coefficient kills a latent for good. A pre-activation
loss (Anthropic, January 2025) reaching only the thresholds: pulling the pre-activations up too
cost 20-40 % NMSE. Dead latents at L0 32 on `benchmarks/quality.py`: 4 % without, 0.6 % with it."""
BATCHTOPK_THRESHOLD_MOMENTUM = 0.9


class Loss(typing.NamedTuple):
    """Loss terms of one batch, one value per SAE (M,), each averaged over examples."""

    loss: torch.Tensor
    """What the optimiser minimises."""
    mse: torch.Tensor
    """Mean squared reconstruction error per element (normalised space)."""
    l0: torch.Tensor
    """Latents firing per example."""
    l1: torch.Tensor
    """Sum of latent values per example."""
    aux: torch.Tensor
    """AuxK loss (0 where off or nothing is dead)."""


class StepFn(torch.autograd.Function):
    """Heaviside step H(z - theta) with a straight-through gradient for theta (JumpReLU paper,
    rectangle kernel of width `bandwidth`); no gradient for z."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.bandwidth / 2).to(z.dtype)
        grad_theta = -(1 / ctx.bandwidth) * window * grad_out
        return None, sum_to(grad_theta, theta.shape), None


class JumpReluFn(torch.autograd.Function):
    """z * H(z - theta): gradient H for z, straight-through estimate -theta/eps * K for theta."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.bandwidth / 2).to(z.dtype)
        grad_z = (z > theta).to(z.dtype) * grad_out
        grad_theta = -(theta / ctx.bandwidth) * window * grad_out
        return grad_z, sum_to(grad_theta, theta.shape), None


def sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to a parameter's shape."""
    while grad.dim() > len(shape):
        grad = grad.sum(dim=0)
    for dim, size in enumerate(shape):
        if size == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim=dim, keepdim=True)
    return grad


def keep_topk(pre_MBF: torch.Tensor, k_M: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Per example, keep each SAE's k largest pre-activations (ReLU'd unless `relu` is off, as
    saev's TopK), zero the rest."""
    k_max = int(k_M.max())
    vals_MBK, idx_MBK = pre_MBF.topk(k_max, dim=-1)
    keep_MBK = torch.arange(k_max, device=pre_MBF.device) < k_M[:, None, None]
    vals_MBK = vals_MBK.relu() if relu else vals_MBK
    return torch.zeros_like(pre_MBF).scatter(-1, idx_MBK, vals_MBK * keep_MBK)


def keep_batch_topk(pre_MBF: torch.Tensor, n_keep_M: torch.Tensor, relu: bool = True):
    """Per SAE, keep the `n_keep` largest pre-activations over the whole batch (ReLU'd unless
    `relu` is off)."""
    M, B, F = pre_MBF.shape
    n_max = int(n_keep_M.max())
    flat_MN = pre_MBF.reshape(M, B * F)
    vals_MK, idx_MK = flat_MN.topk(n_max, dim=-1)
    keep_MK = torch.arange(n_max, device=pre_MBF.device) < n_keep_M[:, None]
    vals_MK = vals_MK.relu() if relu else vals_MK
    return torch.zeros_like(flat_MN).scatter(-1, idx_MK, vals_MK * keep_MK).view(M, B, F)


class Activation:
    """One activation kind: how it turns pre-activations into latents, its sparsity loss, what
    it learns from the first batch and from each training batch, and the tensors it stores.
    Methods take the stack (`SaeParams`) whose parameters and buffers they read; one instance
    serves all M SAEs of a stack."""

    state_keys: typing.ClassVar[tuple[str, ...]] = ()
    """Tensors a single SAE of this kind stores besides saev's four."""

    def encode(self, p: "SaeParams", pre_MBF: torch.Tensor, training: bool) -> torch.Tensor:
        raise NotImplementedError

    def penalty(self, p: "SaeParams", pre_MBF: torch.Tensor, l1_M: torch.Tensor) -> torch.Tensor:
        """What `sparsity_coeff` weighs (none for the kinds that keep k latents)."""
        return torch.zeros_like(l1_M)

    def init_from_batch(self, p: "SaeParams", x_MBD: torch.Tensor):
        """Settings taken from the first (normalised) training batch."""

    def observe(self, p: "SaeParams", f_MBF: torch.Tensor):
        """Statistics kept from each training batch's latents."""

    def schema5(self, cfg: SaeConfig) -> dict:
        """saev's schema-5 `cfg.activation` (its class and parameters) for this SAE."""
        raise ValueError(f"saev has no equivalent of a {cfg.activation} SAE")


def saev_aux(cfg: SaeConfig, required: bool = False) -> dict:
    """saev's schema-5 auxiliary loss entry: AuxK, or none. Where saev types the field `AuxK`
    only (`required`: its BatchTopK), an SAE without AuxK gets one of weight 0 (all latents,
    `alpha` 0), which trains as no AuxK would and encodes the same."""
    if cfg.aux_k or required:
        alpha = cfg.aux_coeff if cfg.aux_k else 0.0
        k_aux = cfg.aux_k or cfg.d_sae
        return {"cls": "AuxK", "params": {"key": "auxk", "k_aux": k_aux, "alpha": alpha}}
    return {"cls": "NoAux", "params": {"key": "no-aux"}}


SAEV_NO_SPARSITY = {"cls": "NoSparsity", "params": {"key": "no-sparsity"}}


class Relu(Activation):
    """ReLU with an L1 penalty on the latents."""

    def encode(self, p, pre_MBF, training):
        return pre_MBF.relu()

    def penalty(self, p, pre_MBF, l1_M):
        return l1_M

    def schema5(self, cfg):
        l1 = {"cls": "L1Sparsity", "params": {"key": "l1-sparsity", "coeff": cfg.sparsity_coeff}}
        return {"cls": "Relu", "params": {"key": "relu", "sparsity": l1, "aux": saev_aux(cfg)}}


class TopK(Activation):
    """The k largest pre-activations per example, ReLU'd."""

    def encode(self, p, pre_MBF, training):
        return keep_topk(pre_MBF, p.k)

    def schema5(self, cfg):
        params = {"key": "top-k", "top_k": cfg.k, "sparsity": SAEV_NO_SPARSITY}
        return {"cls": "TopK", "params": {**params, "aux": saev_aux(cfg)}}


class BatchTopK(Activation):
    """In training, the k x batch largest pre-activations over the batch; at inference, the
    pre-activations above a threshold learned as the running mean of the smallest kept one."""

    state_keys = ("threshold",)

    def encode(self, p, pre_MBF, training):
        if training:
            return keep_batch_topk(pre_MBF, p.k * pre_MBF.shape[1])
        return pre_MBF.relu() * (pre_MBF > p.threshold[:, None, None])

    def observe(self, p, f_MBF):
        """Running mean of the smallest kept activation: the per-example rule at inference."""
        smallest_M = torch.where(f_MBF > 0, f_MBF, float("inf")).flatten(1).amin(dim=1)
        smallest_M = torch.where(smallest_M.isfinite(), smallest_M, 0.0)
        m = BATCHTOPK_THRESHOLD_MOMENTUM
        ema_M = m * p.threshold + (1 - m) * smallest_M
        p.threshold.copy_(torch.where(p.threshold == 0, smallest_M, ema_M))

    def schema5(self, cfg):
        """saev's inference rule is ours (`activation.threshold`); its momentum only trains."""
        params = {"key": "batch-top-k", "top_k": cfg.k, "sparsity": SAEV_NO_SPARSITY}
        aux = saev_aux(cfg, required=True)  # saev 3d73f1f refuses a BatchTopK with NoAux
        return {"cls": "BatchTopK", "params": {**params, "momentum": 0.1, "aux": aux}}


class JumpRelu(Activation):
    """A learned threshold per latent, an L0 penalty through a straight-through estimator, and a
    floor that keeps thresholds from pricing a latent out for good (see `JUMPRELU_*`)."""

    state_keys = ("log_threshold",)

    def encode(self, p, pre_MBF, training):
        theta_M1F = p.log_threshold.exp()[:, None]
        return JumpReluFn.apply(pre_MBF, theta_M1F, JUMPRELU_BANDWIDTH * p.pre_rms)

    def penalty(self, p, pre_MBF, l1_M):
        """L0 plus the threshold floor."""
        theta_M1F = p.log_threshold.exp()[:, None]
        window_M11 = JUMPRELU_BANDWIDTH * p.pre_rms
        l0_M = StepFn.apply(pre_MBF, theta_M1F, window_M11).sum(dim=-1).mean(dim=1)
        below_MBF = (theta_M1F - pre_MBF.detach()).relu() / p.pre_rms
        return l0_M + JUMPRELU_FLOOR * below_MBF.sum(dim=-1).mean(dim=1)

    def init_from_batch(self, p, x_MBD):
        """Thresholds where each latent fires on `JUMPRELU_INIT_FIRING` of the batch, and the
        pre-activations' RMS, the unit of the estimator's window and of the floor, so the L0
        penalty moves the thresholds whatever the data's scale."""
        pre_MBF = p.pre_acts(x_MBD[:, :4096])
        rank = max(1, math.ceil((1 - JUMPRELU_INIT_FIRING) * pre_MBF.shape[1]))
        theta_MF = pre_MBF.kthvalue(rank, dim=1).values.clamp_min(1e-6)
        p.log_threshold.copy_(theta_MF.log())
        p.pre_rms.copy_(pre_MBF.pow(2).mean(dim=(1, 2), keepdim=True).sqrt())


class KMeans(Activation):
    """The k-means baseline's code: 1 for the nearest centroid, 0 elsewhere. The nearest centroid
    c of x maximises x.c - |c|^2 / 2, a linear pre-activation (`W_enc` the centroids'
    transpose, `b_enc` -|c|^2 / 2, `b_dec` 0), and decoding gives that centroid back. Fitted by
    `baselines.fit_kmeans`, never trained."""

    def encode(self, p, pre_MBF, training):
        nearest_MB1 = pre_MBF.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(pre_MBF).scatter(-1, nearest_MB1, 1.0)


class SaevTopK(Activation):
    """saev's TopK (schema 1 from f5d892c on, and 5): the k largest pre-activations as they are,
    no ReLU. Inference only, for checkpoints saev wrote; exported as what it is."""

    def encode(self, p, pre_MBF, training):
        return keep_topk(pre_MBF, p.k, relu=False)

    schema5 = TopK.schema5


class SaevBatchTopK(Activation):
    """saev f5d892c's BatchTopK: the k largest pre-activations of the whole batch, as they are,
    in eval mode too. Inference only, for checkpoints saev wrote."""

    def encode(self, p, pre_MBF, training):
        return keep_batch_topk(pre_MBF, p.k, relu=False)


ACTIVATIONS: dict[str, type[Activation]] = {
    "relu": Relu,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpRelu,
    "kmeans": KMeans,
}
"""Every kind, by `SaeConfig.activation` (their settings: `config.KINDS`; `kmeans` is fitted,
not trained)."""
SAEV_ENCODINGS: dict[str, type[Activation]] = {
    "saev-topk": SaevTopK,
    "saev-batchtopk": SaevBatchTopK,
}
"""Encodings of saev's own checkpoints that differ from the kind's, named by `checkpoints`."""


class SaeParams(torch.nn.Module):
    """Weights of M SAEs of one width: the parameters and activation both classes share.

    `encoding` names one of `SAEV_ENCODINGS` instead of the kind's own, and `subtract_b_dec` off
    makes the encoder read `x` rather than `x - b_dec`: both for checkpoints saev wrote, which
    then compute exactly what saev computes (see `checkpoints`)."""

    def __init__(
        self, cfgs: list[SaeConfig], encoding: str | None = None, subtract_b_dec: bool = True
    ):
        super().__init__()
        d_vit, d_sae = cfgs[0].d_vit, cfgs[0].d_sae
        first = (d_vit, d_sae, cfgs[0].activation)
        if any((c.d_vit, c.d_sae, c.activation) != first for c in cfgs):
            raise ValueError("a stack holds SAEs of one shape (d_vit, d_sae) and activation only")
        self.cfgs = cfgs
        self.activation = (SAEV_ENCODINGS[encoding] if encoding else ACTIVATIONS[first[2]])()
        self.subtract_b_dec = subtract_b_dec
        W_dec_MFD = torch.stack([init_decoder(c) for c in cfgs])
        self.W_enc = torch.nn.Parameter(W_dec_MFD.transpose(1, 2).clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(len(cfgs), d_sae))
        self.W_dec = torch.nn.Parameter(W_dec_MFD)
        self.b_dec = torch.nn.Parameter(torch.zeros(len(cfgs), d_vit))
        self.log_threshold = torch.nn.Parameter(
            torch.full((len(cfgs), d_sae), math.log(JUMPRELU_INIT_THRESHOLD))
        )
        self.register_buffer("threshold", torch.zeros(len(cfgs)))  # batchtopk, inference
        # JumpReLU's pre-activation scale (training only: its window and floor are in RMS units).
        self.register_buffer("pre_rms", torch.ones(len(cfgs), 1, 1))
        self.register_buffer("x_mean", torch.zeros(len(cfgs), d_vit))
        self.register_buffer("x_scale", torch.ones(len(cfgs)))
        self.register_buffer("k", torch.tensor([c.k for c in cfgs]), persistent=False)

    def normalize(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(M, B, D): the input as each SAE sees it."""
        return (x_BD[None] - self.x_mean[:, None]) * self.x_scale[:, None, None]

    def pre_acts(self, x_MBD: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) @ W_enc + b_enc. The batch product sees b_dec as a constant and a zero-valued
        (M, 1, F) term carries its gradient: autograd would otherwise spend a whole (B, F) x (F, D)
        product per step on d loss / d (x - b_dec), of which only the sum over the batch is used.
        SAEs loaded from saev's later layouts read x itself (`subtract_b_dec` off)."""
        if not self.subtract_b_dec:
            return torch.baddbmm(self.b_enc[:, None], x_MBD, self.W_enc)
        b_dec_M1D = self.b_dec[:, None]
        pre_MBF = torch.baddbmm(self.b_enc[:, None], x_MBD - b_dec_M1D.detach(), self.W_enc)
        if not b_dec_M1D.requires_grad:
            return pre_MBF
        return pre_MBF - torch.bmm(b_dec_M1D - b_dec_M1D.detach(), self.W_enc)

    def activate(self, pre_MBF: torch.Tensor, training: bool) -> torch.Tensor:
        """Latents; `training` selects a kind's training rule (batchtopk's batch-wide one)."""
        return self.activation.encode(self, pre_MBF, training)

    def decode(self, f_MBF: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b_dec[:, None], f_MBF, self.W_dec)


def sample_prefixes(d_sae: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """saev's Matryoshka prefix lengths: `n - 1` distinct lengths in 1..d_sae-1 drawn with the
    probabilities of a Pareto distribution of power 0.5 (its CDF 1 - 1/length^0.5 differenced
    over the lengths, so short prefixes are likely), and d_sae; sorted."""
    n = min(n, d_sae - 1)  # length 1 has probability 0: at most d_sae - 2 to draw
    if n <= 1:
        return torch.tensor([d_sae])
    lengths = torch.arange(1, d_sae)
    cdf = 1 - (1 / lengths.double()) ** MATRYOSHKA_PARETO_POWER
    pdf = torch.cat([cdf[:1], cdf[1:] - cdf[:-1]])
    drawn = lengths[torch.multinomial(pdf / pdf.sum(), n - 1, replacement=False, generator=gen)]
    return torch.cat([drawn, torch.tensor([d_sae])]).sort().values


def init_decoder(cfg: SaeConfig) -> torch.Tensor:
    """Unit-norm random decoder rows (F, D), deterministic from the SAE's seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    W_dec_FD = torch.randn(cfg.d_sae, cfg.d_vit, generator=gen)
    return W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True)


INIT_BLEND = 0.8
"""Share of a data vector in a data-initialised decoder row (saev's `reinit_blend`)."""


def data_decoder(cfg: SaeConfig, x_BD: torch.Tensor) -> torch.Tensor:
    """Unit decoder rows (F, D) pointing mostly at training vectors: each a blend of one vector
    of the batch (drawn with the SAE's seed) and a random direction."""
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = torch.randint(len(x_BD), (cfg.d_sae,), generator=gen)
    data_FD = torch.nn.functional.normalize(x_BD[rows.to(x_BD.device)], dim=1)
    random_FD = init_decoder(cfg).to(x_BD.device)
    return torch.nn.functional.normalize(INIT_BLEND * data_FD + (1 - INIT_BLEND) * random_FD, dim=1)


class StackedSaes(SaeParams):
    """M SAEs of one width trained together on each batch."""

    def __init__(self, cfgs: list[SaeConfig]):
        super().__init__(cfgs)
        self.register_buffer("tokens_since_fired", torch.zeros(len(cfgs), cfgs[0].d_sae))
        for name in ("sparsity_coeff", "aux_k", "aux_coeff", "dead_tokens"):
            values = torch.tensor([getattr(c, name) for c in cfgs])
            self.register_buffer(name, values, persistent=False)
        penalised = [c.decoder_norm == "penalised" for c in cfgs]
        if any(penalised):
            self.register_buffer("penalised_M", torch.tensor(penalised), persistent=False)
        else:
            self.penalised_M = None

    @torch.no_grad()
    def init_from_batch(self, x_BD: torch.Tensor):
        """Normalisation constants (for SAEs that normalise), b_dec and the decoder (where it
        starts from data) from the first batch, then what the activation takes from it."""
        mean_D = x_BD.mean(dim=0)
        scale = math.sqrt(x_BD.shape[1]) / (x_BD - mean_D).norm(dim=1).mean()
        for m, cfg in enumerate(self.cfgs):
            if cfg.normalize:
                self.x_mean[m], self.x_scale[m] = mean_D, scale
        x_MBD = self.normalize(x_BD)
        zero_M1 = torch.tensor([[c.b_dec_init == "zero"] for c in self.cfgs], device=x_BD.device)
        self.b_dec.copy_(torch.where(zero_M1, 0.0, x_MBD.mean(dim=1)))
        for m, cfg in enumerate(self.cfgs):
            if cfg.init_from_data:
                self.W_dec[m] = data_decoder(cfg, x_MBD[m] - self.b_dec[m])
                self.W_enc[m] = self.W_dec[m].T
        self.activation.init_from_batch(self, x_MBD)

    def loss(self, x_BD: torch.Tensor, sparsity_scale_M: torch.Tensor, step: int = 0) -> Loss:
        """Per-SAE losses; `sparsity_scale_M` is the sparsity warm-up factor in [0, 1] and
        `step` seeds sampled Matryoshka prefixes (a resumed job draws the same ones)."""
        x_MBD = self.normalize(x_BD)
        pre_MBF = self.pre_acts(x_MBD)
        f_MBF = self.activate(pre_MBF, training=True)
        x_hat_MBD = self.decode(f_MBF)
        mse_M = (x_hat_MBD - x_MBD).pow(2).mean(dim=(1, 2))
        recon_M = self.matryoshka_mse(f_MBF, x_MBD, mse_M, step)
        l1_M = f_MBF.sum(dim=-1).mean(dim=1)  # every activation is non-negative
        if self.penalised_M is not None:  # L1 weighted by each latent's decoder-row norm
            row_norms_M1F = self.W_dec.norm(dim=2)[:, None]
            weighted_M = (f_MBF * row_norms_M1F).sum(dim=-1).mean(dim=1)
            l1_M = torch.where(self.penalised_M, weighted_M, l1_M)
        l0_M = torch.count_nonzero(f_MBF, dim=-1).float().mean(dim=1)
        penalty_M = self.activation.penalty(self, pre_MBF, l1_M)
        aux_M = self.aux_loss(pre_MBF, x_MBD - x_hat_MBD.detach())
        loss_M = recon_M + self.sparsity_coeff * sparsity_scale_M * penalty_M
        loss_M = loss_M + self.aux_coeff * aux_M
        with torch.no_grad():
            self.track_firing(f_MBF)
            self.activation.observe(self, f_MBF)
        return Loss(loss=loss_M, mse=mse_M, l0=l0_M, l1=l1_M, aux=aux_M)

    def step_prefixes(self, step: int) -> list[set[int]]:
        """Per SAE, the prefix lengths whose reconstruction errors its loss averages at `step`:
        its fixed ones, or this step's draw (`sample_prefixes`, one draw for the stack, seeded
        by the stack's first seed and the step)."""
        d_sae = self.cfgs[0].d_sae
        sampled = None
        if any(c.matryoshka and c.matryoshka_prefixes == "sampled" for c in self.cfgs):
            gen = torch.Generator().manual_seed(self.cfgs[0].seed * 1_000_003 + step)
            sampled = set(sample_prefixes(d_sae, MATRYOSHKA_N_PREFIXES, gen).tolist())
        return [
            sampled if c.matryoshka and c.matryoshka_prefixes == "sampled" else set(c.prefixes)
            for c in self.cfgs
        ]

    def matryoshka_mse(self, f_MBF, x_MBD, mse_M, step: int = 0) -> torch.Tensor:
        """Mean over each SAE's prefixes of the reconstruction error from only those latents;
        the prefixes' reconstructions are built up block by block (one full decode's work)."""
        if not any(c.matryoshka for c in self.cfgs):
            return mse_M
        wanted = self.step_prefixes(step)
        terms_M = torch.zeros_like(mse_M)
        counts_M = torch.zeros_like(mse_M)
        x_hat_MBD, done = self.b_dec[:, None].expand_as(x_MBD), 0
        for p in sorted(set().union(*wanted)):
            has_M = torch.tensor([p in w for w in wanted], device=mse_M.device)
            if p == self.cfgs[0].d_sae:
                mse_p_M = mse_M
            else:
                block = slice(done, p)
                x_hat_MBD = torch.baddbmm(x_hat_MBD, f_MBF[..., block], self.W_dec[:, block])
                mse_p_M = (x_hat_MBD - x_MBD).pow(2).mean(dim=(1, 2))
                done = p
            terms_M = terms_M + has_M * mse_p_M
            counts_M = counts_M + has_M
        return terms_M / counts_M

    def aux_loss(self, pre_MBF: torch.Tensor, residual_MBD: torch.Tensor) -> torch.Tensor:
        """AuxK: the `aux_k` largest dead latents reconstruct what the SAE missed (normalised MSE)."""
        aux_M = torch.zeros(len(self.cfgs), device=pre_MBF.device)
        if int(self.aux_k.max()) == 0:
            return aux_M
        dead_MF = self.tokens_since_fired >= self.dead_tokens[:, None]
        if not dead_MF.any():
            return aux_M
        masked_MBF = pre_MBF.masked_fill(~dead_MF[:, None], float("-inf"))
        k_M = torch.minimum(self.aux_k, dead_MF.sum(dim=1))
        f_aux_MBF = keep_topk(masked_MBF, k_M).nan_to_num(0.0)
        e_hat_MBD = torch.bmm(f_aux_MBF, self.W_dec)
        err_M = (e_hat_MBD - residual_MBD).pow(2).mean(dim=(1, 2))
        var_M = (residual_MBD - residual_MBD.mean(dim=1, keepdim=True)).pow(2).mean(dim=(1, 2))
        return torch.where(k_M > 0, err_M / var_M.clamp_min(1e-12), 0.0)

    def track_firing(self, f_MBF: torch.Tensor):
        fired_MF = (f_MBF > 0).any(dim=1)
        self.tokens_since_fired += f_MBF.shape[1]
        self.tokens_since_fired.masked_fill_(fired_MF, 0)

    def dead_fraction(self) -> torch.Tensor:
        return (self.tokens_since_fired >= self.dead_tokens[:, None]).float().mean(dim=1)

    @torch.no_grad()
    def remove_parallel_grads(self):
        """Drop the gradient component along each decoder row, which only rescales it."""
        parallel_MF1 = (self.W_dec.grad * self.W_dec).sum(dim=2, keepdim=True)
        if self.penalised_M is not None:  # free rows keep their whole gradient
            parallel_MF1 = parallel_MF1 * ~self.penalised_M[:, None, None]
        self.W_dec.grad -= parallel_MF1 * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self):
        norms_MF1 = self.W_dec.norm(dim=2, keepdim=True)
        if self.penalised_M is not None:
            norms_MF1 = torch.where(self.penalised_M[:, None, None], 1.0, norms_MF1)
        self.W_dec /= norms_MF1

    def member(self, m: int) -> "SparseAutoencoder":
        """SAE `m` on its own, for inference and `sae.pt`."""
        single = SparseAutoencoder(self.cfgs[m])
        keys = single_keys(single.stack)
        single.load_state_dict({k: v[m] for k, v in stack_state(self).items() if k in keys})
        return single.to(self.b_dec.device)


def single_keys(params: SaeParams) -> set[str]:
    """The state-dict entries a single SAE stores: saev's four, plus what its activation and
    options need."""
    keys = {"W_enc", "b_enc", "W_dec", "b_dec", *params.activation.state_keys}
    if params.cfgs[0].normalize:
        keys |= {"x_mean", "x_scale"}
    return keys


class SparseAutoencoder(torch.nn.Module):
    """One trained SAE for inference: `encode`, `decode` and `forward` on (B, D) inputs in the
    original activation space (normalisation, when used, is applied and undone inside)."""

    def __init__(self, cfg: SaeConfig, encoding: str | None = None, subtract_b_dec: bool = True):
        super().__init__()
        self.cfg = cfg
        self.stack = SaeParams([cfg], encoding, subtract_b_dec)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        keys = single_keys(self.stack)
        return {name: value[0] for name, value in stack_state(self.stack).items() if name in keys}

    def load_state_dict(self, state: dict, strict: bool = True):
        """Copy tensors in; each must have exactly its shape (no broadcasting) and be finite."""
        expected = single_keys(self.stack)
        if strict and set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"SAE state must have exactly {sorted(expected)}; missing {missing}, "
                f"unexpected {extra}"
            )
        shapes = self.state_dict()
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"tensor {name!r} is a {type(value).__name__}, not a tensor")
            want = tuple(shapes[name].shape)
            if tuple(value.shape) != want:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(value.shape)}, expected {want} "
                    f"(d_vit {self.cfg.d_vit}, d_sae {self.cfg.d_sae})"
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"tensor {name!r} holds NaN or infinite values")
        with torch.no_grad():
            for name, value in state.items():
                getattr(self.stack, name)[0].copy_(value)

    @property
    def W_enc(self) -> torch.Tensor:
        return self.stack.W_enc[0]

    @property
    def b_enc(self) -> torch.Tensor:
        return self.stack.b_enc[0]

    @property
    def W_dec(self) -> torch.Tensor:
        return self.stack.W_dec[0]

    @property
    def b_dec(self) -> torch.Tensor:
        return self.stack.b_dec[0]

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latents of (..., D) inputs, e.g. (batch, D) or saev's (batch, patches, D)."""
        x_MBD = self.stack.normalize(x_BD.reshape(-1, x_BD.shape[-1]))
        f_x_BF = self.stack.activate(self.stack.pre_acts(x_MBD), training=False)[0]
        return f_x_BF.reshape(*x_BD.shape[:-1], f_x_BF.shape[-1])

    def decode(self, f_x_BF: torch.Tensor) -> torch.Tensor:
        """Reconstructions of (..., F) latents."""
        flat_BF = f_x_BF.reshape(-1, f_x_BF.shape[-1])
        x_hat_BD = (
            self.stack.decode(flat_BF[None])[0] / self.stack.x_scale[0] + self.stack.x_mean[0]
        )
        return x_hat_BD.reshape(*f_x_BF.shape[:-1], x_hat_BD.shape[-1])

    def decode_change(self, latents: list[int], delta_NU: torch.Tensor) -> torch.Tensor:
        """decode(f + delta) - decode(f) when only `latents` change by `delta_NU`: decoding is
        affine, so this is their decoder rows alone (an edit of a few latents costs nothing
        like a full decode)."""
        return delta_NU @ self.W_dec[latents] / self.stack.x_scale[0]

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_x_BF = self.encode(x_BD)
        return self.decode(f_x_BF), f_x_BF


def stack_state(params: SaeParams) -> dict[str, torch.Tensor]:
    """Every per-SAE tensor of a stack, (M, ...) each."""
    return {
        "W_enc": params.W_enc.detach(),
        "b_enc": params.b_enc.detach(),
        "W_dec": params.W_dec.detach(),
        "b_dec": params.b_dec.detach(),
        "log_threshold": params.log_threshold.detach(),
        "threshold": params.threshold,
        "x_mean": params.x_mean,
        "x_scale": params.x_scale,
    }


def save(fpath: pathlib.Path, model: SparseAutoencoder, train: dict | None = None):
    """Write `sae.pt` (see `checkpoints`): saev's schema-1 header where saev can read the SAE,
    with `b_enc - b_dec @ W_enc` stored because saev's encoder does not subtract `b_dec`, and
    our configuration and `train` (the training configuration) in our own header section."""
    if not isinstance(model.stack.activation, tuple(ACTIVATIONS.values())):
        raise ValueError(
            f"this SAE encodes as saev's {type(model.stack.activation).__name__}, which our "
            "layout cannot say: export it for saev instead (`saev_core.export`)"
        )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    cfg = model.cfg
    section = {"cfg": dataclasses.asdict(cfg), "train": train}
    header = checkpoints.saev_header(cfg, section)
    if header["cls"] != "SparseAutoencoder":
        state["b_enc"] = saev_b_enc(model)
        if "threshold" in state:  # saev f5d892c's BatchTopK has no threshold tensor
            section["threshold"] = float(state.pop("threshold"))
    elif not model.stack.subtract_b_dec:  # our layout subtracts b_dec: undo saev's folding
        state["b_enc"] = (
            state["b_enc"] + (state["b_dec"].double() @ state["W_enc"].double()).float()
        )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    shards.write_atomic(
        pathlib.Path(fpath), (json.dumps(header) + "\n").encode() + buffer.getvalue()
    )


def load(fpath: pathlib.Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Any checkpoint layout of ours or saev's (`checkpoints`), encoding exactly as the code that
    wrote it; tensors are checked for their exact shapes and for NaN."""
    fpath = pathlib.Path(fpath)
    layout = checkpoints.layout(fpath, checkpoints.read_header(fpath))
    _, state = checkpoints.read(fpath)
    state = {layout.renames.get(k, k): v for k, v in state.items()}
    state |= {k: torch.tensor(v) for k, v in layout.header_tensors.items()}
    model = SparseAutoencoder(layout.cfg, layout.encoding, layout.subtracts_b_dec)
    try:
        model.load_state_dict(state)
    except ValueError as err:
        raise checkpoints.CheckpointError(f"{fpath} ({layout.name}): {err}") from None
    return model.to(device)


def saev_b_enc(model: SparseAutoencoder) -> torch.Tensor:
    """The encoder bias for saev's later encoders, which do not subtract b_dec first:
    `b_enc - b_dec @ W_enc`, so that they compute this SAE's pre-activations."""
    b_enc_F = model.b_enc.detach().cpu()
    if not model.stack.subtract_b_dec:
        return b_enc_F.clone()
    b_dec_D, W_enc_DF = model.b_dec.detach().cpu(), model.W_enc.detach().cpu()
    return b_enc_F - (b_dec_D.double() @ W_enc_DF.double()).float()


def load_trained(
    fpath: pathlib.Path, device: str | torch.device = "cpu"
) -> tuple[SparseAutoencoder, dict]:
    """An SAE trained by this workflow and its training configuration (layer, tokens, ...)."""
    fpath = pathlib.Path(fpath)
    train = checkpoints.layout(fpath, checkpoints.read_header(fpath)).train
    if train is None:
        raise checkpoints.CheckpointError(
            f"{fpath} has no training configuration in its header: not trained by this workflow"
        )
    return load(fpath, device), train
