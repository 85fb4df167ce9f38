"""Gather a sweep's metrics into one table and plot L0 against normalised MSE.

Run as `python -m saev_core.steps.summarize --spec-fpath results/specs/sweeps/<sweep>/summary.json
--out-csv-fpath summary.csv --out-parquet-fpath summary.parquet --out-plot-fpath pareto.png`. The
spec (a `jobs.SummarizeJob`) lists the sweep's SAEs with their groups, labels, `sae.pt` and
`metrics.json` files, its external SAEs and the model; each trained SAE's configuration comes from
its `sae.pt` header, so nothing on the command line grows with the sweep.
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from .. import checkpoints, jobs  # noqa: E402

ID_COLUMNS = ("sae", "group")
"""Hexadecimal ids: a CSV reader would take `12345678` or `1234e567` for a number."""

MAX_ANNOTATED = 40
"""Above this many SAEs per (model, layer), only the Pareto frontier's points are labelled."""


def table(
    saes: dict[str, dict],
    metrics: dict[str, dict],
    sae_group: dict[str, str],
    model: str,
    labels: dict[str, str],
) -> pl.DataFrame:
    """One row per SAE: id, readable label, model, group, its configuration and its metrics."""
    rows = [
        {"sae": sae_id, "label": labels[sae_id], "model": model, "group": sae_group[sae_id]}
        | saes[sae_id]
        | metrics[sae_id]
        for sae_id in sorted(saes)
    ]
    return pl.DataFrame(rows, infer_schema_length=None)


def read_csv(fpath: pathlib.Path) -> pl.DataFrame:
    """`summary.csv` with its id columns read as text, never inferred as numbers."""
    return pl.read_csv(fpath, schema_overrides={c: pl.String for c in ID_COLUMNS})


def pareto_front(df: pl.DataFrame) -> pl.DataFrame:
    """Rows no other row beats on both L0 and normalised MSE (lower is better for each)."""
    ordered = df.sort(["l0", "normalized_mse"])
    keep, best = [], float("inf")
    for nmse in ordered["normalized_mse"]:
        keep.append(nmse < best)
        best = min(best, nmse)
    return ordered.filter(pl.Series(keep))


def plot(df: pl.DataFrame, out_fpath: pathlib.Path):
    fig = pareto_figure(df)
    fig.savefig(out_fpath, dpi=120)
    plt.close(fig)


def pareto_figure(df: pl.DataFrame) -> plt.Figure:
    """L0 vs normalised MSE, one colour and frontier per (model, layer); points carry their SAE
    label without the layer, which the colour already says."""
    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    groups = df.group_by(["model", "layer"], maintain_order=True)
    for g, ((model, layer), sub) in enumerate(groups):
        label = f"{model}, layer {layer}"
        points = ax.scatter(sub["l0"], sub["normalized_mse"], label=label, alpha=0.8)
        colour = points.get_facecolor()[0]
        front = pareto_front(sub)
        ax.plot(front["l0"], front["normalized_mse"], color=colour, lw=1)
        named = sub if len(sub) <= MAX_ANNOTATED else front
        for row in named.iter_rows(named=True):
            text = row["label"].removeprefix(f"L{layer} ")
            ax.annotate(
                text,
                (row["l0"], row["normalized_mse"]),
                xytext=(5, 4 - 9 * (g % 2)),  # layers alternate above and below
                textcoords="offset points",
                fontsize=6,
                color=colour,
            )
    ax.set_xscale("log")
    ax.set_xlabel("L0 (latents firing per token)")
    ax.set_ylabel("normalised MSE")
    ax.set_title("Sparsity vs reconstruction (lines: Pareto frontier)")
    ax.legend()
    return fig


def read_sweep(job: jobs.SummarizeJob) -> pl.DataFrame:
    """The sweep table from the files its jobs wrote: `sae.pt` headers and `metrics.json`;
    external SAEs are described by their entry and what their header says."""
    saes = {}
    for sae_id, fpath in job.sae_fpaths.items():
        saes[sae_id] = checkpoints.layout(fpath, checkpoints.read_header(fpath)).train
    for sae_id, external in job.externals.items():
        fpath = pathlib.Path(external.fpath)
        layout = checkpoints.layout(fpath, checkpoints.read_header(fpath))
        cfg = layout.cfg
        saes[sae_id] = {
            "layer": external.layer,
            "tokens": external.tokens,
            "activation": layout.encoding or cfg.activation,
            "exp_factor": cfg.exp_factor,
            "k": cfg.k or None,
            "source": f"{fpath} ({layout.name})",
        }
    metrics = {
        sae_id: json.loads(pathlib.Path(job.metrics_fpaths[sae_id]).read_text()) for sae_id in saes
    }
    return table(saes, metrics, job.groups, job.model, job.labels)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="a SummarizeJob")
    parser.add_argument("--out-csv-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--out-parquet-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--out-plot-fpath", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    df = read_sweep(jobs.SummarizeJob.read(args.spec_fpath))
    df.write_csv(args.out_csv_fpath)
    df.write_parquet(args.out_parquet_fpath)
    plot(df, args.out_plot_fpath)


if __name__ == "__main__":
    main()
