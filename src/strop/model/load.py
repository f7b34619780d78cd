"""The model a run trains: pretrained weights from a directory or the hub, or a fresh model built
from a config with a seed.

`load_model(cfg, tokenizer, device, dtype)` is the only entry point the training loop uses. The
caller chooses `dtype` for the weights: fp32 for full fine-tuning and pretraining (the optimizer's
master weights), bf16 for a frozen base under LoRA (half the memory and bandwidth; the adapter's
own weights stay fp32, see strop.adapters.lora). Gradient checkpointing and torch.compile are
applied by the loop after adapters are added.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strop.errors import StropError, first_line

if TYPE_CHECKING:
    import torch
    import torch.nn as nn
    from transformers import PretrainedConfig, PreTrainedModel

    from strop.config.schema import StropConfig

def load_model(cfg: StropConfig, tokenizer: Any, device: str = "cpu",
               dtype: torch.dtype | None = None, *, skeleton: bool = False) -> PreTrainedModel:
    """The model of this config on `device`, its floating-point weights in `dtype` (default fp32).

    - base_model set: pretrained weights (the class from model_type, else AutoModelForCausalLM,
      or AutoModelForMaskedLM for objective masked_lm), 4-bit / 8-bit through bitsandbytes when
      load_in_4bit / load_in_8bit;
    - otherwise a fresh model from model_config / base_model_config, initialised from cfg.seed,
      its vocabulary sized to the tokenizer.
    Embeddings grow when the tokenizer has more tokens than the model (new rows at the mean
    embedding). An attention implementation that is not available here falls back to sdpa.

    skeleton: the same model on the meta device, no weights read or initialised: the ranks other
    than 0 under fsdp_config.cpu_ram_efficient_loading, which receive their shards from rank 0.
    """
    import torch

    dtype = dtype or torch.float32
    device = _resolve_device(device)
    attention = available_attention(cfg.attention, device)
    if skeleton:
        model = _with_attention_fallback(
            lambda impl: build_skeleton(cfg, tokenizer, dtype, impl), attention)
    elif cfg.from_scratch:
        model = _with_attention_fallback(
            lambda impl: build_from_scratch(cfg, tokenizer, dtype, impl), attention)
        model.to(device)
    else:
        model = _with_attention_fallback(
            lambda impl: load_pretrained(cfg, device, dtype, impl), attention)
    added = resize_embeddings(model, len(tokenizer))
    if added and cfg.uses_lora:
        _warn_frozen_new_tokens(model, cfg, added)
    return model


def _resolve_device(device: str) -> str:
    if device == "auto":
        from strop.device import detect

        return detect().resolve("auto")
    return device


# ------------------------------------------------------------------------------------ attention


def available_attention(requested: str, device: str) -> str:
    """`requested`, or sdpa (with a one-line warning) when it cannot run here."""
    from transformers.utils import is_torch_flex_attn_available

    reason = None
    if requested in ("flash_attention_2", "flash_attention_3"):
        installed = flash_installed(requested)
        if device != "cuda":
            reason = f"it needs a CUDA GPU and this run is on {device}"
        elif not installed:
            package = "flash-attn" if requested == "flash_attention_2" else "flash-attn 3"
            reason = f"{package} is not installed"
    elif requested == "flex_attention":
        if not is_torch_flex_attn_available():
            reason = "this torch build has no flex attention"
        elif device == "cpu":
            reason = "torch's flex attention has no backward pass on a CPU"
    if reason is None:
        return requested
    _warn(f"attn_implementation {requested} is not available ({reason}); using sdpa instead")
    return "sdpa"


def flash_installed(requested: str) -> bool:
    """The flash-attn package that attn_implementation `requested` needs is installed."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if requested == "flash_attention_2":
        return is_flash_attn_2_available()
    return requested == "flash_attention_3" and is_flash_attn_3_available()


def _with_attention_fallback(build, attention: str):
    """Build with `attention`; if the architecture does not implement it, sdpa, then eager."""
    tried = []
    for impl in dict.fromkeys([attention, "sdpa", "eager"]):
        try:
            model = build(impl)
        except (ValueError, ImportError) as err:
            text = str(err)
            if impl not in text and "attention" not in text.lower():
                raise
            tried.append(impl)
            continue
        if tried:
            _warn(f"{type(model).__name__} does not support attention {', '.join(tried)}; "
                  f"using {impl}")
        return model
    raise StropError(f"no attention implementation works for this model (tried "
                     f"{', '.join(tried)}); set attn_implementation: eager")


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


# ------------------------------------------------------------------------------------ classes


def model_class(cfg: StropConfig):
    """The class that loads this config's model: model_type (a transformers class name such as
    LlamaForCausalLM or AutoModelForCausalLM), else the Auto class for the objective."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel

    if cfg.model_type:
        cls = getattr(transformers, cfg.model_type, None)
        auto_base = getattr(transformers.models.auto.auto_factory, "_BaseAutoModelClass", ())
        if isinstance(cls, type) and (issubclass(cls, PreTrainedModel) or issubclass(cls, auto_base)):
            return cls
        from strop.config.suggest import closest

        known = [n for n in dir(transformers) if n.endswith(("ForCausalLM", "ForMaskedLM", "LMHeadModel"))]
        guess = closest(cfg.model_type, [n.lower() for n in known])
        hint = next((n for n in known if n.lower() == guess), None)
        raise StropError(f"model_type: {cfg.model_type!r} is not a transformers model class"
                         + (f"; did you mean {hint}?" if hint else "; e.g. LlamaForCausalLM, or "
                            "leave model_type out to use AutoModelForCausalLM"))
    return AutoModelForMaskedLM if cfg.objective == "masked_lm" else AutoModelForCausalLM


# ------------------------------------------------------------------------------------ pretrained


def load_pretrained(cfg: StropConfig, device: str, dtype: torch.dtype,
                    attention: str) -> PreTrainedModel:
    """base_model's weights, quantized when the config says so, placed on `device`."""
    from strop.model.quantize import bnb_config, keep_4bit_weights_trainable

    assert cfg.model_source is not None
    config = None
    if cfg.base_model_config or cfg.model_config_dict:
        from strop.model.meta import resolve_model_config

        config = resolve_model_config(cfg)
    quantization = bnb_config(cfg, device)
    model = from_pretrained(model_class(cfg), cfg.model_source, dtype=dtype, device=device,
                            attention=attention, trust_remote_code=cfg.trust_remote_code,
                            revision=cfg.model_revision, config=config, quantization=quantization)
    if quantization is not None:
        keep_4bit_weights_trainable(model)
    return model


def from_pretrained(cls, source: str, *, dtype: torch.dtype, device: str = "cpu",
                    attention: str = "sdpa", trust_remote_code: bool = False,
                    revision: str | None = None, config: PretrainedConfig | None = None,
                    quantization: Any = None, key: str = "base_model") -> PreTrainedModel:
    """`cls.from_pretrained(source)`; a source that cannot be read is one line naming it. A GGUF
    file loads from its dequantized copy (strop.model.gguf)."""
    from strop.model.gguf import local_source

    _check_local_path(source, key)
    source = local_source(source, revision)
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=attention,
                                  trust_remote_code=trust_remote_code, device_map={"": device})
    if revision:
        kwargs["revision"] = revision
    if config is not None:
        kwargs["config"] = config
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as err:
        raise StropError(f"{key} {source}: cannot load it ({first_line(err)}); offline, download "
                         "it first (huggingface-cli download) and point to the local "
                         "directory") from None


def build_skeleton(cfg: StropConfig, tokenizer: Any, dtype: torch.dtype,
                   attention: str) -> PreTrainedModel:
    """The model's architecture on the meta device: shapes and dtypes, no memory, no file read
    but the config."""
    import torch

    with torch.device("meta"):
        return _instantiate(model_class(cfg), architecture(cfg, tokenizer), dtype, attention,
                            cfg.trust_remote_code)


def architecture(cfg: StropConfig, tokenizer: Any) -> PretrainedConfig:
    """The config of the model a run trains, read before any weight: base_model's (with the
    config's overrides), or the one built from scratch."""
    from strop.model.meta import resolve_model_config

    return scratch_config(cfg, tokenizer) if cfg.from_scratch else resolve_model_config(cfg)


def _check_local_path(source: str, key: str) -> None:
    """A value that is clearly a path (./x, /x, ~/x) but does not exist: say so, not 'hub'."""
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise StropError(f"{key}: {source} does not exist; give a model directory (config.json + "
                         "weights) or a hub id")



# ------------------------------------------------------------------------------------ scratch


def scratch_config(cfg: StropConfig, tokenizer: Any) -> PretrainedConfig:
    """The architecture of a new model: model_config (or base_model_config + overrides), with the
    vocabulary and special token ids taken from the tokenizer."""
    from strop.model.meta import resolve_model_config

    hf_config = resolve_model_config(cfg)
    explicit_vocab = cfg.model_config_dict.get("vocab_size")
    if explicit_vocab and explicit_vocab < len(tokenizer):
        _warn(f"model_config.vocab_size {explicit_vocab} is smaller than the tokenizer's "
              f"{len(tokenizer)} tokens; using {len(tokenizer)}")
    if not explicit_vocab or explicit_vocab < len(tokenizer):
        # A larger explicit vocab_size (padded to a multiple of 64 for speed) is kept.
        hf_config.vocab_size = len(tokenizer)
    for role in ("pad", "bos", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None and f"{role}_token_id" not in cfg.model_config_dict:
            setattr(hf_config, f"{role}_token_id", token_id)
    return hf_config


def build_from_scratch(cfg: StropConfig, tokenizer: Any, dtype: torch.dtype,
                       attention: str = "sdpa") -> PreTrainedModel:
    """A new model with fresh weights, the same for the same cfg.seed whatever ran before."""
    import torch

    hf_config = scratch_config(cfg, tokenizer)
    cls = model_class(cfg)
    # The model's own RNG stream: initialisation depends on the seed alone, not on how much
    # randomness data preparation or tokenizer training consumed first.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _instantiate(cls, hf_config, dtype, attention, cfg.trust_remote_code)


def _instantiate(cls, hf_config: PretrainedConfig, dtype: torch.dtype, attention: str,
                 trust_remote_code: bool) -> PreTrainedModel:
    if hasattr(cls, "from_config"):
        return cls.from_config(hf_config, dtype=dtype, attn_implementation=attention,
                               trust_remote_code=trust_remote_code)
    hf_config._attn_implementation = attention
    return cls(hf_config).to(dtype)


# ------------------------------------------------------------------------------------ vocabulary


def resize_embeddings(model: nn.Module, vocab_size: int) -> int:
    """Grow the embeddings (and an untied output head) to `vocab_size`; returns the rows added.

    New rows start at the mean of the existing rows, so a new token's first predictions are
    neutral rather than random. A model with more rows than the tokenizer (vocabularies padded
    to a multiple of 64 or 128) is left as it is.
    """
    import torch

    current = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= current:
        return 0
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and head.weight is not matrices[0]:
            matrices.append(head.weight)
        for weight in matrices:
            weight[current:] = weight[:current].float().mean(dim=0).to(weight.dtype)
        bias = getattr(head, "bias", None) if head is not None else None
        if bias is not None and bias.shape[0] == vocab_size:
            bias[current:] = bias[:current].float().mean().to(bias.dtype)
    return vocab_size - current


def embedding_module_names(model: nn.Module) -> set[str]:
    """Short names (last part) of the input embeddings and output head: embed_tokens, lm_head, ..."""
    wanted = [model.get_input_embeddings()]
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        wanted.append(model.get_output_embeddings())
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if any(module is w for w in wanted) and name}


def _warn_frozen_new_tokens(model: nn.Module, cfg: StropConfig, added: int) -> None:
    missing = sorted(embedding_module_names(model) - set(cfg.lora_modules_to_save or []))
    if missing:
        _warn(f"{added} token(s) were added to the vocabulary, but LoRA keeps {' and '.join(missing)} "
              "frozen, so the new tokens stay at the mean embedding; add "
              f"{' and '.join(missing)} to lora_modules_to_save to train them")
