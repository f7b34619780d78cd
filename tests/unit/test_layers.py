"""strop's packages import downward only (docs/architecture.md): a package imports the ones in
the layers below it, never one above it nor a sibling of its own layer."""

from __future__ import annotations

import re
from pathlib import Path

import strop

ROOT = Path(strop.__file__).parent
# From the bottom up; packages in one layer do not import each other.
LAYERS = [
    {"errors"}, {"device", "runtime"}, {"config"}, {"precision"}, {"data"}, {"model"},
    {"adapters"}, {"recipe"}, {"train", "plan"}, {"infer"}, {"export", "report"},
    {"demo", "commands"}, {"cli"}, {"__main__", "__init__"},
]
IMPORT = re.compile(r"^\s*(?:from|import) strop\.(\w+)", re.MULTILINE)


def _layer(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
                if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert packages == set().union(*LAYERS)


def test_no_import_runs_up_or_across_a_layer():
    arrows = set()
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        source = parts[0].removesuffix(".py")
        for target in IMPORT.findall(path.read_text()):
            if target != source and _layer(target) >= _layer(source):
                arrows.add(f"{'/'.join(parts)} imports strop.{target}")
    assert sorted(arrows) == []
