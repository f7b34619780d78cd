"""Chunks of rows handed to worker processes, in order, with a bounded number in flight.

Rendering rows and assembling ids is Python work that holds the GIL, so threads do not run it
in parallel (measured: two threads were no faster than one). Forked processes do: each inherits
the format and the encoder as they are, with no pickling of tokenizers, and sends back numpy
arrays. Where fork is not available (macOS, Windows) the chunks are worked in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# The function the forked workers run: set just before the fork, inherited by the children.
_job: Callable[[Any], Any] | None = None


def _run(item: Any) -> Any:
    assert _job is not None
    return _job(item)


def _child_setup() -> None:
    # A forked child must not use the Rust tokenizer's thread pool, which it inherited unusable.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def can_fork() -> bool:
    return sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()


def ordered_map(job: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """job(item) for each item, in order, on `workers` forked processes (here when 1 or no fork).

    At most 2 x workers items are in flight, so a streamed corpus is never read all at once.
    """
    if workers <= 1 or not can_fork():
        yield from map(job, items)
        return
    global _job
    _job = job
    # Set before the fork so the tokenizers library does not print its fork warning in every
    # child; this process's own setting is put back as soon as the workers exist.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_child_setup)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        pending = []
        for item in items:
            pending.append(pool.apply_async(_run, (item,)))
            if len(pending) > 2 * workers:
                yield pending.pop(0).get()
        for result in pending:
            yield result.get()
    finally:
        pool.terminate()
        pool.join()
        _job = None
