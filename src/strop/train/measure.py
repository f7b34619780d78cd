"""Measure a training step's peak memory and throughput, to check the plan against reality.

Each case runs in a fresh Python process (`python -m strop.train.measure CASE_JSON`), so
allocator state, code pages and caches of one case never leak into the next. The child writes a
model directory built from the case's config (stored in the dtype strop loads it in, so loading
converts nothing), a word-level tokenizer of the model's vocabulary and rows of exactly
`seq_len` random tokens, then runs `strop train` itself for `steps` steps: what is measured is
what a user runs.

Memory: on CPU, the growth of the resident set from just before `strop train` starts to its
high-water mark (VmHWM), loading, data and saving included, with freed memory returned to the
OS at once (see return_freed_memory_promptly); on CUDA,
torch.cuda.max_memory_allocated. Throughput: tokens per second of the logged steps after the
first (which pays one-off costs: optimizer state creation, kernel selection). Time steps with
`trim_heap=False`: returning freed memory at once slows CPU training down (page faults).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Case:
    """One measured run: a model from `model_config` trained as `mode` for `steps` steps."""

    name: str
    model_config: dict[str, Any]          # config.json fields, model_type included
    mode: str = "full"                    # full | lora | qlora
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    micro_batch: int = 2
    seq_len: int = 256
    optimizer: str = "adamw_torch_fused"
    lora_r: int = 8
    lora_dropout: float = 0.0
    bf16: bool = True
    steps: int = 4
    device: str = "cpu"
    threads: int | None = None
    trim_heap: bool = True                # see return_freed_memory_promptly; off to time steps
    compile: bool = False                 # torch.compile (the config's `compile: true`)

    def strop_config(self, config_json: Path) -> dict[str, Any]:
        """The same run as a strop config (for `strop plan` to predict); the model's
        config.json is written to `config_json`, which becomes base_model."""
        config_json.write_text(json.dumps(self.model_config))
        cfg: dict[str, Any] = {
            "base_model": str(config_json),
            "datasets": [{"path": "unused.jsonl", "type": "completion"}],
            "learning_rate": 1e-4,
            "sequence_len": self.seq_len,
            "micro_batch_size": self.micro_batch,
            "gradient_checkpointing": self.gradient_checkpointing,
            "attn_implementation": self.attention,
            "optimizer": self.optimizer,
            "bf16": self.bf16,
            "device": self.device,
        }
        if self.compile:
            cfg["compile"] = True
        if self.mode in ("lora", "qlora"):
            cfg.update(adapter=self.mode, lora_r=self.lora_r, lora_alpha=2 * self.lora_r,
                       lora_dropout=self.lora_dropout, lora_target_linear=True)
        if self.mode == "qlora":
            cfg["load_in_4bit"] = True
        return cfg


def run_case(case: Case, timeout: float = 600) -> dict[str, Any]:
    """Run `case` in a fresh process and return its measurements."""
    env = dict(os.environ)
    if case.threads:
        env["OMP_NUM_THREADS"] = str(case.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "strop.train.measure", json.dumps(asdict(case))],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"measuring {case.name} failed: {' | '.join(tail)}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the child

def _rss_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current resident set (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at 64 KiB so freed tensors go back to the OS at once.

    By default glibc raises the threshold up to 32 MiB as large blocks are freed; tensors under
    it then live in the heap, which keeps its high-water mark: the resident set stays far above
    what is alive (3x on a tiny model, where the logits dominate) and depends on the order of
    past allocations. With a fixed threshold the resident set follows live tensors, which is what
    strop plan predicts. (strop train does not do this: fresh pages for every freed tensor cost
    page faults, measured 2.7x slower training on a 2-core CPU; its resident set on CPU can
    therefore sit above the prediction, by up to a quarter on tiny models.) Returns False where
    there is no glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(ctypes.CDLL(name).mallopt(m_mmap_threshold, 64 * 1024))


def _word_tokenizer(vocab: int):
    """A word-level tokenizer with exactly `vocab` entries ("w3" is id 3), so random token ids
    can be written as text and read back unchanged by strop's data path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", pad_token="</s>")


def _strop_files(case: Case, torch, work: Path) -> dict[str, Any]:
    """A model directory (stored as strop loads it, so loading converts nothing), its tokenizer,
    rows of exactly seq_len random tokens, and the strop config that trains on them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(case.model_config)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    stored = torch.bfloat16 if case.mode == "lora" and case.bf16 else torch.float32
    AutoModelForCausalLM.from_config(config, dtype=stored).save_pretrained(work / "model")
    _word_tokenizer(config.vocab_size).save_pretrained(work / "model")
    rng = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(case.micro_batch * case.steps):
        ids = torch.randint(3, config.vocab_size, (case.seq_len,), generator=rng).tolist()
        rows.append(json.dumps({"text": " ".join(f"w{i}" for i in ids)}))
    (work / "rows.jsonl").write_text("\n".join(rows) + "\n")
    cfg = case.strop_config(work / "config.json")
    cfg.update(base_model=str(work / "model"),
               datasets=[{"path": str(work / "rows.jsonl"), "type": "completion"}],
               output_dir=str(work / "run"), dataset_prepared_path=str(work / "prepared"),
               max_steps=case.steps, logging_steps=1, warmup_steps=0, seed=0)
    return cfg


def _child(case: Case) -> dict[str, Any]:
    if case.device == "cpu" and case.trim_heap:
        return_freed_memory_promptly()
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch

    from strop.config.load import load_dict
    from strop.data import prepare_data  # noqa: F401 - imported before the baseline
    from strop.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        loaded = load_dict(_strop_files(case, torch, work))
        baseline = _rss_bytes("VmRSS")
        _reset_peak_rss()
        summary = train(loaded)
        peak = _rss_bytes("VmHWM") - baseline
        metrics = (work / "run" / "metrics.jsonl").read_text().splitlines()
    # Per-step throughput after the first step, which pays one-off costs.
    speeds = [row["tokens_per_s"] for row in map(json.loads, metrics)
              if row.get("step", 0) > 1 and "tokens_per_s" in row]
    result = {
        "name": case.name,
        "baseline_rss": baseline,
        "peak_rss_growth": peak,
        "tokens_per_second": sorted(speeds)[len(speeds) // 2] if speeds else 0.0,
        "threads": torch.get_num_threads(),
    }
    if case.device == "cuda":  # strop train's own peak there is torch.cuda.max_memory_allocated
        result["peak_allocated"] = summary["peak_memory_bytes"]
    return result


if __name__ == "__main__":
    case = Case(**json.loads(sys.argv[1]))
    print(json.dumps(_child(case)))
