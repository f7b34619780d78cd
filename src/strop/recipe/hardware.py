"""Devices a run could train on: the shipped GPU table, the price table, and this machine's CPU.

Both tables are data files beside this module (gpus.json, prices.json) that a user can read and
edit; `--prices FILE` points at one's own price table with the same layout. The CPU is not in a
table: its speed is measured with a short bf16 (or fp32) matmul, and its memory is what the
machine has.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from strop.errors import StropError

MiB = 2**20


@dataclass(frozen=True)
class Device:
    name: str
    kind: str                       # "cuda" or "cpu"
    memory_bytes: float
    bf16_flops: float | None        # dense peak (GPU) or measured (CPU), FLOP/s
    fp16_flops: float | None
    fp32_flops: float
    prices: dict[str, float]        # provider -> USD per device-hour
    link: str | None = None         # how devices of the kind talk in one node (interconnects.json)

    @property
    def bf16(self) -> bool:
        return self.bf16_flops is not None

    def peak_flops(self, compute_bytes: int, fp16: bool = False) -> float:
        if compute_bytes == 2:
            if fp16 and self.fp16_flops:
                return self.fp16_flops
            return self.bf16_flops or self.fp16_flops or self.fp32_flops
        return self.fp32_flops


def read_json(name: str) -> dict[str, Any]:
    return json.loads(resources.files("strop.recipe").joinpath(name).read_text())


def load_prices(path: str | Path | None = None) -> dict[str, Any]:
    """The price table: strop's snapshot, or a user's file with the same layout."""
    if path is None:
        return read_json("prices.json")
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise StropError(f"--prices {path}: cannot read it ({err.strerror}); give a JSON file "
                         "laid out like strop's prices.json") from None
    except json.JSONDecodeError as err:
        raise StropError(f"--prices {path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data.get("prices"), dict):
        raise StropError(f"--prices {path}: no \"prices\" object; lay it out like strop's "
                         "prices.json: {\"prices\": {\"H100 80GB\": {\"RunPod\": 2.69}}}")
    return data


def gpu_table(prices: dict[str, Any] | None = None) -> dict[str, Device]:
    """Every GPU strop knows, with prices from `prices` (strop's own table by default)."""
    prices = prices if prices is not None else load_prices()
    table = {}
    for name, spec in read_json("gpus.json")["gpus"].items():
        tf = 1e12
        table[name] = Device(
            name=name, kind="cuda", memory_bytes=spec["memory_mib"] * MiB,
            bf16_flops=spec["bf16_tflops"] * tf if spec["bf16_tflops"] else None,
            fp16_flops=spec["fp16_tflops"] * tf if spec["fp16_tflops"] else None,
            fp32_flops=spec["fp32_tflops"] * tf,
            prices={k: float(v) for k, v in prices.get("prices", {}).get(name, {}).items()},
            link=spec.get("link"))
    return table


def find_gpu(name: str, table: dict[str, Device]) -> Device:
    """A GPU by its name or an alias, any case; an unknown name lists the known ones."""
    wanted = name.lower().replace(" ", "").replace("_", "-")
    aliases = read_json("gpus.json")["gpus"]
    for gpu_name, spec in aliases.items():
        names = [gpu_name.lower().replace(" ", "")] + [a.replace("_", "-") for a in spec["aliases"]]
        if wanted in names and gpu_name in table:
            return table[gpu_name]
    raise StropError(f"--gpu {name}: unknown GPU; known: {', '.join(table)} (or cpu)")


def measure_cpu_matmul(dtype_bytes: int = 2, size: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of this CPU on a square matmul in bf16 (2) or fp32 (4), on every thread torch
    uses. Short and rough on purpose: it sets the scale of CPU estimates, nothing more."""
    import torch

    dtype = torch.bfloat16 if dtype_bytes == 2 else torch.float32
    generator = torch.Generator().manual_seed(0)  # never the global one: runs must not shift
    a = torch.randn(size, size, dtype=dtype, generator=generator)
    b = torch.randn(size, size, dtype=dtype, generator=generator)
    torch.matmul(a, b)  # first call selects and compiles the kernel
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        runs += 1
    elapsed = time.perf_counter() - start
    return 2.0 * size**3 * runs / elapsed


def cpu_memory_bytes() -> float:
    """Memory available to a process now (MemAvailable), or total physical memory."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def this_cpu(bf16: bool, measure: bool = True) -> Device:
    """This machine's CPU as a Device, its speed measured by a quick matmul."""
    from strop.device import detect

    caps = detect()
    fp32 = measure_cpu_matmul(4) if measure else 0.0
    low = measure_cpu_matmul(2) if measure and bf16 else None
    return Device(name=f"this CPU ({caps.cpu_name}, {os.cpu_count()} cores)", kind="cpu",
                  memory_bytes=cpu_memory_bytes(), bf16_flops=low, fp16_flops=None,
                  fp32_flops=fp32, prices={})


def device_peak_flops(device: str, precision: str) -> float | None:
    """Peak FLOP/s of the device a run trains on, for its MFU figure: the table's dense peak
    for a known GPU (matched by name), this CPU's measured matmul rate, None when unknown."""
    compute_bytes = 4 if precision == "fp32" else 2
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name().lower()
        for gpu in gpu_table({}).values():
            words = gpu.name.lower().replace("gb", "").split()
            if all(word in name for word in words):
                return gpu.peak_flops(compute_bytes, fp16=precision == "fp16")
        return None
    return this_cpu(bf16=compute_bytes == 2).peak_flops(compute_bytes)
