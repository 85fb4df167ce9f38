"""Small shared pieces: device choice and logging set-up for the step scripts."""

import ctypes
import ctypes.util
import logging

import torch

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def pick_device(device: str) -> torch.device:
    """`auto` means CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup_logging():
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )


def keep_freed_memory():
    """Stop glibc from handing large freed blocks back to the kernel.

    Training allocates and frees the same large tensors every step; by default glibc maps each
    one afresh, and touching the new pages costs a third of a CPU training step in page faults.
    Peak memory is unchanged. A no-op where glibc's `mallopt` is missing.
    """
    libc_name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc_name), "mallopt", None) if libc_name else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 2**30)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
