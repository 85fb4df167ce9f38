"""The sweep table keeps every SAE's configuration and metrics; the Pareto front is right."""

import polars as pl
from PIL import Image

from saev_core.steps import summarize


def test_pareto_front_keeps_only_undominated_saes():
    df = pl.DataFrame(
        {
            "sae": ["a", "b", "c", "d", "e"],
            "l0": [4.0, 8.0, 8.0, 16.0, 32.0],
            "normalized_mse": [0.5, 0.3, 0.4, 0.35, 0.1],
        }
    )
    # c loses to b (same L0, more error); d loses to b (denser, more error).
    assert summarize.pareto_front(df)["sae"].to_list() == ["a", "b", "e"]


def test_table_and_files_with_and_without_concept_metrics(tmp_path):
    saes = {"x1": {"layer": -1, "activation": "relu"}, "x2": {"layer": -1, "activation": "topk"}}
    base = {"l0": 10.0, "normalized_mse": 0.2, "n_dead": 0}
    metrics = {"x1": base | {"mean_best_ap": 0.7}, "x2": base | {"mean_best_ap": None}}
    labels = {"x1": "L-1 relu l1=4e-4 x8", "x2": "L-1 topk k=16 x8"}
    df = summarize.table(saes, metrics, {"x1": "g", "x2": "g"}, "tiny:vit-tiny-p8-64", labels)
    assert df["sae"].to_list() == ["x1", "x2"]
    assert df.columns[:2] == ["sae", "label"] and df["label"].to_list() == list(labels.values())
    assert df["model"].unique().to_list() == ["tiny:vit-tiny-p8-64"]
    assert df["mean_best_ap"].to_list() == [0.7, None]
    df.write_parquet(tmp_path / "s.parquet")
    assert pl.read_parquet(tmp_path / "s.parquet").equals(df)
    summarize.plot(df, tmp_path / "pareto.png")
    assert Image.open(tmp_path / "pareto.png").size == (960, 660)  # 8 x 5.5 in at 120 dpi


def test_csv_ids_that_look_like_numbers_read_back_as_text(tmp_path):
    """A run's hexadecimal ids can be all digits or digits around one `e`: CI once failed on such
    an SAE id, which polars had read as a float."""
    ids = ["12345678", "1234e567"]
    df = pl.DataFrame({"sae": ids, "label": ["a", "b"], "group": ids, "l0": [1.0, 2.0]})
    df.write_csv(tmp_path / "summary.csv")
    assert pl.read_csv(tmp_path / "summary.csv")["sae"].dtype != pl.String  # the trap
    back = summarize.read_csv(tmp_path / "summary.csv")
    assert back["sae"].to_list() == ids and back["group"].to_list() == ids


def test_pareto_plot_shows_every_sae_by_label_and_each_layer_in_its_own_colour():
    df = pl.DataFrame(
        {
            "model": ["tiny"] * 4,
            "layer": [-1, -1, -2, -2],
            "label": ["L-1 topk k=4 x8", "L-1 topk k=16 x8", "L-2 topk k=4 x8", "L-2 relu x8"],
            "l0": [4.0, 16.0, 4.0, 9.0],
            "normalized_mse": [0.4, 0.2, 0.5, 0.45],
        }
    )
    ax = summarize.pareto_figure(df).axes[0]
    points = [c.get_offsets().tolist() for c in ax.collections]
    assert points == [[[4.0, 0.4], [16.0, 0.2]], [[4.0, 0.5], [9.0, 0.45]]]
    colours = [tuple(c.get_facecolor()[0]) for c in ax.collections]
    assert colours[0] != colours[1]
    # Labels without the layer, which the colour says; the frontier: undominated points only.
    assert [t.get_text() for t in ax.texts] == [
        "topk k=4 x8",
        "topk k=16 x8",
        "topk k=4 x8",
        "relu x8",
    ]
    fronts = [line.get_xydata().tolist() for line in ax.lines]
    assert fronts == [[[4.0, 0.4], [16.0, 0.2]], [[4.0, 0.5], [9.0, 0.45]]]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_legend().texts] == [
        "tiny, layer -1",
        "tiny, layer -2",
    ]
