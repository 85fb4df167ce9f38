"""Linear probes on activation vectors: the model, its file, and the scores read from confusions.

A probe maps one vector (a patch, an image's `[CLS]` or its mean patch) to class logits. The probe
step trains a grid of them at once (`StackedProbes`: one weight matrix per grid point, the same
batches for all); `probe.pt` keeps the best one with what it reads, so interventions can apply it
to edited activations. Every score is computed from a confusion matrix (true class x predicted
class counts), summed over batches, so nothing per vector is kept in memory.

Shape key: G = grid points, B = batch, D = d_vit, C = classes, N = vectors.
"""

import csv
import io
import pathlib
import typing

import numpy as np
import torch

from . import datasets, shards


class StackedProbes(torch.nn.Module):
    """G linear probes evaluated together: logits_GBC = x_BD @ W_GDC + b_GC."""

    def __init__(self, n_probes: int, d_vit: int, n_classes: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        bound = 1 / d_vit**0.5  # torch.nn.Linear's initialisation
        weights = (torch.rand(n_probes, d_vit, n_classes, generator=gen) * 2 - 1) * bound
        self.W_GDC = torch.nn.ParameterList([torch.nn.Parameter(w) for w in weights])
        self.b_GC = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(n_classes)) for _ in range(n_probes)]
        )

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        W_GDC, b_GC = torch.stack(list(self.W_GDC)), torch.stack(list(self.b_GC))
        return torch.einsum("bd,gdc->gbc", x_BD, W_GDC) + b_GC[:, None]


class Probe(typing.NamedTuple):
    """One trained probe and what it reads."""

    W_DC: torch.Tensor
    b_C: torch.Tensor
    kind: str
    """`patch` or `image`."""
    layer: int
    tokens: str
    """What one input vector is: `patches`, `cls` or `mean` (pooled patches)."""
    classes: list[str]
    ignore_labels: list[int]

    def logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        return x_ND @ self.W_DC.to(x_ND.device) + self.b_C.to(x_ND.device)

    def predict(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.logits(x_ND).argmax(dim=-1)

    def pool(self, x_NTD: torch.Tensor, has_cls: bool) -> torch.Tensor:
        """What the probe reads from whole images' tokens ([CLS] first where `has_cls`):
        (N * patches, D) for patch probes, (N, D) for image probes."""
        patches_NPD = x_NTD[:, int(has_cls) :]
        if self.tokens == "patches":
            return patches_NPD.reshape(-1, x_NTD.shape[-1])
        if self.tokens == "cls":
            return x_NTD[:, 0]
        return patches_NPD.mean(dim=1)


def save(fpath: pathlib.Path, probe: Probe, extra: dict):
    """`probe.pt`: the weights and what the probe reads, plus `extra` (its grid point)."""
    tmp_fpath = shards.tmp_sibling(pathlib.Path(fpath))
    torch.save({**probe._asdict(), **extra}, tmp_fpath)
    tmp_fpath.replace(fpath)


def load(fpath: pathlib.Path) -> Probe:
    state = torch.load(fpath, map_location="cpu", weights_only=True)
    missing = sorted(set(Probe._fields) - set(state))
    if missing:
        raise ValueError(f"{fpath} is not a probe file: it lacks {missing}")
    return Probe(**{k: state[k] for k in Probe._fields})


def vector_labels(
    kind: str, reader: shards.ShardReader, dataset_cfg: dict, classes: tuple[str, ...]
) -> np.ndarray:
    """Each vector's class, (n_imgs, vectors per image): patch classes from `labels.bin`, or the
    dataset's per-image target."""
    if kind == "patch":
        labels_NP = reader.labels()
        if labels_NP is None:
            raise shards.ShardError(f"{reader.dpath} has no labels.bin: a patch probe needs it")
        reader.check_labels(list(classes))
        return labels_NP
    dataset = datasets.load(dataset_cfg)
    if len(dataset) != reader.n_imgs:
        raise shards.ShardError(
            f"{reader.dpath} holds {reader.n_imgs} images, the dataset {len(dataset)}"
        )
    return np.array([[dataset.target(i)] for i in range(len(dataset))], dtype=np.int64)


def confusion(true_N: torch.Tensor, pred_N: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows the true class, columns the predicted one."""
    flat_N = true_N.long() * n_classes + pred_N.long()
    return torch.bincount(flat_N, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def kept(labels_N: torch.Tensor, ignore_labels: list[int]) -> torch.Tensor:
    """Vectors whose class is scored (not one of `ignore_labels`)."""
    keep_N = torch.ones_like(labels_N, dtype=torch.bool)
    for c in ignore_labels:
        keep_N &= labels_N != c
    return keep_N


def class_iou(conf_CC: np.ndarray) -> np.ndarray:
    """Intersection over union of each class (NaN where it is neither present nor predicted)."""
    conf_CC = np.asarray(conf_CC, dtype=np.float64)
    tp_C = np.diag(conf_CC)
    union_C = conf_CC.sum(axis=0) + conf_CC.sum(axis=1) - tp_C
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union_C > 0, tp_C / union_C, np.nan)


def mean_iou(conf_CC: np.ndarray, ignore_labels: list[int]) -> float:
    """Mean IoU over the classes present among the true labels, ignored classes excepted."""
    iou_C = class_iou(conf_CC)
    present = [
        c for c in range(len(iou_C)) if np.asarray(conf_CC)[c].sum() > 0 and c not in ignore_labels
    ]
    return float(np.mean(iou_C[present])) if present else float("nan")


def accuracy(conf_CC: np.ndarray) -> float:
    conf_CC = np.asarray(conf_CC, dtype=np.float64)
    return float(np.trace(conf_CC) / conf_CC.sum()) if conf_CC.sum() else float("nan")


def recall(conf_CC: np.ndarray) -> np.ndarray:
    """Of each class's vectors, the share predicted as that class (NaN for absent classes)."""
    conf_CC = np.asarray(conf_CC, dtype=np.float64)
    n_C = conf_CC.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_C > 0, np.diag(conf_CC) / n_C, np.nan)


def predicted_share(conf_CC: np.ndarray, excluded: int) -> np.ndarray:
    """Of the vectors whose true class is not `excluded`, the share predicted as each class."""
    conf_CC = np.asarray(conf_CC, dtype=np.float64)
    rows = np.delete(conf_CC, excluded, axis=0)
    return rows.sum(axis=0) / max(rows.sum(), 1.0)


def upsample_nearest(pred_P: np.ndarray, side: int) -> np.ndarray:
    """A row-major square grid of patch predictions as a (side, side) pixel map; nearest patch."""
    grid = int(round(len(pred_P) ** 0.5))
    rows = np.minimum(np.arange(side) * grid // side, grid - 1)
    return np.asarray(pred_P).reshape(grid, grid)[rows][:, rows]


def rows_csv(rows: list[dict]) -> str:
    """A table of dict rows as CSV text, floats to 6 significant digits."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return out.getvalue()
