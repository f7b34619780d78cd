"""How a training process is set up before torch loads: its malloc and its kernel caches.

Both are read once, when the process starts or when torch first needs them, so `strop train` and
`strop demo` set them first thing (`prepare_training_process`), before anything imports torch.

**mimalloc** (Linux). A training step frees and takes again activations of many sizes: they
follow each batch's length, and packed, grouped and padded batches all differ. glibc's malloc
keeps freed blocks in heaps it can rarely hand back: on benchmarks/train_speed.py (LoRA on a 34M
Llama, CPU) the strop runs peaked at 1500-1700 MiB under glibc and 1100-1390 MiB under mimalloc,
at the same speed within the machine's noise. Returning freed memory to the system at once
with glibc's own knobs (`MALLOC_TRIM_THRESHOLD_=0` and kin) reached the live figure but cost
about 45% of the speed in page faults. A malloc is chosen when a process starts, so these
commands exec themselves again: the same process id, arguments and environment plus LD_PRELOAD
naming the library of the cmeel-mimalloc wheel (a dependency on Linux). Signals and
job schedulers see one process. `STROP_ALLOCATOR=system` keeps glibc's malloc.

**Kernel caches.** oneDNN (the CPU's matmul kernels) keeps every kernel it built for a matrix
shape, up to 1024 in its primitive cache and 1024 more in PyTorch's ideep cache, a few hundred
KB each. Batches padded to their longest row have a new shape at almost every step: on the
benchmark Llama, 60 steps of random lengths grew resident memory by 440 MiB before the caches
filled. 256 entries hold all the kernels of several batch shapes, so a run of one shape
(packed rows) never rebuilds them; the same 60 steps then grew by 10 MiB, at the same speed.
A user's own ONEDNN_PRIMITIVE_CACHE_CAPACITY / LRU_CACHE_CAPACITY win.
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
# a second or more later; pages idle for longer than that go back as usual.
PURGE_DELAY_MS = "1000"
KERNEL_CACHE_ENTRIES = "256"
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


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


def active_allocator(environ=os.environ) -> str:
    """The malloc this process runs under, in words for the log."""
    return "mimalloc" if "libmimalloc" in environ.get("LD_PRELOAD", "") else "system malloc"


def bound_kernel_caches(environ) -> None:
    for name in KERNEL_CACHES:
        environ.setdefault(name, KERNEL_CACHE_ENTRIES)


def restart_environment(environ: dict, library: Path | None,
                        platform: str = sys.platform) -> dict | None:
    """The environment to start this process again with, or None to carry on as it is: not
    Linux, no library, opted out with STROP_ALLOCATOR=system, or already under mimalloc."""
    choice = environ.get(ENV, "mimalloc")
    if choice not in ("mimalloc", "system"):
        from strop.errors import StropError

        raise StropError(f"{ENV}={choice}: expected mimalloc (the default) or system")
    if platform != "linux" or library is None or choice == "system":
        return None
    if active_allocator(environ) == "mimalloc":
        return None  # started under it (by us or by the user); never exec twice
    preload = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join([str(library), *preload])
    env.setdefault("MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS)
    return env


def prepare_training_process() -> None:
    """Bound the kernel caches and exec this process again under mimalloc where
    restart_environment says so; returns only when it does not exec. Call it before anything
    imports torch: the work done so far is lost on exec."""
    bound_kernel_caches(os.environ)
    env = restart_environment(dict(os.environ), mimalloc_library())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
