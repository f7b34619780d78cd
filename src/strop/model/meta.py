"""A model's architecture without its weights: its config.json, and the model on the meta device.

`strop plan` and `strop inspect` need shapes, not weights. The config comes from a local
directory or config.json, from the hub when online, or, offline, from the table of popular base
models that strop ships (known_configs.json), so planning a 7B recipe works on a laptop.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strop.errors import StropError

if TYPE_CHECKING:
    import torch.nn as nn
    from transformers import PretrainedConfig

    from strop.config.schema import StropConfig


@functools.cache
def known_configs() -> dict[str, dict[str, Any]]:
    """Hub id -> config.json facts of popular base models, shipped with strop."""
    path = resources.files("strop.model").joinpath("known_configs.json")
    if not path.is_file():
        return {}
    return {k.lower(): v for k, v in json.loads(path.read_text())["models"].items()}


def config_from_source(source: str, trust_remote_code: bool = False,
                       revision: str | None = None) -> PretrainedConfig:
    """config.json from a directory, a config.json file, a hub id, or strop's offline table."""
    from transformers import AutoConfig

    from strop.model.gguf import gguf_config, is_gguf

    if is_gguf(source):
        return gguf_config(source, revision)
    path = Path(source)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict):
            raise StropError(f"{source} is a file strop cannot use as a model: give a model "
                             "directory (config.json + weights), a .gguf file, a config.json, or "
                             "a hub id")
        return _from_dict(data, source)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise StropError(f"{source}: no config.json in this directory; point base_model at a "
                             "Hugging Face model directory")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    known = known_configs().get(source.lower())
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                          revision=revision)
    except (OSError, ValueError) as err:
        if known is not None:
            return _from_dict(known, source)
        raise StropError(f"{source}: cannot read its config.json ({str(err).splitlines()[0]}); "
                         "offline, point base_model (or base_model_config) at a local model "
                         "directory or config.json") from None


def _from_dict(data: dict[str, Any], source: str) -> PretrainedConfig:
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise StropError(f"{source}: config has no model_type; add e.g. \"model_type\": \"llama\"")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise StropError(f"{source}: unknown model_type {model_type!r} ({err})") from None


def resolve_model_config(cfg: StropConfig) -> PretrainedConfig:
    """The architecture a run trains: base_model's config (or base_model_config), with the
    config's model_config overrides; or, building from scratch, model_config alone."""
    overrides = cfg.model_config_dict
    source = cfg.base_model_config or cfg.model_source
    if source is None:
        return _from_dict(overrides, "model_config")
    hf_config = config_from_source(source, cfg.trust_remote_code, cfg.model_revision)
    for key, value in overrides.items():
        if key == "model_type":
            continue
        setattr(hf_config, key, value)
    return hf_config


def meta_model(hf_config: PretrainedConfig, objective: str = "causal_lm",
               trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device: real module tree and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if objective == "masked_lm" else AutoModelForCausalLM
    with torch.device("meta"):
        try:
            return auto.from_config(hf_config, trust_remote_code=trust_remote_code)
        except ValueError as err:
            raise StropError(f"{hf_config.model_type}: no {auto.__name__[9:]} class for this "
                             f"architecture ({str(err).splitlines()[0]})") from None
