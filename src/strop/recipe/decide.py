"""The trainer's decisions for one run, in one place: what the loop builds (strop.train.loop)
and what `strop plan` estimates (strop.plan.estimate) both come from `decide_setup`.

- precision: the dtypes (strop.precision);
- attention: the implementation that runs (flash attention needs a CUDA GPU and flash-attn,
  else SDPA);
- mask_free: packed or padded rows attend without a 4-D mask, for the causal families whose
  attention strop.model.attention reproduces: flash attention, or strop's own varlen
  attention in place of SDPA / eager (`varlen`);
- fused_loss / logits_chunk: a plain causal-LM head goes through strop's chunked loss, so only
  logits_chunk rows of logits exist at a time (strop.train.loss);
- lean_norms / lean_swiglu: RMSNorm and SwiGLU that save fewer activations
  (strop.train.lean_activations), not under torch.compile, gradient checkpointing or FSDP2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from strop.precision import Precision, decide_precision

if TYPE_CHECKING:
    from strop.config.schema import StropConfig
    from strop.device import DeviceCaps

# Rows of hidden states whose logits exist at once in the loss: a 1024 x 128k-vocab chunk is
# 0.5 GB in fp32, small against a step's activations, and large enough that the matmuls stay
# efficient. (256 rows lowered the peak a little more but moved it to places strop plan does
# not model as well: its memory error on checkpointed runs grew past 10%.)
LOSS_CHUNK_ROWS = 1024

# Classes whose forward is exactly transformers' LlamaRMSNorm / LlamaMLP (checked by a test
# against each class's own forward): the ones strop.train.lean_activations replaces.
LEAN_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
              "GraniteRMSNorm"}
LEAN_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GraniteMLP"}
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                 "phi3": "Phi3", "granite": "Granite"}


@dataclass(frozen=True)
class Decisions:
    precision: Precision
    attention: str
    mask_free: bool
    fused_loss: bool
    logits_chunk: int | None
    lean_norms: bool
    lean_swiglu: bool

    @property
    def device(self) -> str:
        return self.precision.device

    @property
    def varlen(self) -> bool:
        """strop's varlen attention replaces the model's during training."""
        return self.mask_free and self.attention in ("sdpa", "eager")

    @property
    def lean(self) -> bool:
        return self.lean_norms or self.lean_swiglu


def decide_setup(cfg: StropConfig, caps: DeviceCaps, hf_config: Any, device: str, *,
                 strategy: str = "single", flash_installed: bool = True) -> Decisions:
    """The decisions for `cfg` on `device` (what `caps` says it can do), for a model of
    `hf_config`, run on one process ("single") or under "ddp" / "fsdp". flash_installed: the
    flash-attn package is there (`strop plan` assumes a GPU machine has it)."""
    from strop.model.attention import supports_varlen

    causal = cfg.objective == "causal_lm"
    flash = cfg.attention.startswith("flash")
    # As strop.model.load.available_attention falls back: flash attention without a CUDA GPU
    # or flash-attn, flex attention on a CPU (no backward there).
    off = (flash and not (device == "cuda" and flash_installed)) or \
        (cfg.attention == "flex_attention" and device == "cpu")
    attention = "sdpa" if off else cfg.attention
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    plain_head = causal and not any(getattr(text, key, None)
                                    for key in ("final_logit_softcapping", "logit_scale"))
    lean = lean_activations_used(cfg) and strategy != "fsdp"
    norms, swiglu = lean_parts(hf_config) if lean else (False, False)
    return Decisions(
        precision=decide_precision(cfg, caps, device),
        attention=attention,
        mask_free=causal and supports_varlen(hf_config, cfg.sequence_len),
        fused_loss=plain_head,
        logits_chunk=LOSS_CHUNK_ROWS if causal else None,
        lean_norms=norms,
        lean_swiglu=swiglu,
    )


def lean_activations_used(cfg: StropConfig) -> bool:
    """Not under torch.compile (its graphs free intermediates on their own) nor with gradient
    checkpointing (which keeps only each layer's input, and whose saved-tensor hooks the
    SwiGLU's would hide inside down_proj). Under FSDP2 neither: the lean modules hold the
    norms' parameters themselves, and FSDP2 swaps sharded and gathered parameters on the
    modules that held them when it sharded."""
    return not cfg.compile_model and not cfg.gradient_checkpointing


def silu_mlp(config: Any) -> bool:
    return getattr(config, "hidden_act", None) in ("silu", "swish")


def lean_parts(config: Any) -> tuple[bool, bool]:
    """(norms, SwiGLU): which lean modules a model of this config trains with."""
    prefix = _CLASS_PREFIX.get(getattr(config, "model_type", None), "")
    return f"{prefix}RMSNorm" in LEAN_NORMS, f"{prefix}MLP" in LEAN_MLPS and silu_mlp(config)


def decide_for(cfg: StropConfig, tokenizer: Any, strategy: str = "single") -> Decisions:
    """decide_setup for a run on this machine: the model's architecture read from the config
    (and the tokenizer, for a model built from scratch). Training asks, and `strop preprocess`
    too, to prepare the rows training will read."""
    from strop.device import detect
    from strop.model.load import architecture, flash_installed
    from strop.precision import run_device

    caps = detect()
    return decide_setup(cfg, caps, architecture(cfg, tokenizer), run_device(cfg, caps),
                        strategy=strategy, flash_installed=flash_installed(cfg.attention))
