"""Rendered pieces -> input_ids and labels, with BOS and EOS as the tokenizer expects them.

The reference is the whole row's text tokenized as one string (what a prompt is at inference),
with the trained characters mapped onto tokens through the tokenizer's offsets: a token is
trained when it overlaps a trained character. A turn's end token (chat templates) is the first
special token in the template text that follows the turn.

Speed: template text that repeats in every row (alpaca's preamble is ~40% of a row) need not be
tokenized 100k times. Where the tokenizer provably splits at the boundaries between pieces
(checked once per tokenizer on probe strings: a newline next to a non-space character), a row is
tokenized piece by piece with the repeated pieces cached, which gives the same ids as the whole
string. Any other row takes the whole-string path.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from strop.data.fast_bpe import encode_batch, fast_bpe_for
from strop.data.formats import Rendered
from strop.data.rows import IGNORE, TokenRows
from strop.errors import StropError

# Boundaries strop checks once per tokenizer: (left piece, right piece) probes for
# "ends with a newline | starts with a non-space" and "ends with a non-space | starts with a newline".
_PROBES_NEWLINE_LEFT = (["### Instruction:\n", "a\n\n", "\n", "x.\n"],
                        ["Word", "word and more", "42 is", "(x)", "'s it", "é", "漢字", "#x", "-x",
                         ".", "<|im_end|>", "x\n"])
_PROBES_NEWLINE_RIGHT = (["word", "Word.", "42", "x)", "é", "漢", "'s", "a b"],
                         ["\n", "\n\n### Response:\n", "\nword", "\n\n"])


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class Encoder:
    """Tokenizes `Rendered` rows for one tokenizer; caches repeated template pieces."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        self.prefix: list[int] = full[:at]   # what the tokenizer puts first (BOS, [CLS]) ...
        suffix = full[at + len(plain):]       # ... and last ([SEP], or EOS for some)
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else \
            (suffix[-1] if suffix else getattr(tokenizer, "sep_token_id", None))
        self.special = set(tokenizer.all_special_ids) | {
            i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
        self._cache: dict[str, list[int]] = {}
        self.twin = fast_bpe_for(tokenizer)
        self.piecewise_ok = not self.fast or self._boundaries_split()

    # ---------------------------------------------------------------------------- helpers
    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.twin is not None:
            return self.twin.ids(texts)
        if self.fast:
            return encode_batch(self.tokenizer, texts)
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def _boundaries_split(self) -> bool:
        """Does tokenizing across newline/non-space boundaries equal tokenizing each side?"""
        for lefts, rights in (_PROBES_NEWLINE_LEFT, _PROBES_NEWLINE_RIGHT):
            pairs = [(a, b) for a in lefts for b in rights]
            whole = self._ids([a + b for a, b in pairs])
            parts = self._ids([p for pair in pairs for p in pair])
            for i, ids in enumerate(whole):
                if ids != parts[2 * i] + parts[2 * i + 1]:
                    return False
        return True

    def _piecewise(self, row: Rendered) -> bool:
        """May this row be tokenized piece by piece (same ids as the whole string)?"""
        if not self.piecewise_ok or row.eos_after:
            return False
        if not self.fast:
            return True
        previous = ""
        for text, _, _ in row.pieces:
            if not text:
                continue
            if previous:
                a, b = previous[-1], text[0]
                if not ((a == "\n" and not b.isspace()) or (b == "\n" and not a.isspace())):
                    return False
            previous = text
        return True

    # --------------------------------------------------------------------------- encoding
    def encode(self, rows: list[Rendered]) -> list[Encoded]:
        out: list[Encoded | None] = [None] * len(rows)
        by_piece = [self._piecewise(r) for r in rows]
        piecewise = [i for i, ok in enumerate(by_piece) if ok]
        whole = [i for i, ok in enumerate(by_piece) if not ok]
        if piecewise:
            for i, enc in zip(piecewise, self._encode_piecewise([rows[i] for i in piecewise]),
                              strict=True):
                out[i] = enc
        if whole:
            for i, enc in zip(whole, self._encode_whole([rows[i] for i in whole]), strict=True):
                out[i] = enc
        return [self._finish(rows[i], enc) for i, enc in enumerate(out) if enc is not None]

    def encode_rows(self, rows: list[Rendered]) -> TokenRows:
        """Like `encode`, straight into flat arrays; the fast path for a chunk of template rows
        assembles ids and labels with numpy instead of row by row."""
        if not rows or not all(self._piecewise(r) for r in rows):
            encoded = self.encode(rows)
            return TokenRows.from_lists([e.input_ids for e in encoded], [e.labels for e in encoded])
        return self._piecewise_flat(rows)

    def _piecewise_flat(self, rows: list[Rendered]) -> TokenRows:
        self._cache_literals(rows)
        cache, prefix, n = self._cache, self.prefix, len(self.prefix)
        varying = iter(self._ids([t for r in rows for t, _, lit in r.pieces if t and not lit]))
        eos = [self.eos_id]
        pieces: list[list[int]] = []   # every row's pieces, in order
        trained: list[bool] = []
        per_row = np.zeros(len(rows), dtype=np.int64)  # pieces of each row
        eos_present: list[int] = []    # rows whose text already ended with EOS
        for i, row in enumerate(rows):
            start = len(pieces)
            for text, is_trained, literal in row.pieces:
                if not text:
                    continue
                piece = cache[text] if literal else next(varying)
                if n and len(pieces) == start and piece[:n] != prefix:
                    pieces.append(prefix)
                    trained.append(False)
                pieces.append(piece)
                trained.append(is_trained)
            if n and len(pieces) == start:
                pieces.append(prefix)
                trained.append(False)
            if row.append_eos:
                if self.eos_id is None:
                    raise StropError("the tokenizer has no EOS token to end each response with; "
                                     "set special_tokens: {eos_token: ...} in the config")
                if len(pieces) > start and pieces[-1] and pieces[-1][-1] == self.eos_id:
                    eos_present.append(i)
                else:
                    pieces.append(eos)
                    trained.append(True)
            per_row[i] = len(pieces) - start
        if not pieces:
            return TokenRows.from_lists([[] for _ in rows], [[] for _ in rows])
        piece_lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        total = int(piece_lengths.sum())
        ids = np.fromiter(chain.from_iterable(pieces), dtype=np.int32, count=total)
        labels = np.where(np.repeat(np.array(trained, dtype=bool), piece_lengths), ids,
                          IGNORE).astype(np.int32)
        piece_ends = np.cumsum(piece_lengths)
        row_last_piece = np.cumsum(per_row) - 1
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        # A row without pieces ends where the previous one did (its last piece index repeats).
        offsets[1:] = np.where(row_last_piece >= 0, piece_ends[np.maximum(row_last_piece, 0)], 0)
        for i in eos_present:
            labels[offsets[i + 1] - 1] = self.eos_id
        starts = offsets[:-1][offsets[1:] > offsets[:-1]]
        labels[starts] = IGNORE  # nothing predicts a row's first token
        return TokenRows(ids, labels, offsets)

    def _cache_literals(self, rows: list[Rendered]) -> None:
        cache = self._cache
        fresh = list(dict.fromkeys(t for r in rows for t, _, lit in r.pieces
                                   if lit and t and t not in cache))
        for text, ids in zip(fresh, self._ids(fresh), strict=True):
            cache[text] = ids

    def _encode_piecewise(self, rows: list[Rendered]) -> list[Encoded]:
        self._cache_literals(rows)
        cache = self._cache
        varying = [t for r in rows for t, _, lit in r.pieces if t and not lit]
        encoded = iter(self._ids(varying))
        out = []
        for row in rows:
            ids: list[int] = []
            labels: list[int] = []
            for text, trained, literal in row.pieces:
                if not text:
                    continue
                piece = cache[text] if literal else next(encoded)
                ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
            out.append(Encoded(ids, labels))
        return out

    def _encode_whole(self, rows: list[Rendered]) -> list[Encoded]:
        texts = [r.text for r in rows]
        if not self.fast:  # no offsets without the Rust tokenizer: piece by piece is all there is
            return self._encode_piecewise(rows)
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        out = []
        for row, enc in zip(rows, encodings, strict=True):
            ids = enc.ids
            labels = [IGNORE] * len(ids)
            start = 0
            spans = []
            for text, trained, _ in row.pieces:
                spans.append((start, start + len(text)))
                if trained and text:
                    first = _token_at_or_after(enc, start, start + len(text))
                    last = _token_at_or_before(enc, start + len(text) - 1, start)
                    if first is not None and last is not None and last >= first:
                        labels[first:last + 1] = ids[first:last + 1]
                start += len(text)
            if row.eos_after:
                offsets = enc.offsets
                for piece in row.eos_after:
                    a, b = spans[piece]
                    t = _token_at_or_after(enc, a, b)
                    while t is not None and t < len(ids) and offsets[t][0] < b:
                        if ids[t] in self.special:
                            labels[t] = ids[t]
                            break
                        t += 1
            out.append(Encoded(ids, labels))
        return out

    def _finish(self, row: Rendered, enc: Encoded) -> Encoded:
        """BOS and EOS as the tokenizer expects them, in place (the lists are this row's own)."""
        ids, labels = enc.input_ids, enc.labels
        n = len(self.prefix)
        if n and ids[:n] != self.prefix:  # BOS as the tokenizer expects it, never doubled
            ids[0:0] = self.prefix
            labels[0:0] = [IGNORE] * n
        if row.append_eos:
            if self.eos_id is None:
                raise StropError("the tokenizer has no EOS token to end each response with; set "
                                 "special_tokens: {eos_token: ...} in the config")
            if ids and ids[-1] == self.eos_id:
                labels[-1] = self.eos_id
            else:
                ids.append(self.eos_id)
                labels.append(self.eos_id)
        if labels:
            # The first token is never predicted; in a packed row it would otherwise be
            # "predicted" from the previous document's last token.
            labels[0] = IGNORE
        return enc


def _token_at_or_after(enc, start: int, end: int) -> int | None:
    for char in range(start, end):
        t = enc.char_to_token(char)
        if t is not None:
            return t
    return None


def _token_at_or_before(enc, last: int, first: int) -> int | None:
    for char in range(last, first - 1, -1):
        t = enc.char_to_token(char)
        if t is not None:
            return t
    return None
