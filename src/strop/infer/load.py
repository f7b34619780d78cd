"""Load what a run produced, ready to generate: `load_for_inference(target)`.

A target is one of
- a run directory (output_dir, or one of its checkpoint-N/): strop-config.yml beside either a
  full model (config.json + weights) or a PEFT adapter. An adapter's base comes from the run's
  base_model and is loaded as training loaded it (4-bit for QLoRA, 8-bit when trained so);
- a YAML config: its output_dir is the run;
- a plain Hugging Face model directory (a merged model, a base model);
- a bare PEFT adapter directory (its base named in adapter_config.json).
`base=True` loads the model the run started from instead: the base without the adapter, or a
full fine-tune's base_model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strop.errors import StropError, first_line

if TYPE_CHECKING:
    import torch

    from strop.config.schema import StropConfig

CONFIG_FILE = "strop-config.yml"


@dataclass
class Loaded:
    model: Any            # in eval mode; a PeftModel for an adapter run
    tokenizer: Any
    cfg: StropConfig | None   # the run's resolved config, when the target is a run
    source: Path          # the directory the weights (or the adapter) came from
    kind: str             # "full", "adapter" or "base"
    description: str      # one line for people: what was loaded


def run_dir_of(target: Path) -> Path:
    """A YAML config names its run through output_dir; anything else is the directory itself."""
    if not target.exists():
        raise StropError(f"{target}: no such run directory, model directory or config file")
    if target.is_file():
        if target.suffix not in (".yml", ".yaml"):
            raise StropError(f"{target} is a file; give a run directory (output_dir), a model "
                             "directory or the run's YAML config")
        from strop.config import load_config

        out = Path(load_config(target).cfg.output_dir)
        if not out.is_absolute():
            out = (target.parent / out) if not out.exists() else out
        if not out.is_dir():
            raise StropError(f"{target}: its output_dir {out} does not exist; train it first "
                             f"(strop train {target})")
        return out
    return target


def run_config(run: Path) -> StropConfig | None:
    if not (run / CONFIG_FILE).is_file():
        return None
    from strop.config import load_config

    return load_config(run / CONFIG_FILE).cfg


def load_for_inference(target: Path | str, device: str = "cpu", dtype: torch.dtype | None = None,
                       base: bool = False) -> Loaded:
    """Model (eval mode), tokenizer and the run's config (None for a plain model directory)."""
    import torch

    run = run_dir_of(Path(target))
    cfg = run_config(run)
    dtype = dtype or torch.float32
    has_adapter = (run / "adapter_config.json").is_file()
    has_model = (run / "config.json").is_file()
    if not has_adapter and not has_model:
        checkpoints = sorted(run.glob("checkpoint-*"), key=_step)
        hint = f"; use a checkpoint instead: {checkpoints[-1]}" if checkpoints else \
            " (did the run finish?)"
        raise StropError(f"{run}: no model here (neither config.json nor adapter_config.json)"
                         f"{hint}")
    tokenizer = _tokenizer(run, cfg)
    if has_adapter:
        loaded = _adapter(run, cfg, tokenizer, device, dtype, base)
    elif base:
        loaded = _full_base(run, cfg, tokenizer, device, dtype)
    else:
        model = _causal_lm(str(run), dtype, device, cfg)
        loaded = Loaded(model, tokenizer, cfg, run, "full", f"the model in {run}")
    loaded.model.eval()
    return loaded


def _step(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _tokenizer(run: Path, cfg: StropConfig | None) -> Any:
    """The run's own tokenizer (saved with the model, added tokens and chat template included);
    a bare adapter without one uses its base's."""
    from transformers import AutoTokenizer

    source: str | Path = run
    if not any((run / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        if cfg is not None and cfg.model_source:
            from strop.model.gguf import local_source

            source = local_source(cfg.model_source)
        elif (run / "adapter_config.json").is_file():
            from strop.adapters.lora import read_adapter_config

            source = read_adapter_config(run).get("base_model_name_or_path") or run
    trust = bool(cfg and cfg.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust)
    except (OSError, ValueError) as err:
        first = first_line(err, 200)
        raise StropError(f"cannot load the tokenizer from {source} ({first})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _causal_lm(source: str, dtype: torch.dtype, device: str, cfg: StropConfig | None) -> Any:
    from transformers import AutoModelForCausalLM

    from strop.model.load import from_pretrained
    from strop.model.meta import config_from_source

    architectures = getattr(config_from_source(source), "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in architectures):
        raise StropError(f"{source} is a masked language model ({architectures[0]}); chat, "
                         "generate and eval need a causal LM")
    trust = bool(cfg and cfg.trust_remote_code)
    return from_pretrained(AutoModelForCausalLM, source, dtype=dtype, device=device,
                           trust_remote_code=trust, key="model")


def _full_base(run: Path, cfg: StropConfig | None, tokenizer: Any, device: str,
               dtype: torch.dtype) -> Loaded:
    if cfg is None or not cfg.base_model:
        why = "it was pretrained from scratch" if cfg is not None else \
            "it has no strop-config.yml naming its base_model"
        raise StropError(f"{run}: there is no base model to compare with ({why})")
    from strop.model.load import resize_embeddings

    model = _causal_lm(cfg.model_source, dtype, device, cfg)
    resize_embeddings(model, len(tokenizer))
    return Loaded(model, tokenizer, cfg, Path(cfg.model_source), "base",
                  f"the base model {cfg.model_source}")


def _adapter(run: Path, cfg: StropConfig | None, tokenizer: Any, device: str, dtype: torch.dtype,
             base: bool) -> Loaded:
    from strop.adapters.merge import find_source

    located = find_source(run)
    if cfg is not None:
        # The base exactly as training loaded it: quantized for QLoRA, embeddings grown to the
        # run's tokenizer. The adapter was trained against these weights.
        from strop.model.load import load_model

        as_trained = cfg.model_copy(update={"base_model": located.base_model, "gguf_file": None,
                                           "adapter": None})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the run already warned (attention)
            model = load_model(as_trained, tokenizer, device, dtype)
    else:
        from strop.model.load import resize_embeddings

        model = _causal_lm(located.base_model, dtype, device, None)
        resize_embeddings(model, len(tokenizer))
    quant = f" ({located.quantized_training})" if located.quantized_training else ""
    if base:
        return Loaded(model, tokenizer, cfg, Path(located.base_model), "base",
                      f"the base model {located.base_model}{quant}, without the adapter")
    from strop.adapters.merge import _attach_adapter

    peft_model = _attach_adapter(model, located)
    return Loaded(peft_model, tokenizer, cfg, run, "adapter",
                  f"the adapter in {run} on {located.base_model}{quant}")
