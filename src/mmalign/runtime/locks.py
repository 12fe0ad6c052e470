"""File locks: one run per run directory, and serialised read-merge-write of shared cache files.

Locks are ``flock`` locks on a small file beside what they guard: the operating system drops them when the process
ends, however it ends (a killed run leaves nothing to clean up).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from mmalign.errors import ConfigError

RUN_LOCK = ".lock"
_HELD: dict[str, int] = {}  # run directory -> descriptor of its lock file, held by this process


def lock_run_dir(out: Path) -> None:
    """Take the run directory's lock for the life of the run (``release_run_dir`` ends it).

    A process may take the lock of a directory it already holds (runs one after another in one process: the demo,
    a notebook, a run that failed and is started again).

    Raises:
        ConfigError: another process holds the directory (a second run into the same ``--out``).
    """
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, out / RUN_LOCK, "--out")


def lock_output(path: Path) -> None:
    """The same for a command that writes one file (``pairs bdhs --out FILE``): ``.<name>.lock`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _claim(path, path.with_name(f".{path.name}.lock"), "--out")


def _claim(what: Path, lock_file: Path, flag: str) -> None:
    key = os.path.abspath(what)
    if key in _HELD:
        if os.path.exists(lock_file):
            return
        os.close(_HELD.pop(key))  # the directory was deleted meanwhile: claim the new one
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"{what} is in use by another run (process {holder}); wait for it to end or choose another {flag}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def release_run_dir(out: Path) -> None:
    """Release the lock of a run directory or output file (nothing to do when this process does not hold it)."""
    fd = _HELD.pop(os.path.abspath(out), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (waiting for it) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def release_all() -> None:
    """Release every lock this process holds (the command line, when a command ends however it ends)."""
    while _HELD:
        os.close(_HELD.popitem()[1])
