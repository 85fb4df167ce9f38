"""Gather a sweep's metrics into one table and plot L0 against normalised MSE.

Run as `python -m saev_core.steps.summarize --spec-fpath results/specs/sweeps/<sweep>/summary.json
--out-csv-fpath summary.csv --out-parquet-fpath summary.parquet --out-plot-fpath pareto.png
--out-verdict-fpath verdict.csv`. The spec (a `jobs.SummarizeJob`) lists the sweep's SAEs with
their groups, labels, `sae.pt`, `metrics.json` and `traits.json` files, its external SAEs, its
baselines and the model; each trained SAE's configuration comes from its `sae.pt` header, so
nothing on the command line grows with the sweep. `verdict.csv` puts every SAE beside the
baselines: the headline metrics, and each SAE's margin over the random SAE of its layer and width.
"""

import argparse
import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from .. import checkpoints, jobs  # noqa: E402

ID_COLUMNS = ("sae", "group")
"""Hexadecimal ids: a CSV reader would take `12345678` or `1234e567` for a number."""

TRAIT_COLUMNS = ("probe_r", "map", "purity_16", "coverage_0_3")
"""saev's trait metrics (`saev_core.traits`) as the sweep table carries them."""
VERDICT_COLUMNS = ("normalized_mse", "l0", "mean_best_ap", *TRAIT_COLUMNS)
LOWER_IS_BETTER = ("normalized_mse",)
MAX_ANNOTATED = 40
"""Above this many SAEs per (model, layer), only the Pareto frontier's points are labelled."""


def table(
    saes: dict[str, dict],
    metrics: dict[str, dict],
    sae_group: dict[str, str],
    model: str,
    labels: dict[str, str],
) -> pl.DataFrame:
    """One row per SAE: id, readable label, model, group, family (sae or baseline), its
    configuration and its metrics."""
    rows = [
        {"sae": sae_id, "label": labels[sae_id], "model": model, "group": sae_group[sae_id]}
        | {"family": "baseline" if sae_group[sae_id] == "baseline" else "sae"}
        | saes[sae_id]
        | metrics[sae_id]
        for sae_id in sorted(saes)
    ]
    return pl.DataFrame(rows, infer_schema_length=None)


def verdict(df: pl.DataFrame) -> pl.DataFrame:
    """Every SAE and baseline with the headline metrics, and each one's margin over the random
    SAE baseline of the same layer and width, the one whose k is nearest its L0 where there are
    several (positive: better than the random dictionary)."""
    present = [c for c in VERDICT_COLUMNS if c in df.columns]
    columns = [c for c in ("sae", "label", "family", "layer", "d_sae") if c in df.columns]
    order = [c for c in ("layer", "family", "label") if c in columns]  # SAEs before baselines
    out = df.select([*columns, *present]).sort(order, descending=[c == "family" for c in order])
    if "baseline" not in df.columns or "d_sae" not in df.columns:
        return out
    randoms = df.filter(pl.col("baseline") == "random").to_dicts()
    margins = {f"margin_{c}": [] for c in present if c != "l0"}
    for row in out.iter_rows(named=True):
        same = [r for r in randoms if (r["layer"], r["d_sae"]) == (row["layer"], row["d_sae"])]
        ref = min(same, key=lambda r: abs(math.log(r["k"] / max(row["l0"], 1e-9))), default=None)
        for c in present:
            if c == "l0":
                continue
            if ref is None or row[c] is None or ref[c] is None:
                margins[f"margin_{c}"].append(None)
            else:
                sign = -1 if c in LOWER_IS_BETTER else 1
                margins[f"margin_{c}"].append(sign * (row[c] - ref[c]))
    return out.with_columns(
        [pl.Series(name, values, dtype=pl.Float64) for name, values in margins.items()]
    )


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
    if "family" not in df.columns:  # a table from before baselines
        df = df.with_columns(family=pl.lit("sae"))
    groups = df.group_by(["model", "layer"], maintain_order=True)
    for g, ((model, layer), sub) in enumerate(groups):
        label = f"{model}, layer {layer}"
        is_sae = sub["family"] == "sae"
        saes, baselines = sub.filter(is_sae), sub.filter(~is_sae)
        points = ax.scatter(saes["l0"], saes["normalized_mse"], label=label, alpha=0.8)
        colour = points.get_facecolor()[0]
        if len(baselines):
            ax.scatter(
                baselines["l0"],
                baselines["normalized_mse"],
                marker="X",
                s=60,
                color=colour,
                edgecolor="black",
                label=f"{label}: baselines",
            )
        front = pareto_front(saes)
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
    if (df["family"] == "baseline").any():
        ax.set_yscale("log")  # a random dictionary's error is many times a trained SAE's
    ax.set_xlabel("L0 (latents firing per token)")
    ax.set_ylabel("normalised MSE")
    ax.set_title("Sparsity vs reconstruction (lines: the SAEs' Pareto frontier; X: baselines)")
    ax.legend()
    return fig


def read_sweep(job: jobs.SummarizeJob) -> pl.DataFrame:
    """The sweep table from the files its jobs wrote: `sae.pt` headers and `metrics.json`;
    external SAEs are described by their entry and what their header says."""
    saes = {}
    for sae_id, fpath in job.sae_fpaths.items():
        layout = checkpoints.layout(fpath, checkpoints.read_header(fpath))
        saes[sae_id] = layout.train
        if sae_id in job.baselines:
            baseline = job.baselines[sae_id]
            saes[sae_id] = {
                "layer": baseline.layer,
                "tokens": baseline.tokens,
                "activation": layout.cfg.activation,
                "baseline": baseline.kind,
                "exp_factor": layout.cfg.exp_factor,
                "k": layout.cfg.k,
                "n_train": baseline.n_train,
                "batch_size": baseline.batch_size,
                "seed": baseline.seed,
            }
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
    for sae_id, fpath in job.traits_fpaths.items():
        scores = json.loads(pathlib.Path(fpath).read_text())
        metrics[sae_id] |= {c: scores[c] for c in TRAIT_COLUMNS}
    return table(saes, metrics, job.groups, job.model, job.labels)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="a SummarizeJob")
    parser.add_argument("--out-csv-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--out-parquet-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--out-plot-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--out-verdict-fpath", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    df = read_sweep(jobs.SummarizeJob.read(args.spec_fpath))
    df.write_csv(args.out_csv_fpath)
    df.write_parquet(args.out_parquet_fpath)
    verdict(df).write_csv(args.out_verdict_fpath, float_precision=4)
    plot(df, args.out_plot_fpath)


if __name__ == "__main__":
    main()
