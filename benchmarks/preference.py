"""Preference training: strop's DPO beside TRL's DPOTrainer + PEFT, on the same model and pairs.

SmolLM2-135M-Instruct (strop.demo.smollm2), the preference pairs of strop.demo.prefs (refuse
questions about a made-up substance, keep answering ordinary ones; 240 pairs, 40-70 tokens a
side with the chat template's default system prompt), the same settings on both sides: LoRA r16
/ alpha 32 / dropout 0 on every linear layer, DPO sigmoid loss at beta 0.1, the reference being
the base with the adapter disabled (computed every step, not precomputed), AdamW, cosine
schedule with warmup, micro-batch of MICRO pairs, one epoch, sequence length 128, fp32, no
gradient checkpointing, seed 42. strop trains from the GGUF file (`base_model:` the .gguf, as
examples/smollm2-135m-dpo.yml does), TRL from the same weights dequantized into a Hugging Face
directory (strop.demo.smollm2.hf_dir). TRL pads each batch of pairs, the only way its DPOTrainer
runs on a CPU; `strop` is unpacked too (the same pairs per step, the same steps as TRL),
`strop_packed` packs whole pairs into rows of 2 x 128 tokens as the example does, 3 rows a step
(strop lays a pair out as its prompt once and both replies, ~70 tokens, so a row holds ~3 pairs:
~10 pairs a step, 25 steps).

Each side runs in its own process, so peak RSS (the child's ru_maxrss: TRL's own process;
for strop, the `strop train` process tree, measured by a wrapper that only waits for it) is its
own. Pairs/s = pairs of the epoch / training seconds, model loading excluded on both sides
(TRL: train_runtime of trainer.train(); strop: summary.json's train_seconds). Reward accuracy is
each tool's last logged training "rewards/accuracies" (the share of the last logging window's
pairs whose implicit reward beta * (log-ratio chosen - log-ratio rejected) is positive). Held-out
preference accuracy is measured by one evaluator for both saved adapters
(strop.demo.prefs.preference_accuracy: log p(chosen) > log p(rejected) on the 40 held-out pairs,
full fp32 logits), so it does not depend on how each tool averages.

Measured on the 2-core development machine (2026-12-07, one run, load average ~1.9 from other
work; 18 min in all): pairs/s, peak RSS, last logged reward accuracy, held-out accuracy:
strop 1.34 / 1905 MiB / 0.950 / 0.900; strop_packed 1.39 / 2049 MiB / 1.000 / 0.875; TRL
0.57 / 4920 MiB / 0.975 / 0.850. strop / TRL: 2.35x the speed at 0.39x the peak RSS (packed:
2.43x, 0.42x). The base model's held-out accuracy is 0.750.

    .venv/bin/python benchmarks/preference.py                # both sides, then the table
    .venv/bin/python benchmarks/preference.py --only trl     # one side
    .venv/bin/python benchmarks/preference.py --pairs 64     # a quicker run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import peak_rss_bytes, write_jsonl  # noqa: E402

LORA = dict(r=16, alpha=32)
BETA = 0.1
# Plain DPO at a usual LoRA rate: the speed and memory figures do not depend on it. (The example
# adds an NLL term, rpo_alpha, and trains at 1e-3, for greedy replies that visibly change.)
LR = 2e-4
WARMUP = 3
MICRO = 8          # pairs per optimizer step, no accumulation
PACKED_MICRO = 3   # packed rows of 2 x SEQ tokens, ~3 pairs each: ~9-10 pairs per step
SEQ = 128
LOGGING = 5
SEED = 42
WORK = Path("/tmp/strop-bench-preference")
SIDES = ("strop", "strop_packed", "trl")


def prepare(work: Path, pairs: int) -> dict:
    """The pairs (the first `pairs` of strop.demo.prefs' training set), the held-out pairs, and
    the model both ways: `gguf` for strop, `hf_model` (the same weights) for TRL."""
    from strop.demo import prefs, smollm2

    written = prefs.write_preference_data(work / "data")
    train = prefs.read_rows(written["train"])
    if not 1 <= pairs <= len(train):
        raise SystemExit(f"--pairs must be 1..{len(train)}")
    subset = write_jsonl(train[:pairs], work / "data" / f"train-{pairs}.jsonl")
    return {"gguf": str(smollm2.gguf_path()), "hf_model": str(smollm2.hf_dir()),
            "train": str(subset), "heldout": str(written["heldout"]), "pairs": pairs,
            "work": str(work)}


def strop_yaml(paths: dict, out: Path, packing: bool) -> Path:
    """The run as a user writes it: examples/smollm2-135m-dpo.yml's keys, fp32, one epoch."""
    import yaml

    config = {
        "base_model": paths["gguf"],
        "datasets": [{"path": paths["train"], "type": "chat_template"}],
        "chat_template": "tokenizer_default",
        "rl": "dpo", "rl_beta": BETA,
        "adapter": "lora", "lora_r": LORA["r"], "lora_alpha": LORA["alpha"],
        "lora_dropout": 0.0, "lora_target_linear": True,
        "sequence_len": SEQ, "sample_packing": packing,
        "micro_batch_size": PACKED_MICRO if packing else MICRO, "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "optimizer": "adamw_torch", "lr_scheduler": "cosine", "learning_rate": LR,
        "warmup_steps": WARMUP, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "bf16": False, "gradient_checkpointing": False,
        "logging_steps": LOGGING, "seed": SEED, "output_dir": str(out),
        "dataset_prepared_path": str(out.parent / f"prepared-{out.name}"),
    }
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_strop(paths: dict, out: Path, packing: bool) -> dict:
    """`strop train` in its own process; this wrapper only waits, so the children's peak RSS
    is the training run's."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    config = strop_yaml(paths, out, packing)
    strop = Path(sys.executable).with_name("strop")
    command = [str(strop)] if strop.exists() else [sys.executable, "-m", "strop"]
    done = subprocess.run(command + ["train", str(config)], capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if done.returncode != 0:
        raise SystemExit(f"strop train {config} failed ({done.returncode}):\n"
                         f"{(done.stdout + done.stderr)[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    logged = [r for r in records if r.get("kind") == "train" and "rewards/accuracies" in r]
    return {"train_seconds": summary["train_seconds"], "steps": summary.get("steps"),
            "reward_accuracy": logged[-1]["rewards/accuracies"] if logged else None,
            "adapter": str(out), "peak_rss": peak}


def run_trl(paths: dict, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from strop.demo.prefs import read_rows

    tokenizer = AutoTokenizer.from_pretrained(paths["hf_model"])
    # The conversational pairs as written: TRL applies the tokenizer's chat template itself.
    data = Dataset.from_list(read_rows(paths["train"]))
    model = AutoModelForCausalLM.from_pretrained(paths["hf_model"], dtype="float32")
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=LR,
                     lr_scheduler_type="cosine", warmup_steps=WARMUP, optim="adamw_torch",
                     weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
                     max_length=SEQ, precompute_ref_log_probs=False, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, report_to="none", save_strategy="no",
                     logging_steps=LOGGING, seed=SEED)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    metrics = trainer.train().metrics
    trainer.model.save_pretrained(out)
    logged = [r for r in trainer.state.log_history if "rewards/accuracies" in r]
    return {"train_seconds": metrics["train_runtime"], "steps": trainer.state.global_step,
            "reward_accuracy": logged[-1]["rewards/accuracies"] if logged else None,
            "adapter": str(out), "peak_rss": peak_rss_bytes()}


def heldout_accuracy(paths: dict, adapter: str) -> float:
    """strop.demo.prefs.preference_accuracy of base + adapter on the held-out pairs."""
    from strop.demo.prefs import preference_accuracy, read_rows
    from strop.infer.load import load_for_inference

    loaded = load_for_inference(adapter, "cpu")
    return preference_accuracy(loaded.model, loaded.tokenizer, read_rows(paths["heldout"]))


def child(side: str, work: Path) -> None:
    paths = json.loads((work / "paths.json").read_text())
    out = work / f"out-{side}"
    if side == "trl":
        result = run_trl(paths, out)
    else:
        result = run_strop(paths, out, packing=side == "strop_packed")
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--pairs", type=int, default=240, help="training pairs (at most 240)")
    parser.add_argument("--only", nargs="*", choices=SIDES, default=list(SIDES))
    parser.add_argument("--child", choices=SIDES)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args.pairs)
    (args.work / "paths.json").write_text(json.dumps(paths))
    results = {}
    for side in args.only:
        proc = subprocess.run([sys.executable, __file__, "--child", side, "--work",
                               str(args.work)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{side} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            continue
        result = json.loads(line[7:])
        result["pairs_per_s"] = args.pairs / result["train_seconds"]
        result["heldout_accuracy"] = heldout_accuracy(paths, result["adapter"])
        results[side] = result

    print(f"\nDPO, SmolLM2-135M-Instruct, {args.pairs} pairs x 1 epoch, LoRA r{LORA['r']} "
          f"all-linear, beta {BETA}, lr {LR}, {MICRO} pairs per step, seq {SEQ}, fp32 (load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    print(f"{'side':<13}{'steps':>6}{'train s':>9}{'pairs/s':>9}{'peak RSS MiB':>14}"
          f"{'reward acc':>12}{'held-out acc':>14}")
    for side, r in results.items():
        reward = "-" if r["reward_accuracy"] is None else f"{r['reward_accuracy']:.3f}"
        print(f"{side:<13}{r['steps'] or '-':>6}{r['train_seconds']:>9.1f}{r['pairs_per_s']:>9.2f}"
              f"{r['peak_rss'] / 2**20:>14.0f}{reward:>12}{r['heldout_accuracy']:>14.3f}")
    if "trl" in results:
        t = results["trl"]
        for side, s in results.items():
            if side == "trl":
                continue
            print(f"{side} / TRL: speed {s['pairs_per_s'] / t['pairs_per_s']:.2f}x, peak RSS "
                  f"{s['peak_rss'] / t['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
