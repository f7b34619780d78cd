"""`strop merge`: fold a LoRA adapter into its base model, verified before anything is written.

The base is always reloaded in full precision from where the run says it came from
(strop-config.yml's base_model, or --base). After QLoRA this matters: the adapter was trained
against 4-bit weights, but merging it into dequantized 4-bit weights would bake the quantization
error into the result; merging into the original weights gives the model the adapter was meant
to correct, which is what QLoRA's authors and PEFT recommend.

Verification: the merged model's logits are compared with the unmerged adapter model's on probe
inputs; a merge that disagrees beyond the tolerance is not written unless forced.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strop.errors import StropError, first_line

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from strop.config.schema import StropConfig

CONFIG_FILE = "strop-config.yml"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json",
                   "vocab.txt")
# Merging in fp32 changes logits by ~1e-6 of their scale; anything near 1e-3 is a real mismatch
# (a wrong base, a vocabulary that does not fit, fan_in_fan_out applied the wrong way round).
DEFAULT_TOLERANCE = 1e-3


@dataclass
class MergeSource:
    """Where the adapter, its base model and its tokenizer are."""

    adapter_dir: Path
    base_model: str
    cfg: StropConfig | None  # the run's resolved config, when there is one
    tokenizer_dir: str
    quantized_training: str | None  # "4-bit" / "8-bit" when the adapter was trained on one


@dataclass
class MergeResult:
    out: Path | None
    base_model: str
    max_abs_diff: float
    logits_scale: float  # max |logit| of the adapter model on the probes
    tolerance: float
    passed: bool
    dtype: str
    probe_shape: tuple[int, int]
    messages: list[str] = field(default_factory=list)


def find_source(source: Path, base: str | None = None) -> MergeSource:
    """A run directory (strop-config.yml + adapter), one of its checkpoints, or a bare PEFT
    adapter directory (with --base, or the base named in adapter_config.json)."""
    from strop.adapters.lora import read_adapter_config

    if not source.exists():
        raise StropError(f"{source}: no such run directory or adapter directory")
    if not source.is_dir():
        raise StropError(f"{source} is a file; give a run directory (output_dir) or a PEFT adapter "
                         "directory")
    has_config = (source / CONFIG_FILE).is_file()
    if not (source / "adapter_config.json").is_file():
        if has_config and _raw_adapter_key(source / CONFIG_FILE) is None:
            raise StropError(f"{source} is a full fine-tuning run: it is already a complete model "
                             "and has no adapter to merge")
        checkpoints = sorted(source.glob("checkpoint-*/adapter_config.json"))
        hint = f"; merge a checkpoint instead: strop merge {checkpoints[-1].parent}" \
            if checkpoints else ""
        raise StropError(f"{source}: no adapter_config.json (the run did not finish?){hint}")
    cfg = _run_config(source) if has_config else None
    adapter_config = read_adapter_config(source)
    base_model = base or (cfg.model_source if cfg else None) \
        or adapter_config.get("base_model_name_or_path")
    if not base_model:
        raise StropError(f"{source}: the adapter does not name its base model; give it with "
                         "--base PATH")
    has_tokenizer = any((source / f).is_file() for f in TOKENIZER_FILES)
    quantized = None
    if cfg is not None and (cfg.load_in_4bit or cfg.load_in_8bit):
        quantized = "4-bit" if cfg.load_in_4bit else "8-bit"
    return MergeSource(adapter_dir=source, base_model=str(base_model), cfg=cfg,
                       tokenizer_dir=str(source) if has_tokenizer else str(base_model),
                       quantized_training=quantized)


def _raw_adapter_key(path: Path) -> Any:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return data.get("adapter") if isinstance(data, dict) else None


def _run_config(source: Path) -> StropConfig:
    from strop.config import load_config

    # The config's rules do not look at the machine, so a run trained on a GPU (bf16: true,
    # device: cuda) merges on a laptop.
    return load_config(source / CONFIG_FILE).cfg


def check_output_dir(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse to write over a non-empty directory (unless overwrite), or over the source."""
    resolved, src = out.resolve(), source.resolve()
    if resolved == src or resolved in src.parents:
        raise StropError(f"--out {out} would overwrite the run being merged; choose another "
                         "directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise StropError(f"--out {out} already exists and is not empty; choose a new directory or "
                         "pass --overwrite to replace it")


def merge_adapter(source: Path, out: Path | None, base: str | None = None, force: bool = False,
                  overwrite: bool = False, dtype: str = "auto",
                  tolerance: float = DEFAULT_TOLERANCE) -> MergeResult:
    """Merge, verify against the unmerged adapter, then write a Hugging Face model directory."""
    import torch

    located = find_source(source, base)
    if out is None:
        raise StropError("--out DIR is required: where to write the merged model")
    check_output_dir(out, source, overwrite)
    messages = [f"merging the adapter in {located.adapter_dir} into {located.base_model}"]
    if located.quantized_training:
        messages.append(f"the adapter was trained on a {located.quantized_training} base: merging "
                        f"into the original full-precision weights reloaded from "
                        f"{located.base_model}, not into dequantized {located.quantized_training} "
                        "weights")

    tokenizer = _load_tokenizer(located)
    model = _load_base(located, tokenizer)
    save_dtype = _save_dtype(dtype, located)
    peft_model = _attach_adapter(model, located)
    probes = probe_inputs(tokenizer, model.get_input_embeddings().weight.shape[0])
    with torch.no_grad():
        want = _logits(peft_model, probes)
        merged = peft_model.merge_and_unload()
        got = _logits(merged, probes)
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    passed = diff <= tolerance * max(1.0, scale)
    messages.append(f"verified on {probes.shape[0]} probe sequences of {probes.shape[1]} tokens: "
                    f"max |merged - adapter| logit difference {diff:.3g} (largest logit "
                    f"{scale:.3g}, tolerance {tolerance:g} x max(1, largest logit))")
    result = MergeResult(out=None, base_model=located.base_model, max_abs_diff=diff,
                         logits_scale=scale, tolerance=tolerance, passed=passed,
                         dtype=str(save_dtype).removeprefix("torch."),
                         probe_shape=tuple(probes.shape), messages=messages)
    if not passed and not force:
        raise StropError(f"the merged model's logits differ from the adapter model's by {diff:.3g} "
                         f"(tolerance {tolerance * max(1.0, scale):.3g}); nothing was written. Is "
                         f"{located.base_model} the model the adapter was trained on? Pass --force "
                         "to write it anyway")
    if not passed:
        messages.append("the check failed; writing anyway because of --force")
    _write(merged.to(save_dtype), tokenizer, out)
    result.out = out
    messages.append(f"wrote {out}: a Hugging Face model ({result.dtype}, safetensors) with its "
                    "tokenizer")
    return result


def _load_tokenizer(located: MergeSource) -> Any:
    from transformers import AutoTokenizer

    trust = bool(located.cfg and located.cfg.trust_remote_code)
    try:
        from strop.model.gguf import local_source

        return AutoTokenizer.from_pretrained(local_source(located.tokenizer_dir),
                                             trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise StropError(f"cannot load the tokenizer from {located.tokenizer_dir} "
                         f"({first_line(err)}); "
                         "the run directory should hold it") from None


def _load_base(located: MergeSource, tokenizer: Any) -> nn.Module:
    """The base in fp32, grown to the tokenizer's vocabulary exactly as training grew it."""
    import warnings

    import torch

    from strop.model.load import from_pretrained, load_model, resize_embeddings

    if located.cfg is not None:
        full_precision = located.cfg.model_copy(update={
            "base_model": located.base_model, "gguf_file": None, "load_in_4bit": False,
            "load_in_8bit": False,
            "adapter": None})
        with warnings.catch_warnings():
            # The run already warned about its attention kernel; merging uses whatever works.
            warnings.simplefilter("ignore", UserWarning)
            return load_model(full_precision, tokenizer, "cpu", torch.float32)
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from strop.adapters.lora import read_adapter_config

    task = read_adapter_config(located.adapter_dir).get("task_type")
    cls = AutoModelForCausalLM if task == "CAUSAL_LM" or not _is_masked_lm(located.base_model) \
        else AutoModelForMaskedLM
    model = from_pretrained(cls, located.base_model, dtype=torch.float32, key="--base")
    resize_embeddings(model, len(tokenizer))
    return model


def _is_masked_lm(base_model: str) -> bool:
    from strop.model.meta import config_from_source

    architectures = getattr(config_from_source(base_model), "architectures", None) or []
    return any(a.endswith("ForMaskedLM") for a in architectures)


def _save_dtype(requested: str, located: MergeSource) -> torch.dtype:
    """auto: the base model's own dtype (config.json), so the merged model is the size users
    expect; float32 when the config gives none."""
    import torch

    if requested != "auto":
        if requested not in ("float32", "bfloat16", "float16"):
            raise StropError(f"--dtype {requested}: choose auto, float32, bfloat16 or float16")
        return getattr(torch, requested)
    from strop.model.meta import config_from_source

    stored = getattr(config_from_source(located.base_model), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _attach_adapter(model: nn.Module, located: MergeSource) -> nn.Module:
    import warnings

    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return PeftModel.from_pretrained(model, str(located.adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        raise StropError(f"{located.adapter_dir}: the adapter does not fit {located.base_model} "
                         f"({first_line(err, 300)}); give the base it was trained on "
                         "with --base") from None


def probe_inputs(tokenizer: Any, vocab_rows: int, rows: int = 4, length: int = 32,
                 seed: int = 0) -> torch.Tensor:
    """Probe token ids: tokenized text (the common path) and random ids from the whole
    vocabulary, added tokens included (the rows a merge is most likely to get wrong)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_rows, (rows, length), generator=generator)
    text = tokenizer("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"][:length]
    ids[0, :len(text)] = torch.tensor(text)
    return ids


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def _write(model: nn.Module, tokenizer: Any, out: Path) -> None:
    """Write to a temporary sibling directory, then move it into place: an interrupted merge
    never leaves a half-written model under --out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
