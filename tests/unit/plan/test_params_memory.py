"""Parameter counts on meta models, the offline config table, and the memory items."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from strop.config.load import load_dict
from strop.plan.estimate import model_facts, setup_for
from strop.plan.memory import estimate_memory, with_setup

REPO = Path(__file__).resolve().parents[3]


def _cfg(**keys):
    base = {"datasets": [{"path": "d.jsonl", "type": "alpaca"}], "learning_rate": 1e-4}
    return load_dict({**base, **keys}).cfg


@pytest.mark.parametrize("hub_id, total", [
    ("meta-llama/Llama-3.2-1B", 1_235_814_400),
    ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    ("Qwen/Qwen2.5-0.5B", 494_032_768),
    ("NousResearch/Llama-2-7b-hf", 6_738_415_616),
])
def test_published_parameter_counts_from_the_offline_table(hub_id, total):
    facts = model_facts(_cfg(base_model=hub_id))
    assert facts.params.total == total
    assert facts.params.trainable == total


def test_every_shipped_base_model_is_in_the_offline_table():
    from strop.model.meta import known_configs

    paths = list((REPO / "examples").glob("*.yml")) + list((REPO / "tests/fixtures/axolotl").glob("*.yml"))
    for path in paths:
        data = yaml.safe_load(path.read_text())
        for key in ("base_model", "base_model_config"):
            if data.get(key) and not data[key].startswith("demo-out/"):
                # a demo-out/ path is a local file `strop demo --real` puts there, no hub id
                assert data[key].lower() in known_configs(), f"{path.name}: {data[key]}"


def test_lora_counts_rank_times_in_plus_out_per_target():
    cfg = _cfg(base_model="meta-llama/Llama-3.2-1B", adapter="lora", lora_r=16,
               lora_target_modules=["q_proj", "v_proj"])
    p = model_facts(cfg).params
    # q: 2048 -> 2048, v: 2048 -> 512, 16 layers
    assert p.adapter == 16 * 16 * ((2048 + 2048) + (2048 + 512))
    assert p.trainable == p.adapter and len(p.lora_modules) == 32


def test_qlora_quantizes_every_linear_but_the_head():
    cfg = _cfg(base_model="mistralai/Mistral-7B-v0.1", adapter="qlora", load_in_4bit=True,
               lora_target_linear=True, lora_r=32)
    p = model_facts(cfg).params
    assert p.quantized == p.total - 2 * 32000 * 4096 - (2 * 32 + 1) * 4096
    by_dtype = p.by_dtype("qlora", 2)
    assert by_dtype["nf4"] == p.quantized and by_dtype["float32"] > p.trainable


def test_memory_items_add_up_and_knobs_lower_the_peak():
    cfg = _cfg(base_model="meta-llama/Llama-3.2-1B", sequence_len=2048, micro_batch_size=2)
    facts = model_facts(cfg)
    setup = setup_for(cfg, "cuda", True, hf_config=facts.hf_config)
    full = estimate_memory(facts.shape, facts.params, setup)
    assert sum(full.items.values()) == pytest.approx(full.total)
    # weights fp32, AdamW two fp32 moments
    assert full.items["weights"] == 4 * facts.params.total
    assert full.items["optimizer_states"] == 8 * facts.params.total
    checkpointed = estimate_memory(facts.shape, facts.params,
                                   with_setup(setup, gradient_checkpointing=True))
    assert checkpointed.total < full.total
    eight_bit = estimate_memory(facts.shape, facts.params, with_setup(setup, optimizer="adamw_8bit"))
    assert eight_bit.total < full.total
    shorter = estimate_memory(facts.shape, facts.params, with_setup(setup, seq_len=1024))
    assert shorter.total < full.total


def test_fsdp_shards_and_ddp_adds_buckets():
    cfg = _cfg(base_model="meta-llama/Llama-3.2-1B", sequence_len=512)
    facts = model_facts(cfg)
    one = estimate_memory(facts.shape, facts.params, setup_for(cfg, "cuda", True, hf_config=facts.hf_config))
    ddp = estimate_memory(facts.shape, facts.params, setup_for(cfg, "cuda", True, 4, "ddp", hf_config=facts.hf_config))
    fsdp = estimate_memory(facts.shape, facts.params, setup_for(cfg, "cuda", True, 4, "fsdp", hf_config=facts.hf_config))
    assert ddp.total > one.total
    assert fsdp.total < one.total
    assert fsdp.phases["optimizer_step"] < one.phases["optimizer_step"] / 2


def test_prediction_matches_a_measured_cpu_training_step(tmp_path):
    """One small case end to end: the harness measures a fresh process, the plan predicts."""
    from strop.train.measure import Case, run_case

    case = Case(name="small-lora", mode="lora", seq_len=384, micro_batch=2, steps=2,
                model_config={"model_type": "llama", "hidden_size": 256,
                              "intermediate_size": 688, "num_hidden_layers": 4,
                              "num_attention_heads": 8, "num_key_value_heads": 4,
                              "vocab_size": 8000, "max_position_embeddings": 1024})
    cfg = load_dict(case.strop_config(tmp_path / "config.json")).cfg
    facts = model_facts(cfg)
    from strop.device import detect

    setup = setup_for(cfg, "cpu", detect().cpu_bf16, hf_config=facts.hf_config)  # this CPU
    predicted = estimate_memory(facts.shape, facts.params, setup).total
    measured = run_case(case)["peak_rss_growth"]
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_qlora_base_keeps_norms_fp32_and_the_rest_in_the_compute_dtype():
    # As strop.model.quantize stores it: only norms are upcast, not embeddings and head.
    cfg = _cfg(base_model="mistralai/Mistral-7B-v0.1", adapter="qlora", load_in_4bit=True,
               lora_target_linear=True, lora_r=32)
    p = model_facts(cfg).params
    by_dtype = p.by_dtype("qlora", 2)
    assert by_dtype["bfloat16"] == 2 * 32000 * 4096
    assert by_dtype["float32"] == p.trainable + (2 * 32 + 1) * 4096


def test_setup_follows_what_the_loop_does_to_the_model():
    """Llama trains through the fused chunked loss without a 4-D mask; a family the mask-free
    attention does not cover keeps the mask, and its loss is still chunked."""
    from strop.recipe.decide import LOSS_CHUNK_ROWS

    llama = _cfg(base_model="meta-llama/Llama-3.2-1B", sequence_len=4096, sample_packing=True)
    facts = model_facts(llama)
    setup = setup_for(llama, "cuda", True, hf_config=facts.hf_config)
    assert setup.fused_loss and not setup.masked and setup.logits_chunk == LOSS_CHUNK_ROWS
    est = estimate_memory(facts.shape, facts.params, setup)
    # One chunk of LOSS_CHUNK_ROWS x 128256 logits at about 6 B each, not the 4096-token whole;
    # the head's weight gradient (fp32), the chunk's share of it (bf16 and an fp32 copy) and
    # the head's bf16 cast.
    assert est.items["logits_and_loss"] < 12 * LOSS_CHUNK_ROWS * 128256 + 4 * 4096 * 2048 \
        + 4 * 128256 * 2048 + 6 * 128256 * 2048 + 2 * 128256 * 2048
    gemma = _cfg(base_model="google/gemma-2-2b", sequence_len=4096, sample_packing=True)
    facts = model_facts(gemma)
    setup = setup_for(gemma, "cuda", True, hf_config=facts.hf_config)
    assert setup.masked and not setup.fused_loss  # softcapped head, sliding window
