"""Batches of activation vectors streamed from a shard directory (SPEC §6).

`ShuffledLoader` is the training loader: it reads large contiguous blocks of images from the
memory-mapped shards in a seeded random order into a shuffle buffer and hands out batches drawn
from the buffer in a seeded random order. A background thread fills the buffers, so disk reads
overlap training, and there is no per-example Python or per-example file access. `OrderedLoader`
reads the same blocks in disk order (evaluation, top-k).

Shape key: N = vectors, B = batch, D = d_vit.
"""

import os
import queue
import threading
import typing

import numpy as np
import torch

from .shards import ShardReader, nonfinite_error, shard_fname

BLOCK_BYTES = 16 << 20
"""Bytes of one contiguous read: large enough for full disk bandwidth."""
ORDERED_BLOCK_BYTES = 4 << 20
"""Ordered reads feed an SAE forward pass whose latents are exp_factor times larger: keep small."""
BUFFER_VECTORS = 1 << 17
"""Vectors in a shuffle buffer: batches mix this many vectors from many random blocks."""
POOLED = "mean"
"""A token kind of the loaders only: one vector per image, the mean of its patch vectors
(image probes)."""


class Block(typing.NamedTuple):
    """Images `start:stop` of shard `shard_i`, read in one go."""

    shard_i: int
    start: int
    stop: int


class BlockReader:
    """The shard directory as a list of blocks of whole images for one layer and token kind
    (`patches`, `cls`, `all`, or `POOLED`).

    Reads are plain `preadv` calls into caller-owned memory (no memory map: at terabyte scale
    every page would be a fresh page fault), one per block; when the layer and tokens are a
    strided part of the stored rows, the block is read whole into a scratch buffer first.
    """

    def __init__(self, reader: ShardReader, layer: int, tokens: str, block_bytes: int):
        md = reader.metadata
        self.reader = reader
        self.layer = layer
        self.layer_i = md.layer_index(layer)
        self.imgs_per_shard = md.n_imgs_per_shard
        self.pool = tokens == POOLED
        self.tokens = reader.token_slice("patches" if self.pool else tokens)
        self.d_vit = md.d_vit
        n_read = len(range(md.n_tokens)[self.tokens])
        self.n_tokens = 1 if self.pool else n_read
        self.img_shape = (len(md.layers), md.n_tokens, md.d_vit)
        self.img_nbytes = int(np.prod(self.img_shape)) * 4
        self.contiguous = len(md.layers) == 1 and n_read == md.n_tokens and not self.pool
        block_imgs = max(1, block_bytes // self.img_nbytes)
        self.blocks = [
            Block(shard_i, start, min(start + block_imgs, md.shard_n_imgs(shard_i)))
            for shard_i in range(md.n_shards)
            for start in range(0, md.shard_n_imgs(shard_i), block_imgs)
        ]
        self.n_vectors = reader.n_imgs * self.n_tokens
        self._scratch = (
            None if self.contiguous else np.empty(block_imgs * self.img_nbytes, np.uint8)
        )

    def n_block_vectors(self, block: Block) -> int:
        return (block.stop - block.start) * self.n_tokens

    def read_into(self, block: Block, out_ND: np.ndarray, check: bool = True):
        """Copy a block's vectors (image-major, token-minor) into `out_ND`: the one disk read.
        With `check`, non-finite values (bit rot, a bad copy) stop here, naming the shard file
        and image."""
        n_imgs = block.stop - block.start
        if self.contiguous:
            self._pread(block, out_ND.reshape(-1).view(np.uint8))
        else:
            raw = self._scratch[: n_imgs * self.img_nbytes]
            self._pread(block, raw)
            rows_NLTD = raw.view("<f4").reshape(n_imgs, *self.img_shape)
            picked_NTD = rows_NLTD[:, self.layer_i, self.tokens]
            if self.pool:
                picked_NTD = picked_NTD.mean(axis=1, keepdims=True)
            out_ND.reshape(n_imgs, self.n_tokens, self.d_vit)[:] = picked_NTD
        if check:
            self.check_finite(block, out_ND)

    def check_finite(self, block: Block, out_ND: np.ndarray):
        """One vectorised summing pass (NaN and inf survive a sum; torch's sum runs several
        times faster than numpy's) while the block is in cache; only a non-finite sum (or an
        overflow of huge finite values) pays for the exact search."""
        if torch.isfinite(torch.from_numpy(out_ND).sum()):
            return
        bad_rows = np.flatnonzero(~np.isfinite(out_ND.reshape(-1, self.d_vit)).all(axis=1))
        if len(bad_rows) == 0:
            return
        row = block.start + int(bad_rows[0]) // self.n_tokens
        img = block.shard_i * self.imgs_per_shard + row
        fpath = self.reader.dpath / shard_fname(block.shard_i)
        raise nonfinite_error(fpath, img, row, self.layer)

    def _pread(self, block: Block, out: np.ndarray):
        fpath = self.reader.dpath / shard_fname(block.shard_i)
        fd = os.open(fpath, os.O_RDONLY)  # one open per 16 MiB read: negligible, nothing leaks
        try:
            offset, view = block.start * self.img_nbytes, memoryview(out)
            while len(view):
                n_read = os.preadv(fd, [view], offset)
                if n_read == 0:
                    raise EOFError(f"{fpath} ended early: is it truncated?")
                view, offset = view[n_read:], offset + n_read
        finally:
            os.close(fd)


class ShuffledLoader:
    """`n_train // batch_size` shuffled batches; epochs repeat until the budget is spent.

    Each epoch reads every block once, in a random order, filling buffers of about
    `buffer_vectors`; each buffer is served in a random order, and its remainder (less than a
    batch) is carried into the next buffer, so one epoch delivers every vector exactly once.
    Deterministic for a seed: all SAEs of a group can share one instance's batches.

    With `labels_NT` (one class per image and vector, e.g. `labels.bin`'s per-patch classes),
    each batch comes as (x_BD, labels_B): the labels travel through the same buffers and
    permutations as their vectors (blocks are whole images, so a block's labels are one slice).
    With `ignore_labels` too, vectors of those classes are dropped as each buffer is read (saev's
    label filtering): an epoch delivers every other vector exactly once.

    `state_dict()` after a batch and `load_state_dict()` on a fresh loader continue with exactly
    the next batch: the state is the random generator, epoch order and carried vectors at the
    start of the current buffer, plus how many of its batches were delivered.

    Blocks are not checked for NaN or inf as they stream: on this machine's CPU that pass cost
    ~30 % of the loader's time (`benchmarks/loader.py`). Non-finite vectors make the training loss
    non-finite, which the training job reads at its logging and checkpoint interval; it then calls
    `find_nonfinite`, which re-reads the batch's blocks with the check and names the shard file
    and image.
    """

    def __init__(
        self,
        reader: ShardReader,
        layer: int,
        tokens: str,
        batch_size: int,
        n_train: int,
        seed: int,
        *,
        block_bytes: int = BLOCK_BYTES,
        buffer_vectors: int = BUFFER_VECTORS,
        prefetch_buffers: int = 2,
        labels_NT: np.ndarray | None = None,
        ignore_labels: tuple[int, ...] = (),
    ):
        self.blocks = BlockReader(reader, layer, tokens, block_bytes)
        expected = (reader.n_imgs, self.blocks.n_tokens)
        if labels_NT is not None and tuple(labels_NT.shape) != expected:
            raise ValueError(f"labels have shape {labels_NT.shape}, the vectors {expected}")
        if ignore_labels and labels_NT is None:
            raise ValueError("ignore_labels needs the vectors' labels (labels_NT)")
        self.labels_NT = labels_NT
        self.ignore_labels = torch.tensor(ignore_labels, dtype=torch.long)
        n_vectors, kept = self.blocks.n_vectors, ""
        if ignore_labels:  # one pass over labels.bin: 1 byte per patch
            n_vectors = int((~np.isin(np.asarray(labels_NT), ignore_labels)).sum())
            kept = f" left by ignore_labels {list(ignore_labels)}"
        if batch_size > n_vectors:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {n_vectors} vectors of layer "
                f"{layer} in {reader.dpath}{kept}"
            )
        self.batch_size, self.seed = batch_size, seed
        self.n_steps = n_train // batch_size
        self.buffer_vectors = max(buffer_vectors, batch_size)
        self.prefetch_buffers = prefetch_buffers
        self.position: dict | None = None
        """Where the last delivered batch came from; None before the first."""
        self._resume_from: dict | None = None
        self._recent_blocks: tuple[list[int], list[int]] = ([], [])
        """Blocks of the current buffer and of the one before (whose leftovers it carries)."""

    def __len__(self) -> int:
        return self.n_steps

    def state_dict(self) -> dict:
        assert self.position is not None, "no batch delivered yet"
        return {**self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict):
        if (state["seed"], state["batch_size"]) != (self.seed, self.batch_size):
            raise ValueError("loader state comes from a different seed or batch size")
        self._resume_from = state

    def __iter__(self) -> typing.Iterator:
        """Batches (B, D) float32, or (x_BD, labels_B int64) with labels; buffers are read and
        shuffled on a background thread."""
        start = self._resume_from
        skip = start["offset"] if start else 0
        n_done = start["step"] + skip if start else 0
        buffers: queue.Queue = queue.Queue(maxsize=self.prefetch_buffers)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._fill, args=(buffers, stop, start), name="loader", daemon=True
        )
        thread.start()
        try:
            while n_done < self.n_steps:
                item = buffers.get()
                if isinstance(item, BaseException):
                    raise item
                buffer_ND, order_N, state, labels_N = item
                self._recent_blocks = (state["blocks"], self._recent_blocks[0])
                for b in range(skip, len(order_N) // self.batch_size):
                    self.position = {**state, "offset": b + 1}
                    batch_B = order_N[b * self.batch_size : (b + 1) * self.batch_size]
                    x_BD = buffer_ND.index_select(0, batch_B)
                    yield x_BD if labels_N is None else (x_BD, labels_N.index_select(0, batch_B))
                    n_done += 1
                    if n_done == self.n_steps:
                        break
                skip = 0
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    buffers.get(timeout=0.1)
                except queue.Empty:
                    pass

    def find_nonfinite(self):
        """Read, with the finiteness check, the blocks the last batch came from and then every
        other block: raises `ShardError` naming the shard file and image of the first non-finite
        vector; returns if there is none."""
        recent = list(dict.fromkeys(self._recent_blocks[0] + self._recent_blocks[1]))
        rest = [i for i in range(len(self.blocks.blocks)) if i not in set(recent)]
        for block_i in recent + rest:
            block = self.blocks.blocks[block_i]
            out_ND = np.empty((self.blocks.n_block_vectors(block), self.blocks.d_vit), np.float32)
            self.blocks.read_into(block, out_ND, check=True)

    def _fill(self, buffers: queue.Queue, stop: threading.Event, start: dict | None):
        """Producer: (buffer, order, state, labels) whose orders hold whole batches only."""
        try:
            for item in self._buffers(start):
                while not stop.is_set():
                    try:
                        buffers.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:
            buffers.put(err)

    def _buffers(self, start: dict | None):
        D, B = self.blocks.d_vit, self.batch_size
        gen = torch.Generator()
        with_labels = self.labels_NT is not None
        if start is None:
            gen.manual_seed(self.seed)
            step, order, next_i = 0, torch.empty(0, dtype=torch.long), 0
            carry_ND, carry_N = torch.empty(0, D), torch.empty(0, dtype=torch.long)
        else:
            gen.set_state(start["gen"])
            step, order, next_i, carry_ND = (start[k] for k in ("step", "order", "next_i", "carry"))
            # Training checkpoints written before labels travelled have no such key.
            carry_N = start.get("carry_labels", torch.empty(0, dtype=torch.long))
        # A ring of reused buffers (fresh memory would cost a page fault per 4 KiB). Slot k is
        # refilled only after the consumer took buffer k + 1 from the queue, so it is done with k.
        max_block = max(self.blocks.n_block_vectors(block) for block in self.blocks.blocks)
        capacity = self.buffer_vectors + max_block + B
        ring = [torch.empty(capacity, D) for _ in range(self.prefetch_buffers + 2)]
        label_ring = [
            torch.empty(capacity if with_labels else 0, dtype=torch.long)
            for _ in range(self.prefetch_buffers + 2)
        ]
        n_filled = 0
        while step < self.n_steps:
            state = {
                "step": step,
                "gen": gen.get_state(),
                "order": order,
                "next_i": next_i,
                "carry": carry_ND,
                "carry_labels": carry_N,
            }
            if next_i == len(order):  # a new epoch
                order, next_i = torch.randperm(len(self.blocks.blocks), generator=gen), 0
            chosen, chosen_i = [], []
            n_vectors = len(carry_ND)
            while next_i < len(order) and n_vectors < self.buffer_vectors:
                chosen_i.append(int(order[next_i]))
                chosen.append(self.blocks.blocks[chosen_i[-1]])
                n_vectors += self.blocks.n_block_vectors(chosen[-1])
                next_i += 1
            buffer_ND = ring[n_filled % len(ring)][:n_vectors]
            labels_N = label_ring[n_filled % len(ring)][:n_vectors] if with_labels else None
            n_filled += 1
            buffer_ND[: len(carry_ND)] = carry_ND
            if with_labels:
                labels_N[: len(carry_N)] = carry_N
            lo = len(carry_ND)
            for block in chosen:
                hi = lo + self.blocks.n_block_vectors(block)
                self.blocks.read_into(block, buffer_ND[lo:hi].numpy(), check=False)
                if with_labels:
                    first = block.shard_i * self.blocks.imgs_per_shard + block.start
                    rows = self.labels_NT[first : first + block.stop - block.start]
                    labels_N[lo:hi] = torch.from_numpy(np.asarray(rows, dtype=np.int64).ravel())
                lo = hi
            if len(self.ignore_labels):  # keep the other classes, in place and in order
                kept_N = (~torch.isin(labels_N, self.ignore_labels)).nonzero().squeeze(1)
                n_vectors = len(kept_N)
                buffer_ND[:n_vectors] = buffer_ND[kept_N]
                labels_N[:n_vectors] = labels_N[kept_N]
                buffer_ND, labels_N = buffer_ND[:n_vectors], labels_N[:n_vectors]
            perm_N = torch.randperm(n_vectors, generator=gen)
            n_full = n_vectors // B * B
            carry_ND = buffer_ND[perm_N[n_full:]]
            carry_N = labels_N[perm_N[n_full:]] if with_labels else carry_N
            yield buffer_ND, perm_N[:n_full], {**state, "blocks": chosen_i}, labels_N
            step += n_full // B


class ToDevice:
    """Host batches moved to `device`. On CUDA each batch is copied into one of `n_slots` pinned
    (page-locked) host buffers and sent with a non-blocking copy: the copy overlaps the running
    step and the host prepares the next batch meanwhile. A buffer is reused only once its last
    copy has finished (a CUDA event, not a device-wide sync). Elsewhere batches pass through."""

    def __init__(
        self, batches: typing.Iterable[torch.Tensor], device: torch.device, n_slots: int = 3
    ):
        self.batches, self.device, self.n_slots = batches, torch.device(device), n_slots

    def __iter__(self) -> typing.Iterator[torch.Tensor]:
        if self.device.type != "cuda":
            yield from self.batches
            return
        slots: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        for i, x_BD in enumerate(self.batches):
            if len(slots) < self.n_slots:
                slots.append((torch.empty_like(x_BD, pin_memory=True), torch.cuda.Event()))
            pinned_BD, copied = slots[i % self.n_slots]
            copied.synchronize()  # the copy from this buffer, n_slots batches ago, is done
            pinned_BD.copy_(x_BD)
            x_BD = pinned_BD.to(self.device, non_blocking=True)
            copied.record()
            yield x_BD


class OrderedLoader:
    """Every vector of a layer in disk order, in chunks of whole images: (first image, (n, T, D))."""

    def __init__(
        self, reader: ShardReader, layer: int, tokens: str, block_bytes: int = ORDERED_BLOCK_BYTES
    ):
        self.blocks = BlockReader(reader, layer, tokens, block_bytes)
        self.S = reader.metadata.n_imgs_per_shard

    def __iter__(self) -> typing.Iterator[tuple[int, np.ndarray]]:
        T, D = self.blocks.n_tokens, self.blocks.d_vit
        for block in self.blocks.blocks:
            out_ND = np.empty((self.blocks.n_block_vectors(block), D), dtype=np.float32)
            self.blocks.read_into(block, out_ND)
            yield block.shard_i * self.S + block.start, out_ND.reshape(-1, T, D)
