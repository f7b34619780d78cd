"""Adapter figures on a tiny Llama (~34M parameters): adapter size against the full model,
the trainable-parameter ratio, and QLoRA against LoRA memory and step time.

Each training mode runs in its own process so peak RSS belongs to that mode alone.
Run: .venv/bin/python benchmarks/adapters.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The model of the training benchmark (issue 4): hidden 512, 8 layers, 8 heads, 4 kv heads.
SIZES = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8192, max_position_embeddings=1024)
BATCH, SEQ, STEPS = 4, 256, 2
MODES = {
    "LoRA, fp32 base": {"adapter": "lora", "bf16": False},
    "LoRA, bf16 base": {"adapter": "lora", "bf16": True},
    "QLoRA, nf4 base, bf16 compute": {"adapter": "qlora", "load_in_4bit": True, "bf16": True},
    "QLoRA, nf4 base, fp32 compute": {"adapter": "qlora", "load_in_4bit": True, "bf16": False},
}
# What keep_4bit_weights_trainable gives up: bitsandbytes' repacked CPU inference kernel, which
# breaks later LoRA gradients (strop.model.quantize). Only its eval forward time is of interest.
REPACK = "QLoRA bf16, eval with and without repack"


def build_model_dir(root: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SIZES))
    vocab = {f"t{i}": i for i in range(SIZES["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")),
                                  unk_token="t0", pad_token="t0")
    path = root / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cfg(base: Path, **keys):
    from strop.config import load_dict

    return load_dict({"base_model": str(base), "datasets": [{"path": "-", "type": "completion"}],
                      "learning_rate": 2e-4, "lora_r": 16, "lora_alpha": 32,
                      "lora_target_linear": True, **keys}).cfg


def param_bytes(model) -> int:
    """Bytes held by parameters and buffers, 4-bit weights and their quantization state included."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                         if hasattr(v, "element_size"))
    return total


def child(mode: str, base: str) -> dict:
    """One training mode in this process: load, wrap, train a few steps, evaluate once."""
    import torch
    from transformers import AutoTokenizer

    from strop.adapters.lora import apply_lora
    from strop.model.load import load_model

    torch.manual_seed(0)
    keys = MODES.get(mode, MODES["QLoRA, nf4 base, bf16 compute"])
    cfg = _cfg(Path(base), **keys)
    dtype = torch.bfloat16 if keys["bf16"] else torch.float32
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load_model(cfg, AutoTokenizer.from_pretrained(base), "cpu", dtype)
    model, report = apply_lora(model, cfg)
    held = param_bytes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(1, SIZES["vocab_size"], (BATCH, SEQ))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=keys["bf16"])
    times = []
    for _ in range(STEPS + 1):  # the first step warms up
        started = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    model.eval()

    def eval_seconds_best_of(n: int) -> float:
        best = float("inf")
        for _ in range(n):
            started = time.perf_counter()
            with torch.no_grad(), autocast:
                model(input_ids=ids)
            best = min(best, time.perf_counter() - started)
        return best

    eval_seconds = eval_seconds_best_of(3)
    repacked_eval_seconds = None
    if mode == REPACK:  # the same model, same process: then with bitsandbytes' repack
        from strop.model.quantize import quantized_linear_layers

        for layer in quantized_linear_layers(model):
            layer.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
        eval_seconds_best_of(1)  # repacks
        repacked_eval_seconds = eval_seconds_best_of(3)
    return {"mode": mode, "param_bytes": held,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_model_bytes": rss_start * 1024,
            "step_seconds": min(times[1:]), "eval_seconds": eval_seconds,
            "repacked_eval_seconds": repacked_eval_seconds,
            "tokens_per_s": BATCH * SEQ / min(times[1:]),
            "trainable": report.trainable_params, "full": report.base_params}


def adapter_sizes(base: Path, out: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from strop.adapters.lora import apply_lora
    from strop.model.load import load_model

    cfg = _cfg(base, adapter="lora", bf16=False)
    model, report = apply_lora(load_model(cfg, AutoTokenizer.from_pretrained(base), "cpu",
                                          torch.float32), cfg)
    model.save_pretrained(out / "adapter")
    return {"adapter_bytes": (out / "adapter" / "adapter_model.safetensors").stat().st_size,
            "full_fp32_bytes": (base / "model.safetensors").stat().st_size,
            "trainable": report.trainable_params, "full": report.base_params}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_model_dir(root)
        sizes = adapter_sizes(base, root)
        print(f"tiny Llama: {sizes['full']:,} parameters (hidden 512, 8 layers, vocab 8192); "
              f"LoRA r=16 alpha=32 on every linear layer")
        print(f"  trainable parameters {sizes['trainable']:,} = "
              f"{100 * sizes['trainable'] / sizes['full']:.2f}% of full fine-tuning")
        print(f"  adapter_model.safetensors {sizes['adapter_bytes'] / 2**20:.2f} MiB vs "
              f"model.safetensors {sizes['full_fp32_bytes'] / 2**20:.1f} MiB in fp32 "
              f"({sizes['full_fp32_bytes'] / 2**21:.1f} MiB in bf16): "
              f"{100 * sizes['adapter_bytes'] / sizes['full_fp32_bytes']:.2f}% of the fp32 model")
        print(f"\ntraining, batch {BATCH} x {SEQ} tokens, best of {STEPS} steps, one process each "
              f"(times are noisy on a shared machine; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores):")
        print(f"  {'mode':<32} {'weights held':>13} {'peak RSS':>10} {'step':>8} {'tokens/s':>9} "
              f"{'eval fwd':>9}")
        rows = []
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, "--child", mode, str(base)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {mode:<32} {row['param_bytes'] / 2**20:>9.1f} MiB "
                  f"{row['peak_rss_bytes'] / 2**20:>6.0f} MiB {row['step_seconds']:>7.2f}s "
                  f"{row['tokens_per_s']:>9.0f} {row['eval_seconds']:>8.2f}s")
        lora = next(r for r in rows if r["mode"] == "LoRA, bf16 base")
        qlora = next(r for r in rows if r["mode"].startswith("QLoRA, nf4 base, bf16"))
        print(f"\nQLoRA / LoRA (bf16 base): weights held {qlora['param_bytes'] / lora['param_bytes']:.2f}x, "
              f"peak RSS {qlora['peak_rss_bytes'] / lora['peak_rss_bytes']:.2f}x, "
              f"step time {qlora['step_seconds'] / lora['step_seconds']:.2f}x")
        repack = json.loads(subprocess.run(
            [sys.executable, __file__, "--child", REPACK, str(base)], capture_output=True,
            text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"QLoRA eval forward, best of 3 in one process: {repack['eval_seconds']:.2f}s as "
              f"strop runs it, {repack['repacked_eval_seconds']:.2f}s with bitsandbytes' CPU "
              "repack (which strop turns off: it breaks later LoRA gradients)")
        print("(peak RSS includes torch, transformers and bitsandbytes themselves, about "
              f"{lora['rss_before_model_bytes'] / 2**20:.0f} MiB before the model loads)")


if __name__ == "__main__":
    main()
