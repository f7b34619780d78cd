"""Every format's input_ids and labels, token by token, on hand-written rows."""

from __future__ import annotations

import pytest
from helpers_data import IGNORE, bpe, config, encode_one, runs

from strop.data.encode import Encoder
from strop.data.formats import ALPACA_INPUT, ALPACA_NO_INPUT, RowProblem, make_format

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture
def tok():
    return bpe()


def test_alpaca_with_input_token_by_token(tok):
    cfg = config([{"path": "x.jsonl", "type": "alpaca"}])
    row = {"instruction": "Name the city.", "input": "It is in France.", "output": "Paris is."}
    prompt = (ALPACA_INPUT + "### Instruction:\nName the city.\n\n### Input:\nIt is in France."
              "\n\n### Response:\n")
    enc = encode_one(tok, cfg, row)
    expected = tok(prompt + "Paris is.")["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok(prompt)["input_ids"])  # BOS + prompt
    assert enc.input_ids == expected
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    assert enc.labels == [IGNORE] * n_prompt + expected[n_prompt:]
    assert runs(enc.input_ids, enc.labels, tok) == ["Paris is.</s>"]


def test_alpaca_without_input_uses_the_short_prompt(tok):
    cfg = config([{"path": "x.jsonl", "type": "alpaca"}])
    enc = encode_one(tok, cfg, {"instruction": "Say hi.", "output": "Hi."})
    prompt = ALPACA_NO_INPUT + "### Instruction:\nSay hi.\n\n### Response:\n"
    assert enc.input_ids == tok(prompt + "Hi.")["input_ids"] + [tok.eos_token_id]
    assert runs(enc.input_ids, enc.labels, tok) == ["Hi.</s>"]


def test_alpaca_system_prompt_and_train_on_inputs(tok):
    cfg = config([{"path": "x.jsonl", "type": "alpaca", "system_prompt": "You answer."}],
                 train_on_inputs=True)
    enc = encode_one(tok, cfg, {"instruction": "Say hi.", "output": "Hi."})
    text = "You answer.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi."
    assert enc.input_ids == tok(text)["input_ids"] + [tok.eos_token_id]
    # Everything trained except the first token (BOS), which nothing predicts.
    assert enc.labels == [IGNORE] + enc.input_ids[1:]


def test_piecewise_and_whole_string_encodings_agree(tok):
    """The cached-template fast path gives exactly the whole-string ids and labels."""
    cfg = config([{"path": "x.jsonl", "type": "alpaca"}])
    fmt = make_format(cfg.datasets[0], cfg, tok)
    rows = [{"instruction": "What is 42?", "input": "", "output": "A number."},
            {"instruction": "(quick) river", "input": "é 漢字 #1", "output": "'s north.\nYes"},
            {"instruction": "Trailing space ", "input": " lead", "output": " spaced "},
            {"instruction": "x", "input": "y\n", "output": "\nz"}]
    rendered = [fmt.render(r) for r in rows]
    encoder = Encoder(tok)
    assert encoder.piecewise_ok
    fast = encoder.encode(rendered)
    whole = [encoder._finish(r, e) for r, e in zip(rendered, encoder._encode_whole(rendered),
                                                   strict=True)]
    assert [e.input_ids for e in fast] == [e.input_ids for e in whole]
    assert [e.labels for e in fast] == [e.labels for e in whole]
    for r, e in zip(rendered, fast, strict=True):
        assert e.input_ids == tok(r.text)["input_ids"] + [tok.eos_token_id]
    # The flat (numpy) assembly of a chunk gives the same rows, EOS already in the text included.
    rendered.append(fmt.render({"instruction": "x", "output": "Done.</s>"}))
    flat = encoder.encode_rows(rendered)
    assert [r["input_ids"] for r in flat] == [e.input_ids for e in encoder.encode(rendered)]
    assert [r["labels"] for r in flat] == [e.labels for e in encoder.encode(rendered)]
    assert flat[-1]["input_ids"].count(tok.eos_token_id) == 1 and flat[-1]["labels"][-1] == tok.eos_token_id


def test_completion_trains_every_token_and_ends_with_eos(tok):
    cfg = config([{"path": "x.jsonl", "type": "completion", "field": "body"}])
    enc = encode_one(tok, cfg, {"body": "The quick river."})
    assert enc.input_ids == tok("The quick river.")["input_ids"] + [tok.eos_token_id]
    assert enc.labels == [IGNORE] + enc.input_ids[1:]


def test_input_output_segments(tok):
    cfg = config([{"path": "x.jsonl", "type": "input_output"}])
    row = {"segments": [{"text": "Q: where?\n", "label": False},
                        {"text": "A: north.", "label": True},
                        {"text": "\nQ: why?\n", "label": False},
                        {"text": "A: because.", "label": True}]}
    enc = encode_one(tok, cfg, row)
    assert enc.input_ids == tok("Q: where?\nA: north.\nQ: why?\nA: because.")["input_ids"] + \
        [tok.eos_token_id]
    assert runs(enc.input_ids, enc.labels, tok) == ["A: north.", "A: because.</s>"]


def test_input_output_untrained_last_segment_gets_no_eos(tok):
    cfg = config([{"path": "x.jsonl", "type": "input_output"}])
    enc = encode_one(tok, cfg, {"segments": [{"text": "A: yes.", "label": True},
                                             {"text": "\nfooter", "label": False}]})
    assert enc.input_ids[-1] != tok.eos_token_id
    assert runs(enc.input_ids, enc.labels, tok) == ["A: yes."]


def test_user_defined_format(tok):
    spec = {"system_prompt": "Sys.", "system_format": "<{system}>\n",
            "format": "Q: {instruction}\nCtx: {input}\nA:", "no_input_format": "Q: {instruction}\nA:"}
    cfg = config([{"path": "x.jsonl", "type": spec}])
    enc = encode_one(tok, cfg, {"instruction": "Where?", "input": "Map.", "output": " North."})
    text = "<Sys.>\nQ: Where?\nCtx: Map.\nA: North."
    assert enc.input_ids == tok(text)["input_ids"] + [tok.eos_token_id]
    assert runs(enc.input_ids, enc.labels, tok) == [" North.</s>"]
    enc = encode_one(tok, cfg, {"instruction": "Where?", "output": " North."})
    assert tok.decode(enc.input_ids[1:-1]) == "<Sys.>\nQ: Where?\nA: North."


# --------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize(("train_on_eos", "expected"), [
    ("turn", ["Paris.<|im_end|>", "Rome.<|im_end|>"]),
    ("last", ["Paris.", "Rome.<|im_end|>"]),
    ("all", ["<|im_end|>", "<|im_end|>", "Paris.<|im_end|>", "<|im_end|>", "Rome.<|im_end|>"]),
    ("none", ["Paris.", "Rome."]),
])
def test_chatml_multi_turn_with_system_each_train_on_eos(tok, train_on_eos, expected):
    cfg = config([{"path": "x.jsonl", "type": "chat_template", "chat_template": "chatml",
                   "train_on_eos": train_on_eos}])
    enc = encode_one(tok, cfg, {"messages": CONVERSATION})
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert enc.input_ids == tok(rendered)["input_ids"]  # BOS from the tokenizer, once
    assert runs(enc.input_ids, enc.labels, tok) == expected


def test_roles_to_train_user_and_assistant(tok):
    cfg = config([{"path": "x.jsonl", "type": "chat_template", "roles_to_train": ["user", "assistant"]}])
    enc = encode_one(tok, cfg, {"messages": CONVERSATION})
    assert runs(enc.input_ids, enc.labels, tok) == [
        "Capital of France?<|im_end|>", "Paris.<|im_end|>", "And Italy?<|im_end|>", "Rome.<|im_end|>"]


def test_chat_train_on_inputs_trains_everything(tok):
    cfg = config([{"path": "x.jsonl", "type": "chat_template"}], train_on_inputs=True)
    enc = encode_one(tok, cfg, {"messages": CONVERSATION})
    assert enc.labels == [IGNORE] + enc.input_ids[1:]


def test_sharegpt_conversations_with_role_mapping(tok):
    cfg = config([{"path": "x.jsonl", "type": "chat_template", "field_messages": "conversations",
                   "roles": {"assistant": ["bot"]}}])
    row = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "bot", "value": "Hello."}]}
    enc = encode_one(tok, cfg, row)
    assert runs(enc.input_ids, enc.labels, tok) == ["Hello.<|im_end|>"]
    assert "<|im_start|>user\nHi?" in tok.decode(enc.input_ids)


def test_message_property_mappings(tok):
    cfg = config([{"path": "x.jsonl", "type": "chat_template", "field_messages": "turns",
                   "message_property_mappings": {"role": "speaker", "content": "text"}}])
    row = {"turns": [{"speaker": "user", "text": "Hi?"}, {"speaker": "assistant", "text": "Yo."}]}
    assert runs(*_ids_labels(encode_one(tok, cfg, row)), tok) == ["Yo.<|im_end|>"]


def _ids_labels(enc):
    return enc.input_ids, enc.labels


def _tok_with(tok, specials):
    import copy

    other = copy.deepcopy(tok)
    other.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    return other


@pytest.mark.parametrize(("name", "specials", "expected", "marker"), [
    ("llama3", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
     ["Paris.<|eot_id|>", "Rome.<|eot_id|>"], "<|start_header_id|>system<|end_header_id|>\n\nBe brief."),
    ("mistral", [], ["Paris.</s>", "Rome.</s>"], "[INST] Be brief.\n\nCapital of France? [/INST]"),
    ("gemma", ["<start_of_turn>", "<end_of_turn>"], ["Paris.<end_of_turn>", "Rome.<end_of_turn>"],
     "<start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>"),
    ("phi3", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
     ["Paris.<|end|>", "Rome.<|end|>"], "<|user|>\nCapital of France?<|end|>"),
    ("qwen2", [], ["Paris.<|im_end|>", "Rome.<|im_end|>"], "<|im_start|>system\nBe brief."),
    ("alpaca", [], ["Paris.</s>", "Rome.</s>"], "### Instruction:\nCapital of France?"),
])
def test_named_templates(tok, name, specials, expected, marker):
    t = _tok_with(tok, specials) if specials else tok
    cfg = config([{"path": "x.jsonl", "type": "chat_template"}], chat_template=name)
    enc = encode_one(t, cfg, {"messages": CONVERSATION})
    text = t.decode(enc.input_ids)
    assert marker in text
    assert enc.input_ids.count(t.bos_token_id) == 1 and enc.input_ids[0] == t.bos_token_id
    assert runs(enc.input_ids, enc.labels, t) == expected


def test_qwen2_adds_its_default_system_prompt_untrained(tok):
    cfg = config([{"path": "x.jsonl", "type": "chat_template"}], chat_template="qwen2")
    enc = encode_one(tok, cfg, {"messages": CONVERSATION[1:3]})
    assert "You are a helpful assistant." in tok.decode(enc.input_ids)
    assert runs(enc.input_ids, enc.labels, tok) == ["Paris.<|im_end|>"]


def test_bos_in_the_template_is_not_doubled(tok):
    """llama3's template writes bos_token itself; the tokenizer would add another."""
    cfg = config([{"path": "x.jsonl", "type": "chat_template"}], chat_template="llama3")
    enc = encode_one(tok, cfg, {"messages": CONVERSATION[1:3]})
    assert enc.input_ids[:2].count(tok.bos_token_id) == 1


def test_tokenizer_without_bos_gets_none(tok):
    import copy

    bare = copy.deepcopy(tok)
    bare.backend_tokenizer.post_processor = None
    cfg = config([{"path": "x.jsonl", "type": "completion"}])
    enc = encode_one(bare, cfg, {"text": "The river."})
    assert tok.bos_token_id not in enc.input_ids
    assert enc.input_ids == bare("The river.")["input_ids"] + [tok.eos_token_id]
    assert enc.labels[0] == IGNORE and enc.labels[1:] == enc.input_ids[1:]


def test_trim_in_the_template_still_finds_the_content(tok):
    cfg = config([{"path": "x.jsonl", "type": "chat_template"}], chat_template="llama3")
    msgs = [{"role": "user", "content": "  Hi?  "}, {"role": "assistant", "content": " Paris. "}]
    enc = encode_one(tok, cfg, {"messages": msgs})
    assert runs(enc.input_ids, enc.labels, tok)[0].startswith("Paris.")


@pytest.mark.parametrize(("row", "field", "problem"), [
    ({"messages": []}, "messages", "empty conversation"),
    ({"messages": "hi"}, "messages", "expected a list of messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "unknown role 'wizard'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing field"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "expected text, got int"),
    ({"text": "x"}, "messages", "missing field"),
])
def test_chat_row_problems(tok, row, field, problem):
    cfg = config([{"path": "x.jsonl", "type": "chat_template"}])
    fmt = make_format(cfg.datasets[0], cfg, tok)
    with pytest.raises(RowProblem) as err:
        fmt.render(row)
    assert err.value.field == field and problem in err.value.problem


@pytest.mark.parametrize(("row", "field", "problem"), [
    ({"input": "x", "output": "y"}, "instruction", "missing field (the row has: input, output)"),
    ({"instruction": "x", "output": 5}, "output", "expected text, got int 5"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "input", "expected text, got list"),
])
def test_alpaca_row_problems(tok, row, field, problem):
    cfg = config([{"path": "x.jsonl", "type": "alpaca"}])
    with pytest.raises(RowProblem) as err:
        make_format(cfg.datasets[0], cfg, tok).render(row)
    assert err.value.field == field and problem in err.value.problem


def test_wordpiece_completion_is_cls_text_sep():
    from conftest import make_tokenizer

    bert = make_tokenizer("wordpiece")
    cfg = config([{"path": "x.jsonl", "type": "completion"}], objective="masked_lm")
    enc = encode_one(bert, cfg, {"text": "quick river"})
    assert enc.input_ids == bert("quick river")["input_ids"]  # [CLS] ... [SEP], never doubled
    assert enc.input_ids[0] == bert.cls_token_id and enc.input_ids[-1] == bert.sep_token_id
