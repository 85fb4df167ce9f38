"""The activation-shard protocol (SPEC §5): metadata, directory hash, shard layout, writer, reader.

One source of truth for the on-disk format, used by the dump step, every loader and the tests.

Shape key: S = images per shard, L = recorded layers, T = tokens per image ([CLS] + patches),
P = patch tokens per image, D = d_vit.
"""

import base64
import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib
import pickle
import zlib

import numpy as np

logger = logging.getLogger("shards")

PROTOCOL = "1.0.0"
PROTOCOL_WITH_LABELS = "1.1.0"
PROTOCOL_SAEV2 = "2.1"
"""saev 3d73f1f's protocol: the same bytes, renamed metadata, an optional `labels.bin`."""
SAEV2_FIELDS = {
    "family": "vit_family",
    "ckpt": "vit_ckpt",
    "layers": "layers",
    "content_tokens_per_example": "n_patches_per_img",
    "cls_token": "cls_token",
    "d_model": "d_vit",
    "n_examples": "n_imgs",
    "max_tokens_per_shard": "max_patches_per_shard",
    "data": "data",
    "dataset": "dataset",
    "pixel_agg": "pixel_agg",
    "dtype": "dtype",
    "protocol": "protocol",
}
"""Protocol 2.1's metadata fields in the order saev writes (and hashes) them -> ours."""
SAEV2_FAMILIES = (
    "bird-mae",
    "clip",
    "dinov2",
    "dinov3",
    "fake-clip",
    "pe-core",
    "pe-spatial",
    "siglip",
)
SAEV2_PIXEL_AGGS = ("majority", "prefer-fg")
BF16_SUFFIX = "@bf16"
"""Ends `vit_ckpt` of activations recorded with the ViT in bfloat16 autocast."""
SHARDS_FNAME = "shards.json"
METADATA_FNAME = "metadata.json"
LABELS_FNAME = "labels.bin"


class ShardError(Exception):
    """A shard directory is missing, incomplete, or does not match its metadata."""


@dataclasses.dataclass(frozen=True)
class Metadata:
    """Everything that decides the bytes of a shard directory (and so its name)."""

    vit_family: str
    """Model family: tiny, clip, siglip or dinov2."""
    vit_ckpt: str
    """Checkpoint name within the family, e.g. `ViT-B-16/openai`."""
    layers: tuple[int, ...]
    """Recorded blocks, as requested (negative indices count from the end)."""
    n_patches_per_img: int
    """Patch tokens per image, without [CLS]."""
    cls_token: bool
    """Whether the [CLS] token is stored first."""
    d_vit: int
    """Residual-stream width."""
    n_imgs: int
    """Images in the dataset."""
    max_patches_per_shard: int
    """Upper bound on token vectors per shard file; decides images per shard."""
    data: dict | str
    """The dataset's configuration plus `__class__`, the dataset kind; in protocol 2.1, saev's
    opaque `base64(pickle(dataset config))`, kept as it is and never unpickled."""
    dtype: str = "float32"
    protocol: str = PROTOCOL
    dataset: str | None = None
    """Protocol 2.1 only: the dataset's root directory."""
    pixel_agg: str | None = None
    """Protocol 2.1 only: how patch labels were made from pixel masks (`majority`: each
    patch's most common class, as ours are); None for a dataset without masks."""

    def __post_init__(self):
        if self.dtype != "float32":
            raise ValueError(f"metadata dtype must be 'float32', got {self.dtype!r}")
        protocols = (PROTOCOL, PROTOCOL_WITH_LABELS, PROTOCOL_SAEV2)
        if self.protocol not in protocols:
            raise ValueError(f"metadata protocol must be one of {protocols}, got {self.protocol!r}")
        if self.protocol == PROTOCOL_SAEV2:
            self.check_saev2()
        elif not isinstance(self.data, dict) or "__class__" not in self.data:
            raise ValueError("metadata 'data' must name the dataset kind under '__class__'")
        elif self.dataset is not None or self.pixel_agg is not None:
            raise ValueError(f"'dataset' and 'pixel_agg' belong to protocol {PROTOCOL_SAEV2} only")
        if not self.layers:
            raise ValueError("metadata 'layers' must list at least one layer")
        if self.n_imgs < 1:
            raise ValueError(f"metadata 'n_imgs' must be >= 1, got {self.n_imgs}")
        if self.n_imgs_per_shard < 1:
            raise ValueError(
                f"max_patches_per_shard={self.max_patches_per_shard} is smaller than one image "
                f"({self.n_tokens} tokens x {len(self.layers)} layers); raise it"
            )

    def check_saev2(self):
        """What saev 3d73f1f's `Metadata` insists on, by saev's field names."""
        if self.vit_family not in SAEV2_FAMILIES:
            raise ValueError(
                f"metadata 'family' must be one of saev's {SAEV2_FAMILIES}, got {self.vit_family!r}"
            )
        if self.pixel_agg not in (*SAEV2_PIXEL_AGGS, None):
            raise ValueError(
                f"metadata 'pixel_agg' must be one of {SAEV2_PIXEL_AGGS} or null, "
                f"got {self.pixel_agg!r}"
            )
        if not isinstance(self.data, str) or not isinstance(self.dataset, str):
            raise ValueError("metadata 'data' and 'dataset' must be strings in protocol 2.1")

    @classmethod
    def from_dict(cls, dct: dict) -> "Metadata":
        if dct.get("protocol") == PROTOCOL_SAEV2:
            if set(dct) != set(SAEV2_FIELDS):  # the order is saev's on writing, any on reading
                raise ValueError(
                    f"protocol {PROTOCOL_SAEV2} metadata fields must be exactly "
                    f"{list(SAEV2_FIELDS)}; missing "
                    f"{sorted(SAEV2_FIELDS.keys() - dct.keys())}, unexpected "
                    f"{sorted(dct.keys() - SAEV2_FIELDS.keys())}"
                )
            dct = {SAEV2_FIELDS[k]: v for k, v in dct.items()}
            return cls(**{**dct, "layers": tuple(dct["layers"])})
        fields = {f.name for f in dataclasses.fields(cls)} - {"dataset", "pixel_agg"}
        if set(dct) != fields:
            raise ValueError(
                f"metadata fields must be exactly {sorted(fields)}; "
                f"missing {sorted(fields - set(dct))}, unexpected {sorted(set(dct) - fields)}"
            )
        return cls(**{**dct, "layers": tuple(dct["layers"])})

    @classmethod
    def load(cls, dpath: pathlib.Path) -> "Metadata":
        fpath = pathlib.Path(dpath) / METADATA_FNAME
        if not fpath.exists():
            raise ShardError(f"{fpath} does not exist: not a shard directory")
        return cls.from_dict(json.loads(fpath.read_text(encoding="utf-8")))

    def to_dict(self) -> dict:
        """The fields as `metadata.json` holds them (saev's names and order in protocol 2.1)."""
        dct = {**dataclasses.asdict(self), "layers": list(self.layers)}
        if self.protocol == PROTOCOL_SAEV2:
            return {saev: dct[ours] for saev, ours in SAEV2_FIELDS.items()}
        return {k: v for k, v in dct.items() if k not in ("dataset", "pixel_agg")}

    def to_json(self) -> str:
        """`metadata.json`'s text: sorted keys before protocol 2.1, saev's own layout in it."""
        if self.protocol == PROTOCOL_SAEV2:
            return json.dumps(self.to_dict(), indent=2)
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def hash(self) -> str:
        """The shard directory's name: the SHA-256 of the canonical JSON; in protocol 2.1, saev's
        rule, the first 8 hex digits of the SHA-256 of the compact JSON in field order."""
        if self.protocol == PROTOCOL_SAEV2:
            compact = json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)
            return hashlib.sha256(compact.encode("utf-8")).hexdigest()[:8]
        return metadata_hash(self.to_dict())

    @property
    def records_labels(self) -> bool:
        """Whether the dump writes `labels.bin` (protocol 1.1.0; in 2.1, when masks were
        aggregated to patches)."""
        if self.protocol == PROTOCOL_SAEV2:
            return self.pixel_agg is not None
        return self.protocol == PROTOCOL_WITH_LABELS

    @property
    def listing_key(self) -> str:
        """The key of each entry's image count in `shards.json`."""
        return "n_examples" if self.protocol == PROTOCOL_SAEV2 else "n_imgs"

    def listing(self) -> list[dict]:
        """`shards.json` as the metadata decides it."""
        return [
            {"name": shard_fname(i), self.listing_key: self.shard_n_imgs(i)}
            for i in range(self.n_shards)
        ]

    @property
    def n_tokens(self) -> int:
        """T: tokens stored per image and layer."""
        return self.n_patches_per_img + int(self.cls_token)

    @property
    def n_imgs_per_shard(self) -> int:
        """S: images per shard file."""
        return self.max_patches_per_shard // (self.n_tokens * len(self.layers))

    @property
    def shard_shape(self) -> tuple[int, int, int, int]:
        return (self.n_imgs_per_shard, len(self.layers), self.n_tokens, self.d_vit)

    @property
    def shard_nbytes(self) -> int:
        return int(np.prod(self.shard_shape)) * 4

    @property
    def labels_nbytes(self) -> int:
        """Size of `labels.bin`: one uint8 per patch of every image."""
        return self.n_imgs * self.n_patches_per_img

    @property
    def n_shards(self) -> int:
        return -(-self.n_imgs // self.n_imgs_per_shard)

    def shard_n_imgs(self, shard_i: int) -> int:
        """Meaningful rows in shard `shard_i` (only the last one may be short)."""
        return min(self.n_imgs_per_shard, self.n_imgs - shard_i * self.n_imgs_per_shard)

    def layer_index(self, layer: int) -> int:
        """Position of `layer` in the recorded layers; a clear error when it was not recorded."""
        if layer not in self.layers:
            raise ShardError(
                f"layer {layer} was not recorded; recorded layers: {list(self.layers)}"
            )
        return self.layers.index(layer)


def as_saev2(metadata: Metadata, dataset_root: str) -> Metadata:
    """`metadata` in protocol 2.1, as saev 3d73f1f's writer records it: `data` is the base64 of a
    pickled plain dict (our dataset settings; it unpickles without saev or this project), and the
    family must be one saev knows."""
    if metadata.vit_family not in SAEV2_FAMILIES:
        raise ValueError(
            f"protocol {PROTOCOL_SAEV2} records a model family saev knows {SAEV2_FAMILIES}, and "
            f"{metadata.vit_family!r} is not one: write protocol 1 for it"
        )
    data = base64.b64encode(pickle.dumps(metadata.data, protocol=4)).decode("ascii")
    return dataclasses.replace(
        metadata,
        data=data,
        protocol=PROTOCOL_SAEV2,
        dataset=dataset_root,
        pixel_agg="majority" if metadata.records_labels else None,
    )


def metadata_hash(metadata: dict) -> str:
    """SHA-256 of the metadata as JSON with sorted keys and separators (',', ':')."""
    canonical = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def nonfinite_error(fpath: pathlib.Path, img: int, row: int, layer: int) -> ShardError:
    """What every reader says when a shard holds NaN or infinite activations."""
    return ShardError(
        f"{fpath}: NaN or infinite activations for image index {img} (row {row} of the shard, "
        f"layer {layer}). The file is damaged (bit rot, a bad copy): delete the shard directory "
        "and rerun `snakemake` to dump it again"
    )


def shard_fname(shard_i: int) -> str:
    return f"acts{shard_i:06d}.bin"


def checksums_fname(shard_i: int) -> str:
    """Our file beside saev's shard: the CRC-32 of each written image row, little-endian uint32."""
    return f"acts{shard_i:06d}.crc32"


def row_checksums(rows_SX: np.ndarray) -> np.ndarray:
    """CRC-32 of each image row (zlib's, about 6 GB/s here: cheap beside the ViT that made it)."""
    return np.array([zlib.crc32(row) for row in rows_SX], dtype="<u4")


def first_damaged_row(dpath: pathlib.Path, metadata: "Metadata", shard_i: int) -> int | None:
    """The first image row of shard `shard_i` whose bytes differ from the CRC-32 written with
    them, or None. A shard written before checksums existed (no `.crc32` file) cannot be checked
    and passes. Reads the shard once, 64 rows at a time."""
    crc_fpath = dpath / checksums_fname(shard_i)
    if not crc_fpath.exists():
        return None
    expected = np.fromfile(crc_fpath, dtype="<u4")
    if len(expected) != metadata.shard_n_imgs(shard_i):
        return 0
    row_nbytes = metadata.shard_nbytes // metadata.n_imgs_per_shard
    with open(dpath / shard_fname(shard_i), "rb") as fd:
        for lo in range(0, len(expected), 64):
            n_rows = min(64, len(expected) - lo)
            rows = np.frombuffer(fd.read(n_rows * row_nbytes), np.uint8)
            if len(rows) != n_rows * row_nbytes:
                return lo
            bad = np.flatnonzero(
                row_checksums(rows.reshape(n_rows, -1)) != expected[lo : lo + n_rows]
            )
            if len(bad):
                return lo + int(bad[0])
    return None


def damaged_error(dpath: pathlib.Path, metadata: "Metadata", shard_i: int, row: int) -> ShardError:
    fpath = dpath / shard_fname(shard_i)
    return ShardError(
        f"{fpath}: image index {shard_i * metadata.n_imgs_per_shard + row} (row {row}) does not "
        f"match the checksum written with it ({checksums_fname(shard_i)}): the file was damaged "
        f"after the dump. Delete it and run `snakemake` again: the dump part that wrote it runs "
        "again (same bytes), nothing else reruns"
    )


def verify(dpath: pathlib.Path, n_threads: int = 2) -> list[ShardError]:
    """Every damaged shard of a shard directory's complete shards, each as the error that names
    it; `n_threads` shards are read at once (reads and CRC-32 release the GIL)."""
    dpath = pathlib.Path(dpath)
    metadata = Metadata.load(dpath)

    def check(shard_i: int) -> ShardError | None:
        fpath = dpath / shard_fname(shard_i)
        if not fpath.exists() or fpath.stat().st_size != metadata.shard_nbytes:
            return None  # not written yet: nothing to check
        row = first_damaged_row(dpath, metadata, shard_i)
        return None if row is None else damaged_error(dpath, metadata, shard_i, row)

    with concurrent.futures.ThreadPoolExecutor(max(1, n_threads)) as pool:
        return [err for err in pool.map(check, range(metadata.n_shards)) if err is not None]


def tmp_sibling(fpath: pathlib.Path) -> pathlib.Path:
    """A hidden temporary name next to `fpath`, unique per process so parallel jobs never share.
    Leftovers of killed writers of the same file (a pid that no longer runs here) go first."""
    fpath = pathlib.Path(fpath)
    prefix = f".{fpath.name}."
    for stale_fpath in fpath.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = stale_fpath.name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale_fpath.unlink(missing_ok=True)
    return fpath.with_name(f"{prefix}{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(fpath: pathlib.Path, data: bytes, sync: bool = True):
    """Write to a temporary sibling, flush to disk (unless `sync` is off, for small files that
    are cheap to redo), then rename: readers never see half a file."""
    tmp_fpath = tmp_sibling(fpath)
    try:
        with open(tmp_fpath, "wb") as fd:
            fd.write(data)
            if sync:
                fd.flush()
                os.fsync(fd.fileno())
    except OSError as err:
        tmp_fpath.unlink(missing_ok=True)
        raise OSError(err.errno, f"{err.strerror}: cannot write {fpath}") from None
    os.replace(tmp_fpath, fpath)


def part_shards(n_shards: int, n_parts: int, part: int) -> range:
    """The whole shards part `part` of `n_parts` writes: contiguous, disjoint, covering all."""
    if not 0 <= part < n_parts <= n_shards:
        raise ValueError(f"part {part} of {n_parts} is impossible with {n_shards} shards")
    return range(part * n_shards // n_parts, (part + 1) * n_shards // n_parts)


class ShardWriter:
    """Writes a shard directory shard by shard, resuming after the last complete shard.

    A shard file appears (by atomic rename) only once all its rows are written, and the directory
    is complete only once `shards.json` is published, after every shard exists with its exact size.
    Several writers (one per part) may fill disjoint shards of one directory at the same time.
    """

    def __init__(self, dpath: pathlib.Path, metadata: Metadata):
        self.dpath = pathlib.Path(dpath)
        self.metadata = metadata
        self.dpath.mkdir(parents=True, exist_ok=True)
        md_fpath = self.dpath / METADATA_FNAME
        if md_fpath.exists():
            if Metadata.load(self.dpath) != metadata:
                raise ShardError(
                    f"{md_fpath} describes a different dump than requested; "
                    "remove the directory or fix the configuration"
                )
        else:
            write_atomic(md_fpath, metadata.to_json().encode("utf-8"))

    def is_complete(self, shard_i: int) -> bool:
        fpath = self.dpath / shard_fname(shard_i)
        return fpath.exists() and fpath.stat().st_size == self.metadata.shard_nbytes

    def incomplete_shards(self, shard_ids: range, verify: bool = False) -> list[int]:
        """The shards of `shard_ids` still to (re)write; with `verify`, also every complete one
        whose bytes no longer match its checksums (one read of each)."""
        todo = []
        for shard_i in shard_ids:
            if not self.is_complete(shard_i):
                todo.append(shard_i)
            elif (
                verify
                and (row := first_damaged_row(self.dpath, self.metadata, shard_i)) is not None
            ):
                logger.warning(
                    "%s; writing it again", damaged_error(self.dpath, self.metadata, shard_i, row)
                )
                todo.append(shard_i)
        return todo

    def open_shard(self, shard_i: int) -> np.memmap:
        """A zero-filled, writable (S, L, T, D) map of shard `shard_i`'s temporary file.

        Rows written to it go to the page cache at memcpy speed; the kernel writes them back
        while the model runs. The blocks of the rows the shard's images fill are reserved first,
        so a full disk stops the dump here with "No space left on device" and the path, never as
        a SIGBUS while writing into the map; the rest of the file (the unused rows of a short last
        shard) stays sparse. Stale temporary files of this shard (a killed writer) go first.
        """
        fpath = self.dpath / shard_fname(shard_i)
        for stale_fpath in self.dpath.glob(f".{fpath.name}.*.tmp"):
            stale_fpath.unlink()
        tmp_fpath = tmp_sibling(fpath)
        md = self.metadata
        nbytes, used_nbytes = (
            md.shard_nbytes,
            md.shard_nbytes // md.n_imgs_per_shard * md.shard_n_imgs(shard_i),
        )
        with open(tmp_fpath, "wb") as fd:
            try:
                if hasattr(os, "posix_fallocate"):  # not on macOS: there the file stays sparse
                    os.posix_fallocate(fd.fileno(), 0, used_nbytes)
                fd.truncate(nbytes)
            except OSError as err:
                fd.close()
                tmp_fpath.unlink(missing_ok=True)
                raise OSError(
                    err.errno,
                    f"{err.strerror}: cannot reserve {nbytes} bytes for {fpath} (shard "
                    f"{shard_i}). Free space there (or move shards_dpath) and rerun: the dump "
                    "resumes after its last complete shard",
                ) from None
        return np.memmap(tmp_fpath, dtype="<f4", mode="r+", shape=self.metadata.shard_shape)

    def finish_shard(self, shard_i: int, acts_SLTD: np.memmap):
        """Write the checksums of a shard opened with `open_shard` (from the page cache), flush it
        to disk and give it its final name: a shard never appears without its checksums."""
        n_rows = self.metadata.shard_n_imgs(shard_i)
        crc = row_checksums(np.asarray(acts_SLTD[:n_rows]).reshape(n_rows, -1).view(np.uint8))
        write_atomic(self.dpath / checksums_fname(shard_i), crc.tobytes())
        acts_SLTD.flush()
        tmp_fpath = pathlib.Path(acts_SLTD.filename)
        with open(tmp_fpath, "rb+") as fd:
            os.fsync(fd.fileno())
        os.replace(tmp_fpath, self.dpath / shard_fname(shard_i))

    def has_labels(self) -> bool:
        fpath = self.dpath / LABELS_FNAME
        return fpath.exists() and fpath.stat().st_size == self.metadata.labels_nbytes

    def write_labels(self, labels_NP: np.ndarray):
        assert labels_NP.shape == (self.metadata.n_imgs, self.metadata.n_patches_per_img)
        write_atomic(self.dpath / LABELS_FNAME, labels_NP.astype(np.uint8).tobytes())

    def publish(self, n_threads: int = 2):
        """Mark the directory complete, after checking every shard; remove temporary leftovers
        of killed writers (all writers have finished when this runs)."""
        missing = self.incomplete_shards(range(self.metadata.n_shards))
        if missing:
            names = ", ".join(shard_fname(i) for i in missing)
            raise ShardError(
                f"cannot publish {self.dpath}: {names} missing or incomplete ({len(missing)} of "
                f"{self.metadata.n_shards} shards). Run `snakemake` again: planning finds lost "
                "shards and redoes the dump parts that wrote them; by hand, "
                "`python -m saev_core.steps.dump part --spec-fpath results/specs/shards/"
                f"{self.dpath.name}/part<i>-of-<n>.json --device auto` for the parts that hold them"
            )
        if self.metadata.records_labels and not self.has_labels():
            raise ShardError(f"cannot publish: {self.dpath / LABELS_FNAME} is missing")
        if damaged := verify(self.dpath, n_threads):  # every byte read once, after every dump
            raise damaged[0]
        for stale_fpath in self.dpath.glob(".*.tmp"):
            stale_fpath.unlink()
        text = json.dumps(self.metadata.listing(), indent=2)
        if self.metadata.protocol != PROTOCOL_SAEV2:  # saev 3d73f1f ends it without a newline
            text += "\n"
        write_atomic(self.dpath / SHARDS_FNAME, text.encode())


class ShardReader:
    """Validated, memory-mapped read access to a complete shard directory."""

    def __init__(self, dpath: pathlib.Path):
        self.dpath = pathlib.Path(dpath)
        self.metadata = Metadata.load(self.dpath)
        if self.metadata.hash != self.dpath.name:
            raise ShardError(
                f"{self.dpath / METADATA_FNAME} hashes to {self.metadata.hash}, "
                f"not to its directory name {self.dpath.name}"
            )
        listing_fpath = self.dpath / SHARDS_FNAME
        if not listing_fpath.exists():
            raise ShardError(f"{listing_fpath} does not exist: the dump is incomplete")
        listing = json.loads(listing_fpath.read_text())
        expected, key = self.metadata.listing(), self.metadata.listing_key
        # saev writes one more, empty shard when n_imgs is a multiple of the shard size.
        trailing = listing[len(expected) :]
        if listing[: len(expected)] != expected or any(e.get(key) != 0 for e in trailing):
            raise ShardError(
                f"{listing_fpath} does not match {METADATA_FNAME}: expected {expected} "
                f"(then, as saev writes, only entries with {key} 0)"
            )
        listing = listing[: len(expected)]
        for entry in listing:
            fpath = self.dpath / entry["name"]
            if not fpath.exists():
                raise ShardError(f"shard file {fpath} is missing")
            size = fpath.stat().st_size
            if size != self.metadata.shard_nbytes:
                raise ShardError(
                    f"shard file {fpath} has {size} bytes, expected {self.metadata.shard_nbytes}"
                )
        labels_fpath = self.dpath / LABELS_FNAME
        labels_nbytes = self.metadata.labels_nbytes
        # Protocol 1.1.0 promises labels; in 2.1 they are optional, but whole when present.
        self.has_labels = self.metadata.protocol == PROTOCOL_WITH_LABELS or (
            self.metadata.protocol == PROTOCOL_SAEV2 and labels_fpath.exists()
        )
        if self.has_labels and (
            not labels_fpath.exists() or labels_fpath.stat().st_size != labels_nbytes
        ):
            raise ShardError(
                f"{labels_fpath} must exist with {labels_nbytes} bytes (one uint8 per patch of "
                f"{self.metadata.n_imgs} images, protocol {self.metadata.protocol})"
            )
        self._mmaps: dict[int, np.memmap] = {}

    @property
    def n_imgs(self) -> int:
        return self.metadata.n_imgs

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row) of image `i`."""
        if not 0 <= i < self.n_imgs:
            raise IndexError(f"image index {i} is out of range for {self.n_imgs} images")
        return divmod(i, self.metadata.n_imgs_per_shard)

    def shard(self, shard_i: int) -> np.memmap:
        """Shard `shard_i` as a read-only (S, L, T, D) memory map (only its first rows count)."""
        if shard_i not in self._mmaps:
            self._mmaps[shard_i] = np.memmap(
                self.dpath / shard_fname(shard_i),
                dtype="<f4",
                mode="r",
                shape=self.metadata.shard_shape,
            )
        return self._mmaps[shard_i]

    def image_tokens(self, i: int, layer: int, tokens: str) -> np.ndarray:
        """Image `i`'s vectors of one layer and token kind, (T, D), checked to be finite."""
        shard_i, row = self.locate(i)
        layer_i, token_slice = self.metadata.layer_index(layer), self.token_slice(tokens)
        x_TD = np.array(self.shard(shard_i)[row, layer_i, token_slice])
        if not np.isfinite(x_TD).all():
            raise nonfinite_error(self.dpath / shard_fname(shard_i), i, row, layer)
        return x_TD

    def token_slice(self, tokens: str) -> slice:
        """Which stored tokens a token kind selects: `patches`, `cls` or `all`."""
        has_cls = int(self.metadata.cls_token)
        if tokens == "patches":
            return slice(has_cls, None)
        if tokens == "all":
            return slice(None)
        if tokens == "cls":
            if not has_cls:
                raise ShardError(f"{self.dpath} has no [CLS] token; use tokens 'patches'")
            return slice(0, 1)
        raise ValueError(f"tokens must be 'patches', 'cls' or 'all', got {tokens!r}")

    def check_labels(self, class_names: list[str]):
        """Refuse, naming the file, a `labels.bin` holding a class id beyond the dataset's
        class list (labels from another dataset, or damaged)."""
        labels_NP = self.labels()
        if labels_NP is None:
            return
        top = int(labels_NP.max())
        if top >= len(class_names):
            img, patch = np.unravel_index(
                int(np.argmax(labels_NP >= len(class_names))), labels_NP.shape
            )
            raise ShardError(
                f"{self.dpath / LABELS_FNAME}: class id {top} (first at image {img}, patch "
                f"{patch}) is beyond the dataset's {len(class_names)} classes {class_names}: "
                "the labels are damaged or from another dataset; delete the shard directory to "
                "dump it again"
            )

    def labels(self) -> np.ndarray | None:
        """Per-patch labels (n_imgs, P) when the dump recorded them."""
        fpath = self.dpath / LABELS_FNAME
        if not self.has_labels:
            return None
        shape = (self.n_imgs, self.metadata.n_patches_per_img)
        return np.memmap(fpath, dtype=np.uint8, mode="r", shape=shape)
