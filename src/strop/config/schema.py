"""The config: one frozen pydantic model whose fields are axolotl's flat YAML keys.

Each field documents itself once (its `description`); `strop validate`, `strop config-schema`
and docs/config.md all read it from here. Defaults are axolotl's where axolotl has one; where
strop differs, the description says so and why. Cross-field rules live in `rules.py` and run
after the fields themselves validate.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from strop.config.datasets import CHAT_TEMPLATES, DatasetConfig

Optimizer = Literal[
    "sgd", "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit",
    "paged_adamw_32bit", "lion_8bit", "adafactor",
]
Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "one_cycle"]
Attention = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]
DType = Literal["float32", "bfloat16", "float16"]
PreferenceObjective = Literal["dpo", "ipo", "orpo", "simpo", "kto"]
# axolotl's rl values that need generation or a reward model during training.
ONLINE_RL = ("grpo", "gkd", "ppo", "rloo", "online_dpo", "xpo", "nash_md", "prm", "rm")

# Field groups, in the order docs/config.md shows them.
GROUPS = {
    "model": "Model and tokenizer",
    "scratch": "Pretraining from scratch",
    "quant": "Quantization (bitsandbytes)",
    "adapter": "LoRA and QLoRA",
    "preference": "Preference training (DPO, IPO, ORPO, SimPO, KTO)",
    "data": "Data",
    "batch": "Batches and length",
    "optim": "Optimizer and schedule",
    "precision": "Precision and speed",
    "eval": "Evaluation and early stopping",
    "save": "Checkpoints and output",
    "logging": "Logging",
    "distributed": "Multi-process training (torchrun: DDP, FSDP2)",
    "compat": "axolotl compatibility",
}


def doc(description: str, group: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: the one-line doc and the docs/config.md group."""
    return {"description": description, "json_schema_extra": {"group": group, **extra}}


def _str_to_float(value: Any) -> Any:
    # PyYAML (YAML 1.1) reads `2e-5` as a string because it has no dot; accept it as a number.
    if isinstance(value, bool):  # pydantic would read true as 1.0
        raise ValueError("must be a number, not true or false")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(),
                              populate_by_name=True)


class SpecialTokens(_Strict):
    bos_token: str | None = Field(None, description="Beginning-of-sequence token")
    eos_token: str | None = Field(None, description="End-of-sequence token (trained after responses)")
    pad_token: str | None = Field(None, description="Padding token")
    unk_token: str | None = Field(None, description="Unknown token")
    mask_token: str | None = Field(None, description="Mask token (masked_lm)")
    sep_token: str | None = Field(None, description="Separator token (BERT-style)")
    cls_token: str | None = Field(None, description="Classifier token (BERT-style)")
    additional_special_tokens: list[str] | None = Field(None, description="More special tokens")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class PretrainTokenizer(_Strict):
    """Train a tokenizer on the corpus before pretraining from scratch."""

    type: Literal["bpe", "unigram", "wordpiece"] = Field(
        "bpe", description="Algorithm: byte-level BPE (GPT/Llama style), unigram, or wordpiece (BERT)")
    vocab_size: int = Field(8192, ge=64, le=1_048_576, description="Vocabulary size")
    min_frequency: int = Field(2, ge=1, description="Minimum count for a merge / token")
    special_tokens: list[str] | None = Field(
        None, description="Special tokens (default: <unk> <s> </s> <pad>, or BERT's for wordpiece)")
    max_rows: int | None = Field(None, gt=0, description="Train on at most this many rows of the corpus")
    lowercase: bool = Field(False, description="Lowercase text before tokenizing (wordpiece)")
    save_path: str | None = Field(None, description="Where to save it (default: output_dir/tokenizer)")


class BnbConfigKwargs(_Strict):
    """axolotl's nested spelling of the 4-bit settings; strop also takes them top-level."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] | None = None
    bnb_4bit_use_double_quant: bool | None = None
    bnb_4bit_compute_dtype: DType | None = None
    bnb_4bit_quant_storage: DType | Literal["uint8"] | None = None
    llm_int8_has_fp16_weight: bool | None = None


class GradientCheckpointingKwargs(_Strict):
    use_reentrant: bool = Field(False, description="Reentrant checkpointing (strop default: false)")


class FsdpConfig(_Strict):
    """axolotl's fsdp_config for FSDP2 (fully_shard); the older fsdp_-prefixed spellings too."""

    reshard_after_forward: bool = Field(
        True, alias="fsdp_reshard_after_forward",
        description="Free each layer's gathered weights after its forward (ZeRO-3) instead of "
                    "keeping them for backward (ZeRO-2: faster, more memory)")
    offload_params: bool = Field(
        False, alias="fsdp_offload_params",
        description="Keep the sharded parameters, gradients and optimizer states in CPU memory")
    cpu_ram_efficient_loading: bool = Field(
        False, alias="fsdp_cpu_ram_efficient_loading",
        description="Only rank 0 reads the weights; the others build the model on the meta "
                    "device and receive their shards from it (not for a 4-bit or 8-bit base)")
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = Field(
        "FULL_STATE_DICT", alias="fsdp_state_dict_type",
        description="Checkpoints as one ordinary file set gathered on rank 0 (FULL_STATE_DICT) or "
                    "one shard per rank with torch.distributed.checkpoint in safetensors "
                    "(SHARDED_STATE_DICT); either resumes on any number of processes")
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP"] = Field(
        "TRANSFORMER_BASED_WRAP", alias="fsdp_auto_wrap_policy",
        description="Shard by decoder layer (the only policy strop uses)")
    transformer_layer_cls_to_wrap: str | None = Field(
        None, alias="fsdp_transformer_layer_cls_to_wrap",
        description="The decoder layer class to shard by, e.g. LlamaDecoderLayer (default: the "
                    "model's own _no_split_modules)")
    activation_checkpointing: bool | None = Field(
        None, alias="fsdp_activation_checkpointing",
        description="axolotl's spelling of gradient_checkpointing under FSDP")
    version: Literal[2] | None = Field(None, alias="fsdp_version",
                                       description="axolotl's place for fsdp_version")
    # FSDP1's knobs, in axolotl configs written for it: FSDP2 has no such setting, so each is
    # refused by name (config/rules.py) rather than dropped.
    sharding_strategy: str | None = Field(
        None, alias="fsdp_sharding_strategy",
        description="FSDP1: FULL_SHARD is reshard_after_forward: true, SHARD_GRAD_OP false")
    limit_all_gathers: bool | None = Field(None, alias="fsdp_limit_all_gathers",
                                           description="FSDP1 only")
    sync_module_states: bool | None = Field(None, alias="fsdp_sync_module_states",
                                            description="FSDP1 only")
    use_orig_params: bool | None = Field(None, alias="fsdp_use_orig_params",
                                         description="FSDP1 only")


PositiveInt = Annotated[int, Field(gt=0)]


class StropConfig(_Strict):
    # ---------------------------------------------------------------- model and tokenizer
    base_model: str | None = Field(
        None, **doc("Model to start from: a local Hugging Face directory, a hub id, or a GGUF file "
                    "(llama.cpp / Ollama; a local .gguf path or owner/repo/file.gguf), "
                    "dequantized once into a cached directory. Leave it out to build a new model "
                    "from model_config / base_model_config", "model"))
    gguf_file: str | None = Field(
        None, **doc("A .gguf file inside base_model (a directory or a hub repository), as "
                    "transformers' gguf_file; the same as base_model: repo/file.gguf", "model"))
    base_model_config: str | None = Field(
        None, **doc("Where config.json comes from when it differs from base_model (a directory, a "
                    "config.json file or a hub id)", "model"))
    model_type: str | None = Field(
        None, **doc("Model class to load, e.g. LlamaForCausalLM (default: AutoModelForCausalLM, "
                    "or AutoModelForMaskedLM for objective masked_lm)", "model"))
    model_revision: str | None = Field(None, **doc("Hub revision (branch, tag or commit) of base_model", "model"))
    tokenizer_type: str | None = Field(
        None, **doc("Tokenizer class, e.g. LlamaTokenizer (default: AutoTokenizer)", "model"))
    tokenizer_config: str | None = Field(
        None, **doc("Where the tokenizer comes from when it differs from base_model", "model"))
    tokenizer_use_fast: bool = Field(True, **doc("Use the fast (Rust) tokenizer", "model"))
    trust_remote_code: bool = Field(
        False, **doc("Allow model code from the hub repository to run (only for repos you trust)", "model"))
    special_tokens: SpecialTokens | None = Field(
        None, **doc("Set bos/eos/pad/unk tokens; new ones are added and the embeddings resized", "model"))
    tokens: list[str] | None = Field(
        None, **doc("Extra tokens to add to the vocabulary (embeddings are resized; new rows start "
                    "at the mean embedding)", "model"))
    chat_template: str | None = Field(
        None, **doc(f"Chat template for chat_template datasets: {', '.join(CHAT_TEMPLATES)} "
                    "(default: the tokenizer's own, else chatml)", "model"))
    chat_template_jinja: str | None = Field(
        None, **doc("Jinja text (or a path to a .jinja file) of a custom chat template", "model"))
    attn_implementation: Attention | None = Field(
        None, **doc("Attention kernel: eager, sdpa, flash_attention_2, flash_attention_3, "
                    "flex_attention (default sdpa; unavailable ones fall back to sdpa with a "
                    "warning)", "model"))
    flash_attention: bool | None = Field(
        None, **doc("Older spelling of attn_implementation: flash_attention_2", "model"))
    sdp_attention: bool | None = Field(None, **doc("Older spelling of attn_implementation: sdpa", "model"))
    eager_attention: bool | None = Field(None, **doc("Older spelling of attn_implementation: eager", "model"))
    objective: Literal["causal_lm", "masked_lm"] = Field(
        "causal_lm", **doc("strop: training objective: next-token prediction, or masked-LM "
                           "(BERT-style, 15% of tokens masked)", "model"))

    # ---------------------------------------------------------------- from scratch
    model_config_overrides: dict[str, Any] | None = Field(
        None, alias="model_config",
        **doc("Overrides of the model's config.json. Without base_model this builds a new model: "
              "give model_type (llama, mistral, qwen2, gpt2, bert, ...) and its sizes", "scratch"))
    pretrain_tokenizer: PretrainTokenizer | None = Field(
        None, **doc("strop: train a tokenizer on the corpus (type, vocab_size, special_tokens, ...) "
                    "for a model built from scratch", "scratch"))

    # ---------------------------------------------------------------- quantization
    load_in_8bit: bool = Field(False, **doc("Load the base model's linear weights in 8-bit (bitsandbytes)", "quant"))
    load_in_4bit: bool = Field(False, **doc("Load the base model's linear weights in 4-bit (QLoRA)", "quant"))
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", **doc("4-bit data type: nf4 (normal float, the QLoRA paper's) or fp4", "quant"))
    bnb_4bit_use_double_quant: bool = Field(
        True, **doc("Quantize the 4-bit block scales too (saves about 0.37 bits per parameter)", "quant"))
    bnb_4bit_compute_dtype: DType | None = Field(
        None, **doc("dtype of the 4-bit matmuls (default: bfloat16 when bf16 is on, else float32)", "quant"))
    bnb_config_kwargs: BnbConfigKwargs | None = Field(
        None, **doc("axolotl's nested form of the bnb_4bit_* keys (either form works, not both)", "quant"))

    # ---------------------------------------------------------------- adapters
    adapter: Literal["lora", "qlora"] | None = Field(
        None, **doc("lora, qlora (LoRA on a 4-bit base), or empty for full fine-tuning", "adapter"))
    lora_model_dir: str | None = Field(
        None, **doc("Start from an existing PEFT adapter directory instead of a fresh one", "adapter"))
    lora_r: PositiveInt = Field(
        8, **doc("LoRA rank (axolotl has no default; strop uses PEFT's 8)", "adapter"))
    lora_alpha: PositiveInt = Field(
        16, **doc("LoRA scaling numerator: updates are scaled by lora_alpha / lora_r (strop "
                  "default 16 = 2 x the default rank)", "adapter"))
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, **doc("Dropout on the LoRA input", "adapter"))
    lora_target_modules: list[str] | str | None = Field(
        None, **doc("Module names to wrap (q_proj, v_proj, ...) or one regex over full module names",
                    "adapter"))
    lora_target_linear: bool | None = Field(
        None, **doc("Wrap every linear layer (plain or quantized) except the output head", "adapter"))
    lora_fan_in_fan_out: bool | None = Field(
        None, **doc("Weights are stored (in, out), as in GPT-2's Conv1D layers", "adapter"))
    lora_modules_to_save: list[str] | None = Field(
        None, **doc("Modules trained in full and saved with the adapter (embed_tokens, lm_head, "
                    "norms); needed when tokens are added", "adapter"))
    peft_use_dora: bool | None = Field(None, **doc("Weight-decomposed LoRA (DoRA)", "adapter"))
    peft_use_rslora: bool | None = Field(
        None, **doc("Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_r)", "adapter"))
    peft_init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] | None = Field(
        None, **doc("Adapter initialisation: true (B = 0), gaussian, pissa or olora", "adapter"))
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, **doc("LoRA+: learning rate of B = this x that of A (16 is typical)", "adapter"))
    loraplus_lr_embedding: float | None = Field(
        None, gt=0, **doc("LoRA+: learning rate for embedding adapters (default 1e-6)", "adapter"))
    peft_layers_to_transform: list[int] | None = Field(
        None, **doc("Wrap only these layer indices", "adapter"))

    # ---------------------------------------------------------------- preference
    rl: PreferenceObjective | None = Field(
        None, **doc("Train on preferences instead of responses: dpo, ipo (a reference model); "
                    "orpo, simpo (none); kto (unpaired: completion + label). Data: prompt, chosen "
                    "and rejected (or completion and label) columns", "preference"))
    rl_beta: float | None = Field(
        None, gt=0, **doc("How far the policy may move from the reference (dpo, ipo, kto), or the "
                          "reward scale (simpo); default 0.1, simpo 2.0", "preference"))
    dpo_label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, **doc("dpo: probability that a pair's labels are flipped "
                                   "(conservative DPO)", "preference"))
    rpo_alpha: float | None = Field(
        None, gt=0, **doc("dpo, ipo: add this x the chosen responses' NLL (RPO)", "preference"))
    orpo_alpha: float | None = Field(
        None, gt=0, **doc("orpo: weight of the odds-ratio term beside the NLL (default 0.1)",
                          "preference"))
    simpo_gamma: float | None = Field(
        None, ge=0, **doc("simpo: target reward margin (default 0.5)", "preference"))
    cpo_alpha: float | None = Field(
        None, ge=0, **doc("simpo: weight of the chosen responses' NLL (default 0: pure SimPO)",
                          "preference"))
    kto_desirable_weight: float = Field(
        1.0, gt=0, **doc("kto: weight of desirable completions", "preference"))
    kto_undesirable_weight: float = Field(
        1.0, gt=0, **doc("kto: weight of undesirable completions", "preference"))
    precompute_ref_log_probs: bool = Field(
        False, **doc("Score the training data with the reference model once before training, "
                     "instead of at every step (always so for full fine-tuning, which has no "
                     "second copy of the model)", "preference"))

    # ---------------------------------------------------------------- data
    datasets: list[DatasetConfig] = Field(
        ..., min_length=1, **doc("Training data (required): a list of {path, type, ...} entries",
                                 "data"))
    test_datasets: list[DatasetConfig] | None = Field(
        None, **doc("Evaluation data, used instead of a val_set_size split", "data"))
    val_set_size: float = Field(
        0.0, ge=0.0, **doc("Held-out share for evaluation: a fraction (< 1) or a number of rows", "data"))
    dataset_prepared_path: str | None = Field(
        None, **doc("Cache directory for tokenized data (strop default: .strop-cache/prepared)", "data"))
    dataset_num_proc: PositiveInt | None = Field(
        None, **doc("Processes for preprocessing (default: every core)", "data"))
    dataset_processes: PositiveInt | None = Field(None, **doc("Older spelling of dataset_num_proc", "data"))
    shuffle_merged_datasets: bool = Field(True, **doc("Shuffle rows after merging datasets", "data"))
    train_on_inputs: bool = Field(
        False, **doc("Train on the prompt tokens too, not only the responses", "data"))
    skip_invalid_rows: bool = Field(
        False, **doc("strop: train on the valid rows and report the bad ones, instead of stopping", "data"))

    # ---------------------------------------------------------------- batches and length
    # 2**22 tokens is past every released model's context; a larger value is a typo that would
    # reserve the memory for it.
    sequence_len: Annotated[int, Field(gt=0, le=1 << 22)] = Field(
        512, **doc("Maximum tokens per row (or per packed row); at most the model's context "
                   "(max_position_embeddings)", "batch"))
    sample_packing: bool = Field(
        False, **doc("Pack several rows into each sequence_len row; rows never attend to each other",
                     "batch"))
    eval_sample_packing: bool | None = Field(
        None, **doc("Pack evaluation rows too (default: as sample_packing)", "batch"))
    pad_to_sequence_len: bool | None = Field(
        None, **doc("Pad every batch to sequence_len: fixed shapes, so memory freed by one step "
                    "fits the next (default: on with sample_packing, whose rows nearly fill "
                    "sequence_len anyway; else pad to the longest row in the batch)", "batch"))
    group_by_length: bool = Field(
        False, **doc("Batch rows of similar length together to waste less on padding", "batch"))
    excess_length_strategy: Literal["truncate", "drop", "raise"] = Field(
        "truncate", **doc("Rows longer than sequence_len: truncate, drop or raise. axolotl drops by "
                          "default; strop truncates so no row is lost, and counts them", "batch"))
    drop_long_sequences: bool | None = Field(
        None, **doc("strop: shorthand for excess_length_strategy: drop", "batch"))
    min_sample_len: PositiveInt | None = Field(None, **doc("Drop rows shorter than this many tokens", "batch"))
    micro_batch_size: PositiveInt = Field(1, **doc("Rows per forward/backward pass on each device", "batch"))
    eval_batch_size: PositiveInt | None = Field(
        None, **doc("Rows per evaluation batch (default: micro_batch_size)", "batch"))
    gradient_accumulation_steps: PositiveInt = Field(
        1, **doc("Micro-batches per optimizer step", "batch"))
    batch_size: PositiveInt | None = Field(
        None, **doc("Older spelling: micro_batch_size x gradient_accumulation_steps", "batch"))
    num_epochs: float = Field(1.0, gt=0, **doc("Passes over the training data", "batch"))
    max_steps: PositiveInt | None = Field(
        None, **doc("Stop after this many optimizer steps (overrides num_epochs)", "batch"))

    # ---------------------------------------------------------------- optimizer and schedule
    optimizer: Optimizer = Field(
        "adamw_torch_fused", **doc("Optimizer: sgd, adamw_torch, adamw_torch_fused, adamw_bnb_8bit "
                                   "(adamw_8bit), paged_adamw_8bit, paged_adamw_32bit, lion_8bit, "
                                   "adafactor", "optim"))
    learning_rate: float = Field(..., gt=0, **doc("Peak learning rate, e.g. 2e-4 for LoRA, 2e-5 for full fine-tuning", "optim"))
    lr_scheduler: Scheduler = Field(
        "cosine", **doc("constant, constant_with_warmup, linear, cosine or one_cycle", "optim"))
    warmup_steps: int | None = Field(None, ge=0, **doc("Linear warmup steps", "optim"))
    warmup_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, **doc("Warmup as a share of all steps (instead of warmup_steps)", "optim"))
    cosine_min_lr_ratio: float | None = Field(
        None, ge=0.0, le=1.0, **doc("Cosine decays to this share of the peak (default 0)", "optim"))
    lr_div_factor: float = Field(25.0, gt=1.0, **doc("one_cycle: start at learning_rate / this", "optim"))
    weight_decay: float = Field(
        0.0, ge=0.0, **doc("Decoupled weight decay (never applied to biases and norms)", "optim"))
    max_grad_norm: float = Field(
        1.0, ge=0.0, **doc("Clip gradients to this global norm; 0 turns clipping off", "optim"))
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, **doc("Adam beta1 (also SGD momentum when set)", "optim"))
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, **doc("Adam beta2", "optim"))
    adam_epsilon: float = Field(1e-8, gt=0.0, **doc("Adam epsilon", "optim"))
    sgd_momentum: float = Field(0.0, ge=0.0, lt=1.0, **doc("strop: SGD momentum", "optim"))
    sgd_nesterov: bool = Field(False, **doc("strop: Nesterov momentum for SGD", "optim"))
    loss_watchdog_threshold: float | None = Field(
        None, gt=0, **doc("Stop when the loss stays above this for loss_watchdog_patience steps", "optim"))
    loss_watchdog_patience: PositiveInt = Field(
        3, **doc("Steps above loss_watchdog_threshold before stopping", "optim"))
    max_bad_steps: PositiveInt = Field(
        5, **doc("strop: consecutive non-finite losses (skipped steps) before the run stops", "optim"))
    seed: int = Field(42, ge=0, **doc("Random seed for initialisation, shuffling and dropout", "optim"))

    # ---------------------------------------------------------------- precision and speed
    bf16: bool | Literal["auto"] = Field(
        "auto", **doc("bfloat16 autocast: true, false, or auto (on where the device has native bf16, "
                      "CPUs with AVX512-BF16 included)", "precision"))
    fp16: bool | None = Field(
        None, **doc("float16 with a gradient scaler (GPU only; on a CPU strop falls back with a "
                    "warning)", "precision"))
    tf32: bool | Literal["auto"] = Field(
        "auto", **doc("TensorFloat-32 matmuls on Ampere+ GPUs (no effect on CPU)", "precision"))
    gradient_checkpointing: bool = Field(
        False, **doc("Recompute activations in backward to save memory (non-reentrant)", "precision"))
    gradient_checkpointing_kwargs: GradientCheckpointingKwargs | None = Field(
        None, **doc("Options for gradient checkpointing: use_reentrant", "precision"))
    compile: bool | None = Field(
        None, **doc("strop: torch.compile the model (cache kept in ~/.cache/strop/compile)", "precision"))
    torch_compile: bool | Literal["auto"] | None = Field(
        None, **doc("axolotl's spelling of compile", "precision"))
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", **doc("strop: where to train: auto (a GPU when present), cpu or cuda", "precision"))

    # ---------------------------------------------------------------- evaluation
    eval_steps: PositiveInt | None = Field(None, **doc("Evaluate every N optimizer steps", "eval"))
    evals_per_epoch: PositiveInt | None = Field(None, **doc("Evaluate N times per epoch (instead of eval_steps)", "eval"))
    early_stopping_patience: PositiveInt | None = Field(
        None, **doc("Stop after this many evaluations without a better eval loss", "eval"))
    eval_max_new_tokens: PositiveInt = Field(
        128, **doc("Longest generation when evaluating answers (strop eval)", "eval"))

    # ---------------------------------------------------------------- checkpoints and output
    output_dir: str = Field("./model-out", **doc("Where checkpoints, the final model and metrics go", "save"))
    save_steps: PositiveInt | None = Field(None, **doc("Save a checkpoint every N optimizer steps", "save"))
    saves_per_epoch: PositiveInt | None = Field(None, **doc("Save N checkpoints per epoch (instead of save_steps)", "save"))
    save_total_limit: PositiveInt | None = Field(
        None, **doc("Keep at most N checkpoints (never removes the latest or the best)", "save"))
    save_safetensors: bool = Field(True, **doc("Save weights as safetensors (the only format strop writes)", "save"))
    resume_from_checkpoint: str | None = Field(
        None, **doc("Continue from a checkpoint directory, or 'latest' in output_dir", "save"))
    auto_resume_from_checkpoints: bool = Field(
        False, **doc("Continue from the latest checkpoint in output_dir when one exists", "save"))

    # ---------------------------------------------------------------- logging
    logging_steps: PositiveInt | None = Field(
        None, **doc("Log every N steps (default: about 100 lines per run)", "logging"))
    use_tensorboard: bool = Field(False, **doc("Write TensorBoard event files to output_dir/runs", "logging"))
    wandb_project: str | None = Field(None, **doc("Weights & Biases project (logging is on when set)", "logging"))
    wandb_entity: str | None = Field(None, **doc("Weights & Biases team or user", "logging"))
    wandb_name: str | None = Field(None, **doc("Weights & Biases run name", "logging"))
    wandb_run_id: str | None = Field(None, **doc("Weights & Biases run id (to resume a run)", "logging"))
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, **doc("online, offline (no network needed) or disabled", "logging"))

    # ---------------------------------------------------------------- distributed
    fsdp_version: Literal[1, 2] | None = Field(
        None, **doc("2: shard parameters, gradients and optimizer states across the processes "
                    "with FSDP2 (fully_shard). Without it a multi-process run is DDP. 1 (FSDP1) "
                    "is not supported", "distributed"))
    fsdp_config: FsdpConfig | None = Field(
        None, **doc("FSDP2 options: reshard_after_forward, offload_params, "
                    "cpu_ram_efficient_loading, state_dict_type, transformer_layer_cls_to_wrap",
                    "distributed"))
    ddp_find_unused_parameters: bool | None = Field(
        None, **doc("DDP: look for parameters that get no gradient each step (slower; needed "
                    "only when some trainable parameter is skipped by the forward)", "distributed"))
    ddp_bucket_cap_mb: PositiveInt | None = Field(
        None, **doc("DDP: gradient all-reduce bucket size in MiB (torch default 25)", "distributed"))
    ddp_broadcast_buffers: bool | None = Field(
        None, **doc("DDP: broadcast module buffers from rank 0 every forward (default: off, the "
                    "buffers of a language model are constant)", "distributed"))
    ddp_timeout: PositiveInt = Field(
        1800, **doc("Seconds a collective may wait for the other processes before the run stops "
                    "with the rank that did not answer", "distributed"))

    # ---------------------------------------------------------------- compatibility
    strict: bool | None = Field(
        None, **doc("axolotl's strict flag; strop always rejects unknown keys", "compat"))

    # ---------------------------------------------------------------- field validators
    @field_validator("learning_rate", "adam_epsilon", "weight_decay", "cosine_min_lr_ratio",
                     "warmup_ratio", "val_set_size", "lora_dropout", "num_epochs", "max_grad_norm",
                     "loraplus_lr_ratio", "loraplus_lr_embedding", "adam_beta1", "adam_beta2",
                     "loss_watchdog_threshold", "rl_beta", "dpo_label_smoothing", "rpo_alpha",
                     "orpo_alpha", "simpo_gamma", "cpo_alpha", mode="before")
    @classmethod
    def _numbers_from_strings(cls, value: Any) -> Any:
        return _str_to_float(value)

    @field_validator("rl", mode="before")
    @classmethod
    def _offline_rl_only(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ONLINE_RL:
            raise ValueError(f"{value} generates or scores responses during training, which "
                             "strop does not do; strop trains on preference data with dpo, ipo, "
                             "orpo, simpo or kto")
        if isinstance(value, str) and value.lower() in ("dpo", "ipo", "orpo", "simpo", "kto"):
            return value.lower()
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `micro_batch_size: true` as 1; a boolean where a number belongs is a
        # mistake to point at, not a value.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if "bool" not in str(annotation) and any(t in str(annotation) for t in ("int", "float")):
                raise ValueError("must be a number, not true or false")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> StropConfig:
        from strop.config.rules import check_rules

        check_rules(self)
        return self

    # ---------------------------------------------------------------- resolved views
    @property
    def model_config_dict(self) -> dict[str, Any]:
        return dict(self.model_config_overrides or {})

    @property
    def model_source(self) -> str | None:
        """Where the base weights are: base_model, or the GGUF file gguf_file names in it (a
        directory or a hub repo), as one source string."""
        if not self.base_model or not self.gguf_file:
            return self.base_model
        return f"{self.base_model.rstrip('/')}/{self.gguf_file}"

    @property
    def from_scratch(self) -> bool:
        """No weights to load: the model is built from a config with fresh weights."""
        return self.base_model is None

    @property
    def attention(self) -> str:
        if self.attn_implementation:
            return self.attn_implementation
        if self.flash_attention:
            return "flash_attention_2"
        if self.eager_attention:
            return "eager"
        return "sdpa"

    @property
    def fsdp(self) -> FsdpConfig | None:
        """FSDP2's options when the config asks for FSDP2, else None (DDP or one process)."""
        if self.fsdp_version == 2 or (self.fsdp_config and self.fsdp_config.version == 2):
            return self.fsdp_config or FsdpConfig()
        return None

    @property
    def sharded_checkpoints(self) -> bool:
        """Checkpoints written by every rank, one shard each (FSDP2, SHARDED_STATE_DICT)."""
        return self.fsdp is not None and self.fsdp.state_dict_type == "SHARDED_STATE_DICT"

    @property
    def compile_model(self) -> bool:
        return bool(self.compile if self.compile is not None else self.torch_compile)

    @property
    def warmup(self) -> tuple[int | None, float | None]:
        return self.warmup_steps, self.warmup_ratio

    @property
    def bnb_4bit(self) -> dict[str, Any]:
        """The 4-bit settings, from the top-level keys or axolotl's bnb_config_kwargs."""
        nested = self.bnb_config_kwargs.model_dump(exclude_none=True) if self.bnb_config_kwargs else {}
        return {
            "bnb_4bit_quant_type": nested.get("bnb_4bit_quant_type", self.bnb_4bit_quant_type),
            "bnb_4bit_use_double_quant": nested.get("bnb_4bit_use_double_quant",
                                                    self.bnb_4bit_use_double_quant),
            "bnb_4bit_compute_dtype": nested.get("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype),
            "bnb_4bit_quant_storage": nested.get("bnb_4bit_quant_storage"),
        }

    @property
    def long_rows(self) -> str:
        return "drop" if self.drop_long_sequences else self.excess_length_strategy

    @property
    def num_proc(self) -> int | None:
        return self.dataset_num_proc or self.dataset_processes

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.micro_batch_size

    @property
    def pads_to_sequence_len(self) -> bool:
        if self.pad_to_sequence_len is None:
            return self.sample_packing
        return self.pad_to_sequence_len

    @property
    def effective_eval_packing(self) -> bool:
        return self.sample_packing if self.eval_sample_packing is None else self.eval_sample_packing

    @property
    def checkpointing_reentrant(self) -> bool:
        kwargs = self.gradient_checkpointing_kwargs
        return bool(kwargs and kwargs.use_reentrant)

    @property
    def has_eval_data(self) -> bool:
        return bool(self.test_datasets) or self.val_set_size > 0

    @property
    def preference(self) -> bool:
        return self.rl is not None

    @property
    def paired(self) -> bool:
        """Rows are chosen/rejected pairs (every preference objective but kto)."""
        return self.rl is not None and self.rl != "kto"

    @property
    def beta(self) -> float:
        return self.rl_beta if self.rl_beta is not None else (2.0 if self.rl == "simpo" else 0.1)

    @property
    def row_len(self) -> int:
        """Tokens one training row may hold: sequence_len, or two documents of a preference
        row (each held to sequence_len)."""
        return self.sequence_len * (2 if self.rl is not None else 1)

    @property
    def uses_reference(self) -> bool:
        """dpo, ipo and kto compare the policy with a reference model; orpo and simpo do not."""
        return self.rl in ("dpo", "ipo", "kto")

    @property
    def uses_lora(self) -> bool:
        return self.adapter in ("lora", "qlora")
