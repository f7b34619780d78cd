"""What the benchmarks share: the tiny Llama of the issues, a tokenizer trained locally, and
skewed-length instruction data, all built offline and deterministically.
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
from pathlib import Path

# The ~34M-parameter Llama the training issue names.
BENCH_LLAMA = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=2048,
                   tie_word_embeddings=False)
VOCAB = 8192

WORDS = ("the of and to in is was for on that with by as at from it an be this which or are "
         "river mountain city forest north south east west market bridge harbor tower garden "
         "merchant farmer baker teacher doctor sailor painter builder writer singer "
         "red blue green yellow purple silver golden bright quiet ancient modern small large "
         "walks builds sells paints writes sings teaches heals sails grows carries finds "
         "morning evening winter summer spring autumn year day night week month "
         "question answer reason story history science music letter number word name").split()


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def _text(rng: random.Random, n_words: int) -> str:
    out, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(5, 18))
        out.append(_sentence(rng, k))
        left -= k
    return " ".join(out)


def skewed_length(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    """Log-normal lengths: most rows short, a long tail (as real instruction data is)."""
    return max(3, min(cap, int(math.exp(rng.gauss(math.log(median), sigma)))))


def instruction_rows(n: int, seed: int = 0, max_words: int = 700) -> list[dict]:
    """Alpaca-style rows whose instruction and output lengths are skewed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rows.append({
            "instruction": _text(rng, skewed_length(rng, 30, 0.8, max_words // 2)),
            "input": _text(rng, skewed_length(rng, 20, 1.0, max_words // 4))
            if rng.random() < 0.4 else "",
            "output": _text(rng, skewed_length(rng, 80, 0.9, max_words)),
        })
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus_for_tokenizer(n: int = 3000, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [_text(rng, rng.randint(20, 200)) for _ in range(n)]


def build_tokenizer(path: Path, vocab_size: int = VOCAB):
    from strop.config.schema import PretrainTokenizer
    from strop.model.tokenizer_train import train_tokenizer

    if (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    tok = train_tokenizer(corpus_for_tokenizer(), PretrainTokenizer(vocab_size=vocab_size,
                                                                    min_frequency=1))
    tok.save_pretrained(path)
    return tok


def build_model_dir(path: Path, seed: int = 0, **sizes) -> Path:
    """A randomly initialised Llama saved with its tokenizer, like a hub checkpoint on disk."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").exists():
        return path
    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    # The vocabulary of 8192: the benchmark text has too few distinct words for BPE to
    # learn that many tokens (it stops near 750), so the embedding and head are padded to it, as
    # hub models pad theirs; the output head's cost is then the issue's.
    config = AutoConfig.for_model("llama", vocab_size=max(VOCAB, len(tok)),
                                  bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  **{**BENCH_LLAMA, **sizes})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def params_millions(path: Path) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters()) / 1e6
