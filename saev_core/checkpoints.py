"""The `sae.pt` file layout shared with saev: one line of JSON (the header), then a `torch.save`
of the state dict. Reading the header needs no torch, so the planner and the sweep summary can
read an SAE's configuration cheaply."""

import json
import pathlib


def read_header(fpath: pathlib.Path) -> dict:
    """The JSON header line of a checkpoint, without loading the weights."""
    with open(fpath, "rb") as fd:
        return json.loads(fd.readline().decode())
