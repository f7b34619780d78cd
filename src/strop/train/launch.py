"""`strop train --nproc N`: the same run through torch's own launcher (torchrun), for a user
who would rather not type `torchrun --standalone --nproc-per-node N -m strop train cfg.yml`.

The launcher runs inside this process (torch.distributed.run's own `run`), not as a child of
it: a SIGTERM or Ctrl-C to `strop train` reaches torchrun's agent, which passes it to every
rank, and a failed rank ends the command with one line instead of torchrun's traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def torchrun(nproc: int, config: Path, overrides: list[str], overwrite: bool) -> int:
    """Run torchrun on this machine and return its exit status (the first failed rank's)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun sets one thread per process when OMP_NUM_THREADS is unset: right on GPUs, slow
    # on a CPU with more cores than processes. Share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // nproc, 1)))
    print(f"starting {nproc} processes: torchrun --standalone --nproc-per-node={nproc} -m strop "
          f"train {config}{' ' + ' '.join(overrides) if overrides else ''}", flush=True)
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "strop", "train",
                       str(config), *overrides, *(["--overwrite"] if overwrite else [])])
    try:
        run(args)
    except ChildFailedError as err:
        # A rank ended by a signal could say nothing itself (SIGKILL: kill -9 or the kernel's
        # out-of-memory killer). SIGTERM is how torchrun stops the others after a failure.
        killed = [(rank, failure) for rank, failure in sorted(err.failures.items())
                  if failure.exitcode < 0 and -failure.exitcode != signal.SIGTERM]
        for rank, failure in killed:
            print(f"error: rank {rank} was ended by {failure.signal_name()}", file=sys.stderr)
        if killed:
            return 128 - killed[0][1].exitcode
        return err.get_first_failure()[1].exitcode  # the rank printed its own error
    except SignalException as err:
        # SIGTERM or SIGINT to this process: the agent passed it on to every rank, which
        # saved a checkpoint and printed the resume command, then stopped them all
        return 128 + int(err.sigval)
    return 0
