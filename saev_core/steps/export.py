"""Export an SAE of ours for today's saev (schema 5, upstream 3d73f1f).

The `export_saev` rule runs `python -m saev_core.steps.export --spec-fpath SPEC --out-fpath
OUT_PT` (a `jobs.ExportJob`); by hand, `python -m saev_core.steps.export --sae-fpath SAE_PT
--out-fpath OUT_PT`. Our `sae.pt` files already load in saev f5d892c (schema 1, see
`checkpoints`); this writes the layout saev's current loader reads: `cfg.activation` names the class and its parameters, `b_enc - b_dec @ W_enc` is stored
because saev's encoder does not subtract `b_dec`, and a BatchTopK SAE's inference threshold goes
to `activation.threshold`. saev computes our latents from it, with one difference: its TopK keeps
the k largest pre-activations as they are, where ours ReLUs them (the same unless some of an
input's k largest are negative). JumpReLU SAEs and SAEs with input normalisation have no saev
equivalent and are refused.
"""

import argparse
import io
import json
import pathlib

import torch

from .. import jobs, sae, shards


def to_schema5(model: sae.SparseAutoencoder, fpath: pathlib.Path):
    """Write `model` in saev's schema-5 layout."""
    cfg = model.cfg
    if cfg.normalize:
        raise ValueError("saev has no input normalisation: this SAE cannot be exported")
    header = {
        "schema": 5,
        "cfg": {
            "d_model": cfg.d_vit,
            "d_sae": cfg.d_sae,
            "activation": model.stack.activation.schema5(cfg),
            "reinit_blend": 0.8,
            "reinit_enc_dec_tranpose": True,  # sic: saev's spelling
            "remove_parallel_grads": cfg.decoder_norm == "unit",
            "normalize_w_dec": cfg.decoder_norm == "unit",
        },
        "commit": "saev-snakemake",
        "lib": "0.1.0",
    }
    state = {
        "W_dec": model.W_dec.detach().cpu().clone(),
        "b_dec": model.b_dec.detach().cpu().clone(),
        "W_enc": model.W_enc.detach().cpu().clone(),
        "b_enc": sae.saev_b_enc(model),
    }
    if "threshold" in model.stack.activation.state_keys:
        state["activation.threshold"] = model.stack.threshold[0].detach().cpu().clone()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = (json.dumps(header) + "\n").encode() + buffer.getvalue()
    shards.write_atomic(pathlib.Path(fpath), payload)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec-fpath", type=pathlib.Path, help="an ExportJob (the workflow's)")
    source.add_argument("--sae-fpath", type=pathlib.Path, help="an sae.pt of any layout")
    parser.add_argument("--out-fpath", type=pathlib.Path, required=True, help="the schema-5 file")
    args = parser.parse_args(argv)
    sae_fpath = args.sae_fpath or pathlib.Path(jobs.ExportJob.read(args.spec_fpath).sae_fpath)
    args.out_fpath.parent.mkdir(parents=True, exist_ok=True)
    to_schema5(sae.load(sae_fpath), args.out_fpath)


if __name__ == "__main__":
    main()
