"""Stop cleanly when asked: rented GPUs get preempted with SIGTERM, people press Ctrl-C.

The first SIGTERM or SIGINT sets a flag; the loop finishes the step it is in, saves a
checkpoint and exits with a message that says how to resume. A second SIGINT raises
KeyboardInterrupt at once; checkpoints are written to a temporary directory and renamed, so
the last complete checkpoint is never damaged.
"""

from __future__ import annotations

import contextlib
import signal
from types import FrameType


class GracefulStop:
    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        print(f"\n{name} received: finishing this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", flush=True)

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread (some embedders) signals cannot be caught: run without.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
