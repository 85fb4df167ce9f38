"""saev's checkpoints and shards work here, ours work in saev.

The fixtures in `../shared/interop/` were written by saev's own code at the commits its README
names, with the latents and reconstructions saev computed for them.
"""

import dataclasses
import io
import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from saev_core import checkpoints, config, loaders, sae, shards
from saev_core.steps import export

REPO = pathlib.Path(__file__).parent.parent
INTEROP = next(
    (
        p
        for p in (REPO.parent / "shared" / "interop", pathlib.Path("/work/shared/interop"))
        if p.is_dir()
    ),
    None,
)
needs_interop = pytest.mark.skipif(
    INTEROP is None, reason="../shared/interop is not on this machine"
)
SAEV_FILES = sorted(INTEROP.glob("saev-checkpoints/*/*.pt")) if INTEROP else []


@needs_interop
@pytest.mark.parametrize("fpath", SAEV_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_saev_layout_encodes_as_saev_does(fpath):
    expected = np.load(fpath.with_name(fpath.stem + ".expected.npz"))
    model = sae.load(fpath)
    with torch.no_grad():
        f_x = model.encode(torch.from_numpy(expected["x"]))
        x_hat = model.decode(f_x)
    assert np.array_equal(f_x.numpy() != 0, expected["f_x"] != 0)  # the same latents fire
    np.testing.assert_allclose(f_x.numpy(), expected["f_x"], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(x_hat.numpy(), expected["x_hat"], atol=1e-5, rtol=1e-6)


@needs_interop
def test_saevs_three_dimensional_inputs_encode_patch_by_patch():
    fpath = INTEROP / "saev-checkpoints" / "schema5-3d73f1f" / "topk16.pt"
    x = torch.from_numpy(np.load(fpath.with_name("topk16.expected.npz"))["x"])
    model = sae.load(fpath)
    with torch.no_grad():
        f_x_BPF = model.encode(x.reshape(8, 16, -1))
        assert f_x_BPF.shape == (8, 16, 512)
        torch.testing.assert_close(f_x_BPF.reshape(128, -1), model.encode(x))
        assert model.decode(f_x_BPF).shape == (8, 16, 64)


def saev_header(cls: str) -> dict:
    """The header saev f5d892c wrote for a class, from the fixtures."""
    fname = {"Relu": "relu.pt", "TopK": "topk16.pt", "BatchTopK": "batchtopk16.pt"}[cls]
    return checkpoints.read_header(INTEROP / "saev-checkpoints" / "schema1-seed-f5d892c" / fname)


ARCHS = {
    "relu": dict(activation="relu", sparsity_coeff=0.01),
    "topk": dict(activation="topk", k=8),
    "batchtopk": dict(activation="batchtopk", k=8),
}


def trained_like(kind: str, seed: int = 0) -> sae.SparseAutoencoder:
    """An SAE with non-trivial weights and biases (b_dec far from 0, as after training)."""
    model = sae.SparseAutoencoder(sae.SaeConfig(d_vit=64, exp_factor=4, seed=seed, **ARCHS[kind]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.stack.b_dec.copy_(torch.randn(1, 64, generator=gen) * 2)
        model.stack.b_enc.copy_(torch.randn(1, 256, generator=gen) * 0.1)
        model.stack.threshold.fill_(0.3)
    return model


@needs_interop
@pytest.mark.parametrize("kind", ARCHS)
def test_ours_write_saevs_schema1_header_and_read_back_equal(kind, tmp_path):
    model = trained_like(kind)
    sae.save(tmp_path / "sae.pt", model, train={"layer": -1})
    header = checkpoints.read_header(tmp_path / "sae.pt")
    cls = config.KINDS[kind].saev_class
    reference = saev_header(cls)
    assert header["schema"] == 1 and header["cls"] == cls
    assert set(header["cfg"]) == set(reference["cfg"])  # exactly saev's fields for the class
    assert {k: type(v) for k, v in header["cfg"].items()} == {
        k: type(v) for k, v in reference["cfg"].items()
    }
    # saev's own state dict: its four tensors, nothing else (its loader is strict).
    _, state = checkpoints.read(tmp_path / "sae.pt")
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    # saev's encoder (no b_dec subtraction) on the stored tensors gives our latents.
    x = torch.randn(32, 64) * 3
    saev_pre = x @ state["W_enc"] + state["b_enc"]
    ours_pre = (x - model.b_dec) @ model.W_enc + model.b_enc
    torch.testing.assert_close(saev_pre, ours_pre, atol=1e-4, rtol=1e-5)
    reloaded, train = sae.load_trained(tmp_path / "sae.pt")
    assert train == {"layer": -1}
    assert not reloaded.stack.subtract_b_dec  # read as saev reads it
    assert reloaded.cfg == model.cfg
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode(x), model.encode(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [dict(activation="jumprelu", sparsity_coeff=0.1), dict(activation="relu", normalize=True)],
)
def test_what_saev_cannot_represent_is_written_so_that_it_refuses(cfg, tmp_path):
    model = sae.SparseAutoencoder(sae.SaeConfig(d_vit=16, **cfg))
    sae.save(tmp_path / "sae.pt", model)
    header = checkpoints.read_header(tmp_path / "sae.pt")
    assert header["cls"] not in ("Relu", "TopK", "BatchTopK")  # saev's loader rejects the class
    assert sae.load(tmp_path / "sae.pt").cfg == model.cfg


def test_our_earlier_files_keep_loading(tmp_path):
    """The layout this workflow wrote before its headers became saev's."""
    model = trained_like("topk")
    header = {"schema": 1, "cls": "SparseAutoencoder", "cfg": dataclasses.asdict(model.cfg)}
    header["train"] = {"layer": -2}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    (tmp_path / "sae.pt").write_bytes((json.dumps(header) + "\n").encode() + buffer.getvalue())
    loaded, train = sae.load_trained(tmp_path / "sae.pt")
    assert train == {"layer": -2}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)


@pytest.mark.parametrize("kind", ARCHS)
def test_schema5_export_reads_back_encoding_like_the_original(kind, tmp_path):
    model = trained_like(kind, seed=3)
    sae.save(tmp_path / "sae.pt", model)
    export.main(["--sae-fpath", str(tmp_path / "sae.pt"), "--out-fpath", str(tmp_path / "out.pt")])
    header = checkpoints.read_header(tmp_path / "out.pt")
    assert header["schema"] == 5
    assert header["cfg"]["activation"]["cls"] == config.KINDS[kind].saev_class
    exported = sae.load(tmp_path / "out.pt")
    x = torch.randn(64, 64) * 3
    with torch.no_grad():
        f_ours, f_saev = model.encode(x), exported.encode(x)
    if kind == "topk":  # saev's TopK keeps negative values among the k largest; ours ReLUs them
        f_saev = f_saev.relu()
    torch.testing.assert_close(f_saev, f_ours, atol=1e-4, rtol=1e-5)


SAEV_AUX_TYPES = {"Relu": {"AuxK", "NoAux"}, "TopK": {"AuxK", "NoAux"}, "BatchTopK": {"AuxK"}}
"""saev 3d73f1f's type of each activation's `aux` field (`../shared/interop/README.md`: its
`BatchTopK.aux` is typed `AuxK` only, so a BatchTopK header with `NoAux` is refused)."""


def saev_3d73f1f_refusals(header: dict) -> list[str]:
    """What saev 3d73f1f's typed loader refuses in a schema-5 header, by the rules its own
    files show: the fields (and their JSON types) of its file of the same class, nested
    classes (`sparsity`, `aux`) with the fields its files give them, `aux` of the field's type."""
    files = sorted((INTEROP / "saev-checkpoints" / "schema5-3d73f1f").glob("*.pt"))
    theirs = {h["cfg"]["activation"]["cls"]: h for h in map(checkpoints.read_header, files)}
    nested = {}  # a nested class's parameters and their types, from any of saev's files
    for h in theirs.values():
        for entry in h["cfg"]["activation"]["params"].values():
            if isinstance(entry, dict):
                nested[entry["cls"]] = {k: type(v) for k, v in entry["params"].items()}
    ours_act = header["cfg"]["activation"]
    if ours_act["cls"] not in theirs:
        return [f"activation class {ours_act['cls']!r}"]
    ref = theirs[ours_act["cls"]]
    problems = []
    types = lambda d: {k: type(v) for k, v in d.items()}  # noqa: E731
    if types({**header["cfg"], "activation": {}}) != types({**ref["cfg"], "activation": {}}):
        problems.append(f"cfg fields {types(header['cfg'])} != {types(ref['cfg'])}")
    if types(ours_act["params"]) != types(ref["cfg"]["activation"]["params"]):
        problems.append(f"activation params {sorted(ours_act['params'])}")
    for name, entry in ours_act["params"].items():
        if not isinstance(entry, dict):
            continue
        if name == "aux" and entry["cls"] not in SAEV_AUX_TYPES[ours_act["cls"]]:
            problems.append(
                f"{ours_act['cls']}.aux={entry['cls']} is not {SAEV_AUX_TYPES[ours_act['cls']]}"
            )
        elif types(entry["params"]) != nested.get(entry["cls"]):
            problems.append(f"{name} {entry['cls']} params {types(entry['params'])}")
    return problems


@needs_interop
def test_the_saev_rules_refuse_what_saev_refused():
    """The check below can fail: it refuses the BatchTopK header saev refused at 5c187ae."""
    header = checkpoints.read_header(INTEROP / "saev-checkpoints/schema5-3d73f1f/batchtopk16.pt")
    assert saev_3d73f1f_refusals(header) == []
    header["cfg"]["activation"]["params"]["aux"] = {"cls": "NoAux", "params": {"key": "no-aux"}}
    assert saev_3d73f1f_refusals(header) == ["BatchTopK.aux=NoAux is not {'AuxK'}"]
    header["cfg"]["activation"]["params"]["aux"] = {
        "cls": "AuxK",
        "params": {"key": "auxk", "k_aux": 8, "alpha": 0},
    }
    assert "alpha" in saev_3d73f1f_refusals(header)[0]  # an int where saev types a float


@needs_interop
@pytest.mark.parametrize(
    "cfg",
    [
        dict(activation="relu", sparsity_coeff=0.01),
        dict(activation="relu", sparsity_coeff=0.01, decoder_norm="penalised"),
        dict(activation="topk", k=8),
        dict(activation="topk", k=8, aux_k=32),
        dict(activation="batchtopk", k=8),
        dict(activation="batchtopk", k=8, aux_k=32),
    ],
    ids=lambda cfg: "-".join(str(v) for v in cfg.values()),
)
def test_every_exportable_kind_is_a_header_saev_loads(cfg, tmp_path):
    model = sae.SparseAutoencoder(sae.SaeConfig(d_vit=64, exp_factor=4, **cfg))
    sae.save(tmp_path / "sae.pt", model)
    export.main(["--sae-fpath", str(tmp_path / "sae.pt"), "--out-fpath", str(tmp_path / "out.pt")])
    header = checkpoints.read_header(tmp_path / "out.pt")
    assert saev_3d73f1f_refusals(header) == []
    aux = header["cfg"]["activation"]["params"]["aux"]
    if model.cfg.aux_k:
        assert aux["params"] == {"key": "auxk", "k_aux": 32, "alpha": model.cfg.aux_coeff}
    elif cfg["activation"] == "batchtopk":  # an AuxK that weighs nothing, typed as saev types it
        assert aux["params"]["alpha"] == 0.0
    assert header["cfg"]["normalize_w_dec"] == (model.cfg.decoder_norm == "unit")


def test_unknown_layouts_and_mismatched_tensors_name_file_and_field(tmp_path):
    fpath = tmp_path / "sae.pt"
    fpath.write_bytes(b'{"schema": 7, "cls": "Relu", "cfg": {}}\n')
    with pytest.raises(
        checkpoints.CheckpointError, match=r"sae.pt: unknown checkpoint layout \(schema 7"
    ):
        sae.load(fpath)
    fpath.write_bytes(b'{"schema": 1, "cls": "TopK", "cfg": {"d_vit": 4, "exp_factor": 2}}\n')
    with pytest.raises(
        checkpoints.CheckpointError, match=r"sae.pt: header field cfg: saev TopK needs"
    ):
        sae.load(fpath)
    header = {
        "schema": 5,
        "cfg": {"d_model": 4, "d_sae": 8, "activation": {"cls": "Relu", "params": {}}},
    }
    buffer = io.BytesIO()
    torch.save(
        {
            "W_enc": torch.zeros(4, 8),
            "b_enc": torch.zeros(8),
            "W_dec": torch.zeros(8, 3),
            "b_dec": torch.zeros(4),
        },
        buffer,
    )
    fpath.write_bytes((json.dumps(header) + "\n").encode() + buffer.getvalue())
    with pytest.raises(
        checkpoints.CheckpointError,
        match=r"saev schema 5 \(Relu\)\): tensor 'W_dec' has shape \(8, 3\)",
    ):
        sae.load(fpath)


@needs_interop
def test_saev_shard_directories_read_bit_exactly(tmp_path):
    dpath = next((INTEROP / "saev-shards").iterdir())
    reader = shards.ShardReader(dpath)
    md = reader.metadata
    assert reader.n_imgs == 128 and md.n_shards == 2  # the empty third shard is not counted
    raw = [
        np.memmap(dpath / shards.shard_fname(i), "<f4", "r", shape=md.shard_shape) for i in range(2)
    ]
    for layer_i, layer in enumerate(md.layers):
        expected = np.concatenate([r[:, layer_i] for r in raw]).reshape(-1, md.d_vit)
        ordered = np.concatenate(
            [x.reshape(-1, md.d_vit) for _, x in loaders.OrderedLoader(reader, layer, "all")]
        )
        np.testing.assert_array_equal(ordered, expected)
        n = len(expected)
        batches = loaders.ShuffledLoader(reader, layer, "all", 512, n, seed=0)
        shuffled = torch.cat(list(batches)).numpy()
        assert len(shuffled) == n // 512 * 512
        seen = {row.tobytes() for row in shuffled}
        assert seen <= {row.tobytes() for row in expected}
        assert np.array_equal(reader.image_tokens(70, layer, "all"), raw[1][6, layer_i])

    # Still refused: a trailing entry that holds images, and a listing that lacks a shard.
    for listing_edit in (
        lambda listing: listing[:-1] + [{"name": "acts000002.bin", "n_imgs": 5}],
        lambda listing: listing[1:],
    ):
        copy = tmp_path / dpath.name
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(dpath, copy)
        listing = json.loads((copy / "shards.json").read_text())
        (copy / "shards.json").write_text(json.dumps(listing_edit(listing)))
        with pytest.raises(shards.ShardError, match="shards.json does not match metadata.json"):
            shards.ShardReader(copy)


def test_checkpoint_layout_and_round_trip(trained_dpath):
    fpath = trained_dpath / "topk" / "sae.pt"
    with open(fpath, "rb") as fd:
        header = json.loads(fd.readline())
        state = torch.load(io.BytesIO(fd.read()), weights_only=True)
    assert header["schema"] == 1 and header["cls"] == "TopK"  # saev's own header
    assert header["cfg"]["top_k"] == 8 and header["cfg"]["d_vit"] == 64
    ours = header["saev_snakemake"]
    assert ours["cfg"]["activation"] == "topk" and ours["train"]["layer"] == -1
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert state["W_enc"].shape == (64, 256) and state["W_dec"].shape == (256, 64)
    model = sae.load(fpath)
    torch.testing.assert_close(model.W_enc.detach(), state["W_enc"])
