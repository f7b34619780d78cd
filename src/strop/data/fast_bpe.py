"""A faster twin of a byte-level BPE tokenizer, for preparing data: tiktoken on the same vocabulary.

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen 2, Mistral's Tekken, and the ones `strop train`
builds for pretraining) split text with a regex and then merge bytes by rank. tiktoken runs that
same algorithm about 5x faster per core than the `tokenizers` library on this machine, which is
the bulk of data preparation. It is used only where it gives the very same ids:

- the tokenizer's pipeline has the shape tiktoken implements: no normalizer, a byte-level
  pre-tokenizer with a known split regex, a BPE model without dropout, byte fallback or affixes,
  whose merges create tokens in id order (tiktoken's rank is the token id);
- every one of the vocabulary's tokens, and a set of probe strings, encode identically;
- texts holding an added token (special tokens like "<|im_end|>") go to the tokenizer itself,
  which splits those out first;
- while preparing, one text in SAMPLE_EVERY of every batch is also encoded by the tokenizer and
  compared. On any difference the twin is dropped for good, with a warning, and that batch and
  all later ones are encoded by the tokenizer itself.

The checks are a sample, not a proof: rank-order BPE and merge-list BPE can in principle differ
on a word that none of them covers. Where they would, the ids still spell the same bytes.
"""

from __future__ import annotations

import json
import logging
import re

log = logging.getLogger("strop.data")

# The split regex of GPT-2's ByteLevel pre-tokenizer (`use_regex: true`).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SAMPLE_EVERY = 32
_PROBES = ["Hello, world!", "  two  spaces\tand\ttabs\n\n\nnewlines ", "it's they're we'll I'd",
           "numbers 1234567 and 3.14159", "émigré naïve façade", "漢字かなカナ 한국어", "emoji 🙂👍🏽",
           "code: def f(x):\n    return x ** 2  # ok", "trailing space ", " leading", "\r\n", "",
           "MiXeD CaSe WORDS", "a-b_c/d\\e|f", "'''", "\u00a0nbsp\u2003em space"]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes, reversed."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(kept)
    extra = 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(kept, chars, strict=True)}


def _split_pattern(pre: dict | None) -> str | None:
    """The regex the pre-tokenizer splits with, where tiktoken can do the same; else None."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_SPLIT if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in (split.get("pattern") or {})):
        return None
    if (byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex")
            or byte_level.get("add_prefix_space")):
        return None
    return split["pattern"]["Regex"]


def _ranks(model: dict) -> dict[bytes, int] | None:
    """Bytes -> id for every token, when the merges make tokens in id order; else None."""
    if (model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        return None
    to_byte = _byte_decoder()
    vocab: dict[str, int] = model["vocab"]
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
    except KeyError:  # a character outside the byte alphabet: not a byte-level vocabulary
        return None
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    # A trained BPE makes each token once, in id order. One converted from tiktoken (Llama 3)
    # lists every split of a token as a merge, grouped by the token's id. Either way the ids
    # never go down along the merges; anything else would rank differently in tiktoken.
    last = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made = vocab.get(left + right)
        if made is None or made < last:
            return None
        last = made
    return ranks


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """The `tokenizers` library's fastest batch path (no offsets), without special tokens."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(
        texts, add_special_tokens=False)]


class FastBPE:
    """`ids(texts)` equal to `tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)`."""

    def __init__(self, tokenizer, encoding, added: re.Pattern | None):
        self.tokenizer = tokenizer
        self.encoding = encoding
        self.added = added
        self.active = True
        self._turn = 0  # where this batch's sample starts, so successive batches check others

    def _reference(self, texts: list[str]) -> list[list[int]]:
        return encode_batch(self.tokenizer, texts)

    def ids(self, texts: list[str]) -> list[list[int]]:
        if not self.active:
            return self._reference(texts)
        encode, added = self.encoding.encode_ordinary, self.added
        out: list[list[int] | None] = [None if added is not None and added.search(t) else encode(t)
                                       for t in texts]
        start, self._turn = self._turn, (self._turn + 1) % SAMPLE_EVERY
        checked = [i for i in range(start, len(texts), SAMPLE_EVERY) if out[i] is not None]
        if checked and self._reference([texts[i] for i in checked]) != [out[i] for i in checked]:
            self.active = False
            log.warning("the fast tokenizer path gave different ids from the tokenizer on this data; "
                        "continuing with the tokenizer alone (slower, same results)")
            return self._reference(texts)
        missing = [i for i, ids in enumerate(out) if ids is None]
        for i, ids in zip(missing, self._reference([texts[i] for i in missing]), strict=True):
            out[i] = ids
        return out  # type: ignore[return-value]


def fast_bpe_for(tokenizer) -> FastBPE | None:
    """A verified tiktoken twin of a fast byte-level BPE tokenizer, or None where there is none."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    if spec.get("normalizer") is not None or pattern is None:
        return None
    ranks = _ranks(spec.get("model") or {})
    if ranks is None:
        return None
    added_texts = sorted({t["content"] for t in spec.get("added_tokens") or [] if t.get("content")},
                         key=len, reverse=True)
    added = re.compile("|".join(map(re.escape, added_texts))) if added_texts else None
    try:
        encoding = tiktoken.Encoding("strop-twin", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens={})
    except Exception:  # a regex tiktoken's engine does not accept
        return None
    twin = FastBPE(tokenizer, encoding, added)
    # Every token's own text and the probes, compared in full, before any data is touched.
    probes = _PROBES + [t.decode("utf-8") for t in ranks if _utf8(t)]
    probes = [p for p in probes if added is None or not added.search(p)]
    if [encoding.encode_ordinary(p) for p in probes] != twin._reference(probes):
        return None
    return twin


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
