"""Which dtypes a run computes and stores in, decided from the config and what a device can do.

- bf16 (true, or auto where the device has native bf16): autocast to bf16; trainable weights
  stay fp32 (the optimizer's master copy); a frozen base under LoRA is held in bf16, which
  halves its memory and costs nothing since autocast would cast it anyway.
- bf16: true on a CPU without native bf16 falls back to fp32 with a note: emulated bf16
  matmuls are not a bit slower there but hundreds of times (a 512 x 2048 x 2048 matmul on an
  AVX2 EPYC: 33 ms in fp32, 14 s in bf16), so a GPU config still runs on a laptop.
- fp16 (GPU only): autocast to fp16 with a gradient scaler; on a CPU it falls back to bf16 (or
  fp32), for the same reason.
- otherwise fp32 throughout.

Pure: the caller hands in what the device can do (strop.device.detect() for this machine, a
GPU's row of the table for `strop plan`), so the same config can be planned for an H100 on a
laptop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from strop.errors import StropError

if TYPE_CHECKING:
    from strop.config.schema import StropConfig
    from strop.device import DeviceCaps


@dataclass(frozen=True)
class Precision:
    device: str  # "cpu" or "cuda"
    compute: torch.dtype  # what autocast computes in (float32 = no autocast); a frozen
    # base under LoRA is held in it too
    scaler: bool  # fp16 needs a gradient scaler
    note: str | None = None  # why the config's precision was not used here

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.compute, "fp32")

    @property
    def compute_bytes(self) -> int:
        return 4 if self.compute == torch.float32 else 2

    def autocast(self):
        if self.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.compute)


def run_device(cfg: StropConfig, caps: DeviceCaps) -> str:
    """The device this machine trains the config on; device: cuda without a GPU is an error
    here, before anything loads (not in the config's rules, which `strop plan` also reads on a
    machine that is not the one the config is for)."""
    device = caps.resolve(cfg.device)
    if device == "cuda" and not caps.cuda:
        raise StropError("device: cuda but no CUDA GPU is visible; use device: auto (or cpu)")
    return device


def decide_precision(cfg: StropConfig, caps: DeviceCaps, device: str) -> Precision:
    native = caps.bf16_supported(device)
    where = "GPU" if device == "cuda" else f"CPU ({caps.cpu_name})"
    if cfg.fp16 and device == "cpu":
        bf16 = native and cfg.bf16 is not False
        compute = torch.bfloat16 if bf16 else torch.float32
        return Precision(device, compute, scaler=False,
                         note=f"fp16 needs a GPU; training on this CPU in "
                              f"{'bf16' if bf16 else 'fp32'} instead")
    if cfg.fp16:
        return Precision(device, torch.float16, scaler=True)
    if cfg.bf16 is True and not native:
        return Precision(device, torch.float32, scaler=False,
                         note=f"bf16: true, but this {where} has no native bf16 (emulated bf16 "
                              "matmuls are hundreds of times slower than fp32); training in "
                              "fp32 instead. bf16: auto says the same without this warning")
    use_bf16 = cfg.bf16 is True or (cfg.bf16 == "auto" and native)
    return Precision(device, torch.bfloat16 if use_bf16 else torch.float32, scaler=False)
