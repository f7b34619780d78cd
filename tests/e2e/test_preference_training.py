"""Preference training end to end on the real model (SmolLM2-135M-Instruct): every objective
through `strop train`, a few steps each, with the checks a user would make: the first step's
loss is the objective's value at the reference, the rewards move the right way, the eval split
reports reward accuracy, and the adapter is saved in PEFT's format."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "What colour is the sky on a clear day?", "What is 7 times 6?",
             "Which planet is closest to the sun?", "What do bees make?",
             "What is the boiling point of water at sea level in Celsius?",
             "How many days are in a week?", "What gas do plants take in?",
             "What is the largest ocean?"]
GOOD = ["Paris.", "Eight.", "Blue.", "42.", "Mercury.", "Honey.", "100 degrees.", "Seven.",
        "Carbon dioxide.", "The Pacific."]
BAD = "I would rather not say."
# A short system prompt: SmolLM2's template would otherwise add its 30-token default to each.
SYSTEM = {"role": "system", "content": "Be brief."}
PAIRS = 3  # two to train on (both in every step: one micro-batch an epoch), one to evaluate


def _write_pairs(path):
    rows = [{"prompt": [SYSTEM, {"role": "user", "content": q}], "chosen": g, "rejected": BAD}
            for q, g in zip(QUESTIONS[:PAIRS], GOOD, strict=False)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_kto(path):
    rows = []
    for i, (q, g) in enumerate(zip(QUESTIONS[:PAIRS], GOOD, strict=False)):
        good = i % 2 == 0
        rows.append({"prompt": [SYSTEM, {"role": "user", "content": q}],
                     "completion": [{"role": "assistant", "content": g if good else BAD}],
                     "label": good})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# (objective, extra config, loss at the reference)
RUNS = {
    "dpo": ({}, math.log(2)),
    "ipo-precomputed": ({"rl": "ipo", "precompute_ref_log_probs": True}, (1 / (2 * 0.1)) ** 2),
    "orpo": ({"rl": "orpo", "orpo_alpha": 0.2}, None),
    "simpo-packed": ({"rl": "simpo", "sample_packing": True, "rl_beta": 2.0}, None),
    "kto": ({"rl": "kto"}, 0.5),
    "dpo-full": ({"adapter": None, "learning_rate": 2e-5}, math.log(2)),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_each_objective_trains_the_real_model(name, smollm2_gguf, tmp_path, cli):
    extra, at_reference = RUNS[name]
    kto = extra.get("rl") == "kto"
    data = (_write_kto if kto else _write_pairs)(tmp_path / "prefs.jsonl")
    cfg = {"base_model": str(smollm2_gguf), "rl": "dpo",
           "datasets": [{"path": str(data), "type": "chat_template"}],
           "chat_template": "tokenizer_default", "output_dir": str(tmp_path / "run"),
           "dataset_prepared_path": str(tmp_path / "prepared"),
           "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
           "sequence_len": 64, "micro_batch_size": 2, "max_steps": 2, "val_set_size": 1,
           "learning_rate": 2e-3, "warmup_steps": 0, "lr_scheduler": "constant",
           "logging_steps": 1, "seed": 0}
    cfg.update(extra)
    if cfg["adapter"] is None:  # full fine-tuning: the reference scored once before training
        cfg = {k: v for k, v in cfg.items() if not k.startswith("lora_") and k != "adapter"}
    path = tmp_path / "config.yml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    result = cli("train", path)
    assert result.code == 0, result.err + result.out
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2]
    if at_reference is not None:  # the policy starts at the reference
        assert train[0]["loss"] == pytest.approx(at_reference, rel=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert all(math.isfinite(r[key]) for r in train), key
    if not kto:
        # both steps see the same pairs: one step on them already rewards the good answers more
        # over the refusal
        assert train[1]["rewards/margins"] > train[0]["rewards/margins"]
        assert 0.0 <= evals[-1]["eval_rewards/accuracies"] <= 1.0
        assert evals[-1]["eval_pairs"] == 1
    assert train[1]["loss"] < train[0]["loss"]
    saved = "adapter_model.safetensors" if cfg.get("adapter") else "model.safetensors"
    assert (run / saved).exists()
