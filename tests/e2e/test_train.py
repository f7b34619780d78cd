"""`strop train` end to end on tiny models: every mode, exact numerics, and runs that go wrong.

Pretraining from scratch, full SFT, LoRA and QLoRA run a few steps through the CLI and write the
expected files; gradient accumulation does not change the result; a run killed at a random step
and resumed ends bitwise equal to an uninterrupted one; SIGTERM saves a checkpoint; non-finite
losses, the loss watchdog, early stopping and overwrite protection behave as documented.
"""

from __future__ import annotations

import json
import os
import random
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
from strop.config import load_dict
from strop.train.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("data") / "alpaca.jsonl", 240, seed=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(tiny_corpus(600, seed=4)) + "\n")
    return path


def sft(model_dir: Path, data: Path, out: Path, **extra) -> dict:
    return {"base_model": str(model_dir), "datasets": [{"path": str(data), "type": "alpaca"}],
            "learning_rate": 1e-3, "micro_batch_size": 4, "max_steps": 4, "sequence_len": 128,
            "output_dir": str(out), "logging_steps": 1, **extra}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def metrics(out: Path, kind: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def strop_process(*args: str | Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "strop", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


# ------------------------------------------------------------------------------------- the modes


def test_pretraining_from_scratch_loss_falls(corpus, tmp_path, cli):
    out = tmp_path / "pretrain"
    cfg = write_config(tmp_path / "pretrain.yml", {
        "model_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "max_position_embeddings": 128},
        "pretrain_tokenizer": {"vocab_size": 300},
        "datasets": [{"path": str(corpus), "type": "completion"}],
        "sequence_len": 64, "micro_batch_size": 8, "max_steps": 40, "learning_rate": 3e-3,
        "warmup_steps": 4, "output_dir": str(out), "logging_steps": 1, "val_set_size": 0.05,
        "eval_steps": 20})
    result = cli("train", cfg)
    assert result.code == 0, result.err + result.out
    losses = [r["loss"] for r in metrics(out)]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3  # it learned the corpus
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "strop-config.yml", "summary.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["trained_tokens"] > 0
    assert summary["final_eval"]["eval_loss"] < losses[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)  # a standard HF model directory
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tok)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_fine_tuning_modes_write_the_expected_files(mode, tiny_model_dir, alpaca, tmp_path, cli):
    out = tmp_path / mode
    extra = {"full": {}, "lora": {"adapter": "lora", "lora_target_linear": True},
             "qlora": {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True}}
    cfg = write_config(tmp_path / f"{mode}.yml", sft(tiny_model_dir("llama"), alpaca, out,
                                                     val_set_size=0.1, eval_steps=2,
                                                     **extra[mode]))
    result = cli("train", cfg)
    assert result.code == 0, result.err + result.out
    expected = ["model.safetensors", "config.json"] if mode == "full" else \
        ["adapter_model.safetensors", "adapter_config.json"]
    for name in [*expected, "tokenizer.json", "strop-config.yml", "summary.json"]:
        assert (out / name).exists(), name
    assert len(metrics(out)) == 4 and len(metrics(out, "eval")) == 2
    if mode != "full":
        assert not (out / "model.safetensors").exists()  # only the adapter is saved
    # The saved config is the resolved one and loads back.
    from strop.config import load_config

    assert load_config(out / "strop-config.yml").cfg.adapter == (None if mode == "full" else mode)
    if mode != "full":
        # The loop counts parameters as the adapter report does: a 4-bit base by its logical
        # shapes, not its packed bytes.
        import re

        summary = json.loads((out / "summary.json").read_text())
        reported = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", result.out)
        assert reported, result.out
        assert (summary["trainable_params"], summary["total_params"]) == \
            tuple(int(n.replace(",", "")) for n in reported.groups())
        assert f"training {summary['trainable_params']:,} of {summary['total_params']:,}" \
            in result.out


def test_masked_lm_from_scratch_trains(corpus, tmp_path):
    out = tmp_path / "mlm"
    summary = train(load_dict({
        "objective": "masked_lm", "pretrain_tokenizer": {"type": "wordpiece", "vocab_size": 300},
        "model_config": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "intermediate_size": 128,
                         "max_position_embeddings": 128},
        "datasets": [{"path": str(corpus), "type": "completion"}], "sequence_len": 64,
        "micro_batch_size": 8, "max_steps": 30, "learning_rate": 2e-3, "output_dir": str(out),
        "logging_steps": 1}))
    losses = [r["loss"] for r in metrics(out)]
    assert summary["outcome"] == "completed"
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3


# ------------------------------------------------------------------------------------- numerics


def test_gradient_accumulation_split_does_not_change_the_result(tiny_model_dir, alpaca, tmp_path):
    """4 rows as 4x1, 2x2 and 1x4 (micro-batch x accumulation): same loss, same weights."""
    results = []
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"m{micro}a{accum}"
        train(load_dict(sft(tiny_model_dir("llama"), alpaca, out, micro_batch_size=micro,
                            gradient_accumulation_steps=accum, max_steps=2, bf16=False,
                            optimizer="sgd", learning_rate=0.5, shuffle_merged_datasets=False)))
        results.append((metrics(out)[-1]["loss"], load_file(out / "model.safetensors")))
    (loss0, weights0), *others = results
    for loss, weights in others:
        assert loss == pytest.approx(loss0, rel=1e-5)
        for key, value in weights0.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)


def test_compiled_training_matches_eager_and_keeps_its_cache(tiny_model_dir, alpaca, tmp_path,
                                                            monkeypatch):
    """`compile: true` trains the same steps as eager on batches of changing lengths, with two
    graphs (the first length's static one, then a dynamic one), not one per length, and leaves
    them in the persistent cache for the next run."""
    from torch._dynamo.utils import counters

    cache = tmp_path / "compile-cache"
    monkeypatch.setenv("STROP_COMPILE_CACHE", str(cache))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                 "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)  # restored (unset) after the test
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled-{compiled}"
        counters.clear()
        train(load_dict(sft(tiny_model_dir("llama"), alpaca, out, max_steps=4, bf16=False,
                            micro_batch_size=2, sequence_len=256, compile=compiled,
                            shuffle_merged_datasets=False)))
        losses[compiled] = [r["loss"] for r in metrics(out)]
    assert counters["stats"]["unique_graphs"] == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert any(cache.rglob("*")), "the compile cache stayed empty"


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_killed_and_resumed_run_ends_bitwise_equal(mode, tiny_model_dir, alpaca, tmp_path):
    """kill -9 at a random step; resuming from the last checkpoint gives the same weights."""
    extra = {"full": {"bf16": False},
             "lora": {"adapter": "lora", "lora_target_linear": True, "lora_dropout": 0.2}}[mode]
    base = sft(tiny_model_dir("llama"), alpaca, tmp_path / "x", max_steps=8, save_steps=1,
               gradient_accumulation_steps=2, warmup_steps=2, **extra)
    reference = tmp_path / "reference"
    ref_cfg = write_config(tmp_path / "ref.yml", {**base, "output_dir": str(reference)})
    assert strop_process("train", ref_cfg).wait() == 0

    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yml", {**base, "output_dir": str(killed)})
    proc = strop_process("train", cfg)
    kill_after = random.Random(os.getpid()).randint(2, 6)
    deadline = time.time() + 240
    while not (killed / f"checkpoint-{kill_after}").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    resumed = strop_process("train", cfg, "--resume_from_checkpoint", "latest")
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert "resuming from" in output

    name = "model.safetensors" if mode == "full" else "adapter_model.safetensors"
    want, got = load_file(reference / name), load_file(killed / name)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # The resumed run logged the same losses for the steps it ran.
    ref_losses = {r["step"]: r["loss"] for r in metrics(reference)}
    assert all(ref_losses[r["step"]] == r["loss"] for r in metrics(killed))


# -------------------------------------------------------------------------- runs that go wrong


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, alpaca, tmp_path):
    out = tmp_path / "preempted"
    cfg = write_config(tmp_path / "long.yml", sft(tiny_model_dir("llama"), alpaca, out,
                                                  max_steps=100000))
    proc = strop_process("train", cfg)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or not metrics(out):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    linux = sys.platform == "linux"
    # `strop train` started itself again under mimalloc (strop/runtime.py) with the same
    # process id, which is what the signal goes to.
    assert not linux or "libmimalloc" in Path(f"/proc/{proc.pid}/maps").read_text()
    assert not linux or b"ONEDNN_PRIMITIVE_CACHE_CAPACITY=256" in \
        Path(f"/proc/{proc.pid}/environ").read_bytes()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    assert not linux or "mimalloc" in output  # and says so
    assert "--resume_from_checkpoint" in output
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").exists()
    assert not (out / "summary.json").exists()  # the run is not finished
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    # Resuming continues from there.
    resumed = strop_process("train", cfg, "--resume_from_checkpoint", "latest", "--max_steps",
                            str(state["step"] + 1))
    assert resumed.wait() == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == state["step"] + 1


def test_non_finite_losses_stop_the_run_with_the_last_good_weights(tiny_model_dir, alpaca,
                                                                   tmp_path, cli):
    out = tmp_path / "diverged"
    cfg = write_config(tmp_path / "bad.yml", sft(tiny_model_dir("llama"), alpaca, out,
                                                 max_steps=30, optimizer="sgd",
                                                 learning_rate=1e30, max_grad_norm=0,
                                                 max_bad_steps=3, bf16=False))
    result = cli("train", cfg)
    assert result.code == 1
    assert "non-finite" in result.out and "learning rate" in result.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "non_finite" and summary["skipped_steps"] == 3
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_loss_watchdog_stops_the_run(tiny_model_dir, alpaca, tmp_path):
    out = tmp_path / "watched"
    summary = train(load_dict(sft(tiny_model_dir("llama"), alpaca, out, max_steps=20,
                                  loss_watchdog_threshold=0.1, loss_watchdog_patience=2)))
    assert summary["outcome"] == "loss_watchdog" and summary["steps"] == 2


def test_early_stopping_when_eval_loss_stops_improving(tiny_model_dir, alpaca, tmp_path):
    out = tmp_path / "early"
    # A learning rate far below fp32's resolution leaves the weights, and the eval loss, as is.
    summary = train(load_dict(sft(tiny_model_dir("llama"), alpaca, out, max_steps=50,
                                  optimizer="sgd", learning_rate=1e-30, val_set_size=0.1,
                                  eval_steps=2, early_stopping_patience=2)))
    assert summary["outcome"] == "early_stopping"
    assert summary["steps"] == 6  # evals at 2 (best), 4 and 6 (no better)
    evals = metrics(out, "eval")
    assert len(evals) == 3 and len({e["eval_loss"] for e in evals}) == 1  # dropout off in eval


def test_a_finished_run_is_not_overwritten_without_overwrite(tiny_model_dir, alpaca, tmp_path,
                                                             cli):
    out = tmp_path / "done"
    cfg = write_config(tmp_path / "c.yml", sft(tiny_model_dir("llama"), alpaca, out,
                                               max_steps=2))
    assert cli("train", cfg).code == 0
    before = (out / "model.safetensors").read_bytes()
    again = cli("train", cfg)
    assert again.code == 2 and "holds a finished run" in again.err and "--overwrite" in again.err
    assert (out / "model.safetensors").read_bytes() == before
    assert cli("train", cfg, "--overwrite", "--learning_rate", "0.01").code == 0
    assert (out / "model.safetensors").read_bytes() != before


def test_an_unfinished_run_asks_to_resume_or_overwrite(tiny_model_dir, alpaca, tmp_path, cli):
    out = tmp_path / "half"
    cfg = write_config(tmp_path / "c.yml", sft(tiny_model_dir("llama"), alpaca, out,
                                               max_steps=2, save_steps=1))
    assert cli("train", cfg).code == 0
    (out / "summary.json").unlink()  # as if it had been killed after its checkpoints
    result = cli("train", cfg)
    assert result.code == 2 and "resume_from_checkpoint latest" in result.err


def test_a_missing_optional_logger_is_named_before_any_weight_loads(tiny_model_dir, alpaca,
                                                                    tmp_path, cli):
    from importlib.util import find_spec

    if find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    out = tmp_path / "tb"
    cfg = write_config(tmp_path / "tb.yml", sft(tiny_model_dir("llama"), alpaca, out,
                                                use_tensorboard=True))
    result = cli("train", cfg)
    assert result.code != 0 and "use_tensorboard: true needs the tensorboard package" in result.err
    assert not out.exists()  # nothing written, nothing loaded

