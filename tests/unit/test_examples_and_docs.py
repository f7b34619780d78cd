"""Every shipped example validates; axolotl users' configs validate unchanged; docs are fresh."""

from __future__ import annotations

from pathlib import Path

import pytest

from strop.config import load_config
from strop.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").rglob("*.yml"))
AXOLOTL = REPO / "tests" / "fixtures" / "axolotl"

# axolotl's current example configs for SFT, LoRA, QLoRA and full fine-tuning.
AXOLOTL_CURRENT = ["mistral_qlora", "llama_3_lora_1b", "llama_3_qlora_1b", "llama_2_lora",
                   "llama_2_qlora", "llama_3_fft_8b", "openllama_3b_lora", "tiny_llama_lora",
                   "gemma_qlora"]
# Configs that ask for what strop does not do (yet): each fails with a named, clear reason.
AXOLOTL_REFUSED = {
    "llama_2_fft_optimized": ["flash_attn_rms_norm", "flash_attn_fuse_mlp"],
    "mistral_qlora_old": ["eval_table_size", "eval_table_max_new_tokens"],
    "llama_2_lora_old": ["eval_table_max_new_tokens"],
    "llama_2_qlora_old": ["max_packed_sequence_len", "xformers_attention"],
}


def test_examples_exist():
    assert len(EXAMPLES) >= 4


def test_examples_in_subfolders_are_validated_too():
    # rglob reaches examples/demo/, the stage configs of `strop demo`
    demo = {p.name for p in EXAMPLES if p.parent.name == "demo"}
    assert demo == {"pretrain.yml", "full.yml", "lora.yml", "qlora.yml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_validates(path, cli):
    result = cli("validate", path)
    assert result.code == 0, result.err


@pytest.mark.parametrize("name", AXOLOTL_CURRENT)
def test_axolotl_configs_validate_unchanged(name):
    loaded = load_config(AXOLOTL / f"{name}.yml")
    assert loaded.cfg.base_model


@pytest.mark.parametrize("name, keys", sorted(AXOLOTL_REFUSED.items()))
def test_axolotl_configs_strop_cannot_honour_say_which_keys(name, keys):
    with pytest.raises(ConfigError) as info:
        load_config(AXOLOTL / f"{name}.yml")
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == len(keys), text
    for key in keys:
        assert f"{key} is an axolotl key that strop does not support yet" in text


def test_an_axolotl_fsdp1_config_is_told_what_fsdp2_needs_in_one_pass():
    with pytest.raises(ConfigError) as info:
        load_config(AXOLOTL / "qwen2_qlora_fsdp.yml")
    text = "\n".join(info.value.problems)
    assert "fsdp is an axolotl key that strop does not support yet" in text
    assert "for FSDP2 set fsdp_version: 2" in text
    assert "fsdp_config is set but fsdp_version is not" in text
    for key in ("sharding_strategy", "limit_all_gathers", "sync_module_states", "use_orig_params"):
        assert f"fsdp_config.{key} is an FSDP1 option" in text
    assert "fsdp_config.cpu_ram_efficient_loading is not built for a 4-bit" in text
    assert len(info.value.problems) == 7, text


def test_every_axolotl_fixture_is_classified():
    names = {p.stem for p in AXOLOTL.glob("*.yml")}
    assert names == set(AXOLOTL_CURRENT) | set(AXOLOTL_REFUSED) | {"qwen2_qlora_fsdp"}


def test_docs_config_md_is_generated_from_the_schema():
    from strop.config.docs import markdown_reference

    written = (REPO / "docs" / "config.md").read_text()
    assert written == markdown_reference(), (
        "docs/config.md is stale: run `strop config-schema --markdown > docs/config.md`")


def test_every_field_documents_itself():
    from strop.config.datasets import DatasetConfig
    from strop.config.schema import StropConfig

    for model in (StropConfig, DatasetConfig):
        for name, info in model.model_fields.items():
            assert info.description and len(info.description) > 8, name
    for name, info in StropConfig.model_fields.items():
        assert (info.json_schema_extra or {}).get("group"), name
