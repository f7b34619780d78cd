"""How a prompt is written for generation: the way training wrote it.

A run trained on a dataset format (alpaca, a user-defined YAML format, chat_template,
input_output, completion) learned to answer text rendered by that format, so a row's prompt is
the format's own `render_prompt(row)`: the training text up to where the response starts. The
reference answer, for evaluation, is the format's `response(row)`.

Chat (`Prompter.chat`) renders a conversation. A run trained with a prompt format (alpaca,
user-defined) uses that format: the tokenizer may carry a chat template inherited from its base
that the run never trained on. Otherwise the tokenizer's chat template is used when it has one,
and plain text when it has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strop.errors import StropError


@dataclass
class Prompt:
    text: str
    reference: str | None  # the row's response, when it has one
    special_tokens: bool   # add the tokenizer's BOS/... (False: a chat template wrote them)


class Prompter:
    """Rows and conversations -> prompt text, for one run (or a plain model)."""

    def __init__(self, cfg: Any, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.format = None
        self.format_name = None
        if cfg is not None and cfg.datasets:
            from strop.data.formats import make_format

            ds = cfg.datasets[0]
            self.format = make_format(ds, cfg, tokenizer)
            self.format_name = ds.format_name

    # -------------------------------------------------------------------------------- rows
    def row(self, row: dict[str, Any]) -> Prompt:
        """A row in the run's dataset format; or {"prompt": ..., "response": ...}."""
        from strop.data.formats import ChatTemplate, RowProblem

        if "prompt" in row and isinstance(row["prompt"], str):
            reference = row.get("response", row.get("output"))
            return Prompt(row["prompt"], reference if isinstance(reference, str) else None, True)
        if self.format is None:
            raise StropError("this model has no training config, so rows need a \"prompt\" field "
                             f"(got: {', '.join(sorted(map(str, row))) or 'nothing'})")
        try:
            text = self.format.render_prompt(row)
            reference = self.format.response(row)
        except RowProblem as problem:
            raise RowProblem(problem.field, f"{problem.problem} (rows must be in the run's "
                                            f"{self.format_name} format)") from None
        return Prompt(token_boundary(text, self.tokenizer), reference,
                      not isinstance(self.format, ChatTemplate))

    # -------------------------------------------------------------------------------- chat
    @property
    def chat_style(self) -> str:
        """'format' (the trained prompt format), 'template' (chat template) or 'plain'."""
        from strop.data.formats import Alpaca, UserDefined

        if isinstance(self.format, Alpaca | UserDefined):
            return "format"
        if getattr(self.tokenizer, "chat_template", None):
            return "template"
        return "plain"

    def chat(self, history: list[dict[str, str]], system: str | None = None) -> Prompt:
        """The conversation so far (ending with a user turn), ready for the assistant's reply."""
        style = self.chat_style
        if style == "template":
            messages = ([{"role": "system", "content": system}] if system else []) + history
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
            return Prompt(text, None, False)
        if style == "format":
            # Earlier turns are rendered as the rows training saw (prompt + answer + EOS); the
            # last user turn as a prompt.
            eos = self.tokenizer.eos_token or ""
            parts = []
            for i in range(0, len(history) - 1, 2):
                row = self._format_row(history[i]["content"], system)
                parts.append(self.format.render_prompt(row) + history[i + 1]["content"] + eos)
            parts.append(token_boundary(self.format.render_prompt(
                self._format_row(history[-1]["content"], system)), self.tokenizer))
            return Prompt("".join(parts), None, True)
        lines = ([system] if system else []) + [m["content"] for m in history]
        return Prompt("\n".join(lines) + "\n", None, True)

    def _format_row(self, message: str, system: str | None) -> dict[str, str]:
        from strop.data.formats import Alpaca

        fmt = self.format
        if isinstance(fmt, Alpaca):
            keys = (fmt.instruction, fmt.system_field)
        else:
            keys = (fmt.spec.field_instruction, fmt.spec.field_system)
        row = {keys[0]: message}
        if system:
            row[keys[1]] = system
        return row


def token_boundary(prompt: str, tokenizer: Any) -> str:
    """The prompt without trailing spaces that training tokenized as part of the response.

    Training tokenizes prompt and response as one string, so with a byte-level BPE a format
    ending in "Answer: " trained the model on "Answer:" followed by " Paris" (one token). A
    prompt ending in a lone " " token asks for what it never saw; without the space the model
    writes " Paris" itself. Checked on the tokenizer, not assumed: the spaces are dropped only
    when the prompt's tokens are not a prefix of the tokens of the prompt followed by a word,
    and the trimmed prompt's are.
    """
    trimmed = prompt.rstrip(" ")
    if trimmed == prompt or not trimmed:
        return prompt

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    joined = ids(prompt + "word")
    as_is, cut = ids(prompt), ids(trimmed)
    if joined[:len(as_is)] != as_is and joined[:len(cut)] == cut:
        return trimmed
    return prompt


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Rows from a .txt (one prompt a line), .jsonl or .json (a list) file."""
    if not path.is_file():
        raise StropError(f"{path}: no such prompts file")
    text = path.read_text()
    if path.suffix == ".txt":
        return [{"prompt": line} for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise StropError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        rows = data
    elif path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise StropError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    else:
        raise StropError(f"{path}: use a .txt (one prompt a line), .jsonl or .json file")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise StropError(f"{path}: row {number} is {type(row).__name__}, not an object")
    if not rows:
        raise StropError(f"{path}: no prompts in the file")
    return rows
