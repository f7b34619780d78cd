"""The decoder layers of a model: what FSDP2 shards one by one (strop.train.distributed) and
what `strop plan` counts per shard (strop.plan.params), found the same way for both."""

from __future__ import annotations

import torch.nn as nn


def decoder_layers(model: nn.Module, class_name: str | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every instance of `class_name` (fsdp_config's
    transformer_layer_cls_to_wrap), else of the model's own _no_split_modules classes; a
    listed class nested inside another is part of the outer one. Empty when none is found."""
    classes = {class_name} if class_name else set(_no_split_modules(model))
    found, inside = [], None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        if type(module).__name__ in classes:
            inside = name
            found.append((name, module))
    return found


def _no_split_modules(model: nn.Module) -> list[str]:
    # PEFT's wrapper hides the transformers model one or two levels down.
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return list(names)
    return []
