"""Two processes on torch.distributed (torchrun, gloo on CPU) train what one process trains.

A 2-process run with gradient_accumulation_steps A takes the same optimizer steps as a
1-process run with 2A: the same rows per step, the loss normalised by the trained tokens of the
whole step. DDP gives the same numbers bit for bit on this tiny Llama; FSDP2 (its reductions
summed in another order) within float tolerance. Checkpoints resume on another world size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_corpus, write_alpaca

pytestmark = pytest.mark.slow

LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}
QLORA = {**LORA, "adapter": "qlora", "load_in_4bit": True, "bf16": True}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dist")
    return {"root": root, "model": tiny_model_dir("llama"),
            "data": write_alpaca(root / "alpaca.jsonl", 120, seed=7)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist-corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(200, seed=1)))
    return path


def config(work: dict, name: str, **extra) -> Path:
    cfg = {"base_model": str(work["model"]),
           "datasets": [{"path": str(work["data"]), "type": "alpaca"}],
           "learning_rate": 1e-3, "micro_batch_size": 4, "max_steps": 4, "sequence_len": 128,
           "logging_steps": 1, "bf16": False, "seed": 0, "output_dir": str(work["root"] / name),
           "dataset_prepared_path": str(work["root"] / "prepared"), **extra}
    path = work["root"] / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def torchrun(cfg: Path, *args: str, nproc: int = 2, wait: bool = True, tee: bool = False):
    # tee: torchrun prefixes each line with the rank that printed it ("[default1]:...")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *(["--tee", "3"] if tee else []),
               "-m", "strop", "train", str(cfg), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def one_process(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "strop", "train", str(cfg), *args],
                          capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def weights(out: Path, adapter: bool = False) -> dict[str, torch.Tensor]:
    return load_file(out / ("adapter_model.safetensors" if adapter else "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def reference(work):
    """One process, accumulation 2: what every 2-process run below must equal."""
    ok(one_process(config(work, "one"), "--gradient_accumulation_steps", "2"))
    return work["root"] / "one"


def test_ddp_and_fsdp2_equal_one_process_with_twice_the_accumulation(work, reference):
    # `strop train --nproc 2` starts torchrun itself
    ddp = subprocess.run([sys.executable, "-m", "strop", "train", str(config(work, "ddp")),
                          "--nproc", "2", "--gradient_accumulation_steps", "1"],
                         capture_output=True, text=True, timeout=600)
    ok(ddp)
    assert "starting 2 processes: torchrun" in ddp.stdout
    ok(torchrun(config(work, "fsdp", fsdp_version=2), "--gradient_accumulation_steps", "1"))
    one, two, sharded = reference, work["root"] / "ddp", work["root"] / "fsdp"
    assert losses(two) == losses(one)  # DDP: bit for bit
    assert losses(sharded) == pytest.approx(losses(one), rel=1e-6)
    assert_same_weights(weights(one), weights(two))
    assert_same_weights(weights(one), weights(sharded), atol=1e-5)
    # Rank 0 alone logs: one record per step, saying how many processes trained.
    records = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and {r["world_size"] for r in train} == {2}
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp"


@pytest.mark.parametrize("mode, strategy", [("lora", "ddp"), ("qlora", "fsdp")])
def test_lora_and_qlora_train_the_same_adapter_on_two_processes(work, mode, strategy):
    # with evaluation: each rank scores its share of the held-out rows, summed over ranks
    extra = {**(LORA if mode == "lora" else QLORA), "val_set_size": 0.1, "eval_steps": 2,
             "dataset_prepared_path": str(work["root"] / f"prepared-{mode}")}
    ok(one_process(config(work, f"{mode}-one", **extra), "--gradient_accumulation_steps", "2"))
    sharding = {"fsdp_version": 2} if strategy == "fsdp" else {}
    result = ok(torchrun(config(work, f"{mode}-{strategy}", **extra, **sharding),
                         "--gradient_accumulation_steps", "1", tee=True))
    # rank 0 speaks for the run: rank 1 prints nothing (no warnings, no "Loading weights" bars)
    printed = (result.stdout + result.stderr).splitlines()
    assert any(line.startswith("[default0]:saved the adapter") for line in printed)
    assert [line for line in printed if line.startswith("[default1]:")] == []
    one, two = work["root"] / f"{mode}-one", work["root"] / f"{mode}-{strategy}"
    # QLoRA computes in bf16, where FSDP2's other summation order shows (measured: 4e-6)
    rel = 1e-6 if mode == "lora" else 2e-5
    assert losses(two) == pytest.approx(losses(one), rel=rel)
    assert_same_weights(weights(one, True), weights(two, True), atol=10 * rel)
    evals = [[(r["step"], r["eval_loss"], r["eval_tokens"]) for r in map(json.loads, (
        out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"] for out in (one, two)]
    assert [e[0] for e in evals[1]] == [2, 4] and [e[2] for e in evals[1]] == [e[2] for e in evals[0]]
    assert [e[1] for e in evals[1]] == pytest.approx([e[1] for e in evals[0]], rel=rel)
    # PEFT loads what two processes wrote
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work["model"]), two)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_pretraining_from_scratch_on_two_processes(work, corpus):
    scratch = {"base_model": None, "datasets": [{"path": str(corpus), "type": "completion"}],
               "model_config": {"model_type": "llama", "hidden_size": 64,
                                "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2,
                                "max_position_embeddings": 128},
               "pretrain_tokenizer": {"vocab_size": 300}}
    ok(one_process(config(work, "scratch-one", **scratch,
                          dataset_prepared_path=str(work["root"] / "p1")),
                   "--gradient_accumulation_steps", "2"))
    # rank 0 trains the tokenizer and prepares the data; rank 1 reads them
    ok(torchrun(config(work, "scratch-two", **scratch, fsdp_version=2,
                       dataset_prepared_path=str(work["root"] / "p2")),
                "--gradient_accumulation_steps", "1"))
    one, two = work["root"] / "scratch-one", work["root"] / "scratch-two"
    assert (two / "tokenizer.json").read_text() == (one / "tokenizer.json").read_text()
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    assert_same_weights(weights(one), weights(two), atol=1e-5)


def test_checkpoints_resume_on_another_number_of_processes(work, reference):
    # 2 -> 1 (DDP's checkpoint), 1 -> 2 under FSDP2: both end where the uninterrupted run did
    ok(torchrun(config(work, "save2", save_steps=2), "--gradient_accumulation_steps", "1"))
    ok(one_process(config(work, "from2"), "--gradient_accumulation_steps", "2",
                   "--resume_from_checkpoint", str(work["root"] / "save2" / "checkpoint-2")))
    assert_same_weights(weights(reference), weights(work["root"] / "from2"))
    ok(one_process(config(work, "save1", save_steps=2), "--gradient_accumulation_steps", "2"))
    ok(torchrun(config(work, "from1", fsdp_version=2), "--gradient_accumulation_steps", "1",
                "--resume_from_checkpoint", str(work["root"] / "save1" / "checkpoint-2")))
    assert_same_weights(weights(reference), weights(work["root"] / "from1"), atol=1e-5)
    assert losses(work["root"] / "from1") == pytest.approx(losses(reference)[2:], rel=1e-6)


SHARDED = {"fsdp_version": 2, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}}


def test_sharded_checkpoints_resume_on_any_number_of_processes(work, reference):
    # Each rank writes its own shard (torch.distributed.checkpoint, safetensors); the
    # checkpoint resumes on 2 processes, on 1, and one process's sharded checkpoint on 2.
    ok(torchrun(config(work, "shard2", save_steps=2, **SHARDED),
                "--gradient_accumulation_steps", "1"))
    saved = work["root"] / "shard2" / "checkpoint-2"
    index = json.loads((saved / "sharded.json").read_text())
    assert index["world_size"] == 2 and len(index["files"]) == 2
    assert {p.name for p in (saved / "sharded").iterdir()} == set(index["files"])
    # nothing but safetensors and JSON holds the weights and optimizer states: no pickle
    assert not (saved / "optimizer.pt").exists() and not list(saved.rglob(".metadata"))
    assert {p.name for p in saved.glob("*.pt")} == {"scheduler.pt", "rng.pt", "rng-rank1.pt"}
    keys = set()
    for name in index["files"]:
        keys |= load_file(saved / "sharded" / name).keys()
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg") for k in keys)
    assert any(k.startswith("model.") and k.endswith("q_proj.weight") for k in keys)
    # the final model is one ordinary file set, the same as with gathered checkpoints
    assert_same_weights(weights(reference), weights(work["root"] / "shard2"), atol=1e-5)

    ok(torchrun(config(work, "shard2to2", **SHARDED), "--gradient_accumulation_steps", "1",
                "--resume_from_checkpoint", str(saved)))
    ok(one_process(config(work, "shard2to1"), "--gradient_accumulation_steps", "2",
                   "--resume_from_checkpoint", str(saved)))
    ok(one_process(config(work, "shard1", save_steps=2, **SHARDED),
                   "--gradient_accumulation_steps", "2"))
    assert len(json.loads((work["root"] / "shard1" / "checkpoint-2" / "sharded.json")
                          .read_text())["files"]) == 1
    ok(torchrun(config(work, "shard1to2", **SHARDED), "--gradient_accumulation_steps", "1",
                "--resume_from_checkpoint", str(work["root"] / "shard1" / "checkpoint-2")))
    for name in ("shard2to2", "shard2to1", "shard1to2"):
        assert_same_weights(weights(reference), weights(work["root"] / name), atol=1e-5)
        assert losses(work["root"] / name) == pytest.approx(losses(reference)[2:], rel=1e-6)


def test_a_damaged_shard_is_named_and_latest_falls_back(work, tmp_path):
    from strop.train.checkpoint import damage

    ok(torchrun(config(work, "shard-damaged", save_steps=1, max_steps=3, **SHARDED),
                "--gradient_accumulation_steps", "1"))
    out = work["root"] / "shard-damaged"
    newest = sorted(out.glob("checkpoint-*"))[-1]
    assert damage(newest, adapter=False) is None
    shard = newest / "sharded" / json.loads((newest / "sharded.json").read_text())["files"][1]
    shard.write_bytes(shard.read_bytes()[:100])
    assert "is damaged" in damage(newest, adapter=False)
    result = ok(one_process(config(work, "shard-damaged", **SHARDED, max_steps=4),
                            "--gradient_accumulation_steps", "2",
                            "--resume_from_checkpoint", "latest"))
    assert f"skipping {newest.name}: sharded/{shard.name} is damaged" in result.stderr
    assert "resuming from" in result.stdout and "checkpoint-1 at step 1" in result.stdout


def test_lora_sharded_checkpoint_holds_the_adapter_only(work):
    extra = {**LORA, **SHARDED, "dataset_prepared_path": str(work["root"] / "prepared-lora")}
    ok(one_process(config(work, "lora-shard-one", **LORA,
                          dataset_prepared_path=str(work["root"] / "prepared-lora")),
                   "--gradient_accumulation_steps", "2"))
    ok(torchrun(config(work, "lora-shard", save_steps=2, **extra),
                "--gradient_accumulation_steps", "1"))
    saved = work["root"] / "lora-shard" / "checkpoint-2"
    keys = set()
    for name in json.loads((saved / "sharded.json").read_text())["files"]:
        keys |= load_file(saved / "sharded" / name).keys()
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all("lora_" in k for k in model_keys)  # the frozen base is not saved
    ok(one_process(config(work, "lora-shard-to1", **LORA,
                          dataset_prepared_path=str(work["root"] / "prepared-lora")),
                   "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", str(saved)))
    one = work["root"] / "lora-shard-one"
    for name in ("lora-shard", "lora-shard-to1"):
        assert_same_weights(weights(one, True), weights(work["root"] / name, True), atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_cpu_ram_efficient_loading_trains_what_every_rank_loading_trains(work, reference, mode):
    # Rank 1 builds the model on the meta device and receives its shards (and the rotary
    # buffers) from rank 0; the run must equal one process's.
    adapter = LORA if mode == "lora" else {}
    prepared = {"dataset_prepared_path": str(work["root"] / f"prepared-{mode}")}
    fsdp = {"fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}}
    if mode == "lora":
        ok(one_process(config(work, "efficient-one", **adapter, **prepared),
                       "--gradient_accumulation_steps", "2"))
        one = work["root"] / "efficient-one"
    else:
        one = reference
    ok(torchrun(config(work, f"efficient-{mode}", **adapter, **prepared, **fsdp),
                "--gradient_accumulation_steps", "1"))
    two = work["root"] / f"efficient-{mode}"
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    assert_same_weights(weights(one, bool(adapter)), weights(two, bool(adapter)), atol=1e-5)


def _rank_pid(job: subprocess.Popen, rank: int) -> int:
    """The pid of one rank (a child of torchrun) by its RANK variable."""
    for _ in range(600):
        for child in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
        time.sleep(0.1)
    raise AssertionError("no such rank")


def _wait_for_step(out: Path, step: int) -> None:
    for _ in range(1200):
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {out}")


def test_sigterm_to_one_rank_saves_one_checkpoint_for_all(work):
    cfg = config(work, "signal", max_steps=5000, lr_scheduler="constant")
    job = torchrun(cfg, wait=False)
    _wait_for_step(work["root"] / "signal", 3)
    os.kill(_rank_pid(job, 1), signal.SIGTERM)
    out, _ = job.communicate(timeout=300)
    saved = sorted((work["root"] / "signal").glob("checkpoint-*"))
    assert len(saved) == 1, out[-3000:]
    assert "stopped by SIGTERM" in out and "--resume_from_checkpoint" in out
    step = int(saved[0].name.split("-")[1])
    assert {p.name for p in saved[0].glob("rng*.pt")} == {"rng.pt", "rng-rank1.pt"}
    ok(torchrun(cfg, "--resume_from_checkpoint", "latest", "--max_steps", str(step + 2)))
    assert json.loads((work["root"] / "signal" / "summary.json").read_text())["steps"] == step + 2


def test_strop_train_nproc_passes_sigterm_on_and_names_a_killed_rank(work):
    # --nproc runs torchrun's agent inside strop: a SIGTERM to strop reaches every rank (one
    # checkpoint, exit 143), and a rank killed outright is named in one line (exit 128 + 9)
    def strop_nproc(name: str) -> subprocess.Popen:
        cfg = config(work, name, max_steps=5000, lr_scheduler="constant")
        return subprocess.Popen([sys.executable, "-m", "strop", "train", str(cfg), "--nproc", "2"],
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    job = strop_nproc("nproc-term")
    _wait_for_step(work["root"] / "nproc-term", 3)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 143, out[-3000:]
    assert len(list((work["root"] / "nproc-term").glob("checkpoint-*"))) == 1, out[-3000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]

    job = strop_nproc("nproc-kill")
    _wait_for_step(work["root"] / "nproc-kill", 3)
    os.kill(_rank_pid(job, 1), signal.SIGKILL)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 137, out[-3000:]
    assert "error: rank 1 was ended by SIGKILL" in out and "Traceback" not in out, out[-3000:]


def test_kill_9_of_one_rank_ends_the_job_and_the_last_checkpoint_resumes(work):
    cfg = config(work, "killed", max_steps=5000, save_steps=2, lr_scheduler="constant")
    job = torchrun(cfg, wait=False)
    _wait_for_step(work["root"] / "killed", 5)
    os.kill(_rank_pid(job, 1), signal.SIGKILL)
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    ok(torchrun(cfg, "--resume_from_checkpoint", "latest", "--max_steps", "12"))
    assert json.loads((work["root"] / "killed" / "summary.json").read_text())["steps"] == 12


def test_a_config_error_is_printed_once(work, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(f"base_model: {work['model']}\ndatasets: [{{path: x.jsonl, type: alpaca}}]\n"
                   "learning_rate: 1.0e-3\nlora_rr: 4\n")
    result = torchrun(bad)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert text.count("unknown key 'lora_rr'; did you mean lora_r?") == 1, text[-3000:]


def test_an_error_rank_0_meets_is_printed_once_and_the_others_end_quietly(work, reference):
    # output_dir holds the reference's finished run: rank 0 refuses it while the other rank
    # waits for rank 0's answer; that rank must not print the connection rank 0 leaves broken
    result = torchrun(work["root"] / "one.yml")
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert text.count("holds a finished run; pass --overwrite") == 1, text[-3000:]
    assert "[rank1]" not in text and "Connection closed" not in text, text[-3000:]


def test_a_rank_that_hangs_is_named_when_the_collective_times_out(work):
    cfg = config(work, "hang", max_steps=5000, ddp_timeout=5, lr_scheduler="constant")
    job = torchrun(cfg, wait=False)
    _wait_for_step(work["root"] / "hang", 2)
    hung = _rank_pid(job, 1)
    os.kill(hung, signal.SIGSTOP)
    try:
        out, _ = job.communicate(timeout=300)
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
    assert job.returncode != 0
    assert "error: rank 0: waited ddp_timeout (5 s)" in out, out[-3000:]
    assert "rank 1 did not answer" in out


@pytest.mark.parametrize("mode, strategy", [("lora", "ddp"), ("full", "fsdp")])
def test_dpo_trains_the_same_on_two_processes(work, mode, strategy):
    """Preference rows, the pair count normalised over both ranks, the reference live (LoRA:
    the adapter off) or scored before training by both ranks, each its share (full)."""
    rows = [json.loads(line) for line in work["data"].read_text().splitlines()][:40]
    pairs = work["root"] / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["instruction"] + "\n", "chosen": r["output"],
                                         "rejected": r["output"][::-1]}) + "\n" for r in rows))
    extra = {**(LORA if mode == "lora" else {}), "rl": "dpo", "rl_beta": 0.5, "val_set_size": 4,
             "eval_steps": 2, "datasets": [{"path": str(pairs), "type": "untemplated"}],
             "dataset_prepared_path": str(work["root"] / f"prepared-dpo-{mode}")}
    ok(one_process(config(work, f"dpo-{mode}-one", **extra), "--gradient_accumulation_steps", "2"))
    sharding = {"fsdp_version": 2} if strategy == "fsdp" else {}
    ok(torchrun(config(work, f"dpo-{mode}-{strategy}", **extra, **sharding),
                "--gradient_accumulation_steps", "1"))
    one, two = (work["root"] / f"dpo-{mode}-{s}" for s in ("one", strategy))
    records = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
               for out in (one, two)]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert [r[key] for r in records[1] if r["kind"] == "train"] == pytest.approx(
            [r[key] for r in records[0] if r["kind"] == "train"], rel=1e-5, abs=1e-6), key
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_pairs"):
        assert [r[key] for r in records[1] if r["kind"] == "eval"] == pytest.approx(
            [r[key] for r in records[0] if r["kind"] == "eval"], rel=1e-5), key
    assert records[0][0]["loss"] == pytest.approx(0.693147, rel=1e-5)  # policy == reference
