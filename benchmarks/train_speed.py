"""Training speed and memory: strop beside TRL's SFTTrainer + PEFT, on the same model and data.

Same tiny Llama (~34M: hidden 512, 8 layers, 8 heads, 4 kv heads, intermediate 1408, vocab
8192, built from a config with a tokenizer trained locally), same skewed-length alpaca-style
rows, same hyperparameters (LoRA r16 on all linear layers, sequence_len 1024, micro-batch 4,
gradient accumulation 2, one epoch, cosine schedule). Each contender runs in its own process
so peak RSS is its own. Trained tokens/s = response tokens of the epoch / training seconds.
Eval loss is computed by one evaluator for all (token-weighted cross-entropy of the saved
adapter on the same held-out rows), so it does not depend on how each tool averages.

`--model smollm2` runs the same contenders on SmolLM2-135M-Instruct, a real pretrained model
(strop.demo.smollm2): strop trains straight from its GGUF file (Q4_1, `base_model:` the .gguf),
TRL from the same weights dequantized into a Hugging Face directory; the rows are shorter there
(sequence_len 512) so one full run fits in about 10 minutes on a 2-core CPU.

    .venv/bin/python benchmarks/train_speed.py            # all contenders, then the table
    .venv/bin/python benchmarks/train_speed.py --rows 96  # a quicker run
    .venv/bin/python benchmarks/train_speed.py --model smollm2
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

from common import build_model_dir, instruction_rows, peak_rss_bytes, write_jsonl  # noqa: E402

LR = 2e-4
MICRO, ACCUM = 4, 2
LORA = dict(r=16, alpha=32)
# Per model: default rows, held-out rows, sequence_len, longest row in words.
MODELS = {"tiny": dict(rows=160, eval_rows=48, seq=1024, max_words=700),
          "smollm2": dict(rows=32, eval_rows=16, seq=512, max_words=350)}


def prepare(work: Path, rows: int, model: str = "tiny") -> dict:
    """Paths for the contenders: `model` is what strop's base_model is (the GGUF file for
    smollm2), `hf_model` the Hugging Face directory TRL and the evaluator load (the same
    weights)."""
    spec = MODELS[model]
    if model == "smollm2":
        from strop.demo.smollm2 import gguf_path, hf_dir

        model_path, hf_path = str(gguf_path()), str(hf_dir())
    else:
        model_path = hf_path = str(build_model_dir(work / "model"))
    train = write_jsonl(instruction_rows(rows, seed=0, max_words=spec["max_words"]),
                        work / "train.jsonl")
    evals = write_jsonl(instruction_rows(spec["eval_rows"], seed=1,
                                         max_words=spec["max_words"]), work / "eval.jsonl")
    return {"model": model_path, "hf_model": hf_path, "train": str(train), "eval": str(evals),
            "work": str(work), "seq": spec["seq"]}


def strop_config(paths: dict, out: Path, bf16: bool = True, packing: bool = True,
                 grouped: bool = False):
    from strop.config import load_dict

    return load_dict({
        "base_model": paths["model"], "datasets": [{"path": paths["train"], "type": "alpaca"}],
        "test_datasets": [{"path": paths["eval"], "type": "alpaca"}],
        "adapter": "lora", "lora_r": LORA["r"], "lora_alpha": LORA["alpha"],
        "lora_target_linear": True, "sequence_len": paths["seq"], "sample_packing": packing,
        "micro_batch_size": MICRO, "gradient_accumulation_steps": ACCUM, "num_epochs": 1,
        "learning_rate": LR, "lr_scheduler": "cosine", "optimizer": "adamw_torch_fused",
        "bf16": "auto" if bf16 else False, "output_dir": str(out), "logging_steps": 1,
        "seed": 0, "dataset_prepared_path": str(out.parent / "prepared"),
        "group_by_length": grouped,
    })


def token_rows(paths: dict) -> tuple[list, list]:
    """(train rows, eval rows) as strop tokenizes them, unpacked: every contender trains on
    exactly these tokens and is scored on exactly those."""
    from strop.data import prepare_data
    from strop.model.tokenizer import load_tokenizer

    loaded = strop_config(paths, Path(paths["work"]) / "rows", packing=False)
    data = prepare_data(loaded.cfg, load_tokenizer(loaded.cfg))
    return [data.train[i] for i in range(len(data.train))], \
        [data.eval[i] for i in range(len(data.eval))]


def run_strop(paths: dict, out: Path, bf16: bool, packing: bool = True,
              grouped: bool = False) -> dict:
    from strop.train.loop import train

    summary = train(strop_config(paths, out, bf16=bf16, packing=packing, grouped=grouped),
                    overwrite=True)
    return {"train_seconds": summary["train_seconds"], "adapter": str(out)}


def run_trl(paths: dict, out: Path, best: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(paths["hf_model"])
    train_rows, _ = token_rows(paths)
    # Pre-tokenized rows with their labels (-100 where not trained): TRL then trains on exactly
    # the tokens strop trains on (TRL 1.16 wants `labels` when it skips its own preparation).
    data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]}
                              for r in train_rows])
    model = AutoModelForCausalLM.from_pretrained(paths["hf_model"])
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=ACCUM, num_train_epochs=1, learning_rate=LR,
                     lr_scheduler_type="cosine", max_length=paths["seq"], use_cpu=True,
                     bf16=best, report_to="none", save_strategy="no", logging_steps=1,
                     completion_only_loss=True, seed=0, dataset_kwargs={"skip_prepare_dataset":
                                                                        True},
                     **({"train_sampling_strategy": "group_by_length"} if best else {}))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    metrics = trainer.train().metrics
    trainer.model.save_pretrained(out)
    return {"train_seconds": metrics["train_runtime"], "adapter": str(out)}


def eval_loss(paths: dict, adapter: str) -> float:
    """Token-weighted eval loss of base + adapter on the held-out rows, full fp32 logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from strop.train.loss import reference_loss_sum

    _, eval_rows = token_rows(paths)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(paths["hf_model"]),
                                      adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in eval_rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            total += float(reference_loss_sum(model(ids).logits, labels))
            count += int((labels[:, 1:] != -100).sum())
    return total / count


def trained_tokens(paths: dict) -> int:
    train_rows, _ = token_rows(paths)
    return sum(sum(1 for x in r["labels"][1:] if x != -100) for r in train_rows)


CONTENDERS = {
    "strop": lambda paths, out: run_strop(paths, out, bf16=True),
    "strop_unpacked": lambda paths, out: run_strop(paths, out, bf16=True, packing=False),
    "strop_grouped": lambda paths, out: run_strop(paths, out, bf16=True, packing=False,
                                                  grouped=True),
    "trl_default": lambda paths, out: run_trl(paths, out, best=False),
    "trl_best": lambda paths, out: run_trl(paths, out, best=True),
}


def child(name: str, work: Path) -> None:
    from strop.runtime import active_allocator, prepare_training_process

    if name.startswith("strop"):
        # As `strop train` runs (strop/runtime.py): under mimalloc unless
        # STROP_ALLOCATOR=system, with bounded kernel caches. TRL runs as its users run it.
        prepare_training_process()
    paths = json.loads((work / "paths.json").read_text())
    started = time.perf_counter()
    result = CONTENDERS[name](paths, work / f"out-{name}")
    result.update(wall_seconds=time.perf_counter() - started, peak_rss=peak_rss_bytes(),
                  malloc=active_allocator())
    print("RESULT " + json.dumps(result), flush=True)


WORK = Path("/tmp/strop-bench-train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--rows", type=int, help="training rows (tiny: 160, smollm2: 32)")
    parser.add_argument("--only", nargs="*", default=list(CONTENDERS))
    parser.add_argument("--child", choices=list(CONTENDERS))
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.work)
    if args.model != "tiny" and args.work == WORK:
        args.work = WORK.with_name(f"{WORK.name}-{args.model}")
    args.rows = args.rows or MODELS[args.model]["rows"]
    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args.rows, args.model)
    (args.work / "paths.json").write_text(json.dumps(paths))
    n_trained = trained_tokens(paths)
    results = {}
    for name in args.only:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--work", str(args.work)],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{name} failed:\n{proc.stderr[-3000:]}")
            continue
        results[name] = json.loads(line[7:])
        results[name]["eval_loss"] = eval_loss(paths, results[name]["adapter"])
        results[name]["tokens_per_s"] = n_trained / results[name]["train_seconds"]
    print(f"\n{args.model}: {args.rows} rows, {n_trained} trained tokens per epoch, LoRA "
          f"r{LORA['r']} all-linear, seq {paths['seq']}, micro-batch {MICRO} x accumulation "
          f"{ACCUM}\n")
    print(f"{'contender':<14}{'trained tok/s':>14}{'peak RSS MiB':>14}{'eval loss':>11}  malloc")
    for name, r in results.items():
        print(f"{name:<14}{r['tokens_per_s']:>14.0f}{r['peak_rss'] / 2**20:>14.0f}"
              f"{r['eval_loss']:>11.4f}  {r['malloc']}")
    for name in (n for n in results if n.startswith("strop")):
        s = results[name]
        for ref in ("trl_default", "trl_best"):
            if ref in results:
                r = results[ref]
                print(f"{name} / {ref}: speed {s['tokens_per_s'] / r['tokens_per_s']:.2f}x, "
                      f"peak RSS {s['peak_rss'] / r['peak_rss']:.2f}x, eval loss "
                      f"{100 * (s['eval_loss'] / r['eval_loss'] - 1):+.2f}%")


if __name__ == "__main__":
    main()
