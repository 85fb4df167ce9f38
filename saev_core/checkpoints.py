"""The `sae.pt` file layout shared with saev: one line of JSON (the header), then a `torch.save`
of the state dict. Reading the header needs no torch, so the planner and the sweep summary can
read an SAE's configuration cheaply."""

import io
import json
import pathlib


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file."""


def parse_header(fpath: pathlib.Path, line: bytes) -> dict:
    try:
        header = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{fpath}: the first line is not a JSON header ({err}): not an sae.pt file, or damaged"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{fpath}: the JSON header is a {type(header).__name__}, not an object"
        )
    return header


def read_header(fpath: pathlib.Path) -> dict:
    """The JSON header line of a checkpoint, without loading the weights."""
    with open(fpath, "rb") as fd:
        return parse_header(fpath, fd.readline())


def read(fpath: pathlib.Path) -> tuple[dict, dict]:
    """Header and state dict (tensors on the CPU, loaded with `weights_only=True`)."""
    import torch

    with open(fpath, "rb") as fd:
        header = parse_header(fpath, fd.readline())
        payload = fd.read()
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as err:
        raise CheckpointError(
            f"{fpath}: cannot read the weights after the header ({type(err).__name__}: {err}); "
            "the file is truncated or damaged"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{fpath}: the weights are a {type(state).__name__}, not a state dict"
        )
    return header, state
