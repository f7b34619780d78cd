"""torch.compile with a persistent cache, so a second run of the same model compiles in seconds.

Inductor's FX-graph and autotune caches live under ~/.cache/strop/compile (or
$STROP_COMPILE_CACHE) instead of a temporary directory that is lost after each run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from strop.train.forward import LossModel


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


def compiled(loss_model: LossModel) -> LossModel:
    """The loss model with its decoder (or whole model) compiled."""
    import torch

    enable_persistent_cache()  # before the first compile reads the cache location
    # dynamic=None: the first graph is specialised to the first batch's shape and only a
    # shape change recompiles it with that dimension symbolic. Packed rows padded to
    # sequence_len keep one shape and keep the faster static graph (full fine-tuning of the
    # benchmark Llama at 4 x 1024, one run each: 1183 tokens/s static, 1132 dynamic).
    if loss_model.decoder is not None:
        loss_model.decoder = torch.compile(loss_model.decoder, dynamic=None)
    else:
        loss_model.model = torch.compile(loss_model.model, dynamic=None)
    return loss_model
