"""Peak memory per rank of a 2-process FSDP2 run with and without
`fsdp_config.cpu_ram_efficient_loading`, on SmolLM2-135M-Instruct (a real model).

Without it every rank reads the whole model before FSDP2 shards it; with it rank 0 alone reads
it and the other ranks build the model on the meta device and receive their shards from rank 0.
Runs: full fine-tuning and LoRA (r16, every linear), 2 steps each, torchrun with gloo on this
CPU, the model as a Hugging Face directory (strop.demo.smollm2.hf_dir). Each rank's peak
resident memory is read from /proc/<pid>/status (VmHWM, the kernel's high-water mark) while the
run goes on, through setup (until rank 0 prints that training starts) and through the whole
run; the final losses show both runs trained the same model. On a small model the training
step's own memory (weights, gradients, AdamW states, activations) sets the run's peak.

    .venv/bin/python benchmarks/efficient_loading.py
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import instruction_rows, write_jsonl  # noqa: E402


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _high_water_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(work: Path, name: str, model: str, data: Path, efficient: bool, lora: bool) -> dict:
    slug = name.replace(" ", "-")
    out = work / slug
    cfg = {"base_model": model, "datasets": [{"path": str(data), "type": "alpaca"}],
           "sequence_len": 256, "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-5,
           "optimizer": "adamw_torch", "bf16": False, "seed": 0, "logging_steps": 1,
           "output_dir": str(out), "dataset_prepared_path": str(work / "prepared"),
           "fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": efficient}}
    if lora:
        cfg.update(adapter="lora", lora_r=16, lora_alpha=32, lora_target_linear=True,
                   learning_rate=1e-4)
    path = work / f"{slug}.yml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "strop", "train", str(path),
               "--gradient_accumulation_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    peaks: dict[int, float] = {}
    setup: dict[int, float] = {}  # each rank's peak when rank 0 starts training
    ranks: dict[int, int] = {}  # pid -> rank
    training = False
    while proc.poll() is None:
        training = training or any(line.startswith("training ") for line in lines)
        for pid in _children(proc.pid):
            if pid not in ranks:
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                rank = [e for e in environ if e.startswith(b"RANK=")]
                if not rank:
                    continue
                ranks[pid] = int(rank[0][5:])
            mib = _high_water_mib(pid)
            if mib is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), mib)
                if not training:
                    setup[pid] = peaks[pid]
        time.sleep(0.05)
    reader.join()
    text = "".join(lines)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{text[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    peak = {ranks[pid]: mib for pid, mib in peaks.items() if pid in ranks}
    loaded = {ranks[pid]: mib for pid, mib in setup.items() if pid in ranks}
    return {"setup": loaded, "peak": peak, "losses": losses,
            "seconds": time.perf_counter() - started}


def main() -> None:
    from strop.demo.smollm2 import hf_dir

    model = str(hf_dir())
    with tempfile.TemporaryDirectory(prefix="strop-bench-loading-") as tmp:
        work = Path(tmp)
        data = write_jsonl(instruction_rows(16, seed=0, max_words=120), work / "train.jsonl")
        results = {(mode, name): run(work, f"{mode} {name}", model, data, efficient,
                                     mode == "lora")
                   for mode in ("full", "lora")
                   for name, efficient in (("every rank loads", False), ("rank 0 loads", True))}
    print("SmolLM2-135M-Instruct, FSDP2 on 2 processes (gloo, CPU), 2 steps; peak resident "
          "MiB of ranks 0 and 1 through setup (until training starts) and through the run\n")
    print(f"{'':<24}{'setup r0':>9}{'setup r1':>9}{'run r0':>8}{'run r1':>8}{'seconds':>9}"
          "  losses")
    for (mode, name), r in results.items():
        print(f"{mode + ', ' + name:<24}{r['setup'][0]:>9.0f}{r['setup'][1]:>9.0f}"
              f"{r['peak'][0]:>8.0f}{r['peak'][1]:>8.0f}{r['seconds']:>9.0f}  "
              + " ".join(f"{x:.4f}" for x in r["losses"]))
    print()
    for mode in ("full", "lora"):
        every, rank0 = results[(mode, "every rank loads")], results[(mode, "rank 0 loads")]
        print(f"{mode}: with cpu_ram_efficient_loading, rank 1's setup peak "
              f"{rank0['setup'][1] - every['setup'][1]:+.0f} MiB "
              f"({rank0['setup'][1] / every['setup'][1]:.2f}x), its run peak "
              f"{rank0['peak'][1] / every['peak'][1]:.2f}x")


if __name__ == "__main__":
    main()
