"""Full fine-tuning MFU on CPU: strop train beside a plain PyTorch loop, eager and compiled.

Same tiny Llama as train_speed.py (~34M: hidden 512, 8 layers, 8 heads, 4 kv heads,
intermediate 1408, vocab 8192), full fine-tuning in bf16 autocast with fused AdamW, rows of
exactly 1024 random tokens, micro-batch 4. Each contender runs in its own process:

- strop: `strop train` on the rows (strop.train.measure builds the run; median step speed after
  the first step), and the same with `compile: true`;
- plain: the HF model's own forward with labels (full logits, HF's loss), backward, step;
- plain + torch.compile: the same loop with the model compiled (the compile time is excluded).

MFU = training FLOPs per token (6N + 12 L T q, PaLM's convention, which counts the whole T x T
attention square; strop.recipe.math) x tokens/s / the bf16 matmul peak of this CPU. The peak is a
2048^3 bf16 matmul, best of several bursts, measured before and after the runs (the higher is
used: a busy neighbour only ever lowers it). The causal-only figure counts half the attention.

    .venv/bin/python benchmarks/train_mfu.py             # all three, then the table (~10 min)
    .venv/bin/python benchmarks/train_mfu.py --only strop plain
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import BENCH_LLAMA, VOCAB  # noqa: E402

SEQ, MICRO, STEPS = 1024, 4, 8
MODEL = {"model_type": "llama", **BENCH_LLAMA, "vocab_size": VOCAB}


def matmul_peak(size: int = 2048, bursts: int = 5) -> float:
    """bf16 FLOP/s of a large square matmul on every thread torch uses, best of `bursts`."""
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    a @ b
    best = 0.0
    for _ in range(bursts):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.5:
            a @ b
            runs += 1
        best = max(best, 2.0 * size**3 * runs / (time.perf_counter() - start))
    return best


def run_strop(compiled: bool) -> float:
    from strop.train.measure import Case, run_case

    case = Case(name="strop", model_config=MODEL, mode="full", seq_len=SEQ, micro_batch=MICRO,
                steps=STEPS + (2 if compiled else 0), trim_heap=False, compile=compiled)
    return run_case(case, timeout=1200)["tokens_per_second"]


def run_plain(compiled: bool) -> float:
    """Median tokens/s of steps after the first (after the warm-up compile when compiled)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(MODEL)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compiled else model
    rng = torch.Generator().manual_seed(0)
    speeds = []
    for _ in range(STEPS + (2 if compiled else 0)):
        ids = torch.randint(3, VOCAB, (MICRO, SEQ), generator=rng)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speeds.append(MICRO * SEQ / (time.perf_counter() - started))
    kept = speeds[3 if compiled else 1:]
    return sorted(kept)[len(kept) // 2]


CONTENDERS = {
    "strop": lambda: run_strop(compiled=False),
    "strop_compiled": lambda: run_strop(compiled=True),
    "plain": lambda: run_plain(compiled=False),
    "plain_compiled": lambda: run_plain(compiled=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(CONTENDERS))
    parser.add_argument("--child", choices=list(CONTENDERS))
    args = parser.parse_args()
    if args.child:
        if args.child.startswith("strop"):
            from strop.runtime import prepare_training_process

            prepare_training_process()  # as `strop train` runs (strop/runtime.py)
        print("RESULT " + json.dumps(CONTENDERS[args.child]()), flush=True)
        return

    from transformers import AutoConfig

    from strop.recipe.math import attention_forward_flops_per_token, training_flops_per_token
    from strop.recipe.shape import model_shape

    data = dict(MODEL)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    flops = training_flops_per_token(config, seq_len=SEQ)
    causal_flops = flops - 1.5 * attention_forward_flops_per_token(model_shape(config), SEQ)
    peak_before = matmul_peak()
    speeds = {}
    for name in args.only:
        proc = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True,
                              text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{name} failed:\n{proc.stderr[-3000:]}")
            continue
        speeds[name] = json.loads(line[7:])
    peak = max(peak_before, matmul_peak())
    print(f"\nfull fine-tuning, seq {SEQ}, micro-batch {MICRO}, bf16 autocast, fused AdamW; "
          f"{flops / 1e6:.1f} MFLOP/token (causal-only {causal_flops / 1e6:.1f}); bf16 matmul "
          f"peak {peak / 1e9:.0f} GFLOP/s (before {peak_before / 1e9:.0f})\n")
    print(f"{'contender':<16}{'tokens/s':>10}{'MFU':>8}{'causal MFU':>12}")
    for name, tps in speeds.items():
        print(f"{name:<16}{tps:>10.0f}{100 * flops * tps / peak:>7.1f}%"
              f"{100 * causal_flops * tps / peak:>11.1f}%")
    for name in (n for n in speeds if n.startswith("strop")):
        for ref in (n for n in speeds if n.startswith("plain")):
            print(f"{name} / {ref}: {speeds[name] / speeds[ref]:.2f}x")


if __name__ == "__main__":
    main()
