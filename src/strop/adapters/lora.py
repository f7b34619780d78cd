"""LoRA (and QLoRA, DoRA, rsLoRA) through PEFT: wrap a loaded model and say what was wrapped.

The adapter is PEFT's own, so what strop saves is what the rest of the ecosystem loads
(`PeftModel.from_pretrained`, vLLM, llama.cpp's converter). A quantized base (load_in_4bit /
load_in_8bit) is prepared for k-bit training first (strop.model.quantize); that is the only
difference between LoRA and QLoRA here.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strop.errors import StropError, first_line
from strop.model.quantize import parameter_count

if TYPE_CHECKING:
    import torch.nn as nn
    from peft import PeftModel

    from strop.config.schema import StropConfig


@dataclass
class AdapterReport:
    """What apply_lora did: printed at the start of a run, and kept in its summary."""

    method: str  # LoRA, DoRA, rsLoRA, rsDoRA
    r: int
    alpha: float
    scaling: float  # alpha / r, or alpha / sqrt(r) for rsLoRA
    wrapped: dict[str, int]  # module suffix -> how many were wrapped: {'q_proj': 32, ...}
    modules_to_save: list[str]
    trainable_params: int
    total_params: int  # the model with its adapter, 4-bit weights counted as parameters
    base_params: int  # the model before adapters: what full fine-tuning would train
    quantized: str | None = None  # "4-bit nf4", "8-bit" or None
    continued_from: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_ratio(self) -> float:
        return self.trainable_params / self.base_params if self.base_params else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_ratio": self.trainable_ratio}

    def render(self) -> str:
        article = "an" if self.quantized and self.quantized.startswith("8") else "a"
        base = f" on {article} {self.quantized} base" if self.quantized else ""
        lines = [f"{self.method} r={self.r} alpha={self.alpha:g} (scale {self.scaling:.4g}){base}"]
        if self.continued_from:
            lines.append(f"  continuing the adapter in {self.continued_from}")
        count = sum(self.wrapped.values())
        per_name = ", ".join(f"{name} x{n}" for name, n in self.wrapped.items())
        lines.append(f"  wrapped {count} modules: {per_name}")
        if self.modules_to_save:
            lines.append(f"  trained in full and saved with the adapter: "
                         f"{', '.join(self.modules_to_save)}")
        lines.append(f"  trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
                     f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%); full "
                     f"fine-tuning would train {self.base_params:,}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def apply_lora(model: nn.Module, cfg: StropConfig) -> tuple[PeftModel, AdapterReport]:
    """Wrap `model` with the config's LoRA adapter (or the one in lora_model_dir, to continue
    training it); base weights frozen, adapter weights trainable and in fp32."""
    from peft import PeftModel

    from strop.adapters.lora_config import build_lora_config, peft_wrap
    from strop.model.quantize import (
        is_quantized,
        prepare_for_kbit_training,
    )

    base_params = parameter_count(model)
    quantized = _quantized_label(model) if is_quantized(model) else None
    if quantized:
        prepare_for_kbit_training(model, gradient_checkpointing=cfg.gradient_checkpointing)
    with warnings.catch_warnings():
        # PEFT asks transformers a deprecated question (is_gradient_checkpointing); not ours.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        if cfg.lora_model_dir:
            adapter_dir = _adapter_dir(cfg.lora_model_dir, "lora_model_dir")
            try:
                peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
            except (RuntimeError, ValueError, KeyError) as err:
                raise StropError(f"lora_model_dir {adapter_dir}: this adapter does not fit "
                                 f"base_model ({first_line(err, 300)}); was it trained on a different "
                                 "base model or vocabulary?") from None
        else:
            peft_model = peft_wrap(model, build_lora_config(model, cfg),
                                   autocast_adapter_dtype=True)
    _trainable_in_fp32(peft_model)
    report = _report(peft_model, base_params, quantized, cfg)
    return peft_model, report


def _adapter_dir(path: str | Path, key: str) -> Path:
    directory = Path(path).expanduser()
    if not (directory / "adapter_config.json").is_file():
        what = "does not exist" if not directory.exists() else "has no adapter_config.json"
        raise StropError(f"{key}: {directory} {what}; point it at a PEFT adapter directory (a run's "
                         "output_dir or one of its checkpoint-N directories)")
    return directory


def _trainable_in_fp32(model: nn.Module) -> None:
    # PEFT keeps LoRA A/B in fp32 on a bf16 base (autocast_adapter_dtype), but copies of
    # modules_to_save inherit the base's dtype; an optimizer stepping bf16 weights loses small
    # updates to rounding, so every trainable weight is fp32.
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32 and param.is_floating_point():
            param.data = param.data.float()


def _quantized_label(model: nn.Module) -> str:
    from strop.model.quantize import quantized_linear_layers

    layer = quantized_linear_layers(model)[0]
    if type(layer).__name__ == "Linear8bitLt":
        return "8-bit"
    return f"4-bit {layer.weight.quant_type}"


def wrapped_module_counts(peft_model: nn.Module) -> dict[str, int]:
    """Module suffix -> how many LoRA layers wrap a module of that name."""
    from peft.tuners.lora import LoraLayer

    counts = Counter(name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules()
                     if isinstance(module, LoraLayer))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _report(peft_model: PeftModel, base_params: int, quantized: str | None,
            cfg: StropConfig) -> AdapterReport:
    config = peft_model.peft_config["default"]
    r, alpha = config.r, config.lora_alpha
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    method = ("rs" if config.use_rslora else "") + ("DoRA" if config.use_dora else "LoRA")
    notes = []
    continued = None
    if cfg.lora_model_dir:
        continued = str(cfg.lora_model_dir)
        if (r, alpha) != (cfg.lora_r, cfg.lora_alpha):
            notes.append(f"the adapter's own r={r}, alpha={alpha:g} apply, not the config's "
                         f"lora_r={cfg.lora_r}, lora_alpha={cfg.lora_alpha}")
    return AdapterReport(
        method=method, r=r, alpha=alpha, scaling=scaling,
        wrapped=wrapped_module_counts(peft_model),
        modules_to_save=sorted(config.modules_to_save or []),
        trainable_params=parameter_count(peft_model, trainable_only=True),
        total_params=parameter_count(peft_model), base_params=base_params,
        quantized=quantized, continued_from=continued, notes=notes)


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter directory, as a dict."""
    return json.loads((_adapter_dir(directory, "adapter") / "adapter_config.json").read_text())

