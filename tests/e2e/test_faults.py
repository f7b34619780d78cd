"""Fault injection: what a careless user or an attacker does to a run, and what strop says.
Each case checks that nothing the user wrote or trained is lost or overwritten."""

from __future__ import annotations

import json
import pickle
import time

import pytest
import torch

from conftest import write_alpaca
from e2e.test_train import sft, strop_process, write_config
from strop.train.run_lock import LOCK_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    return write_alpaca(tmp_path_factory.mktemp("faults") / "alpaca.jsonl", 120, seed=7)


def one_line(text: str) -> bool:
    """stderr holds exactly one error line (progress bars of loading may come before it)."""
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    return len(errors) == 1 and "Traceback" not in text


def test_a_second_run_into_a_busy_output_dir_is_refused(tiny_model_dir, alpaca, tmp_path, cli):
    out = tmp_path / "run"
    first_cfg = write_config(tmp_path / "first.yml", sft(
        tiny_model_dir("llama"), alpaca, out, max_steps=400, save_steps=1))
    first = strop_process("train", first_cfg)
    deadline = time.time() + 120
    while not (out / "checkpoint-1").exists():
        assert first.poll() is None and time.time() < deadline, "the first run did not start"
        time.sleep(0.05)
    try:
        second = cli("train", write_config(tmp_path / "second.yml", sft(
            tiny_model_dir("llama"), alpaca, out, max_steps=2)), "--overwrite")
        assert second.code == 2 and one_line(second.err), second.err
        assert "in use by another strop train" in second.err
        assert f"pid {first.pid}" in second.err
        assert first.poll() is None  # untouched, still training
    finally:
        first.kill()
        first.wait()
    assert (out / "checkpoint-1").is_dir()


def test_a_lock_left_by_a_dead_run_does_not_block(tiny_model_dir, alpaca, tmp_path, cli):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "-"}))
    result = cli("train", write_config(tmp_path / "c.yml", sft(
        tiny_model_dir("llama"), alpaca, out, max_steps=1)))
    assert result.code == 0, result.err
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_an_output_dir_that_cannot_be_one_is_one_line(kind, tiny_model_dir, alpaca, tmp_path,
                                                      cli):
    blocker = tmp_path / "blocker"
    blocker.write_text("a user's file")
    out = blocker if kind == "file" else blocker / "run"
    result = cli("train", write_config(tmp_path / "c.yml", sft(
        tiny_model_dir("llama"), alpaca, out, max_steps=1)))
    assert result.code == 2 and one_line(result.err), result.err
    assert blocker.read_text() == "a user's file"


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resuming_from_a_planted_rng_file_runs_nothing(tiny_model_dir, alpaca, tmp_path, cli):
    out = tmp_path / "run"
    cfg = sft(tiny_model_dir("llama"), alpaca, out, max_steps=2, save_steps=1)
    assert cli("train", write_config(tmp_path / "a.yml", cfg)).code == 0
    marker = tmp_path / "pwned"
    for name in ("rng.pt", "optimizer.pt"):
        planted = out / "checkpoint-1" / name
        original = planted.read_bytes()
        torch.save({"state": _Planted(marker)}, planted)
        result = cli("train", write_config(tmp_path / "b.yml", {**cfg, "max_steps": 3}),
                     "--resume_from_checkpoint", "latest")
        assert result.code == 2 and one_line(result.err), result.err
        assert "never runs code" in result.err and not marker.exists()
        planted.write_bytes(original)
    with (out / "checkpoint-1" / "rng.pt").open("wb") as f:
        pickle.dump(_Planted(marker), f)  # a plain pickle, not torch's zip format
    result = cli("train", write_config(tmp_path / "c.yml", {**cfg, "max_steps": 3}),
                 "--resume_from_checkpoint", "latest")
    assert result.code == 2 and not marker.exists(), result.err


@pytest.mark.parametrize("length, message", [
    (4096, "sequence_len: 4096 is longer than the 512 positions"),
    (10**9, "sequence_len"),
])
def test_a_sequence_len_past_the_models_context_is_caught_before_loading(
        length, message, tiny_model_dir, alpaca, tmp_path, cli):
    cfg = write_config(tmp_path / "c.yml", sft(tiny_model_dir("llama"), alpaca, tmp_path / "run",
                                              sequence_len=length, sample_packing=True))
    for verb in ("validate", "train"):
        result = cli(verb, cfg)
        assert result.code == 2 and one_line(result.err) and message in result.err, result.err
    assert not (tmp_path / "run").exists()  # refused before output_dir was made


# ------------------------------------------------------------------------ damaged checkpoints


def _truncate(path):
    path.write_bytes(path.read_bytes()[: max(8, path.stat().st_size // 3)])


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / "adapter_model.safetensors"),
    "missing optimizer": lambda c: (c / "optimizer.pt").unlink(),
    "corrupt scheduler": lambda c: (c / "scheduler.pt").write_bytes(b"not a zip"),
    "truncated rng": lambda c: _truncate(c / "rng.pt"),
    "malformed state": lambda c: (c / "trainer_state.json").write_text('{"step": '),
}


@pytest.fixture(scope="module")
def lora_checkpoints(tiny_model_dir, alpaca, tmp_path_factory):
    """A LoRA run stopped with checkpoints at steps 1, 2 and 3 (kept as a pristine copy)."""
    from strop.config import load_dict
    from strop.train.loop import train

    root = tmp_path_factory.mktemp("damaged")
    cfg = sft(tiny_model_dir("llama"), alpaca, root / "run", max_steps=4, save_steps=1,
              adapter="lora", lora_target_linear=True, lora_r=4)
    train(load_dict(cfg))
    (root / "run" / "summary.json").unlink()  # as if stopped after step 3's checkpoint
    return root / "run", cfg


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_latest_skips_a_damaged_checkpoint_and_says_why(kind, lora_checkpoints, tmp_path, cli):
    import shutil

    pristine, cfg = lora_checkpoints
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    newest = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    DAMAGE[kind](newest)
    cfg = write_config(tmp_path / "c.yml", {**cfg, "output_dir": str(run)})
    result = cli("train", cfg, "--resume_from_checkpoint", str(newest))
    assert result.code == 2 and one_line(result.err) and "cannot be resumed" in result.err

    result = cli("train", cfg, "--resume_from_checkpoint", "latest")
    assert result.code == 0, result.err
    assert f"skipping {newest.name}:" in result.err and "Traceback" not in result.err
    previous = f"checkpoint-{int(newest.name.split('-')[1]) - 1}"
    assert f"resuming from {run / previous}" in result.out


def test_an_adapter_of_another_rank_is_one_line(lora_checkpoints, tmp_path, cli):
    import shutil

    pristine, cfg = lora_checkpoints
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    cfg = write_config(tmp_path / "c.yml", {**cfg, "output_dir": str(run), "lora_r": 8})
    result = cli("train", cfg, "--resume_from_checkpoint", "latest")
    assert result.code == 2 and one_line(result.err) and "does not fit" in result.err, result.err


# ------------------------------------------------------------------------ a full disk


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_cleans_up(
        tiny_model_dir, alpaca, tmp_path, cli, monkeypatch):
    """ENOSPC simulated on the third save's optimizer file (no tmpfs can be mounted here)."""
    import errno

    import strop.train.checkpoint as ckpt

    real_save = torch.save
    saves = {"n": 0}

    def save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            saves["n"] += 1
            if saves["n"] == 3:
                real_save(obj, path, *args, **kwargs)  # a partial file on disk, then the error
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yml", sft(tiny_model_dir("llama"), alpaca, out,
                                              max_steps=6, save_steps=1))
    result = cli("train", cfg)
    assert result.code == 2 and one_line(result.err), result.err
    assert "the disk is full" in result.err and "MiB are free" in result.err
    assert "resume from checkpoint-2" in result.err
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    resumed = cli("train", cfg, "--resume_from_checkpoint", "latest")
    assert resumed.code == 0 and f"resuming from {out / 'checkpoint-2'}" in resumed.out


# ------------------------------------------------------------------------ odd inputs


def test_a_file_that_is_no_model_as_base_model_says_what_is_accepted(alpaca, tmp_path, cli):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not a model\n")
    result = cli("train", write_config(tmp_path / "c.yml", sft(notes, alpaca, tmp_path / "run")))
    assert result.code == 2 and one_line(result.err), result.err
    assert "a model directory" in result.err and ".gguf" in result.err and "hub id" in result.err
    assert notes.read_text() == "my notes, not a model\n"


def test_gradient_accumulation_past_an_epoch_is_reported(tiny_model_dir, alpaca, tmp_path, cli):
    result = cli("train", write_config(tmp_path / "c.yml", sft(
        tiny_model_dir("llama"), alpaca, tmp_path / "run", max_steps=1,
        gradient_accumulation_steps=10_000)))
    assert result.code == 0, result.err
    assert "gradient_accumulation_steps 10000 is more than the" in result.err


def test_a_second_ctrl_c_while_stopping_prints_no_traceback(tiny_model_dir, alpaca, tmp_path):
    import signal

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yml", sft(tiny_model_dir("llama"), alpaca, out,
                                              max_steps=400, save_steps=1))
    proc = strop_process("train", cfg)
    deadline = time.time() + 120
    while not (out / "checkpoint-1").exists():
        assert proc.poll() is None and time.time() < deadline, "the run did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    for _ in range(3):  # impatient presses while it saves and exits
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
    output = proc.communicate(timeout=120)[0]
    assert "Traceback" not in output, output
    assert proc.returncode in (0, 130), output
    assert (out / "checkpoint-1").is_dir()


def test_kill_9_at_random_moments_always_leaves_a_resumable_checkpoint(tiny_model_dir, alpaca,
                                                                       tmp_path):
    """Saves every step, killed at random points (often mid-save); each restart resumes."""
    import random

    from strop.train import checkpoint as ckpt

    out = tmp_path / "run"
    base = sft(tiny_model_dir("llama"), alpaca, out, max_steps=16, save_steps=1,
               adapter="lora", lora_target_linear=True)
    first = write_config(tmp_path / "first.yml", base)
    again = write_config(tmp_path / "again.yml", {**base, "resume_from_checkpoint": "latest"})
    rng = random.Random(1234)
    for attempt in range(3):
        proc = strop_process("train", again if ckpt.checkpoints(out) else first)
        deadline = time.time() + 120
        seen = len(ckpt.checkpoints(out))
        while len(ckpt.checkpoints(out)) <= seen and proc.poll() is None:
            assert time.time() < deadline, f"attempt {attempt}: no new checkpoint"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.wait()
        found = ckpt.checkpoints(out)
        assert found and ckpt.damage(found[-1], adapter=True) is None, attempt
    proc = strop_process("train", again)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "resuming from" in output, output
    assert (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------ real small filesystems


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of a given size (and read-only if asked); skipped where mounting is not allowed."""
    import subprocess

    mounted = []

    def make(size: str, read_only: bool = False):
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(point)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield make
    for point in mounted:
        # A file still open under the mount (a writer thread not yet joined) makes a plain
        # umount fail with EBUSY; a lazy one detaches it now, so no mount outlives the test.
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_really_full_disk_keeps_the_last_checkpoint(small_fs, tiny_model_dir, alpaca, tmp_path,
                                                      cli):
    out = small_fs("6m") / "run"
    cfg = write_config(tmp_path / "c.yml", sft(tiny_model_dir("llama"), alpaca, out,
                                              max_steps=20, save_steps=1))
    result = cli("train", cfg)
    assert result.code == 2 and one_line(result.err), result.err
    assert "the disk is full" in result.err
    found = sorted(p.name for p in out.glob("*checkpoint-*"))
    assert found and all(not name.startswith(".tmp") for name in found), found
    from strop.train import checkpoint as ckpt

    assert ckpt.damage(out / found[-1], adapter=False) is None


def test_a_read_only_output_dir_is_one_line(small_fs, tiny_model_dir, alpaca, tmp_path, cli):
    out = small_fs("1m", read_only=True) / "run"
    result = cli("train", write_config(tmp_path / "c.yml", sft(tiny_model_dir("llama"), alpaca,
                                                              out)))
    assert result.code == 2 and one_line(result.err), result.err
    assert "read-only" in result.err
