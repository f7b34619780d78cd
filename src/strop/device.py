"""What the machine can do: which device training runs on and whether it has native bf16.

Kept free of heavy imports at module level so config validation stays fast; torch is imported
only when a question needs it.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DeviceCaps:
    cuda: bool
    cuda_bf16: bool
    cpu_bf16: bool  # native bf16 arithmetic (AVX512-BF16, AMX, or Arm BF16), not emulation
    cpu_name: str

    def resolve(self, device: str) -> str:
        """'auto' becomes cuda where a GPU is present, else cpu."""
        if device == "auto":
            return "cuda" if self.cuda else "cpu"
        return device

    def bf16_supported(self, device: str) -> bool:
        return self.cuda_bf16 if self.resolve(device) == "cuda" else self.cpu_bf16


def _cpu_flags() -> tuple[set[str], str]:
    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features"):
                flags.update(value.split())
            elif key == "model name" and value.strip():
                name = value.strip()
    return flags, name


@functools.cache
def detect() -> DeviceCaps:
    import torch

    flags, name = _cpu_flags()
    cpu_bf16 = bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        cpu_bf16 = True  # Apple M2 and later; torch emulates on M1 at a modest cost
    cuda = torch.cuda.is_available()
    cuda_bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    return DeviceCaps(cuda=cuda, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16, cpu_name=name)
