"""Where a generation stops: EOS, and a chat template's end-of-turn token."""

from conftest import make_tokenizer
from strop.infer.generate import _finish, stop_ids


def test_stop_ids_add_the_turn_end_only_for_chat_template_prompts():
    tok = make_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(tok, chat_template=False) == [tok.eos_token_id]
    assert stop_ids(tok, chat_template=True) == [tok.eos_token_id, im_end]


def test_finish_cuts_at_the_first_stop_and_counts_it():
    tok = make_tokenizer()
    words = tok("river stone", add_special_tokens=False)["input_ids"]
    stop = [tok.eos_token_id]
    done = _finish(tok, "p", [*words, tok.eos_token_id, tok.pad_token_id], stop)
    assert done.stopped and done.text == "river stone" and done.new_tokens == len(words) + 1
    cut = _finish(tok, "p", words, stop)
    assert not cut.stopped and cut.new_tokens == len(words)
