"""saev's trait-discovery metrics (its `contrib/trait_discovery`: `probe1d.py`, `metrics.py`,
`notebooks/baselines.py` at 3d73f1f), for any SAE or baseline on patch-labelled activations.

For every (latent, class) pair a 1-D logistic probe p(class | f) = sigmoid(b + w f) is fitted by
Newton's method on the training patches; each class keeps the latent whose probe has the lowest
training loss. On the held-out patches, with that latent and probe:

- Probe R = 1 - CE / CE_0, with CE the mean over classes of the probes' cross-entropy and CE_0
  that of predicting each class's own prevalence (an intercept-only model);
- mAP: the mean over classes of the average precision of the probe's logits (ties share one
  threshold, as in scikit-learn; saev's sort breaks them in array order);
- Purity@k: per class, the share of its latent's k highest-activating patches that carry their
  most common label, averaged over classes (k = 16);
- Coverage@tau: the share of classes whose AP exceeds tau (0.3).

Every class present in both the training and the held-out labels counts, class 0 too (saev's
definition: ADE20K's "other", our background).

Streaming and memory: the probes never see a dense (patches, latents) matrix. A zero activation
gives every pair of its latent the logit b, so the zero patches of a latent add to its sums in
closed form from two counts (its zero patches, and those of each class), and each Newton pass
only walks the non-zero activations (events), a chunk at a time, as (events, classes) arrays.
What stays in memory is about 50 float64 (latents, classes) arrays (parameters, the sums of the
gradient and Hessian, the last accepted step and its sums, the step's temporaries): measured
0.9 GB of peak growth at 16,384 latents x 151 classes (ADE20K), whatever the number of patches,
plus one chunk's (events, classes) temporaries (`CHUNK_ELEMENTS`). The events are kept between
passes when they fit in `EVENT_BYTES`, else re-encoded each pass.

Shape key: N = patches, F = latents, C = classes, E = events (non-zero activations).
"""

import typing

import torch

from . import concepts

PURITY_K = 16
COVERAGE_TAU = 0.3
MAX_PASSES = 25
"""Newton iterations (each one pass over the training events)."""
GRAD_TOL = 1e-7
"""Stop when every pair's gradient of the mean loss is below this."""
RIDGE = 1e-8
"""L2 weight on (w, b - b0) of the mean loss: keeps a latent that separates its class finite."""
MAX_LOGIT_STEP = 8.0
"""Largest change of any logit in one step (a trust region, as saev's `lm_max_update`)."""
EVENT_BYTES = 2**30
"""Events kept in memory between passes; more are re-encoded each pass."""
CHUNK_ELEMENTS = 2**22
"""Largest (events, classes) array in one step of a pass (32 MiB; a step holds about 8)."""
EPS = 1e-12


class Events(typing.NamedTuple):
    """The non-zero activations of a chunk of training patches."""

    patch_E: torch.Tensor
    """Index of the patch within the chunk."""
    latent_E: torch.Tensor
    value_E: torch.Tensor
    labels_N: torch.Tensor
    """The chunk's patch labels."""


def events_of(f_x_NF: torch.Tensor, labels_N: torch.Tensor) -> Events:
    patch_E, latent_E = f_x_NF.nonzero(as_tuple=True)
    return Events(patch_E, latent_E, f_x_NF[patch_E, latent_E].double(), labels_N.long())


def binary_ce(p: torch.Tensor, y_pos: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of predicting probability `p` for `n` cases of which `y_pos` are
    positive."""
    p = p.clamp(EPS, 1 - EPS)
    return -(y_pos * p.log() + (n - y_pos) * (1 - p).log())


class Probes1d:
    """Newton's method for every (latent, class) 1-D logistic probe at once, from passes over
    the training events (`fit`)."""

    def __init__(self, d_sae: int, n_classes: int, device: torch.device | str = "cpu"):
        self.F, self.C, self.device = d_sae, n_classes, device
        zeros = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.n_pos_C = torch.zeros(n_classes, **zeros)
        self.nnz_F = torch.zeros(d_sae, **zeros)
        self.nnz_pos_FC = torch.zeros(d_sae, n_classes, **zeros)
        self.max_abs_F = torch.zeros(d_sae, **zeros)

    def count(self, events: Events):
        """The first pass: patch, class and non-zero counts, and each latent's largest value."""
        self.n += len(events.labels_N)
        self.n_pos_C += torch.bincount(events.labels_N, minlength=self.C).double()
        self.nnz_F.index_add_(0, events.latent_E, torch.ones_like(events.value_E))
        onehot_EC = self.onehot(events.labels_N[events.patch_E])
        self.nnz_pos_FC.index_add_(0, events.latent_E, onehot_EC)
        self.max_abs_F.scatter_reduce_(0, events.latent_E, events.value_E.abs(), "amax")

    def onehot(self, labels_E: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(labels_E, self.C).double()

    def sums(self, chunks: typing.Callable[[], typing.Iterable[Events]], b_FC, w_FC):
        """Loss, gradient (g0 for b, g1 for w) and Hessian (h00, h01, h11) of every pair's
        summed cross-entropy at (b, w): the events walked, the zero patches in closed form."""
        loss, g0, g1, h00, h01, h11 = (torch.zeros_like(b_FC) for _ in range(6))
        for events in chunks():
            step = max(1, CHUNK_ELEMENTS // self.C)
            for lo in range(0, len(events.latent_E), step):
                latent_E = events.latent_E[lo : lo + step]
                v_E1 = events.value_E[lo : lo + step, None]
                y_EC = self.onehot(events.labels_N[events.patch_E[lo : lo + step]])
                mu_EC = torch.sigmoid(b_FC[latent_E] + w_FC[latent_E] * v_E1)
                r_EC, s_EC = mu_EC - y_EC, mu_EC * (1 - mu_EC)
                loss.index_add_(0, latent_E, binary_ce(mu_EC, y_EC, torch.ones_like(y_EC)))
                g0.index_add_(0, latent_E, r_EC)
                g1.index_add_(0, latent_E, r_EC * v_E1)
                h00.index_add_(0, latent_E, s_EC)
                h01.index_add_(0, latent_E, s_EC * v_E1)
                h11.index_add_(0, latent_E, s_EC * v_E1 * v_E1)
        n0_F1 = (self.n - self.nnz_F)[:, None]
        n0_pos_FC = self.n_pos_C - self.nnz_pos_FC
        mu0_FC = torch.sigmoid(b_FC)
        loss += binary_ce(mu0_FC, n0_pos_FC, n0_F1)
        g0 += n0_F1 * mu0_FC - n0_pos_FC
        h00 += n0_F1 * mu0_FC * (1 - mu0_FC)
        return loss, g0, g1, h00, h01, h11

    def fit(self, chunks: typing.Callable[[], typing.Iterable[Events]]) -> dict:
        """Fit (b, w) of every pair by damped Newton steps, one pass each: a step that raised a
        pair's loss is undone and retried with ten times the damping. Sets `b_FC`, `w_FC` and
        `loss_FC` (mean training cross-entropy at them); returns how the fit went."""
        prevalence_C = (self.n_pos_C / self.n).clamp(EPS, 1 - EPS)
        b0_FC = (prevalence_C.log() - (-prevalence_C).log1p()).expand(self.F, self.C).clone()
        b_FC, w_FC = b0_FC.clone(), torch.zeros_like(b0_FC)
        damping_FC = torch.full_like(b0_FC, 1e-3)
        best, n_passes = None, 0
        while n_passes < MAX_PASSES:
            n_passes += 1
            loss, g0, g1, h00, h01, h11 = (t / self.n for t in self.sums(chunks, b_FC, w_FC))
            db_FC, dw_FC = b_FC - b0_FC, w_FC
            loss = loss + 0.5 * RIDGE * (db_FC.pow(2) + dw_FC.pow(2))
            g0, g1, h00, h11 = g0 + RIDGE * db_FC, g1 + RIDGE * dw_FC, h00 + RIDGE, h11 + RIDGE
            current = (b_FC, w_FC, loss, g0, g1, h00, h01, h11)
            if best is None:
                best = current
            else:
                better_FC = loss <= best[2]
                best = tuple(
                    torch.where(better_FC, new, old) for new, old in zip(current, best, strict=True)
                )
                damping_FC = torch.where(better_FC, damping_FC / 10, damping_FC * 10).clamp(
                    1e-9, 1e9
                )
            b_FC, w_FC, _, g0, g1, h00, h01, h11 = best
            if max(g0.abs().max().item(), g1.abs().max().item()) < GRAD_TOL:
                break
            # Levenberg-Marquardt: (H + damping * diag(H)) step = gradient, per pair.
            a, d = h00 * (1 + damping_FC), h11 * (1 + damping_FC)
            det = (a * d - h01 * h01).clamp(min=EPS)
            step_b, step_w = (d * g0 - h01 * g1) / det, (a * g1 - h01 * g0) / det
            reach_FC = step_b.abs() + step_w.abs() * self.max_abs_F[:, None]
            scale_FC = (MAX_LOGIT_STEP / reach_FC.clamp(min=EPS)).clamp(max=1.0)
            b_FC, w_FC = b_FC - scale_FC * step_b, w_FC - scale_FC * step_w
        self.b_FC, self.w_FC, self.loss_FC = best[0], best[1], best[2]
        grad_FC = torch.maximum(best[3].abs(), best[4].abs())
        return {
            "newton_passes": n_passes,
            "converged_share": (grad_FC < 1e-4).double().mean().item(),
        }

    def best_latents(self, classes: list[int]) -> torch.Tensor:
        """Per class, the latent with the lowest training loss (ties: the lower latent)."""
        return self.loss_FC[:, classes].argmin(dim=0)


class ClassTraits(typing.NamedTuple):
    """One class's best latent and its held-out scores."""

    cls: int
    latent: int
    w: float
    b: float
    train_ce: float
    eval_ce: float
    eval_base_ce: float
    ap: float
    purity: float
    top_label: int
    """The most common label among the latent's top-k held-out patches."""


def base_ce(n_pos: torch.Tensor, n: int) -> torch.Tensor:
    """Mean cross-entropy of predicting each class's own prevalence (saev's baseline CE)."""
    return binary_ce(n_pos / n, n_pos, torch.tensor(float(n))) / n


def purity(values_N: torch.Tensor, labels_N: torch.Tensor, k: int) -> tuple[float, int]:
    """Share of the `k` highest values' patches (ties: the earlier patch) carrying their most
    common label, and that label."""
    top_N = values_N.argsort(descending=True, stable=True)[:k]
    counts = torch.bincount(labels_N[top_N])
    return counts.max().item() / len(top_N), int(counts.argmax())


def score_classes(
    probes: Probes1d,
    classes: list[int],
    eval_values_NC: torch.Tensor,
    eval_labels_N: torch.Tensor,
    k: int = PURITY_K,
) -> list[ClassTraits]:
    """Held-out scores of each class's best latent (`eval_values_NC`: that latent's values,
    one column per class of `classes`)."""
    best_C = probes.best_latents(classes)
    n = len(eval_labels_N)
    eval_pos_C = torch.bincount(eval_labels_N, minlength=probes.C).double()
    out = []
    for i, c in enumerate(classes):
        latent = int(best_C[i])
        b, w = probes.b_FC[latent, c].item(), probes.w_FC[latent, c].item()
        logits_N = b + w * eval_values_NC[:, i].double()
        positive_N = eval_labels_N == c
        eval_ce = binary_ce(torch.sigmoid(logits_N), positive_N.double(), 1.0).mean().item()
        ap, _ = concepts.ap_and_best_f1(logits_N, positive_N)
        share, top_label = purity(eval_values_NC[:, i], eval_labels_N, k)
        train_ce = probes.loss_FC[latent, c].item()
        eval_base = base_ce(eval_pos_C[c], n).item()
        out.append(ClassTraits(c, latent, w, b, train_ce, eval_ce, eval_base, ap, share, top_label))
    return out


def summary(rows: list[ClassTraits], train_base_ce_C: torch.Tensor) -> dict:
    """The sweep-table scalars, as saev's notebook aggregates them."""
    train_ce = sum(r.train_ce for r in rows) / len(rows)
    eval_ce = sum(r.eval_ce for r in rows) / len(rows)
    eval_base = sum(r.eval_base_ce for r in rows) / len(rows)
    return {
        "probe_r": 1 - eval_ce / eval_base,
        "train_probe_r": 1 - train_ce / train_base_ce_C.mean().item(),
        "map": sum(r.ap for r in rows) / len(rows),
        f"purity_{PURITY_K}": sum(r.purity for r in rows) / len(rows),
        f"coverage_{COVERAGE_TAU}".replace(".", "_"): sum(r.ap > COVERAGE_TAU for r in rows)
        / len(rows),
        "n_trait_classes": len(rows),
    }
