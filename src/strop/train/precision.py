"""Which dtypes a run computes and stores in, decided once from the config and the device.

- bf16 (true, or auto where the device has native bf16): autocast to bf16; trainable weights
  stay fp32 (the optimizer's master copy); a frozen base under LoRA is held in bf16, which
  halves its memory and costs nothing since autocast would cast it anyway.
- fp16 (GPU only): autocast to fp16 with a gradient scaler; on a CPU it falls back to bf16 (or
  fp32) with a warning, so a GPU config still runs on a laptop.
- otherwise fp32 throughout.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from strop.config.schema import StropConfig
from strop.device import detect


@dataclass(frozen=True)
class Precision:
    device: str  # "cpu" or "cuda"
    compute: torch.dtype  # what autocast computes in (float32 = no autocast)
    frozen_weights: torch.dtype  # dtype of frozen base weights (LoRA)
    scaler: bool  # fp16 needs a gradient scaler

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.compute, "fp32")

    def autocast(self):
        if self.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.compute)


def resolve_precision(cfg: StropConfig) -> Precision:
    caps = detect()
    device = caps.resolve(cfg.device)
    bf16_ok = caps.bf16_supported(device)
    if cfg.fp16 and device == "cpu":
        fallback = "bf16" if bf16_ok and cfg.bf16 is not False else "fp32"
        warnings.warn(f"fp16 needs a GPU; training on this CPU in {fallback} instead", stacklevel=2)
        compute = torch.bfloat16 if fallback == "bf16" else torch.float32
        return Precision(device, compute, compute, scaler=False)
    if cfg.fp16:
        return Precision(device, torch.float16, torch.float16, scaler=True)
    use_bf16 = cfg.bf16 is True or (cfg.bf16 == "auto" and bf16_ok)
    compute = torch.bfloat16 if use_bf16 else torch.float32
    if device == "cuda" and cfg.tf32 in (True, "auto"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Precision(device, compute, compute, scaler=False)
