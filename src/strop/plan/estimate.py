"""From a config to the numbers: model shape, parameters, memory and FLOPs for one device kind.

`model_facts(cfg)` does the slow part once (config.json, the meta-device model, PEFT on it);
`setup_for(cfg, ...)` and `estimate_memory` are then cheap enough to evaluate for every GPU and
every knob the report tries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from strop.plan.memory import Setup
from strop.plan.params import ParamCounts, count_params
from strop.recipe import math as tm
from strop.recipe.shape import ModelShape, model_shape

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
    from strop.device import DeviceCaps
    from strop.recipe.decide import decide_setup

    sharding = resolve_sharding(cfg, sharding)
    fsdp = (cfg.fsdp or FsdpConfig()) if sharding == "fsdp" else FsdpConfig()
    # The device of this row, not this machine: a GPU of the table on a laptop.
    caps = DeviceCaps(cuda=device == "cuda", cuda_bf16=bf16_supported, cpu_bf16=bf16_supported,
                      cpu_name="")
    decided = decide_setup(cfg, caps, hf_config, device,
                           strategy=sharding if world_size > 1 else "single")
    return Setup(
        mode=training_mode(cfg),
        # a preference row is two sequences (chosen and rejected, or kto's completion and its
        # KL pair), each up to sequence_len
        micro_batch=cfg.micro_batch_size * (2 if cfg.preference else 1),
        seq_len=cfg.sequence_len,
        compute_bytes=decided.precision.compute_bytes,
        gradient_checkpointing=cfg.gradient_checkpointing,
        attention=decided.attention,
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
        masked=not decided.mask_free and (cfg.sample_packing or bool(cfg.pad_to_sequence_len)
                                          or cfg.micro_batch_size > 1),
        fused_loss=decided.fused_loss,
        logits_chunk=decided.logits_chunk,
        lean_norms=decided.lean_norms,
        lean_swiglu=decided.lean_swiglu,
        reference_forwards=reference_forwards(cfg),
    )


def reference_forwards(cfg: StropConfig) -> float:
    """Reference-model forward passes per trained token of a preference run: every step under
    LoRA (the base with the adapter off), once over the data when scored before training."""
    if not cfg.uses_reference:
        return 0.0
    if cfg.uses_lora and not cfg.precompute_ref_log_probs:
        return 1.0
    return 1.0 / max(cfg.num_epochs, 1e-9) if not cfg.max_steps else 1.0


def flops_per_token(facts: ModelFacts, setup: Setup, recompute: bool | None = None) -> float:
    """Training FLOPs per token for this run (recompute defaults to gradient checkpointing)."""
    params = facts.params
    full = setup.mode == "full"
    saved_in_base = 0 if full else params.modules_to_save
    training = tm.training_flops_per_token(
        facts.shape, setup.seq_len, None if full else params.trainable, params.total,
        recompute=setup.gradient_checkpointing if recompute is None else recompute,
        trainable_in_base=saved_in_base)
    forward = 2.0 * facts.shape.matmul_params_per_token \
        + tm.attention_forward_flops_per_token(facts.shape, setup.seq_len)
    return training + setup.reference_forwards * forward
