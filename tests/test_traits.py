"""saev's trait-discovery metrics (`saev_core.traits`) against cases computed by hand: the 1-D
probes' fit, the choice of each class's latent, and Probe R, AP, Purity@k and Coverage@tau."""

import math

import pytest
import torch

from saev_core import traits


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def binary_case():
    """100 patches, two latents. Latent 0 is 1 on patches 0-39 (30 of class 1), latent 1 is 2 on
    patches 40-69 (6 of class 1); 36 patches are class 1, the rest class 0."""
    labels_N = torch.tensor([1] * 30 + [0] * 10 + [1] * 6 + [0] * 54)
    f_x_NF = torch.zeros(100, 2)
    f_x_NF[:40, 0] = 1.0
    f_x_NF[40:70, 1] = 2.0
    return f_x_NF, labels_N


def fitted(f_x_NF, labels_N, n_classes=2, chunk=None) -> traits.Probes1d:
    chunk = chunk or len(labels_N)
    events = [
        traits.events_of(f_x_NF[lo : lo + chunk], labels_N[lo : lo + chunk])
        for lo in range(0, len(labels_N), chunk)
    ]
    probes = traits.Probes1d(f_x_NF.shape[1], n_classes)
    for e in events:
        probes.count(e)
    probes.fit(lambda: events)
    return probes


def test_newton_reaches_the_closed_form_fit_of_a_binary_latent():
    """On a 0/1 feature the maximum-likelihood probe predicts each side's class share: b is the
    logit of class 1's share where the latent is 0 (6/60), b + w where it is 1 (30/40)."""
    f_x_NF, labels_N = binary_case()
    probes = fitted(f_x_NF, labels_N)
    assert probes.b_FC[0, 1].item() == pytest.approx(logit(6 / 60), abs=1e-5)
    assert probes.w_FC[0, 1].item() == pytest.approx(logit(30 / 40) - logit(6 / 60), abs=1e-5)
    ce = -(30 * math.log(0.75) + 10 * math.log(0.25) + 6 * math.log(0.1) + 54 * math.log(0.9))
    assert probes.loss_FC[0, 1].item() == pytest.approx(ce / 100, abs=1e-6)
    # Latent 1 (value 2 on 30 patches, 6 of them class 1): share 6/30 there, 30/70 elsewhere.
    assert probes.b_FC[1, 1].item() == pytest.approx(logit(30 / 70), abs=1e-5)
    assert 2 * probes.w_FC[1, 1].item() == pytest.approx(logit(6 / 30) - logit(30 / 70), abs=1e-5)


def test_streaming_the_events_in_chunks_gives_the_same_probes():
    f_x_NF, labels_N = binary_case()
    whole, chunked = fitted(f_x_NF, labels_N), fitted(f_x_NF, labels_N, chunk=7)
    for name in ("b_FC", "w_FC", "loss_FC"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), atol=1e-9), name


def test_newton_matches_a_dense_reference_on_continuous_latents():
    """Three classes, latents of mixed sparsity: every pair's probe equals one fitted by L-BFGS
    on the dense values (the same mean cross-entropy, no shortcut for zeros)."""
    gen = torch.Generator().manual_seed(0)
    labels_N = torch.randint(3, (400,), generator=gen)
    f_x_NF = torch.rand(400, 3, generator=gen) * (torch.rand(400, 3, generator=gen) < 0.4)
    f_x_NF[:, 2] += 0.8 * (labels_N == 2) * (torch.rand(400, generator=gen) < 0.7)
    probes = fitted(f_x_NF, labels_N, n_classes=3, chunk=64)
    for latent in range(3):
        for c in range(3):
            loss, w = dense_fit(f_x_NF[:, latent].double(), (labels_N == c).double())
            assert probes.loss_FC[latent, c].item() == pytest.approx(loss, abs=1e-7)
            assert probes.w_FC[latent, c].item() == pytest.approx(w, abs=1e-3)


def dense_fit(x_N: torch.Tensor, y_N: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and weight of a 1-D logistic fit by L-BFGS on the dense values."""
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=200, tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            params[0] + params[1] * x_N, y_N
        )
        loss.backward()
        return loss

    opt.step(closure)
    return closure().item(), params[1].item()


def test_each_class_keeps_the_latent_with_the_lowest_training_loss():
    """Latent 1 is class 1's indicator with noise, latent 0 unrelated: class 1 picks latent 1."""
    gen = torch.Generator().manual_seed(1)
    labels_N = (torch.rand(300, generator=gen) < 0.3).long()
    f_x_NF = torch.stack(
        [torch.rand(300, generator=gen), labels_N * (1 + 0.1 * torch.rand(300, generator=gen))],
        dim=1,
    )
    probes = fitted(f_x_NF, labels_N)
    assert probes.best_latents([1]).tolist() == [1]


def test_held_out_scores_match_a_hand_computation():
    """Two classes and set probes: class 1 read from latent 0 (w 1, b -1), class 0 from latent 1
    (w -2, b 0.5). Six held-out patches with labels 1 1 0 0 1 0.

    Class 1's latent values 3 0 2 0 1 0 rank the patches 3 (class 1), 2 (0), 1 (1), then three
    tied at 0 (1, 0, 0) that share one threshold: AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 1/2 = 13/18.
    Its top 3 patches are labelled 1 0 1: purity 2/3. Class 0's latent values 0 1 0 2 0 0 with
    w < 0 rank patches with low values first: the four zeros (1, 0, 1, 0) tie, then 1 (label 1),
    then 2 (label 0): AP = 1/2 * 2/4 + 0 + 1/2 * 3/6 = 1/2."""
    probes = traits.Probes1d(2, 2)
    probes.b_FC = torch.tensor([[0.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    probes.w_FC = torch.tensor([[0.0, 1.0], [-2.0, 0.0]], dtype=torch.float64)
    probes.loss_FC = torch.tensor([[0.9, 0.2], [0.3, 0.9]], dtype=torch.float64)
    labels_N = torch.tensor([1, 1, 0, 0, 1, 0])
    values_NC = torch.tensor([[0, 3], [1, 0], [0, 2], [2, 0], [0, 1], [0, 0]], dtype=torch.float32)
    rows = traits.score_classes(probes, [0, 1], values_NC, labels_N, k=3)
    assert [r.latent for r in rows] == [1, 0]
    by_class = {r.cls: r for r in rows}
    assert by_class[1].ap == pytest.approx(13 / 18)
    assert by_class[1].purity == pytest.approx(2 / 3) and by_class[1].top_label == 1
    assert by_class[0].ap == pytest.approx(1 / 2)

    def ce(logits, ys):
        probs = [1 / (1 + math.exp(-z)) for z in logits]
        return -sum(math.log(p if y else 1 - p) for p, y in zip(probs, ys, strict=True)) / 6

    ce_1 = ce([-1 + v for v in (3, 0, 2, 0, 1, 0)], [1, 1, 0, 0, 1, 0])
    ce_0 = ce([0.5 - 2 * v for v in (0, 1, 0, 2, 0, 0)], [0, 0, 1, 1, 0, 1])
    assert by_class[1].eval_ce == pytest.approx(ce_1) and by_class[0].eval_ce == pytest.approx(ce_0)
    half = -math.log(0.5)  # each class is half of the held-out patches
    assert by_class[0].eval_base_ce == pytest.approx(half)

    scalars = traits.summary(rows, torch.tensor([0.5, 0.6], dtype=torch.float64))
    assert scalars["probe_r"] == pytest.approx(1 - (ce_0 + ce_1) / 2 / half)
    assert scalars["train_probe_r"] == pytest.approx(1 - (0.3 + 0.2) / 2 / 0.55)
    assert scalars["map"] == pytest.approx((13 / 18 + 1 / 2) / 2)
    assert scalars["coverage_0_3"] == 1.0
    assert scalars["purity_16"] == pytest.approx((2 / 3 + by_class[0].purity) / 2)


def test_coverage_counts_classes_above_tau_and_purity_breaks_ties_by_patch_order():
    rows = [
        traits.ClassTraits(c, 0, 1.0, 0.0, 0.1, 0.1, 0.2, ap, 1.0, c)
        for c, ap in enumerate((0.1, 0.3, 0.31, 0.9))
    ]
    assert traits.summary(rows, torch.ones(4))["coverage_0_3"] == 0.5  # 0.3 itself does not count
    share, label = traits.purity(torch.zeros(5), torch.tensor([2, 2, 1, 1, 1]), k=2)
    assert (share, label) == (1.0, 2)
