"""The config reference: JSON schema for tools, Markdown (docs/config.md) for people.

Both come from the field descriptions in schema.py; a test fails when docs/config.md is stale.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from strop.config.datasets import DatasetConfig, UserFormat
from strop.config.schema import GROUPS, PretrainTokenizer, SpecialTokens, StropConfig


def json_schema() -> dict[str, Any]:
    schema = StropConfig.model_json_schema(by_alias=True, mode="validation")
    schema["title"] = "strop config"
    return schema


def _default(info: Any) -> str:
    if info.is_required():
        return "required"
    value = info.default
    if value is None:
        return ""
    return json.dumps(value) if not isinstance(value, str) else value


def _table(model: type[BaseModel], names: list[str]) -> list[str]:
    rows = ["| key | default | what it does |", "| --- | --- | --- |"]
    for name in names:
        info = model.model_fields[name]
        key = info.alias or name
        description = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_default(info).replace('|', '/')} | {description} |")
    return rows


def markdown_reference() -> str:
    out = ["# strop config reference", "",
           "Generated from `src/strop/config/schema.py` by `strop config-schema --markdown`; "
           "do not edit by hand.", "",
           "Keys are axolotl's, with axolotl's meaning and, where axolotl has one, its default; "
           "where strop differs, the description says so. An unknown key is an error with the "
           "closest known key; an axolotl key strop does not support yet is accepted when it is "
           "left empty and is an error when it asks for something. Keys marked *strop:* are "
           "strop's own.", ""]
    for group, title in GROUPS.items():
        names = [n for n, i in StropConfig.model_fields.items()
                 if (i.json_schema_extra or {}).get("group") == group]
        if not names:
            continue
        out += [f"## {title}", "", *_table(StropConfig, names), ""]
    for title, model in (("One `datasets:` entry", DatasetConfig),
                         ("A prompt format written in YAML (`type:` as a mapping)", UserFormat),
                         ("`special_tokens:`", SpecialTokens),
                         ("`pretrain_tokenizer:`", PretrainTokenizer)):
        out += [f"## {title}", "", *_table(model, list(model.model_fields)), ""]
    return "\n".join(out).rstrip() + "\n"
