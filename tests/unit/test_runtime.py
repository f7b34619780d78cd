"""How a training process is set up before torch loads: when it starts itself again under
mimalloc and with what environment, and its kernel caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from strop.errors import StropError
from strop.runtime import (
    active_allocator,
    bound_kernel_caches,
    mimalloc_library,
    restart_environment,
)

LIB = Path("/venv/site-packages/cmeel.prefix/lib/libmimalloc.so")


def test_restarts_with_the_library_first_and_the_users_preloads_kept():
    env = restart_environment({"LD_PRELOAD": "/opt/libmine.so", "HOME": "/h"}, LIB)
    assert env["LD_PRELOAD"] == f"{LIB}:/opt/libmine.so"
    assert env["HOME"] == "/h"
    assert env["MIMALLOC_PURGE_DELAY"] == "1000"
    assert active_allocator(env) == "mimalloc"
    assert active_allocator({}) == "system malloc"


def test_the_users_mimalloc_settings_win():
    env = restart_environment({"MIMALLOC_PURGE_DELAY": "-1"}, LIB)
    assert env["MIMALLOC_PURGE_DELAY"] == "-1"


@pytest.mark.parametrize("environ, library, platform", [
    ({"LD_PRELOAD": str(LIB)}, LIB, "linux"),                 # already restarted: never twice
    ({"LD_PRELOAD": "/usr/lib/libmimalloc.so.2"}, LIB, "linux"),  # the user preloaded one
    ({"STROP_ALLOCATOR": "system"}, LIB, "linux"),            # opted out
    ({}, None, "linux"),                                       # wheel not installed
    ({}, LIB, "darwin"),                                       # LD_PRELOAD is Linux's
])
def test_carries_on_as_it_is(environ, library, platform):
    assert restart_environment(environ, library, platform) is None


def test_an_unknown_choice_is_an_error_naming_the_variable():
    with pytest.raises(StropError, match="STROP_ALLOCATOR=jemalloc"):
        restart_environment({"STROP_ALLOCATOR": "jemalloc"}, LIB, "darwin")


def test_kernel_caches_are_bounded_unless_the_user_set_them():
    environ = {"LRU_CACHE_CAPACITY": "2048"}
    bound_kernel_caches(environ)
    assert environ == {"LRU_CACHE_CAPACITY": "2048", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux")
def test_the_dependency_ships_a_library_python_runs_under():
    import subprocess
    import sys

    library = mimalloc_library()
    assert library is not None
    probe = "print('libmimalloc' in open('/proc/self/maps').read())"
    done = subprocess.run([sys.executable, "-c", probe], env={"LD_PRELOAD": str(library)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
