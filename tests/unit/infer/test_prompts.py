"""Prompts for generation are the training text up to where the response starts."""

import json

import pytest

from conftest import make_tokenizer
from strop.config import load_dict
from strop.data.formats import make_format
from strop.errors import StropError
from strop.infer.prompts import Prompter, read_prompt_file


def _cfg(ds: dict, **extra):
    return load_dict({"base_model": "/nonexistent-not-loaded", "datasets": [ds],
                      "output_dir": "/tmp/x", "learning_rate": 1e-4, "micro_batch_size": 1,
                      "sequence_len": 128, "num_epochs": 1, **extra}).cfg


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


ROW = {"instruction": "Name a river", "input": "in France", "output": "The Seine"}


@pytest.mark.parametrize("ds, row", [
    ({"path": "d.jsonl", "type": "alpaca"}, ROW),
    ({"path": "d.jsonl", "type": "alpaca"}, {"instruction": "Hi", "output": "Hello"}),
    ({"path": "d.jsonl", "type": {"field_instruction": "q", "field_output": "a",
                                 "format": "Q: {instruction}\nA: ",
                                 "no_input_format": "Q: {instruction}\nA: "}},
     {"q": "Two plus two?", "a": "Four"}),
    ({"path": "d.jsonl", "type": "input_output"},
     {"segments": [{"text": "Q: sky?\n", "label": False}, {"text": "A: blue", "label": True}]}),
    ({"path": "d.jsonl", "type": "chat_template"},
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
])
def test_prompt_plus_response_is_the_training_text(ds, row, tok):
    cfg = _cfg(ds)
    fmt = make_format(cfg.datasets[0], cfg, tok)
    prompt, response = fmt.render_prompt(row), fmt.response(row)
    text = fmt.render(row).text
    assert text.startswith(prompt) and response
    assert text[len(prompt):].startswith(response)
    assert text[len(prompt):] in (response, response + "<|im_end|>\n")


def test_alpaca_prompt_without_output_and_its_response(tok):
    cfg = _cfg({"path": "d.jsonl", "type": "alpaca"})
    p = Prompter(cfg, tok).row({"instruction": "Name a river"})
    assert p.text.endswith("### Instruction:\nName a river\n\n### Response:\n")
    assert p.reference is None and p.special_tokens
    assert Prompter(cfg, tok).row(ROW).reference == "The Seine"


def test_a_prompt_field_is_taken_as_is_and_plain_models_need_one(tok):
    assert Prompter(None, tok).row({"prompt": "Once", "response": "upon"}).reference == "upon"
    with pytest.raises(StropError, match="prompt"):
        Prompter(None, tok).row({"instruction": "x"})


def test_chat_uses_the_trained_format_or_the_chat_template(tok):
    alpaca = Prompter(_cfg({"path": "d.jsonl", "type": "alpaca"}), tok)
    assert alpaca.chat_style == "format"
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
               {"role": "user", "content": "and?"}]
    text = alpaca.chat(history).text
    assert text.count("### Response:\n") == 2 and "yo</s>" in text and text.endswith("and?\n\n### Response:\n")
    chat = Prompter(_cfg({"path": "d.jsonl", "type": "chat_template"}), tok)
    assert chat.chat_style == "template"
    prompt = chat.chat(history[:1], system="be brief")
    assert prompt.text.endswith("<|im_start|>assistant\n") and "be brief" in prompt.text
    assert not prompt.special_tokens


def test_read_prompt_file(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompt_file(tmp_path / "p.txt") == [{"prompt": "one"}, {"prompt": "two"}]
    (tmp_path / "p.jsonl").write_text(json.dumps(ROW) + "\n")
    assert read_prompt_file(tmp_path / "p.jsonl") == [ROW]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(StropError, match="bad.jsonl:1"):
        read_prompt_file(tmp_path / "bad.jsonl")
    with pytest.raises(StropError, match="no such"):
        read_prompt_file(tmp_path / "missing.txt")


def test_a_trailing_space_training_merged_into_the_answer_is_left_for_the_model(tok):
    """Format "A: " trained "A:" + " Four" (one token); the prompt must end at "A:"."""
    from strop.infer.prompts import token_boundary

    cfg = _cfg({"path": "d.jsonl", "type": {"field_instruction": "q", "field_output": "a",
                                           "format": "Q: {instruction} A: ",
                                           "no_input_format": "Q: {instruction} A: "}})
    row = {"q": "Two plus two?", "a": "Four"}
    prompt = Prompter(cfg, tok).row(row).text
    assert prompt == "Q: Two plus two? A:"
    training = tok(make_format(cfg.datasets[0], cfg, tok).render(row).text,
                   add_special_tokens=False)["input_ids"]
    assert training[:len(tok(prompt, add_special_tokens=False)["input_ids"])] == \
        tok(prompt, add_special_tokens=False)["input_ids"]
    # A newline is its own token: nothing to take back.
    assert token_boundary("Q: x\nA:\n", tok) == "Q: x\nA:\n"
    assert token_boundary("Q: x A:", tok) == "Q: x A:"
