"""Render a resolved config for `strop validate`: YAML a user can save, each key's source beside it."""

from __future__ import annotations

from typing import Any

import yaml

from strop.config.load import LoadedConfig
from strop.config.schema import StropConfig


def resolved_dict(cfg: StropConfig) -> dict[str, Any]:
    """The config as plain data under the names users write (model_config, not its field name).

    Dataset entries leave out their unset (null) keys: a list of them repeated per entry would
    hide what the entry says.
    """
    data = cfg.model_dump(mode="json", by_alias=True)
    for key in ("datasets", "test_datasets"):
        if data.get(key):
            data[key] = [{k: v for k, v in entry.items() if v is not None} for entry in data[key]]
    return data


def render_resolved(loaded: LoadedConfig) -> str:
    data = resolved_dict(loaded.cfg)
    aliases = {info.alias or name: name for name, info in StropConfig.model_fields.items()}
    head = [f"# resolved config: {loaded.path or '<config>'}",
            "# every key with its value; the comment says where the value came from"]
    lines: list[str] = []
    width = 0
    rendered: list[tuple[str, str]] = []
    for key, value in data.items():
        text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False,
                              allow_unicode=True, width=100).rstrip("\n")
        source = loaded.sources.get(aliases.get(key, key), "default")
        rendered.append((text, source))
        first = text.splitlines()[0]
        width = max(width, min(len(first), 60))
    for text, source in rendered:
        first, *rest = text.splitlines()
        lines.append(f"{first.ljust(width)}  # {source}")
        lines.extend(rest)
    tail: list[str] = []
    if loaded.accepted_empty:
        tail.append("# axolotl keys left empty (they ask for nothing): "
                    + ", ".join(loaded.accepted_empty))
    for notice in loaded.notices:
        tail.append(f"# note: {notice}")
    return "\n".join(head + lines + tail)
