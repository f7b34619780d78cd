"""Named chat templates and how a dataset entry picks one.

Each template is Jinja text in the form Hugging Face tokenizers carry (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`), rendered with the tokenizer's own
`apply_chat_template`. They put every message's content into the text unchanged (llama3 trims
it, as Meta's does), which is what lets strop find each message in the rendered text.
"""

from __future__ import annotations

from pathlib import Path

from strop.config.datasets import DatasetConfig
from strop.errors import StropError

# <|im_start|>role\ncontent<|im_end|>\n  (OpenAI's ChatML, used by Qwen, Hermes, ...)
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# ChatML with Qwen2's default system prompt when the conversation has none.
QWEN2 = ("{% if messages and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}" + CHATML)

LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
          "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")

# [INST] user [/INST] answer</s>; a system prompt opens the first [INST] block.
MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if message['role'] == 'system' %}{{ '[INST] ' + message['content'] + '\n\n' }}"
           "{% elif message['role'] == 'user' %}"
           "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
           "{{ message['content'] + ' [/INST]' }}"
           "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
           "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
           "{% endif %}{% endfor %}")

# Gemma has no system role: the system prompt opens the first user turn.
GEMMA = ("{{ bos_token }}{% for message in messages %}"
         "{% if message['role'] == 'system' %}"
         "{{ '<start_of_turn>user\n' + message['content'] + '\n\n' }}"
         "{% else %}"
         "{% if not (loop.index0 == 1 and messages[0]['role'] == 'system' and "
         "message['role'] == 'user') %}"
         "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
         " + '\n' }}{% endif %}"
         "{{ message['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

PHI3 = ("{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

# The alpaca prompt as a chat: each response closes with the EOS token.
ALPACA = ("{% for message in messages %}"
          "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
          "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
          "{% elif message['role'] == 'assistant' %}"
          "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
          "{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}")

NAMED = {"chatml": CHATML, "qwen2": QWEN2, "llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA,
         "phi3": PHI3, "alpaca": ALPACA}


def jinja_text(value: str) -> str:
    """`chat_template_jinja` is the template itself, or a path to a .jinja file."""
    if "{" not in value and Path(value).expanduser().is_file():
        return Path(value).expanduser().read_text()
    return value


def resolve_template(tokenizer, name: str | None, jinja: str | None) -> tuple[str, str]:
    """(label, Jinja text) for a chat template choice.

    name None means the tokenizer's own template, else chatml; jinja text (or a path) wins.
    """
    if jinja:
        return "jinja", jinja_text(jinja)
    if name == "jinja":
        raise StropError("chat_template: jinja needs chat_template_jinja (the template text or a "
                         "path to a .jinja file)")
    if name in (None, "tokenizer_default"):
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if own:
            return "tokenizer_default", own
        if name == "tokenizer_default":
            raise StropError("chat_template: tokenizer_default, but the tokenizer has no chat "
                             f"template; choose one of {', '.join(NAMED)} or give "
                             "chat_template_jinja")
        return "chatml", CHATML
    if name not in NAMED:
        raise StropError(f"unknown chat_template {name!r}; strop has {', '.join(NAMED)}, "
                         "tokenizer_default and jinja")
    return name, NAMED[name]


def template_for(tokenizer, ds: DatasetConfig, cfg) -> tuple[str, str]:
    """The template a chat_template dataset uses: its own setting, else the config's."""
    if ds.chat_template or ds.chat_template_jinja:
        return resolve_template(tokenizer, ds.chat_template, ds.chat_template_jinja)
    return resolve_template(tokenizer, cfg.chat_template, cfg.chat_template_jinja)
