"""From a config to the numbers: model shape, parameters, memory and FLOPs for one device kind.

`model_facts(cfg)` does the slow part once (config.json, the meta-device model, PEFT on it);
`setup_for(cfg, ...)` and `estimate_memory` are then cheap enough to evaluate for every GPU and
every knob the report tries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from strop.plan import math as tm
from strop.plan.memory import Setup
from strop.plan.params import ParamCounts, count_params
from strop.plan.shape import ModelShape, model_shape

if TYPE_CHECKING:
    from strop.config.schema import StropConfig


@dataclass(frozen=True)
class ModelFacts:
    hf_config: Any
    shape: ModelShape
    params: ParamCounts
    source: str          # where config.json came from (a path, a hub id, strop's table)


def training_mode(cfg: StropConfig) -> str:
    if cfg.uses_lora and cfg.load_in_4bit:
        return "qlora"
    if cfg.uses_lora and cfg.load_in_8bit:
        return "lora8"
    return "lora" if cfg.uses_lora else "full"


def model_facts(cfg: StropConfig) -> ModelFacts:
    """The architecture (offline table, local path or hub) and its parameter counts."""
    from strop.model.meta import meta_model

    hf_config = _architecture(cfg)
    model = meta_model(hf_config, cfg.objective, cfg.trust_remote_code)
    vocab_extra = len(cfg.tokens or [])
    if vocab_extra:
        model.resize_token_embeddings(hf_config.get_text_config().vocab_size + vocab_extra,
                                      mean_resizing=False)
    params = count_params(model, cfg)
    source = cfg.base_model_config or cfg.model_source or "model_config"
    return ModelFacts(hf_config, model_shape(model.config), params, source)


def _architecture(cfg: StropConfig) -> Any:
    """config.json for the run. A hub id in strop's table is read from the table, without the
    network: architecture facts do not change between revisions, and an offline laptop would
    otherwise wait through the hub client's retries. Anything else resolves as training does."""
    from pathlib import Path

    from transformers import AutoConfig

    from strop.model.meta import known_configs, resolve_model_config

    source = cfg.base_model_config or cfg.model_source
    known = known_configs().get(source.lower()) if source else None
    if known is None or Path(source).exists() or cfg.model_revision:
        return resolve_model_config(cfg)
    data = dict(known)
    hf_config = AutoConfig.for_model(data.pop("model_type"), **data)
    for key, value in cfg.model_config_dict.items():
        if key != "model_type":
            setattr(hf_config, key, value)
    return hf_config


def compute_bytes_for(cfg: StropConfig, device: str, bf16_supported: bool) -> int:
    """2 when the run computes in bf16 or fp16 under autocast, 4 in plain fp32."""
    if cfg.fp16 and device == "cuda":
        return 2
    if cfg.bf16 == "auto":
        return 2 if bf16_supported else 4
    return 2 if cfg.bf16 else 4


def resolve_sharding(cfg: StropConfig, sharding: str | None) -> str:
    """--sharding when given, else what the config asks: fsdp under fsdp_version: 2, else ddp."""
    if sharding is not None:
        return sharding
    return "fsdp" if cfg.fsdp is not None else "ddp"


def setup_for(cfg: StropConfig, device: str = "cuda", bf16_supported: bool = True,
              world_size: int = 1, sharding: str | None = None, *, hf_config: Any) -> Setup:
    """The Setup of `cfg` on a device of this kind, as strop's loop trains it.

    The model's config (ModelFacts.hf_config) says what the loop does to it: a plain causal-LM head
    goes through strop's fused chunked loss (strop.train.loss), and a family whose attention
    strop can run without a mask (strop.model.attention) never gets the 4-D mask. sharding
    (ddp | fsdp) overrides the config's; `--sharding fsdp` on a config without fsdp_config
    plans FSDP2 with fsdp_config's defaults.
    """
    from strop.config.schema import FsdpConfig
    from strop.model.attention import supports_varlen
    from strop.train.lean_activations import lean_parts, used_for
    from strop.train.loss import LOSS_CHUNK_ROWS

    causal = cfg.objective == "causal_lm"
    plain_head = causal and not any(getattr(hf_config.get_text_config(), key, None)
                                    for key in ("final_logit_softcapping", "logit_scale"))
    mask_free = causal and supports_varlen(hf_config, cfg.sequence_len)
    lean_norms, lean_swiglu = lean_parts(hf_config) if used_for(cfg) else (False, False)
    sharding = resolve_sharding(cfg, sharding)
    fsdp = (cfg.fsdp or FsdpConfig()) if sharding == "fsdp" else FsdpConfig()
    return Setup(
        mode=training_mode(cfg),
        micro_batch=cfg.micro_batch_size,
        seq_len=cfg.sequence_len,
        compute_bytes=compute_bytes_for(cfg, device, bf16_supported),
        gradient_checkpointing=cfg.gradient_checkpointing,
        attention=cfg.attention if device == "cuda" or not cfg.attention.startswith("flash")
        else "sdpa",  # flash attention needs a GPU; strop falls back to SDPA elsewhere
        optimizer=cfg.optimizer,
        sgd_momentum=cfg.sgd_momentum,
        lora_dropout=cfg.uses_lora and cfg.lora_dropout > 0,
        double_quant=bool(cfg.bnb_4bit["bnb_4bit_use_double_quant"]),
        device=device,
        world_size=world_size,
        sharding=sharding,
        reshard_after_forward=fsdp.reshard_after_forward,
        accumulation=cfg.gradient_accumulation_steps,
        offload_params=sharding == "fsdp" and fsdp.offload_params,
        masked=not mask_free and (cfg.sample_packing or bool(cfg.pad_to_sequence_len)
                                  or cfg.micro_batch_size > 1),
        fused_loss=plain_head,
        logits_chunk=LOSS_CHUNK_ROWS if causal else None,
        lean_norms=lean_norms,
        lean_swiglu=lean_swiglu,
    )


def flops_per_token(facts: ModelFacts, setup: Setup, recompute: bool | None = None) -> float:
    """Training FLOPs per token for this run (recompute defaults to gradient checkpointing)."""
    params = facts.params
    full = setup.mode == "full"
    saved_in_base = 0 if full else params.modules_to_save
    return tm.training_flops_per_token(
        facts.shape, setup.seq_len, None if full else params.trainable, params.total,
        recompute=setup.gradient_checkpointing if recompute is None else recompute,
        trainable_in_base=saved_in_base)
