"""Dictionaries that are not trained SAEs, fitted from streamed batches and returned as
`SparseAutoencoder`s, so evaluation, concept recovery, top-k, render, trait metrics, probes and
interventions score them exactly as they score SAEs.

- `fit_pca`: the principal components of the training vectors, exact, from running float64 sums
  of x and x x^T (memory d_vit^2 whatever the number of vectors). Latent j < d_vit is component
  j's positive coefficient and latent d_vit + j its negative one, both ReLU'd, so every latent is
  non-negative as an SAE's is; TopK keeps the k largest, which are the k coefficients of largest
  magnitude: saev's PCA top-K baseline (`contrib/trait_discovery/docs/specs/baselines.md`), its
  sign carried by which half fires. W_enc = [V, -V], W_dec its transpose, b_dec the mean.
- `fit_kmeans`: mini-batch k-means (Sculley 2010; scikit-learn's update): each centroid moves to
  the mean of the batch vectors assigned to it at rate (its batch count / its total count).
  Centroids start by k-means++ seeding (Arthur & Vassilvitskii 2007) among the first batches
  (twice as many vectors as centroids, where the budget allows; random starts left whole
  clusters without a centroid in the tests); during the first half of the batches, a centroid
  that won no vector for `KMEANS_REASSIGN_EVERY` batches restarts at a random vector of the
  current batch. Encodes as `sae.KMeans` (nearest centroid, value 1).
- `random_sae`: an untrained TopK SAE, the control of the random-SAE papers: seeded random unit
  decoder rows, the encoder their transpose, b_dec the first batch's mean, b_enc 0.

Shape key: B = batch, D = d_vit, F = d_sae (latents).
"""

import typing

import torch

from . import sae
from .config import BaselineConfig

KMEANS_REASSIGN_EVERY = 16
"""Batches without a vector after which a centroid restarts (first half of the fit only)."""


def kmeans_plus_plus(pool_ND: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` rows of `pool_ND`, each drawn with probability proportional to its squared distance
    from the nearest row drawn before."""
    first = int(torch.randint(len(pool_ND), (1,), generator=gen))
    chosen = [first]
    dist_N = (pool_ND - pool_ND[first]).pow(2).sum(dim=1)
    for _ in range(n - 1):
        weights_N = dist_N.double().cpu().clamp(min=0)
        if weights_N.sum() <= 0:  # fewer distinct vectors than centroids
            weights_N = torch.ones_like(weights_N)
        i = int(torch.multinomial(weights_N, 1, generator=gen))
        chosen.append(i)
        dist_N = torch.minimum(dist_N, (pool_ND - pool_ND[i]).pow(2).sum(dim=1))
    return pool_ND[torch.tensor(chosen, device=pool_ND.device)].clone()


class Fit(typing.NamedTuple):
    model: sae.SparseAutoencoder
    summary: dict
    """What the fit measured (`fit.json`): vectors read, and PCA's explained variance or
    k-means' inertia per stretch of batches."""


def as_model(cfg, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D) -> sae.SparseAutoencoder:
    model = sae.SparseAutoencoder(cfg)
    state = {"W_enc": W_enc_DF, "b_enc": b_enc_F, "W_dec": W_dec_FD, "b_dec": b_dec_D}
    model.load_state_dict({k: v.float().cpu().contiguous() for k, v in state.items()})
    return model


@torch.no_grad()
def fit_pca(baseline: BaselineConfig, d_vit: int, batches: typing.Iterable[torch.Tensor]) -> Fit:
    n, sum_D = 0, torch.zeros(d_vit, dtype=torch.float64)
    sum_DD = torch.zeros(d_vit, d_vit, dtype=torch.float64)
    for x_BD in batches:
        x_BD = x_BD.double().cpu()
        n += len(x_BD)
        sum_D += x_BD.sum(dim=0)
        sum_DD += x_BD.T @ x_BD
    mean_D = sum_D / n
    cov_DD = sum_DD / n - torch.outer(mean_D, mean_D)
    eigvals_D, V_DD = torch.linalg.eigh(cov_DD)  # ascending
    eigvals_D, V_DD = eigvals_D.flip(0).clamp(min=0), V_DD.flip(1)
    W_enc_DF = torch.cat([V_DD, -V_DD], dim=1)
    cfg = baseline.sae_config(d_vit)
    model = as_model(cfg, W_enc_DF, torch.zeros(2 * d_vit), W_enc_DF.T, mean_D)
    explained = (eigvals_D.cumsum(0) / eigvals_D.sum()).tolist()
    summary = {"n_vectors": n, "explained_variance_by_components": explained}
    return Fit(model, summary)


@torch.no_grad()
def fit_kmeans(
    baseline: BaselineConfig,
    d_vit: int,
    batches: typing.Iterable[torch.Tensor],
    n_batches: int,
    device: torch.device | str = "cpu",
) -> Fit:
    cfg = baseline.sae_config(d_vit)
    n_centroids = cfg.d_sae
    gen = torch.Generator().manual_seed(baseline.seed)
    centroids_FD, counts_F, start = None, None, []
    last_won_F = None
    inertia, n_seen, inertia_log = 0.0, 0, []
    log_every = max(1, n_batches // 8)
    for step, x_BD in enumerate(batches):
        x_BD = x_BD.to(device).float()
        if centroids_FD is None:
            start.append(x_BD)
            pool_target = min(2 * n_centroids, n_batches * len(start[0]))
            if sum(len(x) for x in start) < max(n_centroids, pool_target) and step < n_batches - 1:
                continue
            pool_ND = torch.cat(start)
            if len(pool_ND) < n_centroids:
                break
            centroids_FD = kmeans_plus_plus(pool_ND, n_centroids, gen)
            counts_F = torch.zeros(n_centroids, device=device)
            last_won_F = torch.zeros(n_centroids, dtype=torch.long, device=device)
            x_BD = pool_ND
        pre_BF = x_BD @ centroids_FD.T - 0.5 * centroids_FD.pow(2).sum(dim=1)
        nearest_B = pre_BF.argmax(dim=1)
        inertia += (x_BD - centroids_FD[nearest_B]).pow(2).sum().item()
        n_seen += len(x_BD)
        batch_counts_F = torch.bincount(nearest_B, minlength=n_centroids).float()
        batch_sums_FD = torch.zeros_like(centroids_FD).index_add_(0, nearest_B, x_BD)
        counts_F += batch_counts_F
        won_F = batch_counts_F > 0
        rate_F1 = (batch_counts_F / counts_F.clamp(min=1))[:, None]
        batch_means_FD = batch_sums_FD / batch_counts_F.clamp(min=1)[:, None]
        centroids_FD += torch.where(won_F[:, None], rate_F1 * (batch_means_FD - centroids_FD), 0)
        last_won_F[won_F] = step
        stale_F = step - last_won_F >= KMEANS_REASSIGN_EVERY
        if step < n_batches // 2 and stale_F.any():
            idx = stale_F.nonzero().flatten()
            rows = torch.randint(len(x_BD), (len(idx),), generator=gen).to(device)
            centroids_FD[idx], counts_F[idx], last_won_F[idx] = x_BD[rows], 0, step
        if (step + 1) % log_every == 0:
            inertia_log.append({"batch": step + 1, "mean_sq_distance": inertia / n_seen})
            inertia, n_seen = 0.0, 0
    if centroids_FD is None:
        raise ValueError(
            f"k-means needs at least {n_centroids} training vectors for its centroids; "
            f"the stream had {sum(len(x) for x in start)}"
        )
    b_enc_F = -0.5 * centroids_FD.pow(2).sum(dim=1)
    model = as_model(cfg, centroids_FD.T, b_enc_F, centroids_FD, torch.zeros(d_vit))
    return Fit(model, {"n_vectors": int(counts_F.sum().item()), "inertia": inertia_log})


@torch.no_grad()
def random_sae(baseline: BaselineConfig, d_vit: int, first_batch_BD: torch.Tensor) -> Fit:
    cfg = baseline.sae_config(d_vit)
    W_dec_FD = sae.init_decoder(cfg)
    b_dec_D = first_batch_BD.double().mean(dim=0)
    model = as_model(cfg, W_dec_FD.T, torch.zeros(cfg.d_sae), W_dec_FD, b_dec_D)
    return Fit(model, {"n_vectors": len(first_batch_BD)})
