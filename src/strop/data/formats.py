"""Row formats: turn one raw row into text pieces, each trained or not.

A format never tokenizes. It returns `Rendered`: the pieces whose concatenation is the row's
text, which of them are trained, and which template pieces hold a turn's end token; the
encoder (`strop.data.encode`) maps those character ranges onto tokens. A row that cannot be
used raises `RowProblem` naming the field and what is wrong.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

from strop.config.datasets import DatasetConfig, UserFormat
from strop.data.templates import template_for
from strop.errors import StropError


class RowProblem(Exception):  # noqa: N818 - a finding about one row, collected, not raised to users
    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field = field
        self.problem = problem


@dataclass
class Rendered:
    """One row as text pieces: (text, trained, literal).

    `literal` marks template text that repeats across rows, which the encoder may tokenize once.
    `eos_after` lists pieces whose first special token ends a trained turn (chat templates).
    `append_eos` asks the encoder to end the row with a trained EOS token.
    """

    pieces: list[tuple[str, bool, bool]]
    append_eos: bool = False
    eos_after: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(p[0] for p in self.pieces)


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if not required:
            return ""
        have = ", ".join(sorted(map(str, row))) or "nothing"
        raise RowProblem(key, f"missing field (the row has: {have})")
    value = row[key]
    if not isinstance(value, str):
        raise RowProblem(key, f"expected text, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------ completion


class Completion:
    """Raw text, every token trained; a document ends with EOS."""

    blocks = True

    def __init__(self, ds: DatasetConfig):
        self.field = ds.field or "text"

    def render(self, row: dict[str, Any]) -> Rendered:
        text = _text(row, self.field)
        if not text.strip():
            raise RowProblem(self.field, "empty text")
        return Rendered([(text, True, False)], append_eos=True)

    def corpus_text(self, row: dict[str, Any]) -> str:
        return _text(row, self.field)

    def render_prompt(self, row: dict[str, Any]) -> str:
        """Generation continues the text itself: there is no separate response."""
        return _text(row, self.field)

    def response(self, row: dict[str, Any]) -> str | None:
        return None


# ----------------------------------------------------------------------- alpaca and friends

ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n")


class Alpaca:
    """instruction / input / output with the Stanford Alpaca prompt (and its no-input variant)."""

    blocks = False

    def __init__(self, ds: DatasetConfig, train_on_inputs: bool):
        self.instruction = ds.field_instruction or "instruction"
        self.input = ds.field_input or "input"
        self.output = ds.field_output or "output"
        self.system_field = ds.field_system or "system"
        self.system_prompt = ds.system_prompt
        self.train_inputs = train_on_inputs

    def render(self, row: dict[str, Any]) -> Rendered:
        output = _text(row, self.output)
        return Rendered([*self._prompt_pieces(row), (output, True, False)], append_eos=True)

    def _prompt_pieces(self, row: dict[str, Any]) -> list[tuple[str, bool, bool]]:
        instruction = _text(row, self.instruction)
        extra = _text(row, self.input, required=False)
        system = _text(row, self.system_field, required=False) or self.system_prompt
        t = self.train_inputs
        head = (system + "\n\n") if system else (ALPACA_INPUT if extra else ALPACA_NO_INPUT)
        pieces = [(head + "### Instruction:\n", t, not system or system == self.system_prompt),
                  (instruction, t, False)]
        if extra:
            pieces += [("\n\n### Input:\n", t, True), (extra, t, False)]
        return [*pieces, ("\n\n### Response:\n", t, True)]

    def render_prompt(self, row: dict[str, Any]) -> str:
        """The text training put before the response (the output field may be absent)."""
        return "".join(p[0] for p in self._prompt_pieces(row))

    def response(self, row: dict[str, Any]) -> str | None:
        return _text(row, self.output, required=False) or None

    def corpus_text(self, row: dict[str, Any]) -> str:
        return "\n".join(_text(row, k, required=False)
                         for k in (self.instruction, self.input, self.output))


class UserDefined:
    """A prompt format written in the YAML: `format` / `no_input_format` with {instruction},
    {input} and {system} placeholders, then the output."""

    blocks = False
    PLACES = ("instruction", "input", "system")

    def __init__(self, spec: UserFormat, train_on_inputs: bool):
        self.spec = spec
        self.train_inputs = train_on_inputs
        self.with_input = self._parse(spec.format, "format")
        self.no_input = self._parse(spec.no_input_format, "no_input_format")

    def _parse(self, fmt: str, key: str) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(fmt))
        except ValueError as err:
            raise StropError(f"type.{key}: {err}; write literal braces as {{{{ and }}}}") from None
        for literal, name, spec, _ in parsed:
            if name is not None and (name not in self.PLACES or spec):
                raise StropError(f"type.{key}: unknown placeholder {{{name}}}; use {{instruction}}, "
                                 "{input} or {system}")
            out.append((literal, name))
        return out

    def render(self, row: dict[str, Any]) -> Rendered:
        output = _text(row, self.spec.field_output)
        return Rendered([*self._prompt_pieces(row), (output, True, False)], append_eos=True)

    def render_prompt(self, row: dict[str, Any]) -> str:
        """The text training put before the output (the output field may be absent)."""
        return "".join(p[0] for p in self._prompt_pieces(row))

    def response(self, row: dict[str, Any]) -> str | None:
        return _text(row, self.spec.field_output, required=False) or None

    def _prompt_pieces(self, row: dict[str, Any]) -> list[tuple[str, bool, bool]]:
        s = self.spec
        values = {"instruction": _text(row, s.field_instruction),
                  "input": _text(row, s.field_input, required=False),
                  "system": _text(row, s.field_system, required=False) or s.system_prompt}
        t = self.train_inputs
        pieces: list[tuple[str, bool, bool]] = []
        if values["system"]:
            pieces.append((s.system_format.replace("{system}", values["system"]), t,
                           values["system"] == s.system_prompt))
        for literal, name in (self.with_input if values["input"] else self.no_input):
            if literal:
                pieces.append((literal, t, True))
            if name:
                pieces.append((values[name], t, False))
        return pieces

    def corpus_text(self, row: dict[str, Any]) -> str:
        s = self.spec
        return "\n".join(_text(row, k, required=False)
                         for k in (s.field_instruction, s.field_input, s.field_output))


# ---------------------------------------------------------------------------- input_output


class InputOutput:
    """Template-free segments [{text, label}]: exactly the text given, trained where label."""

    blocks = False

    def __init__(self, ds: DatasetConfig, train_on_inputs: bool):
        self.field = ds.field_segments or "segments"
        self.train_inputs = train_on_inputs

    def _segments(self, row: dict[str, Any]) -> list[tuple[str, bool]]:
        segments = row.get(self.field)
        if segments is None:
            raise RowProblem(self.field, f"missing field (the row has: {', '.join(sorted(row))})")
        if not isinstance(segments, list):
            raise RowProblem(self.field, f"expected a list of {{text, label}}, got "
                                         f"{type(segments).__name__}")
        if not segments:
            raise RowProblem(self.field, "empty list of segments")
        out = []
        for i, seg in enumerate(segments):
            where = f"{self.field}[{i}]"
            if not isinstance(seg, dict):
                raise RowProblem(where, f"expected {{text, label}}, got {type(seg).__name__}")
            if not isinstance(seg.get("text"), str):
                raise RowProblem(f"{where}.text", "missing field" if seg.get("text") is None
                                 else f"expected text, got {type(seg['text']).__name__}")
            label = seg.get("label", True)
            if not isinstance(label, bool):
                raise RowProblem(f"{where}.label", f"expected true or false, got {_short(label)}")
            out.append((seg["text"], label))
        return out

    def render(self, row: dict[str, Any]) -> Rendered:
        segments = self._segments(row)
        pieces = [(text, label or self.train_inputs, False) for text, label in segments]
        return Rendered(pieces, append_eos=segments[-1][1])

    def corpus_text(self, row: dict[str, Any]) -> str:
        return "".join(text for text, _ in self._segments(row))

    def _split(self, row: dict[str, Any]) -> tuple[str, str | None]:
        """(prompt, response): the response is the final run of labelled segments."""
        segments = self._segments(row)
        start = len(segments)
        while start > 0 and segments[start - 1][1]:
            start -= 1
        prompt = "".join(text for text, _ in segments[:start])
        response = "".join(text for text, _ in segments[start:])
        return prompt, response or None

    def render_prompt(self, row: dict[str, Any]) -> str:
        return self._split(row)[0]

    def response(self, row: dict[str, Any]) -> str | None:
        return self._split(row)[1]


# ---------------------------------------------------------------------------- chat_template

# How datasets name roles -> strop's roles (OpenAI's names). `roles:` in the entry adds more.
DEFAULT_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                 "gpt": "assistant", "model": "assistant", "bot": "assistant", "tool": "tool"}
_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class ChatTemplate:
    """Conversations ([{role, content}] or ShareGPT [{from, value}]) through a chat template.

    Which characters are trained comes from rendering twice: once with each message's content
    replaced by a private-use sentinel (so the template's own text between messages is known
    exactly) and once for real; the real text is then cut at the same places. Nothing searches
    token ids for marker strings.
    """

    blocks = False

    def __init__(self, ds: DatasetConfig, cfg, tokenizer, train_on_inputs: bool):
        self.tokenizer = tokenizer
        self.label, self.template = template_for(tokenizer, ds, cfg)
        self.field = ds.field_messages
        self.mapped_keys = ds.message_property_mappings is not None or \
            ds.message_field_role is not None or ds.message_field_content is not None
        self.role_key, self.content_key = ds.role_key, ds.content_key
        self.roles = dict(DEFAULT_ROLES)
        for role, names in (ds.roles or {}).items():
            for name in names:
                self.roles[name] = role
            self.roles.setdefault(role, role)
        self.train_roles = set(ds.roles_to_train or ["assistant"])
        self.train_on_eos = ds.train_on_eos or "turn"
        self.drop_system = ds.drop_system_message
        self.train_inputs = train_on_inputs

    def _messages(self, row: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
        name = self.field or ("messages" if "messages" in row or "conversations" not in row
                              else "conversations")
        messages = row.get(name)
        if messages is None:
            raise RowProblem(name, f"missing field (the row has: {', '.join(sorted(row))})")
        if not isinstance(messages, list):
            raise RowProblem(name, f"expected a list of messages, got {type(messages).__name__}")
        if not messages:
            raise RowProblem(name, "empty conversation")
        out = []
        for i, message in enumerate(messages):
            where = f"{name}[{i}]"
            if not isinstance(message, dict):
                raise RowProblem(where, f"expected a message {{role, content}}, got "
                                        f"{type(message).__name__}")
            role_key, content_key = self.role_key, self.content_key
            if not self.mapped_keys and role_key not in message and "from" in message:
                role_key, content_key = "from", "value"  # ShareGPT
            if role_key not in message:
                raise RowProblem(f"{where}.{role_key}", "missing field")
            raw_role = message[role_key]
            role = self.roles.get(raw_role) if isinstance(raw_role, str) else None
            if role is None:
                raise RowProblem(f"{where}.{role_key}", f"unknown role {_short(raw_role)}; map it "
                                 f"with roles: on the dataset (e.g. roles: {{assistant: [{raw_role}]}})")
            content = message.get(content_key)
            if not isinstance(content, str):
                raise RowProblem(f"{where}.{content_key}", "missing field" if content is None
                                 else f"expected text, got {type(content).__name__}")
            if "\ue000" in content:
                raise RowProblem(f"{where}.{content_key}", "contains U+E000, a private-use "
                                 "character strop reserves to locate messages")
            if role == "system" and self.drop_system:
                continue
            out.append({"role": role, "content": content})
        if not out:
            raise RowProblem(name, "empty conversation (only system messages, and "
                             "drop_system_message is on)")
        return name, out

    def _render(self, messages: list[dict[str, str]], name: str) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template,
                                                      tokenize=False)
        except TemplateError as err:
            raise RowProblem(name, f"the {self.label} chat template refused this conversation "
                                   f"({err})") from None

    def render(self, row: dict[str, Any]) -> Rendered:
        name, messages = self._messages(row)
        marked = [{"role": m["role"], "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        skeleton = self._render(marked, name)
        parts = _SENTINEL.split(skeleton)  # [between0, idx, between1, idx, ..., between_n]
        between, order = parts[0::2], [int(i) for i in parts[1::2]]
        if order != sorted(set(order)):
            raise RowProblem(name, f"the {self.label} chat template repeats or reorders messages; "
                                   "strop cannot tell which text to train")
        real = self._render(messages, name)
        pieces: list[tuple[str, bool, bool]] = [(between[0], self.train_inputs, False)]
        if not real.startswith(between[0]):
            raise self._mismatch(name)
        pos = len(between[0])
        turn_ends: list[tuple[int, bool]] = []  # (piece index holding the turn's end, trained)
        for k, index in enumerate(order):
            content = messages[index]["content"]
            after = between[k + 1]
            last = k == len(order) - 1
            # The template wrote the content as is, or trimmed (llama3 does).
            shown = next((c for c in dict.fromkeys((content, content.strip()))
                          if _fits(real, pos, c, after, last)), None)
            if shown is None:
                raise self._mismatch(name)
            end = pos + len(shown)
            trained = messages[index]["role"] in self.train_roles
            pieces += [(shown, trained or self.train_inputs, False),
                       (after, self.train_inputs, False)]
            turn_ends.append((len(pieces) - 1, trained))
            pos = end + len(after)
        return Rendered(pieces, append_eos=False, eos_after=self._eos(turn_ends))

    def _eos(self, turn_ends: list[tuple[int, bool]]) -> list[int]:
        mode = self.train_on_eos
        if mode == "none":
            return []
        if mode == "all":
            return [piece for piece, _ in turn_ends]
        trained = [piece for piece, was_trained in turn_ends if was_trained]
        return trained[-1:] if mode == "last" else trained

    def _mismatch(self, name: str) -> RowProblem:
        return RowProblem(name, f"the {self.label} chat template changes this conversation's text "
                                "beyond trimming it, so strop cannot tell which characters to train")

    def corpus_text(self, row: dict[str, Any]) -> str:
        return "\n".join(m["content"] for m in self._messages(row)[1])

    def _split(self, row: dict[str, Any]) -> tuple[str, list[dict[str, str]], str | None]:
        name, messages = self._messages(row)
        if messages[-1]["role"] in self.train_roles and len(messages) > 1:
            return name, messages[:-1], messages[-1]["content"]
        return name, messages, None

    def render_prompt(self, row: dict[str, Any]) -> str:
        """The conversation up to the last trained turn, ending with the template's
        generation prompt (the text training put before that turn's content)."""
        name, messages, _ = self._split(row)
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template,
                                                      tokenize=False, add_generation_prompt=True)
        except TemplateError as err:
            raise RowProblem(name, f"the {self.label} chat template refused this conversation "
                                   f"({err})") from None

    def response(self, row: dict[str, Any]) -> str | None:
        return self._split(row)[2]


def _fits(real: str, pos: int, content: str, after: str, last: bool) -> bool:
    """Does `content` sit at `pos` in the rendered text, followed by the template's `after`?"""
    end = pos + len(content)
    if not real.startswith(content, pos):
        return False
    return real[end:] == after if last else real.startswith(after, end)


def make_format(ds: DatasetConfig, cfg, tokenizer=None):
    """The format object for a dataset entry."""
    train_inputs = cfg.train_on_inputs if ds.train_on_inputs is None else ds.train_on_inputs
    if isinstance(ds.type, UserFormat):
        return UserDefined(ds.type, train_inputs)
    if ds.type in ("completion", "pretrain"):
        return Completion(ds)
    if ds.type == "alpaca":
        return Alpaca(ds, train_inputs)
    if ds.type == "input_output":
        return InputOutput(ds, train_inputs)
    if ds.type == "chat_template":
        return ChatTemplate(ds, cfg, tokenizer, train_inputs)
    raise StropError(f"format {ds.type!r} is not known")  # the schema rejects it first
