"""Measure a training step's peak memory and throughput, to check the plan against reality.

Each case runs in a fresh Python process (`python -m strop.plan.measure CASE_JSON`), so
allocator state, code pages and caches of one case never leak into the next. The child builds
the model from a config with transformers, PEFT and bitsandbytes directly (the storage policy of
strop.plan.params: trainable fp32, a LoRA base in the compute dtype, a k-bit base with fp32
non-quantized parameters), then runs `steps` training steps: forward under autocast, loss,
backward, gradient clipping, optimizer step, zero_grad. When strop's training loop exists,
`run_case` is the one place to point at `strop train` instead.

Memory: on CPU, the growth of the resident set from just before the model is built to its
high-water mark (VmHWM, reset after the model is built so loading transients do not count); on
CUDA, torch.cuda.max_memory_allocated. Throughput: trained tokens per second over the steps
after the first (which pays one-off costs: optimizer state creation, kernel selection).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
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
    extra: dict[str, Any] = field(default_factory=dict)

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
    proc = subprocess.run([sys.executable, "-m", "strop.plan.measure", json.dumps(asdict(case))],
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
    the plan predicts and a laptop user wants. Returns False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(ctypes.CDLL(name).mallopt(m_mmap_threshold, 64 * 1024))


def _build_model(case: Case, torch, workdir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(case.model_config)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    config._attn_implementation = case.attention
    compute = torch.bfloat16 if case.bf16 else torch.float32
    torch.manual_seed(0)
    if case.mode == "qlora":
        from transformers import BitsAndBytesConfig

        AutoModelForCausalLM.from_config(config).save_pretrained(workdir)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(workdir, quantization_config=quant,
                                                     attn_implementation=case.attention)
    elif case.mode == "lora":
        model = AutoModelForCausalLM.from_config(config, dtype=compute)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if case.mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if case.mode == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(r=case.lora_r, lora_alpha=2 * case.lora_r, lora_dropout=case.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if case.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if case.mode != "full":
            model.enable_input_require_grads()
    model.config.use_cache = False
    return model.to(case.device).train()


def _optimizer(case: Case, params, torch):
    if case.optimizer == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if case.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-4)
    if case.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    if case.optimizer in ("adamw_8bit", "adamw_bnb_8bit"):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    raise ValueError(f"the measurement harness does not build {case.optimizer}")


def _child(case: Case) -> dict[str, Any]:
    if case.device == "cpu":
        return_freed_memory_promptly()
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    # Import everything (the model's module too) before the baseline: code that is loaded is not
    # memory the training step needs, and the same in every mode.
    data = dict(case.model_config)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model(data.pop("model_type"), **data))]
    cuda = case.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        baseline = _rss_bytes("VmRSS")
        model = _build_model(case, torch, Path(tmp))
    after_build = _rss_bytes("VmRSS")
    _reset_peak_rss()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(case, params, torch)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (case.micro_batch, case.seq_len), generator=generator)
    ids = ids.to(case.device)
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before_cuda = torch.cuda.memory_allocated()
    times = []
    after_first = 0
    for step in range(case.steps):
        start = time.perf_counter()
        with torch.autocast(case.device, dtype=dtype, enabled=case.bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del loss
        if step == 0:
            after_first = _rss_bytes("VmRSS")
    warm = times[1:] or times
    tokens = case.micro_batch * case.seq_len
    result = {
        "name": case.name,
        "baseline_rss": baseline,
        "model_rss": after_build - baseline,
        "peak_rss_growth": _rss_bytes("VmHWM") - baseline,
        "after_first_step_rss": after_first - baseline,
        "step_seconds": sorted(warm)[len(warm) // 2],
        "tokens_per_second": tokens / sorted(warm)[len(warm) // 2],
        "threads": torch.get_num_threads(),
    }
    if cuda:
        result["peak_allocated"] = torch.cuda.max_memory_allocated()
        result["model_allocated"] = before_cuda
    return result


if __name__ == "__main__":
    print(json.dumps(_child(Case(**json.loads(sys.argv[1])))))
