"""The top-k pass's result, `topk.npz`: what the top-k step writes and render and the browser read.

Each latent's values when it fires are counted in a histogram of fixed log10 bins (`BIN_EDGES`,
0.05 decades wide from 1e-6 to 1e4; values outside go to the end bins).

Shape key: F = d_sae, K = top_k, H = histogram bins.
"""

import pathlib
import typing

import numpy as np

from . import shards

LOG10_MIN, LOG10_MAX, N_BINS = -6.0, 4.0, 200
BIN_EDGES = np.linspace(LOG10_MIN, LOG10_MAX, N_BINS + 1)
"""log10 edges of the value histogram bins."""


class TopK(typing.NamedTuple):
    """What the top-k pass learns about each latent."""

    top_values: np.ndarray
    """(F, K) largest per-image activation (max over the image's tokens), descending."""
    top_imgs: np.ndarray
    """(F, K) image index of each value; -1 where the latent never fired on that many images."""
    freq: np.ndarray
    """(F,) fraction of token vectors on which the latent fires."""
    mean_value: np.ndarray
    """(F,) mean activation over the vectors where it fires (0 if never)."""
    percentile: np.ndarray
    """(F,) estimate of the `percentile_q` percentile of its values when it fires (0 if never)."""
    percentile_q: float
    value_hist: np.ndarray
    """(F, H) how many vectors fall in each log10 value bin (`BIN_EDGES`) when it fires."""


def save(fpath: pathlib.Path, result: TopK):
    tmp_fpath = shards.tmp_sibling(pathlib.Path(fpath))
    with open(tmp_fpath, "wb") as fd:
        np.savez_compressed(fd, **result._asdict())
    tmp_fpath.replace(fpath)


def load(fpath: pathlib.Path) -> TopK:
    with np.load(fpath) as data:
        return TopK(**{field: data[field] for field in TopK._fields})._replace(
            percentile_q=float(data["percentile_q"])
        )
