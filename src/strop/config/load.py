"""Load a config: YAML file + command-line overrides -> a validated, frozen `StropConfig`.

Every key is accounted for before pydantic sees it:
- a key strop knows is validated by the schema;
- an axolotl key strop does not support yet is accepted when its value asks for nothing (empty,
  null, false, or axolotl's own default) and is otherwise a "not supported yet" error;
- anything else is unknown: an error with the closest known key.
All problems are collected and reported together, each with `file:line`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from strop.config.datasets import DatasetConfig, UserFormat
from strop.config.rules import RuleViolations
from strop.config.schema import StropConfig
from strop.config.suggest import closest
from strop.config.yaml_source import KeyPath, YamlDocument, read_yaml
from strop.errors import ConfigError

OVERRIDE = "command line"

# axolotl keys that describe, rather than ask: accepted whatever their value, with a notice.
INFORMATIONAL = {
    "is_llama_derived_model": "strop reads the architecture from the model's config.json",
    "is_mistral_derived_model": "strop reads the architecture from the model's config.json",
    "is_falcon_derived_model": "strop reads the architecture from the model's config.json",
    "is_qwen_derived_model": "strop reads the architecture from the model's config.json",
    "local_rank": "torchrun sets the rank; the config does not",
}

# Hints for axolotl keys people set that strop does not honour (yet).
HINTS = {
    "fsdp": "axolotl's FSDP1 list; for FSDP2 set fsdp_version: 2 (and fsdp_config:), and "
            "launch with torchrun or strop train --nproc N",
    "ddp": "torchrun (or strop train --nproc N) starts DDP by itself; remove ddp",
    "deepspeed": "strop does not use DeepSpeed; remove it to train on one device",
    "max_packed_sequence_len": "removed from axolotl too; use sample_packing: true with sequence_len",
    "xformers_attention": "use attn_implementation: sdpa (or flash_attention_2)",
    "sage_attention": "use attn_implementation: sdpa (or flash_attention_2)",
    "flex_attention": "use attn_implementation: flex_attention",
    "hub_model_id": "push the output_dir yourself with `huggingface-cli upload`",
    "dpo_use_weighting": "WPO weighting is not built; remove it",
    "dataset_shard_num": "use shards / shards_idx on the dataset entry",
    "pretraining_dataset": "list the corpus under datasets with type: completion (and streaming: "
                           "true on the entry for a corpus larger than memory)",
}


@functools.cache
def _axolotl_keys() -> tuple[dict[str, Any], dict[str, Any]]:
    text = resources.files("strop.config").joinpath("axolotl_keys.json").read_text()
    data = json.loads(text)
    return data["top"], data["dataset"]


def _field_keys(model: type[BaseModel]) -> dict[str, str]:
    """Every accepted spelling (field name and alias) -> field name."""
    keys: dict[str, str] = {}
    for name, info in model.model_fields.items():
        keys[name] = name
        if info.alias:
            keys[info.alias] = name
    return keys


def _asks_nothing(value: Any, axolotl_default: Any = None) -> bool:
    if value is None or value is False or value in ("", [], {}):
        return True
    return axolotl_default is not None and value == axolotl_default


@dataclass
class LoadedConfig:
    """A validated config and where each of its values came from."""

    cfg: StropConfig
    path: Path | None
    sources: dict[str, str] = field(default_factory=dict)  # key -> "file:line" | OVERRIDE | "default"
    accepted_empty: list[str] = field(default_factory=list)  # axolotl keys that asked for nothing
    notices: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # what the user wrote, overrides applied


# ------------------------------------------------------------------------------------ overrides


def parse_overrides(args: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--lora_r 16 --learning-rate=1e-4 --sample_packing` -> {lora_r: 16, ...}.

    Values are read as YAML scalars, so they get the same types a file would give them.
    Dotted names reach into mappings: `--model_config.hidden_size 64`.
    """
    out: dict[str, Any] = {}
    i = 0
    args = list(args)
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError([f"{OVERRIDE}: unexpected argument {token!r}; overrides look like "
                               "--key value (e.g. --lora_r 16)"])
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        key = name.replace("-", "_")
        if key in out:
            raise ConfigError([f"{OVERRIDE}: --{name} is given twice ({out[key]!r}, then "
                               f"{parsed!r}); give it once"])
        out[key] = parsed
        i += 1
    return out


def _apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    target: Any = data
    for depth, part in enumerate(parts[:-1]):
        key: Any = int(part) if part.isdigit() and isinstance(target, list) else part
        try:
            nxt = target[key]
        except (KeyError, IndexError, TypeError):
            nxt = None
        if nxt is None:
            if isinstance(target, list):
                raise ConfigError([f"{OVERRIDE}: --{dotted}: no item {part} in "
                                   f"{'.'.join(parts[:depth])}"])
            nxt = target[key] = {}
        if not isinstance(nxt, dict | list):
            raise ConfigError([f"{OVERRIDE}: --{dotted}: {'.'.join(parts[:depth + 1])} is not a "
                               "mapping"])
        target = nxt
    last: Any = parts[-1]
    if isinstance(target, list):
        if not last.isdigit() or int(last) >= len(target):
            raise ConfigError([f"{OVERRIDE}: --{dotted}: no item {last} in the list"])
        last = int(last)
    target[last] = value


# ------------------------------------------------------------------------------- key screening


class _Screen:
    """Sorts the keys of the raw document and collects problems with their positions."""

    def __init__(self, doc: YamlDocument, override_keys: set[str]):
        self.doc = doc
        self.override_keys = override_keys
        self.problems: list[str] = []
        self.accepted_empty: list[str] = []
        self.notices: list[str] = []
        self.suggested: set[KeyPath] = set()  # keys named by a did-you-mean

    def where(self, path: KeyPath) -> str:
        if path and path[0] in self.override_keys:
            return OVERRIDE
        return self.doc.where(path)

    def problem(self, path: KeyPath, message: str) -> None:
        self.problems.append(f"{self.where(path)}: {message}")

    def screen(self, data: dict[str, Any], prefix: KeyPath, model: type[BaseModel],
               axolotl: dict[str, Any], what: str) -> dict[str, Any]:
        known = _field_keys(model)
        clean: dict[str, Any] = {}
        for key, value in data.items():
            path = (*prefix, key)
            shown = _dotted(path)
            if key in known:
                if value is not None:  # `key:` with nothing after it means "default"
                    clean[key] = value
            elif key in INFORMATIONAL and not prefix:
                if not _asks_nothing(value):
                    self.notices.append(f"{shown}: no effect in strop ({INFORMATIONAL[key]})")
            elif key in axolotl:
                if _asks_nothing(value, axolotl[key]):
                    self.accepted_empty.append(shown)
                else:
                    hint = HINTS.get(key, f"remove it or leave it empty; `strop config-schema "
                                          f"--markdown` lists the {what} keys strop supports")
                    self.problem(path, f"{shown} is an axolotl key that strop does not support "
                                       f"yet; {hint}")
            else:
                guess = closest(key, sorted(set(known)))
                if guess:
                    self.suggested.add((*prefix, guess))
                fix = f"did you mean {guess}?" if guess else \
                    f"`strop config-schema --markdown` lists the {what} keys"
                self.problem(path, f"unknown key '{shown}'; {fix}")
        return clean


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _screen_datasets(screen: _Screen, data: dict[str, Any]) -> None:
    _, axolotl_ds = _axolotl_keys()
    for list_key in ("datasets", "test_datasets"):
        entries = data.get(list_key)
        if not isinstance(entries, list):
            continue
        cleaned = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):  # `- path/to/data.jsonl` is a common shorthand slip
                screen.problem((list_key, i), f"{list_key}[{i}] is a bare string; write the "
                               f"entry as a mapping: - {{path: {entry or '...'}, type: <format>}}")
                continue
            if not isinstance(entry, dict):
                cleaned.append(entry)  # the schema reports the wrong type
                continue
            entry = screen.screen(entry, (list_key, i), DatasetConfig, axolotl_ds, "dataset")
            if isinstance(entry.get("type"), dict):
                entry["type"] = screen.screen(entry["type"], (list_key, i, "type"), UserFormat,
                                              {}, "prompt-format")
            cleaned.append(entry)
        data[list_key] = cleaned


# --------------------------------------------------------------------------- pydantic errors

_EXPECTED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "text", "list_type": "a list",
    "dict_type": "a mapping (key: value lines)", "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)", "none_required": "empty",
}


def _key_path(loc: tuple[Any, ...], model: type[BaseModel]) -> tuple[KeyPath, Any]:
    """Drop pydantic's union-branch tags ('list[str]', 'UserFormat', ...) from an error location.

    Returns the key path and the model that holds its last key (for did-you-mean candidates).
    """
    path: list[str | int] = []
    current: Any = model
    holder: Any = model
    for part in loc:
        if isinstance(part, int):
            path.append(part)
            continue
        fields = _field_keys(current) if isinstance(current, type) and \
            issubclass(current, BaseModel) else {}
        if part in fields:
            path.append(part)
            holder = current
            current = _model_in(current.model_fields[fields[part]].annotation)
        elif fields:  # a branch tag; stay on the same model
            nested = _named_model(part)
            if nested is not None:
                current = nested
    return tuple(path), (current if isinstance(current, type) else holder)


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `X | None`, `list[X]` or `X`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _named_model(tag: str) -> type[BaseModel] | None:
    return {"UserFormat": UserFormat, "DatasetConfig": DatasetConfig}.get(tag)


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
                "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "")
        return f"must be {sign} {bound}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length', 1)} item(s)"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"][:1].lower() + err["msg"][1:]


def _format_validation(exc: ValidationError, screen: _Screen, data: dict[str, Any]) -> None:
    grouped: dict[KeyPath, list[dict[str, Any]]] = {}
    for err in exc.errors():
        if err["type"] == "extra_forbidden":  # an unknown key inside a nested mapping
            parent, model = _key_path(err["loc"][:-1], StropConfig)
            key = str(err["loc"][-1])
            shown = _dotted((*parent, key))
            guess = closest(key, sorted(_field_keys(model))) if isinstance(model, type) else None
            fix = f"did you mean {guess}?" if guess else "check the spelling"
            screen.problem(parent, f"unknown key '{shown}'; {fix}")
            continue
        path, _ = _key_path(err["loc"], StropConfig)
        grouped.setdefault(path, []).append(err)
    for path, errs in grouped.items():
        shown = _dotted(path) or "config"
        if any(e["type"] == "missing" for e in errs):
            if path in screen.suggested:  # already reported as a misspelling of this key
                continue
            field_doc = _doc_for(path)
            screen.problems.append(f"{screen.doc.where(path[:-1]) if len(path) > 1 else screen.doc.where(())}: "
                                   f"missing required key {shown}"
                                   + (f": {field_doc}" if field_doc else ""))
            continue
        value = _value_at(data, path)
        reasons = list(dict.fromkeys(_describe(e) for e in errs))
        shown_value = repr(value)
        got = f" (got {shown_value})" if value is not None and not isinstance(value, dict | list) \
            and shown_value not in " ".join(reasons) else ""
        screen.problem(path, f"{shown}: {' or '.join(reasons)}{got}")


def _doc_for(path: KeyPath) -> str:
    if len(path) == 1:
        info = StropConfig.model_fields.get(str(path[0]))
        return info.description if info and info.description else ""
    if len(path) == 3 and path[0] in ("datasets", "test_datasets"):
        info = DatasetConfig.model_fields.get(str(path[2]))
        return info.description if info and info.description else ""
    return ""


def _value_at(data: Any, path: KeyPath) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


# ---------------------------------------------------------------------------------- entry points


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedConfig:
    """Read, screen and validate a YAML config file with command-line overrides."""
    doc = read_yaml(path)
    return load_document(doc, parse_overrides(overrides))


def load_dict(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> LoadedConfig:
    """Validate a config given as a mapping (tests, the demo, programmatic use)."""
    return load_document(YamlDocument(path=None, data=data), overrides or {})


def load_document(doc: YamlDocument, overrides: dict[str, Any]) -> LoadedConfig:
    data = json.loads(json.dumps(doc.data, default=str))  # a private deep copy
    top_override_keys = {k.split(".")[0] for k in overrides}
    for dotted, value in overrides.items():
        _apply_override(data, dotted, value)
    raw = json.loads(json.dumps(data, default=str))

    screen = _Screen(doc, top_override_keys)
    axolotl_top, _ = _axolotl_keys()
    clean = screen.screen(data, (), StropConfig, axolotl_top, "config")
    _screen_datasets(screen, clean)

    cfg: StropConfig | None = None
    try:
        cfg = StropConfig.model_validate(clean)
    except ValidationError as exc:
        _format_validation(exc, screen, clean)
    except RuleViolations as exc:
        for v in exc.violations:
            # a key, or the path to one inside a dataset entry
            screen.problem(v.keys[0] if isinstance(v.keys[0], tuple) else (v.keys[0],), v.message)
    if screen.problems or cfg is None:
        raise ConfigError(screen.problems)

    sources: dict[str, str] = {}
    for name, info in StropConfig.model_fields.items():
        spelled = info.alias if info.alias and info.alias in clean else name
        if spelled in clean:
            sources[name] = screen.where((spelled,))
        elif spelled in raw:
            sources[name] = f"default (left empty at {screen.where((spelled,))})"
        else:
            sources[name] = "default"
    return LoadedConfig(cfg=cfg, path=doc.path, sources=sources,
                        accepted_empty=screen.accepted_empty, notices=screen.notices, raw=raw)
