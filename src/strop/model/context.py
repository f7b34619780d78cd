"""Does the config's sequence_len fit the model's context? Read from its config.json only, so it
runs before any weights load (`strop validate`, and `strop train` before loading)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strop.errors import StropError

if TYPE_CHECKING:
    from strop.config.schema import StropConfig


def context_length(hf_config) -> int | None:
    """The longest sequence the model's positions cover: max_position_embeddings (n_positions
    for GPT-2), times the RoPE scaling factor when the config stretches it."""
    length = getattr(hf_config, "max_position_embeddings", None) or \
        getattr(hf_config, "n_positions", None)
    if not length:
        return None
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if factor and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        # Models trained with scaling (Llama 3.1's "llama3") already state the stretched length.
        original = scaling.get("original_max_position_embeddings")
        if original and original * factor > length:
            length = int(original * factor)
    return int(length)


def check_sequence_len(cfg: StropConfig, hf_config=None) -> None:
    """One line with the fix when sequence_len exceeds what the model's positions cover."""
    if hf_config is None:
        from strop.model.meta import resolve_model_config

        hf_config = resolve_model_config(cfg)
    limit = context_length(hf_config)
    if limit and cfg.sequence_len > limit:
        source = cfg.model_source or "model_config"
        fix = f"set sequence_len: {limit} or less"
        if cfg.from_scratch:
            fix += f", or model_config.max_position_embeddings: {cfg.sequence_len}"
        raise StropError(f"sequence_len: {cfg.sequence_len} is longer than the {limit} positions "
                         f"{source} has (max_position_embeddings); {fix}")


def check_before_loading(cfg: StropConfig) -> None:
    """For `strop validate`: the check when the model's config can be read here; a model it
    cannot read yet (offline hub id) is checked again when training loads it."""
    from strop.model.meta import resolve_model_config

    try:
        hf_config = resolve_model_config(cfg)
    except StropError:
        return
    check_sequence_len(cfg, hf_config)
