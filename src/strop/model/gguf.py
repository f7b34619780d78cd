"""A GGUF file (llama.cpp's and Ollama's format) as a base model.

`base_model:` may name a `.gguf` file: a local path, or `owner/repo/file.gguf` on the hub (the
same as `base_model: owner/repo` with `gguf_file: file.gguf`). transformers reads GGUF, but only
by dequantizing every tensor on each load, and a model it loaded that way refuses
`save_pretrained`. So strop dequantizes a GGUF once into an ordinary Hugging Face directory
(config.json, fp32 model.safetensors, the tokenizer with its chat template) in a cache, and
every verb then loads that directory like any other model: in the training dtype, 4-bit for
QLoRA, with PEFT on top. The run's strop-config.yml keeps the GGUF path the user wrote.

Config-only readers (`strop validate`, `plan`, `inspect`) read the GGUF's metadata, not its
tensors: `gguf_config(path)` is quick on any size of model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from strop.errors import StropError, first_line

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SUFFIX = ".gguf"
# Written last into a converted directory: what it was made from. A directory without it is an
# interrupted conversion and is made again.
MARKER = "strop-gguf.json"
FORMAT = 2  # of the converted directory; a new value converts again


def is_gguf(source: str | os.PathLike | None) -> bool:
    return source is not None and str(source).lower().endswith(SUFFIX)


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "strop" / "gguf"
    return Path(os.environ.get("STROP_GGUF_CACHE", default))


# ------------------------------------------------------------------------------------ locate


def locate(source: str, revision: str | None = None) -> Path:
    """The GGUF file on disk: a local path, or `owner/repo/path/in/repo.gguf` fetched from the
    hub (through huggingface_hub's cache, so offline it must be there already)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    parts = source.strip("/").split("/")
    looks_local = source.startswith(("/", "./", "../", "~")) or len(parts) < 3
    if looks_local or path.parent.is_dir():
        raise StropError(f"base_model: {source} does not exist; give a .gguf file, a model "
                         "directory (config.json + weights) or a hub id")
    from huggingface_hub import hf_hub_download

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as err:  # the hub client raises many kinds; all mean "not available"
        raise StropError(f"base_model: {source} is no local file, and as a hub path "
                         f"(owner/repo/file.gguf) {filename} cannot be fetched from {repo} "
                         f"({first_line(err, 160)}); give the local path of an existing .gguf "
                         "file") from None


def _check_magic(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise StropError(f"base_model: {path} is not a GGUF file (it does not start with 'GGUF'); "
                         "give a .gguf file from llama.cpp or Ollama, or a model directory")


# ------------------------------------------------------------------------------------ config


def gguf_config(source: str, revision: str | None = None) -> PretrainedConfig:
    """The model's config from the GGUF's metadata, without reading its tensors."""
    from transformers import AutoConfig

    path = locate(source, revision)
    converted = _converted(path)
    if converted is not None:  # its config.json reads in milliseconds, the GGUF in seconds
        return AutoConfig.from_pretrained(converted)
    _check_magic(path)
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:
        raise StropError(f"base_model: {path}: transformers cannot read this GGUF "
                         f"({first_line(err, 160)}); its architecture may not be supported "
                         "for GGUF loading") from None


# ------------------------------------------------------------------------------------ convert


def _key(path: Path) -> str:
    """What a converted directory depends on: the file (path, size, mtime) and transformers,
    whose GGUF reader names and reshapes the tensors."""
    import transformers

    stat = path.resolve().stat()
    facts = [FORMAT, str(path.resolve()), stat.st_size, stat.st_mtime_ns,
             transformers.__version__]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:20]


def _cache_dir(path: Path) -> Path:
    return cache_root() / f"{path.stem}-{_key(path)}"


def _converted(path: Path) -> Path | None:
    out = _cache_dir(path)
    return out if (out / MARKER).is_file() else None


def cache_dir_if_converted(source: str | None) -> str | None:
    """The converted directory of a local GGUF that has been converted already, else None:
    for readers that want the tokenizer when it is at hand but must not convert (plan)."""
    if not is_gguf(source) or not Path(source).expanduser().is_file():
        return None
    converted = _converted(Path(source).expanduser())
    return str(converted) if converted else None


def hf_dir(source: str, revision: str | None = None) -> Path:
    """A Hugging Face model directory holding the GGUF's weights, dequantized (once, cached)."""
    path = locate(source, revision)
    out = _cache_dir(path)
    if (out / MARKER).is_file():
        return out
    _check_magic(path)
    started = time.perf_counter()
    print(f"strop: dequantizing {path.name} once into {out} (later runs reuse it)",
          file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _convert(path, partial)
        (partial / MARKER).write_text(json.dumps({
            "source": str(path.resolve()), "size": path.stat().st_size,
            "seconds": round(time.perf_counter() - started, 1)}, indent=1) + "\n")
        if (out / MARKER).is_file():  # another process finished first: keep its copy
            shutil.rmtree(partial, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier conversion
            os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _convert(path: Path, out: Path) -> None:
    """Dequantize into fp32 plain modules and save them as safetensors with the tokenizer.

    transformers marks a model it loaded from GGUF as quantized and will not save it, so the
    weights move into a model built from the same config, which saves like any other."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as err:
        raise StropError(f"base_model: {path}: transformers cannot load this GGUF "
                         f"({first_line(err, 160)}); its architecture or quantization type may "
                         "not be supported") from None
    # The loaded config says "quantized with gguf"; the saved copy is an ordinary fp32 model (and
    # must be, for bitsandbytes to quantize it for QLoRA).
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    del loaded
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def local_source(source: str, revision: str | None = None) -> str:
    """`source` as from_pretrained can read it: a GGUF becomes its converted directory."""
    return str(hf_dir(source, revision)) if is_gguf(source) else source
