"""Cross-field rules: combinations of keys that cannot work together, each with its fix.

Every rule runs (not only the first that fails) so a user fixes a config in one pass. A rule
names the keys it is about; the loader turns those into `file:line` positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from strop.config.schema import StropConfig


@dataclass(frozen=True)
class Violation:
    keys: tuple[str, ...]
    message: str


class RuleViolations(Exception):  # noqa: N818 - not a ValueError on purpose: pydantic must not wrap it
    """Raised from the schema's after-validator with every violated rule."""

    def __init__(self, violations: list[Violation]):
        super().__init__("; ".join(v.message for v in violations))
        self.violations = violations


LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
             "lora_fan_in_fan_out", "lora_modules_to_save", "lora_model_dir", "peft_use_dora",
             "peft_use_rslora", "peft_init_lora_weights", "loraplus_lr_ratio",
             "loraplus_lr_embedding", "peft_layers_to_transform")


def _set(cfg: StropConfig, key: str) -> bool:
    """The key was written (in the file or an override) with a value that asks for something:
    not empty, and not its default (a resolved config, which spells out every default, must
    load back unchanged)."""
    value = getattr(cfg, key)
    default = type(cfg).model_fields[key].default
    return key in cfg.model_fields_set and value not in (None, False, [], {}) and value != default


def _model(cfg: StropConfig) -> list[Violation]:
    out = []
    if cfg.base_model is None and not cfg.model_config_dict and not cfg.base_model_config:
        out.append(Violation(("base_model",), "base_model is required: a local model directory or "
                             "a hub id; to build a new model from scratch, give model_config with "
                             "model_type and sizes instead"))
    if cfg.from_scratch and cfg.model_config_dict and not cfg.base_model_config \
            and "model_type" not in cfg.model_config_dict:
        out.append(Violation(("model_config",), "model_config builds a model from scratch and needs "
                             "model_type (llama, mistral, qwen2, gpt2, bert, ...); add "
                             "model_config.model_type"))
    if cfg.pretrain_tokenizer is not None and not cfg.from_scratch:
        out.append(Violation(("pretrain_tokenizer",), "pretrain_tokenizer trains a new tokenizer, "
                             "which only fits a model built from scratch; remove pretrain_tokenizer "
                             "to keep base_model's tokenizer, or remove base_model"))
    building = cfg.from_scratch and (cfg.model_config_dict or cfg.base_model_config)
    if building and cfg.pretrain_tokenizer is None and not cfg.tokenizer_config:
        out.append(Violation(("tokenizer_config",), "a model built from scratch needs a tokenizer: "
                             "set pretrain_tokenizer (train one on the corpus) or tokenizer_config "
                             "(a tokenizer directory or hub id)"))
    legacy = [k for k in ("flash_attention", "sdp_attention", "eager_attention") if _set(cfg, k)]
    if cfg.attn_implementation and legacy:
        out.append(Violation((legacy[0], "attn_implementation"), f"{legacy[0]} and "
                             "attn_implementation both choose the attention kernel; keep only "
                             "attn_implementation"))
    elif len(legacy) > 1:
        out.append(Violation(tuple(legacy), f"{' and '.join(legacy)} both choose the attention "
                             "kernel; keep one (or use attn_implementation)"))
    if cfg.objective == "masked_lm" and cfg.sample_packing:
        out.append(Violation(("sample_packing",), "sample_packing packs documents causally; a "
                             "masked LM attends both ways, so packed documents would see each "
                             "other: remove sample_packing (pretraining text is already cut into "
                             "sequence_len blocks)"))
    if cfg.chat_template and cfg.chat_template != "jinja" and cfg.chat_template_jinja:
        out.append(Violation(("chat_template", "chat_template_jinja"), "chat_template_jinja gives "
                             "a custom template, so chat_template must be jinja or left out"))
    if _set(cfg, "compile") and _set(cfg, "torch_compile") and cfg.compile != cfg.torch_compile:
        out.append(Violation(("compile", "torch_compile"), "compile and torch_compile disagree; "
                             "keep one of them"))
    return out


def _quantization(cfg: StropConfig) -> list[Violation]:
    out = []
    if cfg.load_in_4bit and cfg.load_in_8bit:
        out.append(Violation(("load_in_4bit", "load_in_8bit"), "load_in_4bit and load_in_8bit are "
                             "both true; choose one (4-bit for qlora)"))
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        out.append(Violation(("adapter", "load_in_4bit"), "adapter: qlora trains LoRA on a 4-bit "
                             "base and needs load_in_4bit: true (or use adapter: lora)"))
    if cfg.adapter == "qlora" and cfg.load_in_8bit:
        out.append(Violation(("adapter", "load_in_8bit"), "adapter: qlora uses a 4-bit base, not "
                             "8-bit; set load_in_8bit: false and load_in_4bit: true"))
    if cfg.load_in_4bit and cfg.adapter != "qlora":
        out.append(Violation(("load_in_4bit", "adapter"), "load_in_4bit needs adapter: qlora (a "
                             "4-bit model cannot be fully fine-tuned); set adapter: qlora"))
    if cfg.load_in_8bit and cfg.adapter is None:
        out.append(Violation(("load_in_8bit", "adapter"), "load_in_8bit needs adapter: lora (an "
                             "8-bit model cannot be fully fine-tuned); set adapter: lora"))
    if (cfg.load_in_4bit or cfg.load_in_8bit) and cfg.from_scratch:
        out.append(Violation(("load_in_4bit" if cfg.load_in_4bit else "load_in_8bit",),
                             "quantized loading needs pretrained weights (base_model); a model "
                             "built from scratch trains in full precision"))
    if cfg.bnb_config_kwargs is not None:
        for key in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
            if key in cfg.model_fields_set and getattr(cfg.bnb_config_kwargs, key) is not None:
                out.append(Violation((key, "bnb_config_kwargs"), f"{key} is set both top-level and "
                                     "in bnb_config_kwargs; keep one"))
    return out


def _adapter(cfg: StropConfig) -> list[Violation]:
    out = []
    if cfg.adapter is None:
        stray = [k for k in LORA_KEYS if _set(cfg, k)]
        if stray:
            out.append(Violation((stray[0],), f"{', '.join(stray)} set without an adapter; set "
                                 "adapter: lora (or qlora), or remove the LoRA keys for full "
                                 "fine-tuning"))
        return out
    if not cfg.lora_target_modules and not cfg.lora_target_linear:
        out.append(Violation(("lora_target_modules",), f"adapter: {cfg.adapter} needs targets: set "
                             "lora_target_linear: true (every linear layer) or lora_target_modules "
                             "(e.g. [q_proj, k_proj, v_proj, o_proj]); `strop inspect` lists them"))
    if cfg.from_scratch:
        out.append(Violation(("adapter",), f"adapter: {cfg.adapter} on a model built from scratch "
                             "would train adapters on random weights; pretrain in full first "
                             "(no adapter), then fine-tune that model with an adapter"))
    return out


def _schedule(cfg: StropConfig) -> list[Violation]:
    out = []
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        out.append(Violation(("warmup_steps", "warmup_ratio"), "warmup_steps and warmup_ratio are "
                             "both set; keep one of them"))
    if cfg.batch_size is not None and \
            cfg.batch_size != cfg.micro_batch_size * cfg.gradient_accumulation_steps:
        if "gradient_accumulation_steps" in cfg.model_fields_set:
            out.append(Violation(("batch_size",), f"batch_size {cfg.batch_size} disagrees with "
                                 f"micro_batch_size x gradient_accumulation_steps = "
                                 f"{cfg.micro_batch_size * cfg.gradient_accumulation_steps}; "
                                 "remove batch_size"))
        elif cfg.batch_size % cfg.micro_batch_size:
            out.append(Violation(("batch_size",), f"batch_size {cfg.batch_size} is not a multiple "
                                 f"of micro_batch_size {cfg.micro_batch_size}; set "
                                 "gradient_accumulation_steps instead"))
    if cfg.lr_scheduler == "constant" and (cfg.warmup_steps or cfg.warmup_ratio):
        out.append(Violation(("lr_scheduler",), "lr_scheduler: constant has no warmup; use "
                             "constant_with_warmup, or remove warmup_steps/warmup_ratio"))
    if cfg.cosine_min_lr_ratio is not None and cfg.lr_scheduler != "cosine":
        out.append(Violation(("cosine_min_lr_ratio",), "cosine_min_lr_ratio applies to "
                             "lr_scheduler: cosine only; set lr_scheduler: cosine or remove it"))
    if cfg.optimizer != "sgd" and (_set(cfg, "sgd_momentum") or _set(cfg, "sgd_nesterov")):
        out.append(Violation(("sgd_momentum",), f"sgd_momentum/sgd_nesterov apply to optimizer: "
                             f"sgd, not {cfg.optimizer}"))
    if cfg.sgd_nesterov and cfg.sgd_momentum == 0:
        out.append(Violation(("sgd_nesterov",), "sgd_nesterov needs sgd_momentum > 0 (e.g. 0.9)"))
    return out


def _eval_and_save(cfg: StropConfig) -> list[Violation]:
    out = []
    if cfg.save_steps is not None and cfg.saves_per_epoch is not None:
        out.append(Violation(("save_steps", "saves_per_epoch"), "save_steps and saves_per_epoch "
                             "are both set; keep one of them"))
    if cfg.eval_steps is not None and cfg.evals_per_epoch is not None:
        out.append(Violation(("eval_steps", "evals_per_epoch"), "eval_steps and evals_per_epoch "
                             "are both set; keep one of them"))
    if cfg.early_stopping_patience and not cfg.has_eval_data:
        out.append(Violation(("early_stopping_patience",), "early_stopping_patience needs "
                             "evaluation data: set val_set_size (e.g. 0.05) or test_datasets"))
    if cfg.val_set_size >= 1 and cfg.val_set_size != int(cfg.val_set_size):
        out.append(Violation(("val_set_size",), f"val_set_size {cfg.val_set_size} is neither a "
                             "fraction below 1 nor a whole number of rows"))
    if cfg.resume_from_checkpoint and cfg.lora_model_dir:
        out.append(Violation(("resume_from_checkpoint", "lora_model_dir"), "resume_from_checkpoint "
                             "already restores the adapter; remove lora_model_dir"))
    if not cfg.save_safetensors:
        out.append(Violation(("save_safetensors",), "save_safetensors: false is not supported: "
                             "strop writes safetensors only (pickled weights can run code)"))
    return out


def _precision(cfg: StropConfig) -> list[Violation]:
    out = []
    if cfg.bf16 is True and cfg.fp16:
        out.append(Violation(("bf16", "fp16"), "bf16 and fp16 are both true; choose one (bf16 where "
                             "the device has it)"))
    return out


def _distributed(cfg: StropConfig) -> list[Violation]:
    out = []
    if cfg.fsdp_version == 1:
        out.append(Violation(("fsdp_version",), "fsdp_version: 1 (FSDP1) is not supported; strop "
                             "shards with FSDP2 (fully_shard): set fsdp_version: 2"))
    nested = cfg.fsdp_config.version if cfg.fsdp_config else None
    if cfg.fsdp_config is not None and cfg.fsdp_version is None and nested is None:
        out.append(Violation(("fsdp_config",), "fsdp_config is set but fsdp_version is not; add "
                             "fsdp_version: 2 to shard with FSDP2, or remove fsdp_config for DDP"))
    fsdp1 = {"sharding_strategy": "FULL_SHARD is reshard_after_forward: true, SHARD_GRAD_OP is "
                                  "reshard_after_forward: false",
             "limit_all_gathers": "FSDP2 limits its all-gathers itself",
             "sync_module_states": "cpu_ram_efficient_loading: true is FSDP2's way to load on "
                                   "rank 0 only",
             "use_orig_params": "FSDP2 always keeps the original parameters"}
    for key, fix in fsdp1.items():
        if cfg.fsdp_config is not None and getattr(cfg.fsdp_config, key) is not None:
            out.append(Violation(("fsdp_config",), f"fsdp_config.{key} is an FSDP1 option and "
                                 f"strop shards with FSDP2 ({fix}); remove it"))
    if cfg.fsdp_config is not None and cfg.fsdp_config.cpu_ram_efficient_loading \
            and (cfg.load_in_4bit or cfg.load_in_8bit):
        # The other ranks build the model on the meta device and receive rank 0's tensors;
        # a bitsandbytes base keeps its quantization state outside the tensors that travel.
        out.append(Violation(("fsdp_config",), "fsdp_config.cpu_ram_efficient_loading is not "
                             "built for a 4-bit or 8-bit base (load_in_4bit / load_in_8bit): "
                             "every rank quantizes its own copy; remove it (or set it to false)"))
    if cfg.fsdp_config is not None and cfg.fsdp_config.activation_checkpointing \
            and not cfg.gradient_checkpointing:
        out.append(Violation(("fsdp_config",), "fsdp_config.activation_checkpointing: strop has "
                             "one switch for it, under FSDP2 too: set gradient_checkpointing: "
                             "true and remove activation_checkpointing"))
    if cfg.fsdp is not None and cfg.ddp_find_unused_parameters:
        out.append(Violation(("ddp_find_unused_parameters",), "ddp_find_unused_parameters is a "
                             "DDP option and this config shards with FSDP2; remove it"))
    return out


# Keys of one preference objective, and the objectives they belong to.
PREFERENCE_KEYS = {"dpo_label_smoothing": ("dpo",), "rpo_alpha": ("dpo", "ipo"),
                   "orpo_alpha": ("orpo",), "simpo_gamma": ("simpo",), "cpo_alpha": ("simpo",),
                   "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",),
                   "precompute_ref_log_probs": ("dpo", "ipo", "kto")}


def _preference(cfg: StropConfig) -> list[Violation]:
    from strop.config.datasets import PREFERENCE_FORMATS

    out = []
    rl = cfg.rl
    for key, objectives in PREFERENCE_KEYS.items():
        if _set(cfg, key) and rl not in objectives:
            owner = " or ".join(f"rl: {o}" for o in objectives)
            out.append(Violation((key,), f"{key} is used by {owner} only" +
                                 (f", not rl: {rl}" if rl else "") + f"; remove {key}" +
                                 ("" if rl else f" or set {owner}")))
    if rl is None:
        if _set(cfg, "rl_beta"):
            out.append(Violation(("rl_beta",), "rl_beta is the beta of preference training; set "
                                 "rl: dpo (or ipo, orpo, simpo, kto), or remove rl_beta"))
        for group in ("datasets", "test_datasets"):
            for i, ds in enumerate(getattr(cfg, group) or []):
                if ds.type == "untemplated":
                    out.append(Violation(((group, i, "type"),), "type: untemplated reads preference "
                                         "rows (prompt, chosen, rejected) for rl:; for plain text "
                                         "use completion or input_output"))
        return out
    if cfg.objective == "masked_lm":
        out.append(Violation(("rl",), "preference training scores a causal LM's responses; "
                             "remove rl or objective: masked_lm"))
    if cfg.from_scratch:
        out.append(Violation(("rl",), "preference training starts from a trained model "
                             "(base_model); pretrain or fine-tune first, then set base_model"))
    if cfg.train_on_inputs:
        out.append(Violation(("train_on_inputs",), "preference losses score the responses only; "
                             "remove train_on_inputs"))
    for group in ("datasets", "test_datasets"):
        for i, ds in enumerate(getattr(cfg, group) or []):
            if ds.format_name not in PREFERENCE_FORMATS:
                out.append(Violation(((group, i, "type"),), f"rl: {rl} reads preference rows "
                                     f"(prompt, {'completion, label' if rl == 'kto' else 'chosen, rejected'}): "
                                     f"use type: chat_template (the chat template applied) or type: "
                                     f"untemplated (plain text), not {ds.format_name}"))
    return out


RULES = (_model, _quantization, _adapter, _schedule, _eval_and_save, _precision, _distributed,
         _preference)


def check_rules(cfg: StropConfig) -> None:
    violations = [v for rule in RULES for v in rule(cfg)]
    if violations:
        raise RuleViolations(violations)
