"""`strop plan` as a user runs it: every shipped example offline, JSON keys, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yml"))


def _place_demo_model(path: Path, request, tmp_path, monkeypatch) -> None:
    """An example whose base_model is the file `strop demo --real` links into demo-out/ is
    planned as after the demo's setup: in a fresh directory where that link exists."""
    base = yaml.safe_load(path.read_text()).get("base_model") or ""
    if not base.startswith("demo-out/"):
        return
    gguf = request.getfixturevalue("smollm2_gguf")
    monkeypatch.chdir(tmp_path)
    (tmp_path / base).parent.mkdir(parents=True)
    (tmp_path / base).symlink_to(gguf)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_plans_offline(path, cli, request, tmp_path, monkeypatch):
    _place_demo_model(path, request, tmp_path, monkeypatch)
    result = cli("plan", path, "--gpu", "H100", "--json")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["params"]["total"] >= plan["params"]["trainable"] > 0
    assert plan["memory"]["total_bytes"] == pytest.approx(sum(plan["memory"]["items"].values()),
                                                          rel=1e-3)
    assert "tokens_per_epoch" in plan["compute"] and "flops_total" in plan["compute"]


def test_a_missing_local_gguf_says_so_not_only_that_the_hub_failed(cli, write_yaml, tmp_path,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_yaml("""
base_model: demo-out/smollm2/Model.Q4_1.gguf
datasets: [{path: d.jsonl, type: alpaca}]
learning_rate: 2.0e-4
""")
    result = cli("plan", cfg)
    assert result.code == 2
    assert "demo-out/smollm2/Model.Q4_1.gguf is no local file" in result.err
    assert "give the local path of an existing .gguf file" in result.err


def test_mistral_qlora_text_report(cli):
    result = cli("plan", REPO / "examples" / "mistral-7b-qlora.yml")
    assert result.code == 0, result.err
    out = result.out
    assert "total 7.24B" in out and "NF4 4.127 bits/param" in out
    assert "RTX 4090" in out and "this CPU" in out and "cheapest that fits:" in out


def test_a_gpu_config_plans_for_an_h100_on_a_laptop(cli, write_yaml, tiny_model_dir):
    # device: cuda and bf16: true describe the GPU the run is for, not this machine
    cfg = write_yaml(f"base_model: {tiny_model_dir('llama')}\ndatasets: [{{path: d.jsonl, "
                     "type: alpaca}]\nlearning_rate: 1.0e-4\ndevice: cuda\nbf16: true\n"
                     "sequence_len: 256\n")
    result = cli("plan", cfg, "--gpu", "H100", "--json")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["setup"]["device"].startswith("H100") and plan["setup"]["compute_bytes"] == 2
    assert plan["memory"]["items"]["cuda_context"] > 0  # a GPU's memory, planned here


def test_this_cpu_alone_says_it_fits_and_times_the_step(cli, write_yaml, tiny_model_dir):
    cfg = write_yaml(f"""
base_model: {tiny_model_dir("llama")}
datasets: [{{path: not/here.jsonl, type: alpaca}}]
adapter: lora
lora_r: 8
lora_alpha: 16
lora_target_linear: true
learning_rate: 2e-4
sequence_len: 128
micro_batch_size: 2
""")
    result = cli("plan", cfg, "--gpu", "cpu")
    assert result.code == 0, result.err
    assert "fits on this CPU" in result.out and "nothing fits" not in result.out
    assert "timed at their shapes" in result.out


def test_tokens_and_flops_from_a_local_dataset(cli, write_yaml, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": "word " * 60, "output": "ok"}) + "\n"
                            for _ in range(300)))
    cfg = write_yaml(f"""
base_model: Qwen/Qwen2.5-0.5B
datasets: [{{path: {data}, type: alpaca}}]
learning_rate: 2e-5
sequence_len: 1024
sample_packing: true
num_epochs: 2
""")
    plan = json.loads(cli("plan", cfg, "--gpu", "a100-80gb", "--json").out)
    compute = plan["compute"]
    assert compute["tokens_per_epoch"] % 1024 == 0 and compute["tokens_per_epoch"] > 0
    assert compute["tokens_total"] == 2 * compute["tokens_per_epoch"]
    assert compute["flops_total"] == pytest.approx(compute["tokens_total"] * compute["flops_per_token"],
                                                   rel=1e-3)
    row = plan["devices"][0]
    assert row["device"] == "A100 80GB" and row["fits"] and row["hours"] > 0
    assert set(row["cost"]) >= {"RunPod", "Lambda", "AWS"}


def test_nothing_fits_suggests_knobs_with_new_estimates(cli, write_yaml):
    cfg = write_yaml("""
base_model: meta-llama/Llama-2-13b-hf
datasets: [{path: remote/data, type: alpaca}]
learning_rate: 2e-5
sequence_len: 4096
micro_batch_size: 4
""")
    result = cli("plan", cfg, "--gpu", "T4")
    assert result.code == 0, result.err
    assert "nothing fits" in result.out
    assert "gradient_checkpointing: true" in result.out and "adapter: qlora" in result.out
    plan = json.loads(cli("plan", cfg, "--gpu", "T4", "--json").out)
    changes = {s["change"]: s for s in plan["suggestions"]}
    assert changes["all of the above"]["total_bytes"] < plan["memory"]["total_bytes"]


def test_own_price_table(cli, write_yaml, tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"date": "2030-01", "prices": {"L4": {"MyCloud": 0.01}}}))
    result = cli("plan", REPO / "examples" / "llama-3.2-1b-lora.yml", "--gpu", "L4",
                 "--prices", prices, "--json")
    plan = json.loads(result.out)
    assert plan["prices"]["date"] == "2030-01"
    assert list(plan["devices"][0]["cost_per_million_tokens"]) == ["MyCloud"]


def test_unknown_gpu_lists_the_known_ones(cli):
    result = cli("plan", REPO / "examples" / "qwen2.5-0.5b-full.yml", "--gpu", "V100")
    assert result.code == 2
    line = result.err.strip()
    assert "--gpu V100: unknown GPU" in line and "H100 80GB" in line and "T4" in line
    assert len(line.splitlines()) == 1


def test_unresolvable_base_model_names_it_and_suggests_a_local_path(cli, write_yaml):
    cfg = write_yaml("""
base_model: nobody/unknown-model-7b
datasets: [{path: d.jsonl, type: alpaca}]
learning_rate: 2e-5
""")
    result = cli("plan", cfg, "--gpu", "H100")
    assert result.code == 2
    line = result.err.strip()
    assert "nobody/unknown-model-7b" in line and "local model directory" in line
    assert len(line.splitlines()) == 1


def test_world_size_and_fsdp(cli):
    path = REPO / "examples" / "qwen2.5-0.5b-full.yml"
    one = json.loads(cli("plan", path, "--gpu", "L4", "--json").out)
    sharded = json.loads(cli("plan", path, "--gpu", "L4", "--world-size", "4",
                             "--sharding", "fsdp", "--json").out)
    assert sharded["memory"]["total_bytes"] < one["memory"]["total_bytes"]
    assert sharded["devices"][0]["count"] == 4


def test_fsdp2_from_the_config_on_8_gpus_over_nvlink(cli, write_yaml):
    """fsdp_version: 2 picks FSDP2 without --sharding. Llama-2-7b: 6,738,415,616 parameters,
    32 layers of 202,383,360, the root (embedding, head, norm) 262,148,096."""
    cfg = write_yaml("""
base_model: NousResearch/Llama-2-7b-hf
datasets: [{path: not/here.jsonl, type: alpaca}]
learning_rate: 2e-5
sequence_len: 2048
gradient_checkpointing: true
fsdp_version: 2
fsdp_config:
  reshard_after_forward: true
""")
    args = ("plan", cfg, "--gpu", "H100", "--world-size", "8", "--interconnect", "nvlink")
    result = cli(*args, "--json")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    dist = plan["distributed"]
    assert (dist["strategy"], dist["strategy_from"]) == ("fsdp", "fsdp_version: 2 in the config")
    assert dist["world_size"] == 8 and dist["reshard_after_forward"] is True
    step = dist["step"]
    # 7/8 x 4 bytes x every parameter each: fp32 weights gathered in forward and again in
    # backward, fp32 gradients reduce-scattered
    assert step["collectives"] == {"all_gather_forward": 23_584_454_656,
                                   "all_gather_backward": 23_584_454_656,
                                   "reduce_scatter_gradients": 23_584_454_656}
    assert step["comm_bytes"] == 70_753_363_968
    assert (step["interconnect"], step["interconnect_gb_per_s"]) == ("nvlink", 450)
    assert step["comm_seconds"] == pytest.approx(70_753_363_968 / 450e9, rel=1e-3)
    assert step["seconds"] == max(step["comm_seconds"], step["compute_seconds"])
    items = plan["memory"]["items"]
    assert items["weights"] == 4 * 6_738_415_616 / 8
    assert items["fsdp_gathered_params"] == 4 * (262_148_096 + 2 * 202_383_360)
    assert plan["memory"]["host_bytes"] == 0
    row = plan["devices"][0]
    assert row["count"] == 8 and row["step"] == step
    text = cli(*args).out
    assert "8 x H100 80GB" in text and "FSDP2 (fsdp_version: 2 in the config)" in text
    assert "assumes communication overlaps compute" in text
    ddp = json.loads(cli(*args, "--sharding", "ddp", "--json").out)["distributed"]
    assert (ddp["strategy"], ddp["strategy_from"]) == ("ddp", "--sharding")
    assert ddp["step"]["collectives"] == {"all_reduce_gradients": 47_168_909_312}
