"""Training processes run under mimalloc instead of glibc's malloc (Linux).

A training step frees and takes again activations of many sizes: they follow each batch's
length, and packed, grouped and padded batches all differ. glibc's malloc keeps the freed
blocks in heaps it can rarely hand back, so a CPU run's resident memory grew to about 1.6x what
was live (benchmarks/train_speed.py, LoRA on a 34M Llama: glibc 1583 MiB, live ~1000 MiB).
mimalloc reuses them: about 1.2 GiB on the same run, at the same speed or better. Returning
freed memory to the system at once (glibc's own knobs, `MALLOC_TRIM_THRESHOLD_=0` and kin) did
reach the live figure, but cost about 40% of the speed in page faults.

The allocator is chosen when a process starts, so `strop train` and `strop demo` start again
under it: exec, with the same process id, arguments and environment plus LD_PRELOAD naming the
library the cmeel-mimalloc wheel ships (a dependency on Linux). Signals, torchrun and job
schedulers see one process. `STROP_ALLOCATOR=system` keeps glibc's malloc.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "STROP_ALLOCATOR"
# Commands that train: the others are short or spend their time elsewhere.
COMMANDS = {"train", "demo"}
# mimalloc hands freed pages back to the system 10 ms after they fall free. A training step
# frees a layer's activations in backward and takes the same sizes again in the next forward,
# seconds later; at 10 ms every step would fault them all in anew (measured: -7% tokens/s).
# Pages idle for longer than a second go back as usual.
PURGE_DELAY_MS = "1000"


def mimalloc_library() -> Path | None:
    """libmimalloc.so from the cmeel-mimalloc wheel, or None where it is not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution("cmeel-mimalloc")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "libmimalloc.so":
            path = Path(dist.locate_file(file))
            return path if path.exists() else None
    return None


def active(environ: os._Environ | dict = os.environ) -> str:
    """The allocator this process runs under, in words for the log."""
    preload = environ.get("LD_PRELOAD", "")
    return "mimalloc" if "libmimalloc" in preload else "system malloc"


def restart_environment(environ: dict, library: Path | None,
                        platform: str = sys.platform) -> dict | None:
    """The environment to start this process again with, or None to carry on as it is: not
    Linux, no library, opted out with STROP_ALLOCATOR=system, or already under mimalloc."""
    if platform != "linux" or library is None:
        return None
    choice = environ.get(ENV, "mimalloc")
    if choice == "system":
        return None
    if choice != "mimalloc":
        from strop.errors import StropError

        raise StropError(f"{ENV}={choice}: expected mimalloc (the default) or system")
    preload = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    if any("libmimalloc" in p for p in preload):
        return None  # started under it (by us or by the user); never exec twice
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join([str(library), *preload])
    env.setdefault("MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS)
    return env


def restart_under_mimalloc() -> None:
    """Exec this process again under mimalloc where restart_environment says so; returns only
    when it does not. Call it before anything heavy is imported: the work done so far is lost."""
    env = restart_environment(dict(os.environ), mimalloc_library())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
