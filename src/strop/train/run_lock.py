"""One `strop train` per output_dir at a time.

A second run into the same directory would overwrite the first one's checkpoints, delete its
temporary checkpoint directories and interleave its metrics. The running process holds an
exclusive flock on output_dir/.strop-lock; the kernel releases it when the process dies (even by
kill -9), so a lock file left behind by a dead run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from strop.errors import StropError

LOCK_FILE = ".strop-lock"


def make_output_dir(out: Path) -> None:
    """Create output_dir, or say in one line why it cannot be one."""
    if out.exists() and not out.is_dir():
        raise StropError(f"output_dir {out} is a file, not a directory; choose another "
                         "output_dir or move the file away")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = "the filesystem is read-only" if err.errno == errno.EROFS else \
            "permission denied" if err.errno in (errno.EACCES, errno.EPERM) else \
            (err.strerror or type(err).__name__)
        raise StropError(f"output_dir {out}: cannot create it ({why}); choose a writable "
                         "output_dir") from None
    if not os.access(out, os.W_OK):
        raise StropError(f"output_dir {out} is not writable; choose a writable output_dir")


@contextlib.contextmanager
def exclusive_output_dir(out: Path):
    """Hold output_dir for this process; a second run into it is refused in one line."""
    make_output_dir(out)
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise StropError(f"output_dir {out}: cannot write {LOCK_FILE} ({err.strerror}); choose a "
                         "writable output_dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StropError(f"output_dir {out} is in use by another strop train "
                             f"({_holder(path)}); wait for it to finish, stop it, or choose "
                             "another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its process id is not recorded yet"
