"""Data preparation speed: strop vs TRL's SFTTrainer on the same 100k alpaca-style rows.

Both sides tokenize with the same tokenizer (a byte-level BPE trained here on the rows, with
strop's trainer), mask the prompt (train on the response and EOS only) and pack into
sequence_len rows with best-fit decreasing. strop starts from the JSONL file of raw
instruction/input/output rows (reading, alpaca formatting, tokenizing, masking, packing:
`prepare_data` with the cache off); TRL gets the same rows already formatted as in-memory
prompt/completion strings, and its figure is the `SFTTrainer(...)` construction that runs its
dataset preparation, less the construction time on 8 rows (model, accelerate and args setup).
Both get every core (`dataset_num_proc`). strop tokenizes byte-level BPE with its verified
tiktoken twin of the tokenizer (src/strop/data/fast_bpe.py) in forked worker processes; the
token and trained-token totals printed for both sides show they produced the same rows.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/data_prep.py            # 100k rows, strop and TRL
    .venv/bin/python benchmarks/data_prep.py --rows 20000 --skip-trl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

TARGET_ROWS_PER_S = 20_000
TARGET_RATIO = 3.0


def make_words(count: int, seed: int) -> list[str]:
    """Pronounceable made-up words, so the tokenizer learns real merges and BPE sees a long tail."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr", "pl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
    codas = ["", "n", "r", "s", "t", "l", "nd", "st"]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.randint(1, 3))))
    return sorted(words)


def make_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-shaped rows: a 6-20 word instruction, an input on 40% of rows, a 10-60 word answer.
    Word frequencies follow Zipf's law, as in real text."""
    rng = random.Random(seed)
    words = make_words(4000, seed)
    weights = [1 / (rank + 1) for rank in range(len(words))]

    def sentence(lo: int, hi: int) -> str:
        picked = rng.choices(words, weights, k=rng.randint(lo, hi))
        return " ".join(picked).capitalize() + rng.choice([".", ".", "?", "!"])

    rows = []
    for _ in range(count):
        rows.append({"instruction": sentence(6, 20),
                     "input": sentence(5, 25) if rng.random() < 0.4 else "",
                     "output": " ".join(sentence(5, 15) for _ in range(rng.randint(2, 4)))})
    return rows


def train_bench_tokenizer(rows: list[dict[str, str]]):
    from strop.config.schema import PretrainTokenizer
    from strop.data.formats import ALPACA_INPUT
    from strop.model.tokenizer_train import train_tokenizer

    texts = [ALPACA_INPUT] + [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows[:20000]]
    return train_tokenizer(texts, PretrainTokenizer(type="bpe", vocab_size=8192, min_frequency=2))


def run_strop(path: Path, tokenizer, sequence_len: int, workers: int) -> tuple[float, dict]:
    from strop.config import load_dict
    from strop.data import prepare_data

    cfg = load_dict({"base_model": "unused", "learning_rate": 1e-4, "sequence_len": sequence_len,
                     "sample_packing": True, "dataset_num_proc": workers,
                     "datasets": [{"path": str(path), "type": "alpaca"}]}).cfg
    start = time.perf_counter()
    data = prepare_data(cfg, tokenizer, use_cache=False)
    seconds = time.perf_counter() - start
    s = data.stats
    return seconds, {"rows": s.documents, "packed_rows": s.rows, "tokens": s.tokens,
                     "trained_tokens": s.trained_tokens, "packing_efficiency": s.packing_efficiency}


def tokenizer_alone(rows: list[dict[str, str]], tokenizer) -> tuple[float, float | None]:
    """Seconds the `tokenizers` library (all cores) and strop's tiktoken twin (one core) take on
    the rows' own text alone (no template, no masking, no packing), for scale."""
    from strop.data.fast_bpe import fast_bpe_for

    texts = [t for r in rows for t in (r["instruction"], r["input"], r["output"]) if t]
    start = time.perf_counter()
    tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    hf = time.perf_counter() - start
    twin = fast_bpe_for(tokenizer)
    if twin is None:
        return hf, None
    start = time.perf_counter()
    for text in texts:
        twin.encoding.encode_ordinary(text)
    return hf, time.perf_counter() - start


def run_trl(rows: list[dict[str, str]], tokenizer, sequence_len: int, workers: int) -> tuple[float, dict]:
    import datasets
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_model
    from strop.data.formats import ALPACA_INPUT, ALPACA_NO_INPUT

    datasets.disable_caching()
    datasets.disable_progress_bars()

    def prompt(r: dict[str, str]) -> str:
        if r["input"]:
            return (f"{ALPACA_INPUT}### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}"
                    "\n\n### Response:\n")
        return f"{ALPACA_NO_INPUT}### Instruction:\n{r['instruction']}\n\n### Response:\n"

    table = datasets.Dataset.from_list([{"prompt": prompt(r), "completion": r["output"]} for r in rows])
    model = make_tiny_model("llama", tokenizer)
    tmp = tempfile.mkdtemp(prefix="strop-bench-trl-")

    def build(ds):
        args = SFTConfig(output_dir=tmp, max_length=sequence_len, packing=True,
                         packing_strategy="bfd", completion_only_loss=True,
                         dataset_num_proc=workers if workers > 1 else None, report_to=[],
                         use_cpu=True, disable_tqdm=True)
        start = time.perf_counter()
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
        return time.perf_counter() - start, trainer

    overhead, _ = build(table.select(range(8)))
    seconds, trainer = build(table)
    packed = trainer.train_dataset
    tokens = sum(len(x) for x in packed["input_ids"])
    trained = sum(sum(1 for v in lab if v != -100) for lab in packed["labels"]) \
        if "labels" in packed.column_names else None
    return seconds - overhead, {"rows": len(rows), "packed_rows": len(packed), "tokens": tokens,
                                "trained_tokens": trained, "setup_seconds_subtracted": round(overhead, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-trl", action="store_true", help="time strop only")
    args = parser.parse_args(argv)

    rows = make_rows(args.rows)
    tokenizer = train_bench_tokenizer(rows)
    with tempfile.TemporaryDirectory(prefix="strop-bench-") as tmp:
        path = Path(tmp) / "alpaca.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        chars = sum(len(r["instruction"]) + len(r["input"]) + len(r["output"]) for r in rows)
        print(f"{args.rows} alpaca-style rows ({chars / args.rows:.0f} characters of fields per row), "
              f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, sequence_len "
              f"{args.sequence_len}, {args.workers} workers, {os.cpu_count()} cores")
        strop_s, strop_info = run_strop(path, tokenizer, args.sequence_len, args.workers)
    strop_rate = args.rows / strop_s
    hf, twin = tokenizer_alone(rows, tokenizer)
    print(f"fields only, tokenizers library ({os.cpu_count()} threads) {hf:7.2f} s  "
          f"{args.rows / hf:9,.0f} rows/s")
    if twin is not None:
        print(f"fields only, tiktoken twin (1 thread)    {twin:7.2f} s  {args.rows / twin:9,.0f} rows/s")
    print(f"strop  {strop_s:7.2f} s  {strop_rate:9,.0f} rows/s  {json.dumps(strop_info)}")
    ok = strop_rate >= TARGET_ROWS_PER_S
    if not args.skip_trl:
        trl_s, trl_info = run_trl(rows, tokenizer, args.sequence_len, args.workers)
        trl_rate = args.rows / trl_s
        print(f"TRL    {trl_s:7.2f} s  {trl_rate:9,.0f} rows/s  {json.dumps(trl_info)}")
        ratio = strop_rate / trl_rate
        print(f"strop / TRL: {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x)")
        ok = ok and ratio >= TARGET_RATIO
    print(f"strop rows/s target >= {TARGET_ROWS_PER_S:,}: {'met' if strop_rate >= TARGET_ROWS_PER_S else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
