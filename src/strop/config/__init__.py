"""strop's config: schema (fields and docs), rules (cross-field) and load (YAML + overrides)."""

from strop.config.datasets import DatasetConfig, UserFormat
from strop.config.load import LoadedConfig, load_config, load_dict, parse_overrides
from strop.config.schema import StropConfig

__all__ = ["DatasetConfig", "LoadedConfig", "StropConfig", "UserFormat", "load_config",
           "load_dict", "parse_overrides"]
