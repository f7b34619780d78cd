"""Config: strict keys, axolotl compatibility, types, ranges, cross-field rules, overrides."""

from __future__ import annotations

import textwrap

import pytest

from strop.config import load_config, load_dict, parse_overrides
from strop.config.schema import StropConfig
from strop.errors import ConfigError

BASE = """\
base_model: ./models/tiny
learning_rate: 2e-4
datasets:
  - path: data/train.jsonl
    type: alpaca
"""


def problems(write_yaml, text: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(textwrap.dedent(text)), list(overrides))
    return info.value.problems


def one_problem(write_yaml, text: str, *overrides: str) -> str:
    found = problems(write_yaml, text, *overrides)
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------------------------- good input


def test_minimal_config_resolves_axolotl_defaults(write_yaml):
    loaded = load_config(write_yaml(BASE))
    cfg = loaded.cfg
    assert cfg.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string
    assert (cfg.sequence_len, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (512, 1, 1)
    assert (cfg.optimizer, cfg.lr_scheduler, cfg.num_epochs) == ("adamw_torch_fused", "cosine", 1.0)
    assert cfg.train_on_inputs is False and cfg.val_set_size == 0.0
    assert cfg.output_dir == "./model-out" and cfg.bf16 == "auto"
    assert loaded.sources["base_model"].endswith("config.yml:1")
    assert loaded.sources["sequence_len"] == "default"


def test_config_is_frozen(write_yaml):
    cfg = load_config(write_yaml(BASE)).cfg
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        cfg.lora_r = 4  # type: ignore[misc]


def test_empty_values_mean_default_and_empty_axolotl_keys_are_accepted(write_yaml):
    loaded = load_config(write_yaml(BASE + "lora_model_dir:\nwandb_watch:\ndeepspeed:\n"
                                    "fsdp:\nspecial_tokens:\nsave_only_model: false\n"))
    assert loaded.cfg.lora_model_dir is None
    assert set(loaded.accepted_empty) >= {"wandb_watch", "deepspeed", "fsdp", "save_only_model"}
    assert "left empty" in loaded.sources["lora_model_dir"]


def test_axolotl_key_at_its_own_default_asks_nothing(write_yaml):
    loaded = load_config(write_yaml(BASE + "tokenizer_save_jinja_files: true\n"))
    assert "tokenizer_save_jinja_files" in loaded.accepted_empty


def test_informational_axolotl_keys_give_a_notice(write_yaml):
    loaded = load_config(write_yaml(BASE + "is_llama_derived_model: true\n"))
    assert any("is_llama_derived_model" in n for n in loaded.notices)


def test_legacy_attention_flag_maps_to_attn_implementation(write_yaml):
    assert load_config(write_yaml(BASE + "flash_attention: true\n")).cfg.attention == \
        "flash_attention_2"
    assert load_config(write_yaml(BASE)).cfg.attention == "sdpa"


def test_from_scratch_config(write_yaml):
    cfg = load_config(write_yaml("""\
        model_config: {model_type: llama, hidden_size: 64}
        pretrain_tokenizer: {vocab_size: 512}
        learning_rate: 1e-3
        datasets: [{path: corpus.txt, type: completion}]
        """.replace("        ", ""))).cfg
    assert cfg.from_scratch and cfg.model_config_dict["hidden_size"] == 64
    assert cfg.pretrain_tokenizer.type == "bpe"


def test_bnb_config_kwargs_is_read_like_top_level_keys(write_yaml):
    cfg = load_config(write_yaml(BASE + "adapter: qlora\nload_in_4bit: true\n"
                                 "lora_target_linear: true\n"
                                 "bnb_config_kwargs: {bnb_4bit_quant_type: fp4}\n")).cfg
    assert cfg.bnb_4bit["bnb_4bit_quant_type"] == "fp4"
    assert cfg.bnb_4bit["bnb_4bit_use_double_quant"] is True


# ----------------------------------------------------------------------------------- bad keys


def test_unknown_key_names_file_line_and_closest_key(write_yaml):
    msg = one_problem(write_yaml, BASE + "lora_alpah: 16\n")
    assert "config.yml:6" in msg and "lora_alpah" in msg and "did you mean lora_alpha?" in msg


def test_dashed_key_suggests_underscored(write_yaml):
    assert "did you mean learning_rate?" in one_problem(write_yaml, BASE.replace(
        "learning_rate", "learning-rate"))


def test_unknown_key_without_close_match_points_at_the_reference(write_yaml):
    assert "config-schema" in one_problem(write_yaml, BASE + "zzzzqqq: 1\n")


def test_unsupported_axolotl_key_with_a_value_is_not_supported_yet(write_yaml):
    msg = one_problem(write_yaml, BASE + "neftune_noise_alpha: 5\n")
    assert "config.yml:6" in msg and "axolotl key" in msg and "not support yet" in msg


def test_unknown_key_in_a_dataset_entry(write_yaml):
    msg = one_problem(write_yaml, BASE + "  - path: b.jsonl\n    type: alpaca\n    feild: x\n")
    assert "datasets[1].feild" in msg and "did you mean field?" in msg and "config.yml:8" in msg


def test_unknown_key_in_a_nested_mapping(write_yaml):
    msg = one_problem(write_yaml, BASE + "special_tokens: {pad_tokn: x}\n")
    assert "unknown key 'special_tokens.pad_tokn'; did you mean pad_token?" in msg


def test_duplicate_key_is_reported(write_yaml):
    msg = one_problem(write_yaml, BASE + "lora_r: 8\nlora_r: 16\n")
    assert "written twice" in msg and "line 6" in msg


def test_dataset_format_typo_and_unsupported_axolotl_format(write_yaml):
    found = problems(write_yaml, BASE.replace("type: alpaca", "type: alpacca")
                     + "  - {path: b, type: sharegpt}\n")
    assert any("did you mean alpaca?" in p for p in found)
    assert any("sharegpt" in p and "chat_template" in p for p in found)


# ------------------------------------------------------------------------ malformed documents


@pytest.mark.parametrize("text, expected", [
    ("base_model: x\n  lora_r: [1,\n", "config.yml:2:"),
    ("- a\n- b\n", "holds a list"),
    ("just a string\n", "holds a single string"),
    ("", "config is empty"),
    ("# only a comment\n", "config is empty"),
    ("a: 1\n---\nb: 2\n", "YAML syntax error"),
    ("1: a\n", "is not a name"),
    ("? [a, b]\n: 1\n", "unhashable key"),
])
def test_malformed_documents(write_yaml, text, expected):
    assert expected in " ".join(problems(write_yaml, text))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "c.yml"
    path.write_bytes(b"base_model: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


# ------------------------------------------------------------------------- types and ranges


@pytest.mark.parametrize("line, expected", [
    ("lora_r: sixteen", "lora_r: expected an integer (got 'sixteen')"),
    ("lora_dropout: 1.5", "lora_dropout: must be < 1.0"),
    ("micro_batch_size: 0", "micro_batch_size: must be > 0"),
    ("sample_packing: maybe", "sample_packing: expected true or false"),
    ("optimizer: adamw_fancy", "optimizer: expected one of"),
    ("lora_target_modules: 5", "lora_target_modules:"),
    ("special_tokens: [a]", "special_tokens: expected a mapping"),
])
def test_wrong_types_and_ranges(write_yaml, line, expected):
    msg = one_problem(write_yaml, BASE + line + "\n")
    assert expected in msg and "config.yml:6" in msg


def test_datasets_must_be_a_list(write_yaml):
    msg = one_problem(write_yaml, "base_model: m\nlearning_rate: 1e-4\ndatasets: {path: x}\n")
    assert "config.yml:3" in msg and "datasets: expected a list" in msg


def test_negative_learning_rate(write_yaml):
    msg = one_problem(write_yaml, BASE.replace("2e-4", "-1"))
    assert "learning_rate: must be > 0" in msg


def test_missing_required_keys(write_yaml):
    assert "missing required key learning_rate" in one_problem(
        write_yaml, BASE.replace("learning_rate: 2e-4\n", ""))
    assert "missing required key datasets" in one_problem(
        write_yaml, "base_model: m\nlearning_rate: 1e-4\n")
    msg = one_problem(write_yaml, BASE.replace("base_model: ./models/tiny\n", ""))
    assert "base_model is required" in msg and "model_config" in msg


def test_all_problems_are_reported_together(write_yaml):
    found = problems(write_yaml, BASE + "lora_alpah: 1\nlora_r: x\nmicro_batch_size: 0\n")
    assert len(found) == 3


# ------------------------------------------------------------------------------ cross-field


RULES = [
    ("adapter: qlora\nlora_target_linear: true\n", "needs load_in_4bit: true"),
    ("warmup_steps: 10\nwarmup_ratio: 0.1\n", "warmup_steps and warmup_ratio"),
    ("lora_r: 16\n", "without an adapter"),
    ("adapter: lora\nlora_target_linear: true\nload_in_4bit: true\nload_in_8bit: true\n",
     "load_in_4bit and load_in_8bit"),
    ("save_steps: 10\nsaves_per_epoch: 2\n", "save_steps and saves_per_epoch"),
    ("eval_steps: 10\nevals_per_epoch: 2\n", "eval_steps and evals_per_epoch"),
    ("adapter: lora\n", "needs targets"),
    ("load_in_4bit: true\n", "needs adapter: qlora"),
    ("load_in_8bit: true\n", "needs adapter: lora"),
    ("early_stopping_patience: 3\n", "needs evaluation data"),
    ("bf16: true\nfp16: true\n", "bf16 and fp16"),
    ("flash_attention: true\nattn_implementation: eager\n", "keep only attn_implementation"),
    ("lr_scheduler: constant\nwarmup_steps: 5\n", "constant has no warmup"),
    ("cosine_min_lr_ratio: 0.1\nlr_scheduler: linear\n", "cosine only"),
    ("batch_size: 7\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\n", "disagrees"),
    ("pretrain_tokenizer: {vocab_size: 512}\n", "only fits a model built from scratch"),
    ("save_safetensors: false\n", "safetensors"),
    ("val_set_size: 2.5\n", "neither a fraction"),
    ("sgd_nesterov: true\noptimizer: sgd\n", "needs sgd_momentum"),
    ("objective: masked_lm\nsample_packing: true\n", "masked LM attends both ways"),
]


@pytest.mark.parametrize("extra, expected", RULES)
def test_cross_field_rules(write_yaml, extra, expected):
    assert any(expected in p for p in problems(write_yaml, BASE + extra)), expected


def test_rule_points_at_the_line_of_its_key(write_yaml):
    msg = one_problem(write_yaml, BASE + "warmup_steps: 10\nwarmup_ratio: 0.1\n")
    assert "config.yml:6" in msg


def test_scratch_rules(write_yaml):
    found = problems(write_yaml, "model_config: {hidden_size: 8}\nlearning_rate: 1e-3\n"
                     "datasets: [{path: c.txt, type: completion}]\nadapter: lora\n"
                     "lora_target_linear: true\n")
    text = " ".join(found)
    assert "needs model_type" in text and "needs a tokenizer" in text and "from scratch" in text


def test_the_rules_do_not_look_at_the_machine(write_yaml, monkeypatch):
    # A GPU config (bf16: true, device: cuda) validates on a laptop without bf16 or a GPU:
    # strop plan reads it there for an H100; training decides what runs (strop.recipe).
    from strop import device

    no_bf16 = device.DeviceCaps(cuda=False, cuda_bf16=False, cpu_bf16=False, cpu_name="old cpu")
    monkeypatch.setattr(device, "detect", lambda: no_bf16)
    cfg = load_config(write_yaml(BASE + "bf16: true\ndevice: cuda\n")).cfg
    assert cfg.bf16 is True and cfg.device == "cuda"
    assert "choose one" in one_problem(write_yaml, BASE + "bf16: true\nfp16: true\n")


# -------------------------------------------------------------------------------- overrides


def test_parse_overrides_types_and_spellings():
    assert parse_overrides(["--lora_r", "16", "--learning-rate=1e-4", "--sample_packing",
                            "--bf16", "false", "--model_config.hidden_size", "64"]) == {
        "lora_r": 16, "learning_rate": "1e-4", "sample_packing": True, "bf16": False,
        "model_config.hidden_size": 64}


def test_overrides_are_validated_like_yaml(write_yaml):
    path = write_yaml(BASE)
    loaded = load_config(path, ["--micro-batch-size", "4", "--lora_dropout=0.1", "--adapter",
                                "lora", "--lora_target_linear"])
    assert loaded.cfg.micro_batch_size == 4 and loaded.cfg.adapter == "lora"
    assert loaded.sources["micro_batch_size"] == "command line"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["--lora_rr", "3", "--micro_batch_size", "zero"])
    text = " ".join(info.value.problems)
    assert "command line: unknown key 'lora_rr'; did you mean lora_r?" in text
    assert "command line: micro_batch_size: expected an integer" in text


def test_dotted_override_reaches_dataset_entries(write_yaml):
    loaded = load_config(write_yaml(BASE), ["--datasets.0.path", "other.jsonl"])
    assert loaded.cfg.datasets[0].path == "other.jsonl"
    with pytest.raises(ConfigError, match="no item 3"):
        load_config(write_yaml(BASE), ["--datasets.3.path", "x"])


def test_bad_override_syntax(write_yaml):
    with pytest.raises(ConfigError, match="--key value"):
        load_config(write_yaml(BASE), ["lora_r", "16"])


def test_load_dict_for_programmatic_use():
    cfg = load_dict({"base_model": "m", "learning_rate": 1e-4,
                     "datasets": [{"path": "d", "type": "completion"}]}).cfg
    assert isinstance(cfg, StropConfig) and cfg.datasets[0].format_name == "completion"


def test_user_defined_format(write_yaml):
    cfg = load_config(write_yaml(BASE.replace("type: alpaca", textwrap.indent(
        "type:\n  field_instruction: q\n  field_output: a\n  format: 'Q: {instruction}\\nA: '",
        "    ").lstrip()))).cfg
    fmt = cfg.datasets[0].type
    assert fmt.field_instruction == "q" and fmt.format.startswith("Q:")
    assert cfg.datasets[0].format_name == "user_defined"


# ------------------------------------------------------------------ hostile and odd YAML files


def test_an_alias_bomb_is_refused_quickly_in_one_line(tmp_path):
    import time

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    lines.append("base_model: *a9")
    path = tmp_path / "bomb.yml"
    path.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - started < 5  # 9**10 values if expanded
    assert "aliases" in str(err.value) and len(str(err.value).splitlines()) == 1


def test_a_utf8_bom_is_dropped(tmp_path):
    path = tmp_path / "bom.yml"
    path.write_bytes(b"\xef\xbb\xbf" + b"base_model: ./m\ndatasets:\n  - path: d.jsonl\n"
                     b"    type: alpaca\nlearning_rate: 1e-4\n")
    assert load_config(path).cfg.base_model == "./m"


@pytest.mark.parametrize("text, message", [
    ("learning_rate: .inf", "learning_rate: must be a finite number"),
    ("learning_rate: 1e400", "learning_rate: must be a finite number"),
    ("learning_rate: .nan", "learning_rate: must be a finite number"),
    ("learning_rate: true", "learning_rate: must be a number, not true or false"),
    ("learning_rate: 1e-4\nmicro_batch_size: true", "micro_batch_size: must be a number"),
])
def test_non_finite_and_boolean_numbers_are_rejected(write_yaml, text, message):
    path = write_yaml("base_model: ./m\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n" + text
                      + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and f"{path}:" in str(err.value)


def test_a_key_given_twice_on_the_command_line_is_an_error():
    with pytest.raises(ConfigError, match="--lora-r is given twice"):
        parse_overrides(["--lora_r", "8", "--lora-r", "16"])


# ---------------------------------------------------------------------------- multi-process keys


def test_fsdp2_keys_load_in_both_spellings(write_yaml):
    cfg = load_config(write_yaml(BASE + "fsdp_version: 2\nfsdp_config:\n"
                                 "  fsdp_reshard_after_forward: false\n"
                                 "  transformer_layer_cls_to_wrap: LlamaDecoderLayer\n"
                                 "ddp_timeout: 60\n")).cfg
    assert cfg.fsdp is not None and cfg.fsdp.reshard_after_forward is False
    assert cfg.fsdp.transformer_layer_cls_to_wrap == "LlamaDecoderLayer"
    assert cfg.ddp_timeout == 60
    assert load_config(write_yaml(BASE)).cfg.fsdp is None  # DDP when several processes run
    assert not cfg.sharded_checkpoints
    sharded = load_config(write_yaml(BASE + "fsdp_version: 2\nfsdp_config:\n"
                                     "  fsdp_state_dict_type: SHARDED_STATE_DICT\n"
                                     "  fsdp_cpu_ram_efficient_loading: true\n")).cfg
    assert sharded.sharded_checkpoints and sharded.fsdp.cpu_ram_efficient_loading


@pytest.mark.parametrize("extra, expected", [
    ("fsdp_version: 1\n", "fsdp_version: 1 (FSDP1) is not supported"),
    ("fsdp_config: {offload_params: true}\n", "fsdp_config is set but fsdp_version is not"),
    ("load_in_4bit: true\nadapter: qlora\nlora_target_linear: true\nfsdp_version: 2\n"
     "fsdp_config: {cpu_ram_efficient_loading: true}\n",
     "cpu_ram_efficient_loading is not built for a 4-bit or 8-bit base"),
    ("fsdp_version: 2\nfsdp_config: {fsdp_activation_checkpointing: true}\n",
     "set gradient_checkpointing: true"),
    ("fsdp_version: 2\nddp_find_unused_parameters: true\n",
     "ddp_find_unused_parameters is a DDP option"),
])
def test_multi_process_keys_that_cannot_work_say_what_does(write_yaml, extra, expected):
    assert expected in one_problem(write_yaml, BASE + extra)
