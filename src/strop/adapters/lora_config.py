"""The config's lora_* keys -> PEFT's LoraConfig, resolved against a concrete model.

Kept apart from applying adapters so `strop plan` and `strop inspect` can count what LoRA would
train on a meta-device model (no weights) with exactly the targets training would use.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from typing import TYPE_CHECKING

from strop.errors import StropError

if TYPE_CHECKING:
    import torch.nn as nn
    from peft import LoraConfig

    from strop.config.schema import StropConfig


def _linear_types() -> tuple[type, ...]:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    types: list[type] = [nn.Linear, Conv1D]
    # Quantized linears count as linear layers for lora_target_linear. A model can only hold
    # them if bitsandbytes was imported to load it, so inspect and plan never pay its import.
    if "bitsandbytes" in sys.modules:
        bnb = sys.modules["bitsandbytes"]
        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def output_head_names(model: nn.Module) -> set[str]:
    """Full names of the output projection (never a LoRA target under lora_target_linear)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer (plain, Conv1D or quantized), output head included."""
    types = _linear_types()
    return [name for name, module in model.named_modules() if isinstance(module, types)]


def resolve_targets(model: nn.Module, cfg: StropConfig) -> list[str]:
    """Full names of the modules LoRA will wrap; an error when the targets match nothing."""
    heads = output_head_names(model)
    linears = [n for n in linear_module_names(model) if n not in heads]
    targets = cfg.lora_target_modules
    if cfg.lora_target_linear:
        chosen = set(linears)
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise StropError(f"lora_target_modules: {targets!r} is not a valid regex ({err}); "
                             "give a list of module names or a valid regex") from None
        chosen = {n for n in linears if pattern.fullmatch(n)}
    else:
        wanted = set(targets or [])
        chosen = {n for n in linears if n.rsplit(".", 1)[-1] in wanted or n in wanted}
        missing = sorted(w for w in wanted
                         if not any(n.rsplit(".", 1)[-1] == w or n == w for n in linears))
        if missing and chosen:
            raise StropError(f"lora_target_modules: {', '.join(missing)} match no linear layer of "
                             f"this model; its linear layers are: "
                             f"{', '.join(sorted(linear_suffix_counts_from(linears)))}")
    if cfg.peft_layers_to_transform:
        layers = set(cfg.peft_layers_to_transform)
        chosen = {n for n in chosen if _layer_index(n) in layers}
    if not chosen:
        raise StropError(f"lora_target_modules: {targets!r} matches no linear layer of this model; "
                         f"its linear layers are: {', '.join(sorted(linear_suffix_counts_from(linears)))}"
                         " (or set lora_target_linear: true)")
    return sorted(chosen)


def linear_suffix_counts_from(names: list[str]) -> Counter[str]:
    return Counter(name.rsplit(".", 1)[-1] for name in names)


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def build_lora_config(model: nn.Module, cfg: StropConfig) -> LoraConfig:
    """PEFT's LoraConfig for this model and config, with explicit full-name targets."""
    from peft import LoraConfig, TaskType

    targets = resolve_targets(model, cfg)
    init = cfg.peft_init_lora_weights
    fan_in_fan_out = cfg.lora_fan_in_fan_out
    if fan_in_fan_out is None:  # GPT-2's Conv1D stores weights (in, out); PEFT must know
        from transformers.pytorch_utils import Conv1D

        modules = dict(model.named_modules())
        fan_in_fan_out = any(isinstance(modules[t], Conv1D) for t in targets)
    task = TaskType.CAUSAL_LM if cfg.objective == "causal_lm" else None
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        # Full names, anchored: PEFT matches a list by suffix, so 'model.layers.0.mlp.up_proj'
        # as a regex keeps exactly the modules resolved above.
        target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$",
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=list(cfg.lora_modules_to_save) if cfg.lora_modules_to_save else None,
        use_dora=bool(cfg.peft_use_dora),
        use_rslora=bool(cfg.peft_use_rslora),
        init_lora_weights=True if init is None else init,
        bias="none",
        task_type=task,
    )


def peft_wrap(model: nn.Module, lora_config: LoraConfig, **kwargs):
    """PEFT's get_peft_model, without the deprecation notice PEFT triggers in transformers
    (it asks `is_gradient_checkpointing`); the notice is addressed to PEFT, not to our users."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, lora_config, **kwargs)
