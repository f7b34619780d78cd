"""Read a YAML config and remember where each key was written.

Errors about a key should point at `file:line`, so the document is composed once into nodes
(which carry marks) and once into plain Python values. Duplicate keys, which PyYAML would
silently resolve to the last one, are reported instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from strop.errors import ConfigError

KeyPath = tuple[str | int, ...]


@dataclass
class YamlDocument:
    path: Path | None
    data: dict[str, Any]
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def where(self, key_path: KeyPath) -> str:
        """`file:line` for a key (or its nearest written parent), or just the file."""
        name = str(self.path) if self.path else "<config>"
        probe = tuple(key_path)
        while probe:
            if probe in self.lines:
                return f"{name}:{self.lines[probe]}"
            probe = probe[:-1]
        return name


def _index_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int], dups: list[str],
                 path: Path | None) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                shown = ".".join(str(p) for p in (*prefix, key))
                dups.append(f"{path or '<config>'}:{line}: key '{shown}' is written twice "
                            f"(first on line {seen[key]}); keep one of them")
            seen[key] = line
            lines[(*prefix, key)] = line
            _index_lines(value_node, (*prefix, key), lines, dups, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*prefix, i)] = item.start_mark.line + 1
            _index_lines(item, (*prefix, i), lines, dups, path)


def _syntax_error(path: Path | None, err: yaml.YAMLError) -> ConfigError:
    name = str(path) if path else "<config>"
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None:
        return ConfigError([f"{name}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: "
                            f"{problem}; fix the YAML at that position"])
    return ConfigError([f"{name}: YAML syntax error: {problem}"])


# A config is a page of keys. These bounds keep a hostile or broken file (a "billion laughs" of
# nested aliases expands exponentially once its values are copied) from eating the machine.
MAX_BYTES = 1 << 20
MAX_VALUES = 100_000


def expanded_size(node: yaml.Node, memo: dict[int, int] | None = None) -> int:
    """How many values the document holds once every alias is expanded, computed without
    expanding (each shared node is sized once)."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(expanded_size(item, memo) for item in node.value)
    memo[id(node)] = size
    return size


def parse_yaml_text(text: str, path: Path | None = None) -> YamlDocument:
    name = str(path) if path else "<config>"
    if len(text) > MAX_BYTES:
        raise ConfigError([f"{name}: {len(text):,} characters is not a config (at most "
                           f"{MAX_BYTES:,}); point datasets at data files instead of inlining"])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and expanded_size(root) > MAX_VALUES:
            raise ConfigError([f"{name}: its YAML aliases (&anchor / *alias) expand to more than "
                               f"{MAX_VALUES:,} values; write the values out or use fewer "
                               "nested aliases"])
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return_error = _syntax_error(path, err)
        raise return_error from None
    except RecursionError:
        raise ConfigError([f"{name}: the YAML is nested too deeply to be a config"]) from None
    if root is None or data is None:
        raise ConfigError([f"{name}: the config is empty; it needs at least base_model "
                           "(or model_config to build a model from scratch) and datasets"])
    if not isinstance(data, dict):
        kind = type(data).__name__
        kind = {"list": "a list", "str": "a single string", "int": "a number",
                "float": "a number", "bool": "a boolean"}.get(kind, kind)
        raise ConfigError([f"{name}: the config must be a mapping of keys to values "
                           f"(key: value lines), but the file holds {kind}"])
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError([f"{name}: key {k!r} is not a name; config keys are words such as "
                           "lora_r" for k in bad_keys])
    lines: dict[KeyPath, int] = {}
    dups: list[str] = []
    _index_lines(root, (), lines, dups, path)
    if dups:
        raise ConfigError(dups)
    return YamlDocument(path=path, data=data, lines=lines)


def read_yaml(path: str | Path) -> YamlDocument:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: no such file; check the path (relative paths are taken "
                           f"from {Path.cwd()})"])
    if path.is_dir():
        raise ConfigError([f"{path}: is a directory; give the path of a .yml config file"])
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is dropped
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: not UTF-8 text (byte {err.start}); save the config as "
                           "UTF-8"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read the file: {err.strerror}"]) from None
    return parse_yaml_text(text, path)
