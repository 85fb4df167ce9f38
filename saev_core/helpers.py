"""Small shared pieces: device choice, logging set-up and a job lock for the step scripts."""

import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import fcntl
import logging
import os
import pathlib
import socket

import torch

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


TF32_ENV = "SAEV_TF32"
"""Set to 0 to keep float32 matrix products exact on CUDA (TF32 is on by default, as in saev)."""


def pick_device(device: str) -> torch.device:
    """`auto` means CUDA when present, else CPU; anything else is passed to torch. On CUDA,
    float32 matrix products and convolutions use TF32 tensor cores unless `SAEV_TF32=0`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        use_tf32(os.environ.get(TF32_ENV, "1") != "0")
    return torch_device


def use_tf32(on: bool):
    """TF32 for CUDA matrix products and cuDNN convolutions (CPU kernels are unaffected)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


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


class LockedError(RuntimeError):
    """Another job holds the lock."""


@contextlib.contextmanager
def exclusive_lock(fpath: pathlib.Path, what: str):
    """Hold an exclusive lock on `fpath` for the duration, or refuse at once, naming the holder.

    A POSIX record lock (`fcntl.lockf`, honoured over NFS) that the kernel drops when the process
    dies, however it dies, so a killed job never leaves a stale lock. Where the file system
    cannot lock, the job goes on with a warning.
    """
    fd = os.open(fpath, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                logging.getLogger("lock").warning("cannot lock %s (%s): going on", fpath, err)
            else:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                raise LockedError(
                    f"{what} is already being trained by another job ({holder}; lock {fpath}). "
                    "Two jobs for one group would overwrite each other's checkpoints, so this one "
                    "stops and leaves the other's work alone. This happens after `snakemake "
                    "--unlock` while a run was still going: wait for that run to finish."
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{lock_holder()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_holder() -> str:
    """Who this process is, for a lock file: pid, host, start time and Slurm job."""
    started = datetime.datetime.now().isoformat(timespec="seconds")
    slurm = f", Slurm job {os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else ""
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}{slurm}"
