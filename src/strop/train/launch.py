"""`strop train --nproc N`: the same run through torch's own launcher (torchrun), for a user
who would rather not type `torchrun --standalone --nproc-per-node N -m strop train cfg.yml`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun(nproc: int, config: Path, overrides: list[str], overwrite: bool) -> int:
    """Run torchrun on this machine and return its exit status (the first failed rank's)."""
    env = dict(os.environ)
    # torchrun sets one thread per process when OMP_NUM_THREADS is unset: right on GPUs, slow
    # on a CPU with more cores than processes. Share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // nproc, 1)))
    print(f"starting {nproc} processes: torchrun --standalone --nproc-per-node={nproc} -m strop "
          f"train {config}{' ' + ' '.join(overrides) if overrides else ''}", flush=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "strop", "train", str(config), *overrides,
               *(["--overwrite"] if overwrite else [])]
    return subprocess.call(command, env=env)
