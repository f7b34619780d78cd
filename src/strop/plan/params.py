"""Parameter counts of the model a run trains, read off the meta-device model.

Counting on the real module tree (built on the meta device, no weights) rather than from a
formula keeps biases, q/k norms, tied heads and odd families exact. LoRA is applied with
PEFT's own `get_peft_model` and strop's `build_lora_config`, so the adapter count is what
training will create, target matching included.

The storage dtype of every parameter follows one policy (`storage_policy`), shared with the
memory math; see strop.plan.memory for why each choice is made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

    from strop.config.schema import StropConfig


@dataclass(frozen=True)
class LoraModule:
    """One linear layer LoRA wraps: its input width and rank (for activation memory)."""

    name: str
    in_features: int
    out_features: int
    rank: int


@dataclass(frozen=True)
class LayerCounts:
    """One decoder layer: the unit FSDP2 shards and gathers (strop wraps by decoder layer)."""

    params: int                 # base parameters (adapters not included)
    quantized: int              # of those, linear weights stored in 4 or 8 bits
    added: int                  # trainable parameters PEFT adds to it (LoRA A and B, saved copies)


@dataclass(frozen=True)
class ParamCounts:
    total: int                  # parameters of the base model (adapters not included)
    trainable: int              # what the optimizer updates
    adapter: int                # LoRA A and B matrices (0 for full training)
    modules_to_save: int        # trainable copies of whole modules kept beside frozen originals
    quantized: int              # base linear weights stored in 4 or 8 bits
    linear_weights: int         # parameters of nn.Linear modules (biases included), head included
    linear_weights_trainable: int  # of those, trainable (full) / adapter and saved-module linears
    head: int                   # the output projection (shared with the embedding when tied)
    embedding: int
    norms_and_biases: int       # 1-D parameters (norm weights, biases)
    largest_trainable: int      # elements of the biggest trainable tensor
    trainable_shapes: tuple[tuple[int, ...], ...] = ()
    lora_modules: tuple[LoraModule, ...] = ()
    quantized_linears: int = 0  # how many linear layers are quantized
    quantized_rows: int = 0     # their output rows (8-bit keeps one fp32 scale per row)
    layers: tuple[LayerCounts, ...] = ()  # the decoder layers, in order (empty: none found)

    def by_dtype(self, mode: str, compute_bytes: int) -> dict[str, int]:
        """Parameters per storage dtype under strop's policy (see storage_policy)."""
        frozen, trainable_name = storage_policy(compute_bytes)
        counts: Counter[str] = Counter()
        counts[trainable_name] += self.trainable
        # Under LoRA the whole base stays (modules_to_save keep their frozen originals beside
        # the trainable copies counted above); under full training nothing is frozen.
        frozen_fp = 0 if mode == "full" else self.total - self.quantized
        if self.quantized:
            counts["nf4" if mode == "qlora" else "int8"] += self.quantized
            # strop.model.quantize keeps a k-bit base's norms in fp32 for stability.
            counts["float32"] += self.norms_and_biases
            frozen_fp -= self.norms_and_biases
        if frozen_fp:
            counts[frozen] += frozen_fp
        return {k: v for k, v in counts.items() if v}


_DTYPE_NAMES = {4: "float32", 2: "bfloat16"}


def storage_policy(compute_bytes: int) -> tuple[str, str]:
    """(dtype of frozen floating-point parameters, dtype of trainable ones).

    Trainable parameters are kept in fp32 (they are their own master copy; autocast makes the
    low-precision copies). A LoRA base is frozen in the compute dtype, and so are a k-bit base's
    embeddings and head (strop.model.quantize casts only its norms to fp32, unlike PEFT's
    prepare_model_for_kbit_training, which casts all of them).
    """
    return _DTYPE_NAMES.get(compute_bytes, "float32"), "float32"


def count_params(model: nn.Module, cfg: StropConfig) -> ParamCounts:
    """Counts for `cfg` on `model` (a meta-device model from strop.model.meta.meta_model)."""
    import torch
    import torch.nn as nn

    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_module = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head_ids = {id(p) for p in head_module.parameters()} if head_module is not None else set()
    embed_ids = {id(p) for p in embed_module.parameters()} if embed_module is not None else set()

    seen: set[int] = set()
    total = linear = head = embedding = small = 0
    quantized = quantized_linears = quantized_rows = 0
    quantize = cfg.load_in_4bit or cfg.load_in_8bit
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue  # tied weights are stored once
            seen.add(id(param))
            n = param.numel()
            total += n
            if id(param) in head_ids:
                head += n
            if id(param) in embed_ids:
                embedding += n
            if param.dim() <= 1:
                small += n
            if isinstance(module, nn.Linear):
                linear += n
                # bitsandbytes quantizes every linear weight but the output head (transformers
                # keeps the head in floating point); biases stay in floating point.
                if quantize and module is not head_module and param is module.weight:
                    quantized += n
                    quantized_linears += 1
                    quantized_rows += module.out_features

    if not cfg.uses_lora:
        shapes = tuple(tuple(p.shape) for p in _unique_params(model))
        return ParamCounts(
            total=total, trainable=total, adapter=0, modules_to_save=0, quantized=quantized,
            linear_weights=linear, linear_weights_trainable=linear, head=head,
            embedding=embedding, norms_and_biases=small,
            largest_trainable=max((p.numel() for p in _unique_params(model)), default=0),
            trainable_shapes=shapes, quantized_linears=quantized_linears,
            quantized_rows=quantized_rows, layers=_layer_counts(model, cfg, quantize))

    from peft.tuners.lora import LoraLayer

    from strop.adapters.lora_config import build_lora_config, peft_wrap

    lora_config = build_lora_config(model, cfg)
    with torch.device("meta"):
        peft_model = peft_wrap(model, lora_config)
    adapter = saved = trainable_linear = 0
    trainable_params = [p for p in _unique_params(peft_model) if p.requires_grad]
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_" in name:
            adapter += param.numel()
        else:
            saved += param.numel()
    loras = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
            rank = module.r["default"]
            loras.append(LoraModule(name, module.in_features, module.out_features, rank))
            trainable_linear += rank * (module.in_features + module.out_features)
    for name, module in peft_model.named_modules():
        if isinstance(module, nn.Linear) and "modules_to_save" in name:
            trainable_linear += sum(p.numel() for p in module.parameters())
    return ParamCounts(
        total=total, trainable=adapter + saved, adapter=adapter, modules_to_save=saved,
        quantized=quantized, linear_weights=linear, linear_weights_trainable=trainable_linear,
        head=head, embedding=embedding, norms_and_biases=small,
        largest_trainable=max((p.numel() for p in trainable_params), default=0),
        trainable_shapes=tuple(tuple(p.shape) for p in trainable_params),
        lora_modules=tuple(loras),
        quantized_linears=quantized_linears, quantized_rows=quantized_rows,
        layers=_layer_counts(peft_model, cfg, quantize))


def _layer_counts(model: nn.Module, cfg: StropConfig, quantize: bool) -> tuple[LayerCounts, ...]:
    """Counts per decoder layer, found as FSDP2 wrapping finds them: instances of the class
    fsdp_config.transformer_layer_cls_to_wrap names, else of the model's _no_split_modules."""
    import torch.nn as nn

    from strop.model.layers import decoder_layers

    named = cfg.fsdp.transformer_layer_cls_to_wrap if cfg.fsdp else None
    out = []
    for _, module in decoder_layers(model, named):
        linear = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
        params = quantized = added = 0
        for param_name, param in module.named_parameters():
            if "lora_" in param_name or "modules_to_save" in param_name:
                added += param.numel()
                continue
            params += param.numel()
            if quantize and id(param) in linear:
                quantized += param.numel()
        out.append(LayerCounts(params, quantized, added))
    return tuple(out)


def _unique_params(model: nn.Module):
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            yield param
