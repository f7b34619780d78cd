"""The lock is what `make demo`, `make test` and CI install: it must agree with pyproject.toml,
and this environment must be the one it describes."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("strop_lock_tool", REPO / "tools" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    lines += lock.requirement_lines(REPO / "requirements-models.txt")
    return [Requirement(line) for line in lines]


def test_every_declared_dependency_is_pinned_within_its_range():
    pinned = lock.pins()
    env = default_environment()
    problems = []
    for req in _declared():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        version = pinned.get(lock.normalise(req.name))
        if version is None:
            problems.append(f"{req.name} is not in requirements.lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} in the lock is outside {req}")
    assert not problems, "; ".join(problems) + " -- run `make lock`"


def test_lock_was_resolved_from_the_current_pyproject():
    assert lock.recorded_digest() == lock.inputs_digest(), (
        "pyproject.toml's dependencies or requirements-models.txt changed since requirements.lock "
        "was written: run `make lock`, then `make test`")


def test_lock_pins_exact_versions_only():
    for line in lock.requirement_lines(lock.LOCK):
        name, sep, version = line.partition("==")
        assert sep and version and "+" not in version and ";" not in line, line


def test_this_environment_is_the_locked_one():
    """What `make` installed is what the lock says (a drifted .venv fails here, not later)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("not running in the project's .venv")
    drift = []
    for name, version in lock.pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra this environment was not set up with
        if installed.split("+", 1)[0] != version:
            drift.append(f"{name} {installed} (lock: {version})")
    assert not drift, "installed versions differ from requirements.lock: " + ", ".join(drift)
