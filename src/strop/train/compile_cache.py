"""torch.compile with a persistent cache, so a second run of the same model compiles in seconds.

Inductor's FX-graph and autotune caches live under ~/.cache/strop/compile (or
$STROP_COMPILE_CACHE) instead of a temporary directory that is lost after each run.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "strop" / "compile"
    return Path(os.environ.get("STROP_COMPILE_CACHE", default))


def enable_persistent_cache() -> Path:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    # Importing torch's compiler writes its default (a per-user temporary directory) into
    # TORCHINDUCTOR_CACHE_DIR, so that value means "not chosen"; a user's own choice wins.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path
