"""Several processes: DDP and FSDP2 memory per device, bytes per step, the link, the step time.

Figures are worked by hand for Llama-3.2-1B (tied embeddings; 16 decoder layers of 60,821,504
parameters; the root holds the 128256 x 2048 embedding and the final norm: 262,670,336) and
Llama-2-7b (6,738,415,616 parameters), full training in bf16 with AdamW unless said. FSDP2 is
modelled as strop.train.distributed wraps it: weights gathered as stored (fp32 when they train),
gradients reduce-scattered in fp32 once per optimizer step.
"""

from __future__ import annotations

import pytest

from strop.config.load import load_dict
from strop.errors import StropError
from strop.plan.comm import Layout, layout, links, step_traffic
from strop.plan.estimate import model_facts, setup_for
from strop.plan.memory import (
    estimate_memory,
    fsdp_gathered_bytes,
    fsdp_unit_bytes,
    weight_bytes,
    with_setup,
)

P_1B = 1_235_814_400
LAYER_1B = 60_821_504
ROOT_1B = 262_670_336


def _cfg(**keys):
    base = {"datasets": [{"path": "d.jsonl", "type": "alpaca"}], "learning_rate": 1e-4,
            "base_model": "meta-llama/Llama-3.2-1B", "sequence_len": 512}
    return load_dict({**base, **keys}).cfg


@pytest.fixture(scope="module")
def llama_1b():
    cfg = _cfg()
    return cfg, model_facts(cfg)


def test_decoder_layers_are_counted_as_fsdp2_wraps_them(llama_1b):
    _, facts = llama_1b
    layers = facts.params.layers
    assert len(layers) == 16 and {u.params for u in layers} == {LAYER_1B}
    assert facts.params.total - sum(u.params for u in layers) == ROOT_1B
    qlora = model_facts(_cfg(adapter="qlora", load_in_4bit=True, lora_target_linear=True,
                             lora_r=16)).params.layers[0]
    # q, k, v, o, gate, up, down are 4-bit; two norms are not. r=16 on each of the seven:
    # 16 x ((2048+2048) x 2 + (2048+512) x 2 + (2048+8192) x 3)
    assert qlora.quantized == LAYER_1B - 2 * 2048 and qlora.added == 704_512


def test_fsdp2_gathers_the_root_and_two_layers_or_every_layer(llama_1b):
    cfg, facts = llama_1b
    setup = setup_for(cfg, "cuda", True, 8, "fsdp", hf_config=facts.hf_config)
    # fp32 trainable weights: (root + two layers) x 4 bytes
    assert fsdp_gathered_bytes(facts.shape, facts.params, setup) == 4 * (ROOT_1B + 2 * LAYER_1B)
    assert fsdp_gathered_bytes(facts.shape, facts.params, setup) == 1_537_253_376
    kept = with_setup(setup, reshard_after_forward=False)
    # every layer stays gathered until its backward: the whole model in fp32
    assert fsdp_gathered_bytes(facts.shape, facts.params, kept) == 4 * P_1B == 4_943_257_600


def test_fsdp2_memory_per_device_for_world_1_2_8(llama_1b):
    cfg, facts = llama_1b
    est = {n: estimate_memory(facts.shape, facts.params,
                              setup_for(cfg, "cuda", True, n, "fsdp", hf_config=facts.hf_config))
           for n in (1, 2, 8)}
    # One process shards nothing: fp32 weights and two AdamW moments whole, no gathered copies.
    assert est[1].items["weights"] == 4 * P_1B
    assert "fsdp_gathered_params" not in est[1].items
    for n in (2, 8):
        assert est[n].peak_phase == "forward_end"
        assert est[n].items["weights"] == 4 * P_1B / n
        assert est[n].items["optimizer_states"] == 8 * P_1B / n
        assert est[n].items["fsdp_gathered_params"] == 1_537_253_376
        # autocast casts each gathered fp32 weight: its bf16 copies are not sharded
        assert est[n].items["autocast_weight_copies"] == est[1].items["autocast_weight_copies"]
        assert "fsdp_unsharded_gradients" not in est[n].items  # one micro-batch a step
    # Between 2 and 8 devices only the shards change: 12 bytes a parameter x (1/2 - 1/8).
    assert est[2].total - est[8].total == pytest.approx(5_561_164_800)
    # Gradients and the optimizer step are sharded too: (4 + 8 + 4) bytes a parameter / 8.
    framework = est[8].items["cuda_context"] + est[8].items["framework"]
    step_8 = est[8].phases["optimizer_step"] - framework
    assert step_8 == pytest.approx((est[1].phases["optimizer_step"] - framework) / 8)
    assert step_8 >= 16 * P_1B / 8


def test_fsdp2_accumulates_unsharded_gradients_between_micro_batches():
    cfg = _cfg(gradient_accumulation_steps=4)
    facts = model_facts(cfg)
    est = estimate_memory(facts.shape, facts.params,
                          setup_for(cfg, "cuda", True, 8, "fsdp", hf_config=facts.hf_config))
    # every fp32 gradient, whole, until the step's last backward reduce-scatters them
    assert est.items["fsdp_unsharded_gradients"] == 4 * P_1B == 4_943_257_600
    assert any("accumulates the gradients" in note for note in est.notes)


def test_ddp_keeps_gradient_buckets_in_every_phase(llama_1b):
    cfg, facts = llama_1b
    one = estimate_memory(facts.shape, facts.params,
                          setup_for(cfg, "cuda", True, hf_config=facts.hf_config))
    ddp = estimate_memory(facts.shape, facts.params,
                          setup_for(cfg, "cuda", True, 4, "ddp", hf_config=facts.hf_config))
    for phase in one.phases:
        assert ddp.phases[phase] - one.phases[phase] == 4 * P_1B == 4_943_257_600


def test_offload_moves_shards_gradients_and_states_to_host(llama_1b):
    cfg, facts = llama_1b
    setup = setup_for(cfg, "cuda", True, 8, "fsdp", hf_config=facts.hf_config)
    on_device = estimate_memory(facts.shape, facts.params, setup)
    offloaded = estimate_memory(facts.shape, facts.params, with_setup(setup, offload_params=True))
    assert offloaded.host_items["weights"] == 4 * P_1B / 8 == 617_907_200
    assert offloaded.host_items["optimizer_states"] == 8 * P_1B / 8 == 1_235_814_400
    assert offloaded.host_items["gradients"] == 617_907_200
    assert not {"weights", "optimizer_states", "gradients"} & set(offloaded.items)
    assert offloaded.items["fsdp_gathered_params"] == 1_537_253_376  # what runs stays on the GPU
    assert on_device.total - offloaded.total == pytest.approx(12 * P_1B / 8)
    assert on_device.host_total == 0


def test_lora_shards_the_frozen_base_and_sends_only_adapter_gradients():
    cfg = _cfg(base_model="NousResearch/Llama-2-7b-hf", adapter="lora", lora_r=16,
               lora_target_modules=["q_proj", "v_proj"])
    facts = model_facts(cfg)
    adapter = 32 * 16 * (4096 + 4096) * 2
    assert facts.params.trainable == adapter == 8_388_608
    fsdp = setup_for(cfg, "cuda", True, 8, "fsdp", hf_config=facts.hf_config)
    est = estimate_memory(facts.shape, facts.params, fsdp)
    assert est.items["weights"] == 2 * 6_738_415_616 / 8  # the bf16 base, sharded
    assert est.items["lora_weights"] == 4 * adapter / 8
    # a layer gathers its bf16 base (202,383,360) and its fp32 adapters (16 x 8192 x 2)
    _, layers = fsdp_unit_bytes(facts.shape, facts.params, fsdp)
    assert set(layers) == {2 * 202_383_360 + 4 * 262_144}
    ddp = setup_for(cfg, "cuda", True, 8, "ddp", hf_config=facts.hf_config)
    assert step_traffic(facts.params, ddp) == {
        "all_reduce_gradients": 2 * 7 / 8 * 4 * adapter}  # 58,720,256
    sent = step_traffic(facts.params, fsdp)
    assert sent["reduce_scatter_gradients"] == 29_360_128  # 7/8 x 4 x adapter
    assert sent["all_gather_forward"] == 11_821_587_456  # 7/8 x (2 x base + 4 x adapter)


def test_bytes_per_step_ddp_against_fsdp2(llama_1b):
    cfg, facts = llama_1b
    params = facts.params
    ddp = setup_for(cfg, "cuda", True, 8, "ddp", hf_config=facts.hf_config)
    fsdp = setup_for(cfg, "cuda", True, 8, "fsdp", hf_config=facts.hf_config)
    # ring all-reduce: 2 x 7/8 x 4 bytes a parameter, once a step (no_sync before the last)
    assert step_traffic(params, ddp) == {"all_reduce_gradients": 8_650_700_800}
    assert step_traffic(params, with_setup(ddp, accumulation=4)) == \
        {"all_reduce_gradients": 8_650_700_800}
    # each 7/8 x 4 bytes x every parameter: fp32 weights gathered twice, fp32 gradients reduced
    assert step_traffic(params, fsdp) == {"all_gather_forward": 4_325_350_400,
                                          "all_gather_backward": 4_325_350_400,
                                          "reduce_scatter_gradients": 4_325_350_400}
    # kept for backward: DDP's volume (ZeRO-2's point)
    kept = with_setup(fsdp, reshard_after_forward=False)
    assert sum(step_traffic(params, kept).values()) == 8_650_700_800
    # gathered in every micro-batch, reduced once: 4 x 2 x 4,325,350,400 + 4,325,350,400
    assert sum(step_traffic(params, with_setup(fsdp, accumulation=4)).values()) == 38_928_153_600
    assert step_traffic(params, with_setup(fsdp, world_size=1)) == {}


def test_the_strategy_comes_from_the_config_unless_given():
    plain = _cfg()
    sharded = _cfg(fsdp_version=2, fsdp_config={"reshard_after_forward": False,
                                                "offload_params": True})
    facts = model_facts(plain)
    assert setup_for(plain, world_size=8, hf_config=facts.hf_config).sharding == "ddp"
    setup = setup_for(sharded, world_size=8, hf_config=facts.hf_config)
    assert (setup.sharding, setup.reshard_after_forward, setup.offload_params) == \
        ("fsdp", False, True)
    assert setup_for(sharded, world_size=8, sharding="ddp",
                     hf_config=facts.hf_config).offload_params is False
    forced = setup_for(plain, world_size=8, sharding="fsdp", hf_config=facts.hf_config)
    assert (forced.sharding, forced.reshard_after_forward, forced.offload_params) == \
        ("fsdp", True, False)


def test_the_slowest_hop_sets_the_link():
    table = links()
    assert Layout(8).link_for("nvlink").gb_per_s == 450
    assert Layout(8).link_for(None) is None  # a CPU: nothing says how it talks
    assert Layout(16, 2).link_for("nvlink") == table["infiniband"]
    assert Layout(16, 2).link_for("pcie3").gb_per_s == 16  # the node's own PCIe is slower
    assert Layout(2, 2).link_for("pcie3") == table["infiniband"]  # one GPU a node: no PCIe hop
    assert layout(16, 2, "ethernet").link_for("nvlink").gb_per_s == 12.5
    assert layout(8, 1, "100").link_for("nvlink").gb_per_s == 100
    for args in ((8, 3, None), (8, 2, "nvlink"), (8, 1, "ethernet"), (8, 1, "fast"),
                 (8, 1, "-5")):
        with pytest.raises(StropError):
            layout(*args)


def test_step_time_is_the_longer_of_compute_and_communication():
    from strop.plan.report import GPU_MFU, build_plan
    from strop.recipe.hardware import load_prices

    cfg = _cfg(micro_batch_size=2, gradient_accumulation_steps=4)
    tokens = 2 * 512 * 4
    fast = build_plan(cfg, gpu="H100", world_size=8, measure_cpu=False)
    step = fast["distributed"]["step"]
    assert fast["distributed"]["strategy"] == "ddp"
    assert step["tokens_per_device"] == tokens
    assert step["interconnect"] == "nvlink"
    assert step["comm_seconds"] == pytest.approx(8_650_700_800 / 450e9)
    flops = fast["compute"]["flops_per_token"]
    assert step["compute_seconds"] == pytest.approx(tokens * flops / (989.4e12 * GPU_MFU))
    assert step["seconds"] == step["compute_seconds"] and step["bound"] == "compute"
    slow = build_plan(cfg, gpu="H100", world_size=8, nodes=2, interconnect="ethernet",
                      measure_cpu=False)
    step = slow["distributed"]["step"]
    assert step["comm_seconds"] == pytest.approx(8_650_700_800 / 12.5e9)
    assert step["seconds"] == step["comm_seconds"] and step["bound"] == "communication"
    row = slow["devices"][0]
    assert row["count"] == 8
    assert row["tokens_per_second"] == pytest.approx(8 * tokens / step["seconds"])
    hourly = load_prices()["prices"]["H100 80GB"]["RunPod"]  # per GPU; the run rents 8
    assert row["cost_per_million_tokens"]["RunPod"] == pytest.approx(
        hourly * 8 * 1e6 / row["tokens_per_second"] / 3600)
    single = build_plan(cfg, gpu="H100", measure_cpu=False)["distributed"]
    assert single["strategy"] == "single" and single["step"]["collectives"] == {}
    assert single["step"]["comm_seconds"] == 0


def test_qlora_shards_its_packed_base_and_reduces_only_the_adapters():
    cfg = _cfg(adapter="qlora", load_in_4bit=True, lora_target_linear=True, lora_r=16)
    facts = model_facts(cfg)
    setup = setup_for(cfg, "cuda", True, 8, "fsdp", hf_config=facts.hf_config)
    stored = weight_bytes(facts.params, setup)
    est = estimate_memory(facts.shape, facts.params, setup)
    assert est.items["weights"] == stored["weights"] / 8
    root, layers = fsdp_unit_bytes(facts.shape, facts.params, setup)
    assert root + sum(layers) == pytest.approx(sum(stored.values()))
    # a layer: 4-bit linears (about 0.52 bytes each), fp32 norms and fp32 adapters
    assert 0.5 * LAYER_1B < layers[0] - 4 * (2 * 2048 + 704_512) < 0.53 * LAYER_1B
    assert step_traffic(facts.params, setup)["reduce_scatter_gradients"] == 39_452_672
