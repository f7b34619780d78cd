"""Preference rows: a prompt with a chosen and a rejected response, or KTO's one completion with
its label, as token rows the one training loop can batch, pack and score.

An example becomes one row of two documents laid end to end, each with position ids from 0:

    pairs (dpo, ipo, orpo, simpo)   prompt + chosen     | prompt + rejected
    kto                             prompt + completion | prompt + another row's completion

One forward scores both documents (the model keeps them apart, as it keeps packed documents
apart), and packing moves whole rows, so a pair is never split. The `side` column says which
document each token belongs to (SIDES); the loss sums the trained tokens' log-probs per document.
KTO's second document is its KL estimate: the prompt with a completion written for another
prompt (the previous row's), as KTO's paper and TRL do.

Only the response is trained (labels), its end token included: a chat template's end-of-turn
token, or EOS appended to untemplated text. Each document is held to sequence_len on its own.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from strop.data.formats import ChatTemplate, Rendered, RowProblem, _short, _text
from strop.data.prepare import long_rule
from strop.data.rows import IGNORE, TokenRows, restarting_positions

# Values of the `side` column (0: padding).
CHOSEN, REJECTED, DESIRABLE, UNDESIRABLE, KL = 1, 2, 3, 4, 5
SIDES = {"chosen": CHOSEN, "rejected": REJECTED, "desirable": DESIRABLE,
         "undesirable": UNDESIRABLE, "kl": KL}
_CONVERSATION = "\ue002conversation"  # a column name no dataset has


class PreferenceFormat:
    """Renders a preference row's two documents; `render` returns them with their sides."""

    blocks = False

    def __init__(self, ds, cfg, tokenizer):
        self.kto = cfg.rl == "kto"
        self.untemplated = ds.format_name == "untemplated"
        self.prompt_key = ds.field_prompt
        self.messages_key = ds.field_messages
        self.chosen_key = ds.field_chosen or "chosen"
        self.rejected_key = ds.field_rejected or "rejected"
        self.completion_key = ds.field_completion or "completion"
        self.label_key = ds.field_label or "label"
        self.chat = None if self.untemplated else ChatTemplate(
            ds.model_copy(update={"field_messages": _CONVERSATION}), cfg, tokenizer, False)

    # ------------------------------------------------------------------------ one example
    def responses(self, row: dict[str, Any]) -> list[tuple[str, Any]]:
        """(field, value) of the example's responses: chosen and rejected, or the completion."""
        keys = [self.completion_key] if self.kto else [self.chosen_key, self.rejected_key]
        out = []
        for key in keys:
            if row.get(key) is None:
                raise RowProblem(key, f"missing field (the row has: {', '.join(sorted(row))})")
            out.append((key, row[key]))
        return out

    def label(self, row: dict[str, Any]) -> bool:
        value = row.get(self.label_key)
        if not isinstance(value, bool):
            raise RowProblem(self.label_key, "missing field" if value is None else
                             f"expected true or false, got {_short(value)}")
        return value

    def render(self, row: dict[str, Any], other: Any = None) -> list[Rendered]:
        """The example's documents: [chosen, rejected], or kto's [completion, KL] where the KL
        document pairs this prompt with `other`, another row's completion value."""
        responses = self.responses(row)
        if self.kto:
            responses.append((self.completion_key, other if other is not None
                              else responses[0][1]))
        if self.untemplated:
            prompt = _text(row, self.prompt_key or "prompt")
            return [self._plain(prompt, key, value) for key, value in responses]
        prompt = self._prompt(row, responses)
        return [self._chat(prompt, key, value) for key, value in responses]

    def corpus_text(self, row: dict[str, Any]) -> str:
        """The example's own text (prompt and responses), for duplicate detection."""
        return "\n".join(r.text for r in self.render(row))

    # ------------------------------------------------------------------------ plain text
    def _plain(self, prompt: str, key: str, value: Any) -> Rendered:
        if not isinstance(value, str):
            raise RowProblem(key, f"expected text (type: untemplated), got {type(value).__name__}; "
                                  "use type: chat_template for messages")
        if not value.strip():
            raise RowProblem(key, "empty response")
        return Rendered([(prompt, False, False), (value, True, False)], append_eos=True)

    # ------------------------------------------------------------------------ chat template
    def _message(self, content: str, role: str = "assistant") -> dict[str, str]:
        return {self.chat.role_key: role, self.chat.content_key: content}

    def _as_messages(self, key: str, value: Any, role: str) -> list[dict[str, Any]]:
        if isinstance(value, str):
            return [self._message(value, role)]
        if isinstance(value, dict):
            return [value]
        if isinstance(value, list) and value:
            return value
        raise RowProblem(key, f"expected text, a message or a list of messages, got {_short(value)}")

    def _prompt(self, row: dict[str, Any], responses: list[tuple[str, Any]]) -> list[dict]:
        key = self.prompt_key or next((k for k in ("prompt", self.messages_key, "messages")
                                       if k and k in row), None)
        if key is not None:
            if row.get(key) is None:
                raise RowProblem(key, f"missing field (the row has: {', '.join(sorted(row))})")
            return self._as_messages(key, row[key], "user")
        # No prompt column: chosen and rejected are whole conversations sharing the prompt.
        sides = [self._as_messages(k, v, "assistant") for k, v in responses]
        shared = 0
        while all(len(s) > shared + 1 for s in sides) and \
                all(s[shared] == sides[0][shared] for s in sides):
            shared += 1
        if shared == 0:
            raise RowProblem(responses[0][0], "no prompt: add a prompt column (or field_prompt), "
                             "or give chosen and rejected as conversations that share their "
                             "first messages")
        return sides[0][:shared]

    def _chat(self, prompt: list[dict], key: str, value: Any) -> Rendered:
        response = self._as_messages(key, value, "assistant")
        if len(response) > 1 and response[:len(prompt)] == prompt:
            response = response[len(prompt):]  # a whole conversation: its reply is the response
        if len(response) != 1:
            raise RowProblem(key, f"expected one response message, got {len(response)}")
        try:
            rendered = self.chat.render({_CONVERSATION: [*prompt, *response]})
        except RowProblem as err:
            where = key if err.field is None or err.field.startswith(_CONVERSATION) else err.field
            raise RowProblem(where, err.problem) from None
        pieces = rendered.pieces  # [before, content, after, content, after, ...]
        last = len(pieces) - 2
        if last < 1 or self.chat.roles.get(response[0].get(self.chat.role_key)) != "assistant":
            raise RowProblem(key, "the response must be an assistant message")
        if not pieces[last][0].strip():
            raise RowProblem(key, "empty response")
        # Only the final reply and its end-of-turn token are scored, never the prompt's turns.
        trained = [(text, i == last, literal) for i, (text, _, literal) in enumerate(pieces)]
        return Rendered(trained, append_eos=False, eos_after=[last + 1])


# ----------------------------------------------------------------------------- to tokens


def render_examples(fmt: PreferenceFormat, chunk: list[tuple[str, Any]]
                    ) -> tuple[list[Rendered], list[int], list[str], list[Any]]:
    """Render a chunk of (where, row): two documents per good example, their sides, the
    examples' places, and the problems found (BadRow-ready tuples)."""
    from strop.data.sources import BadRow

    rendered: list[Rendered] = []
    sides: list[int] = []
    places: list[str] = []
    problems: list[BadRow] = []
    good = [(where, row) for where, row in chunk if not isinstance(row, BadRow)]
    problems += [row for _, row in chunk if isinstance(row, BadRow)]
    # kto: each prompt's KL document takes the previous example's completion (the last
    # example's for the first), in the chunk's order.
    completions = [row.get(fmt.completion_key) for _, row in good] if fmt.kto else []
    for i, (where, row) in enumerate(good):
        try:
            docs = fmt.render(row, completions[i - 1] if fmt.kto else None)
            if fmt.kto:
                kind = [DESIRABLE if fmt.label(row) else UNDESIRABLE, KL]
            else:
                kind = [CHOSEN, REJECTED]
        except RowProblem as err:
            problems.append(BadRow(where, err.field, err.problem))
            continue
        rendered += docs
        sides += kind
        places.append(where)
    return rendered, sides, places, problems


def assemble(docs: TokenRows, sides: list[int], places: list[str], cfg, counts: Counter,
             share_prompt: bool = False) -> tuple[TokenRows, list[str]]:
    """Documents (two per example, in order) -> one row per example with the `side` column,
    after the length rules: each document is held to sequence_len (truncated, or its example
    dropped, or an error, as excess_length_strategy says), and an example with a document left
    with nothing to score is dropped.

    share_prompt lays an example as prompt, first response, second response, the second a
    branch whose positions continue the prompt's (strop.model.attention.segments): the prompt
    is computed once. Only for a model that runs strop's varlen attention, which reads the
    branch; any other attention needs the two whole documents."""
    limit = cfg.sequence_len
    starts, ends = docs.offsets[:-1], docs.offsets[1:].copy()
    lengths = ends - starts
    keep, cut = long_rule((lengths > limit).reshape(-1, 2).any(axis=1), cfg, counts,
                          lambda i: f"{places[i]}: a response with its prompt has "
                                    f"{int(lengths[2 * i:2 * i + 2].max())} tokens")
    if cut:
        ends = np.minimum(ends, starts + limit)
    if cfg.min_sample_len:
        short = keep & (lengths < cfg.min_sample_len).reshape(-1, 2).any(axis=1)
        counts["dropped_short"] += int(short.sum())
        keep &= ~short
    trained = np.concatenate([[0], np.cumsum(docs.labels != IGNORE)])
    empty = keep & (trained[ends] - trained[starts] == 0).reshape(-1, 2).any(axis=1)
    counts["dropped_untrained"] += int(empty.sum())
    keep &= ~empty
    chosen_docs = np.repeat(keep, 2)
    kept = docs.spans(starts[chosen_docs], ends[chosen_docs])
    kept_sides = np.asarray(sides, dtype=np.int8)[chosen_docs]
    places = [p for p, k in zip(places, keep, strict=True) if k]
    if share_prompt:
        return _shared(kept, kept_sides), places
    doc_lengths = kept.lengths
    offsets = kept.offsets[::2]  # two documents a row
    side = np.repeat(kept_sides, doc_lengths)
    rows = TokenRows(kept.input_ids, kept.labels, offsets, restarting_positions(doc_lengths),
                     {"side": side})
    return rows, places


def _shared(docs: TokenRows, sides: np.ndarray) -> TokenRows:
    """Two documents a row -> prompt, first response, second response (a branch that skips
    the prompt they share: their common first tokens, up to the first scored one)."""
    keep = np.ones(docs.num_tokens, dtype=bool)
    positions = restarting_positions(docs.lengths)
    skipped = np.zeros(len(docs) // 2, dtype=np.int64)
    for k in range(0, len(docs), 2):
        a, b, c = (int(x) for x in docs.offsets[k:k + 3])
        first, second = docs.input_ids[a:b], docs.input_ids[b:c]
        limit = min(len(first), len(second))
        differ = np.flatnonzero(first[:limit] != second[:limit])
        common = int(differ[0]) if len(differ) else limit
        scored = [int(np.argmax(docs.labels[x:y] != IGNORE)) for x, y in ((a, b), (b, c))]
        prefix = min(common, *scored)  # each document has a scored token (assemble's rule)
        keep[b:b + prefix] = False
        skipped[k // 2] = prefix
    offsets = docs.offsets[::2] - np.concatenate([[0], np.cumsum(skipped)])
    return TokenRows(docs.input_ids[keep], docs.labels[keep], offsets, positions[keep],
                     {"side": np.repeat(sides, docs.lengths)[keep]})
