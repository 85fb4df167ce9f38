"""Concept recovery: for each patch-label class, the latent that best predicts it.

Scoring every (latent, class) pair exactly needs one sort of every latent's values over every patch;
for ImageNet-scale SAEs that is out of reach, so it runs in two steps. First, while evaluation
streams the patches, `ClassStats` accumulates per-class sums that give each latent's point-biserial
correlation with each class (a single matrix product per batch). Then the `n_candidates` most
correlated latents per class get their exact average precision and best F1 over all thresholds,
from one sort of their values. A latent that equals a class indicator has correlation 1, so it is
always a candidate.

Class 0 is background (synthetic) or "other" (ADE20K) and is not scored.

Shape key: N = patches, F = d_sae, C = classes, U = candidate latents.
"""

import typing

import torch

BACKGROUND_CLASS = 0


class ClassStats:
    """Streaming sums for the correlation of every latent with every class."""

    def __init__(self, d_sae: int, n_classes: int, device: torch.device | str = "cpu"):
        self.n_classes = n_classes
        self.n = 0
        zeros = dict(dtype=torch.float64, device=device)
        self.n_pos_C = torch.zeros(n_classes, **zeros)
        self.sum_F = torch.zeros(d_sae, **zeros)
        self.sumsq_F = torch.zeros(d_sae, **zeros)
        self.pos_sum_CF = torch.zeros((n_classes, d_sae), **zeros)

    def update(self, f_x_NF: torch.Tensor, labels_N: torch.Tensor):
        onehot_NC = torch.nn.functional.one_hot(labels_N.long(), self.n_classes).to(f_x_NF.dtype)
        self.n += len(f_x_NF)
        self.n_pos_C += onehot_NC.sum(dim=0).double()
        self.sum_F += f_x_NF.sum(dim=0).double()
        self.sumsq_F += f_x_NF.double().pow(2).sum(dim=0)
        self.pos_sum_CF += (onehot_NC.T @ f_x_NF).double()

    def scored_classes(self) -> list[int]:
        """Classes with at least one patch, background excepted."""
        present = (self.n_pos_C > 0).nonzero().flatten().tolist()
        return [c for c in present if c != BACKGROUND_CLASS]

    def candidates(self, n_candidates: int) -> dict[int, list[int]]:
        """Per scored class, the `n_candidates` latents most correlated with it."""
        mean_F = self.sum_F / self.n
        std_F = (self.sumsq_F / self.n - mean_F.pow(2)).clamp(min=0).sqrt()
        classes = self.scored_classes()
        if not classes:
            return {}
        idx = torch.tensor(classes, device=self.n_pos_C.device)
        n_pos = self.n_pos_C[idx, None]
        mean_pos_CF = self.pos_sum_CF[idx] / n_pos
        mean_neg_CF = (self.sum_F - self.pos_sum_CF[idx]) / (self.n - n_pos).clamp(min=1)
        # Point-biserial correlation; the sqrt(p(1-p)) factor is constant within a class.
        corr_CF = (mean_pos_CF - mean_neg_CF) / std_F
        corr_CF = torch.where(std_F > 0, corr_CF, -torch.inf)
        top = corr_CF.topk(min(n_candidates, corr_CF.shape[1]), dim=1).indices.cpu()
        return {c: top[i].tolist() for i, c in enumerate(classes)}


def ap_and_best_f1(values_N: torch.Tensor, positive_N: torch.Tensor) -> tuple[float, float]:
    """Average precision (precision times recall increase, summed over distinct thresholds, as in
    scikit-learn) and the best F1 over those thresholds, for predicting `positive_N` by `values_N`.
    """
    order = values_N.argsort(descending=True)
    return ranked_ap_and_best_f1(values_N[order], positive_N[order])


def ranked_ap_and_best_f1(
    sorted_values_N: torch.Tensor, sorted_positive_N: torch.Tensor
) -> tuple[float, float]:
    """`ap_and_best_f1` on values already sorted in descending order."""
    tp = sorted_positive_N.double().cumsum(0)
    n_predicted = torch.arange(1, len(tp) + 1, dtype=torch.float64, device=tp.device)
    # Patches with equal values share one threshold: keep the last position of each run.
    last = torch.ones_like(sorted_values_N, dtype=torch.bool)
    last[:-1] = sorted_values_N[1:] != sorted_values_N[:-1]
    tp, n_predicted = tp[last], n_predicted[last]
    n_pos = tp[-1]
    precision = tp / n_predicted
    recall_step = torch.diff(tp, prepend=tp.new_zeros(1)) / n_pos
    ap = (recall_step * precision).sum()
    f1 = (2 * tp / (n_predicted + n_pos)).max()
    return float(ap), float(f1)


def score_candidates(
    candidates: dict[int, list[int]],
    values_NU: torch.Tensor,
    latents_U: list[int],
    labels_N: torch.Tensor,
) -> dict[tuple[int, int], tuple[float, float]]:
    """(AP, best F1) of every (class, latent) candidate pair whose latent is among `latents_U`;
    each latent's values are sorted once for all the classes that nominated it."""
    nominated_by: dict[int, list[int]] = {}
    for c, latents in candidates.items():
        for latent in latents:
            nominated_by.setdefault(latent, []).append(c)
    scores = {}
    for u, latent in enumerate(latents_U):
        order = values_NU[:, u].argsort(descending=True)
        sorted_values, sorted_labels = values_NU[order, u], labels_N[order]
        for c in nominated_by.get(latent, []):
            scores[c, latent] = ranked_ap_and_best_f1(sorted_values, sorted_labels == c)
    return scores


class Concept(typing.NamedTuple):
    """One scored (class, latent) candidate pair."""

    cls: int
    name: str
    n_patches: int
    latent: int
    ap: float
    f1: float
    rank: int
    """1 for the class's best latent (by AP), 2 for the next, ... among its candidates."""


def ranked_candidates(
    candidates: dict[int, list[int]],
    scores: dict[tuple[int, int], tuple[float, float]],
    n_pos_C: torch.Tensor,
    class_names: list[str],
) -> list[Concept]:
    """Every candidate pair, by class, best AP first (ties: the lower latent)."""
    ranked = []
    for c, latents in sorted(candidates.items()):
        by_ap = sorted(latents, key=lambda f: (-scores[c, f][0], f))
        for rank, latent in enumerate(by_ap, start=1):
            ap, f1 = scores[c, latent]
            ranked.append(Concept(c, class_names[c], int(n_pos_C[c]), latent, ap, f1, rank))
    return ranked


def best_latents(ranked: list[Concept]) -> list[Concept]:
    """Per class, its rank-1 latent."""
    return [concept for concept in ranked if concept.rank == 1]
