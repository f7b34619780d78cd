"""Train a tokenizer on a corpus (pretraining from scratch) and wrap it as a Hugging Face fast
tokenizer, so everything downstream (formats, chat templates, saving, llama.cpp export) treats
it like any tokenizer from the hub.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from strop.config.schema import PretrainTokenizer

# Roles of the default special tokens, Llama-style for bpe/unigram and BERT-style for wordpiece.
CAUSAL_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>"}
BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                 "sep_token": "[SEP]", "mask_token": "[MASK]"}


def _limited(texts: Iterable[str], max_rows: int | None) -> Iterator[str]:
    for i, text in enumerate(texts):
        if max_rows is not None and i >= max_rows:
            return
        if text:
            yield text


def train_tokenizer(texts: Iterable[str], settings: PretrainTokenizer, model_max_length: int = 2048):
    """Train a tokenizer of `settings.type` on `texts`; returns a PreTrainedTokenizerFast.

    bpe is byte-level (no unknown characters, as in GPT-2 and Llama 3); it prepends BOS to every
    encoded text, as Llama's tokenizer does. wordpiece is BERT's ([CLS] text [SEP]).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    roles = dict(BERT_SPECIALS if settings.type == "wordpiece" else CAUSAL_SPECIALS)
    extra = [t for t in (settings.special_tokens or []) if t not in roles.values()]
    specials = list(roles.values()) + extra
    corpus = _limited(texts, settings.max_rows)

    if settings.type == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=settings.vocab_size,
                                      min_frequency=settings.min_frequency,
                                      special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif settings.type == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=settings.vocab_size, special_tokens=specials,
                                          unk_token=roles["unk_token"], show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token=roles["unk_token"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=settings.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=settings.vocab_size,
                                            min_frequency=settings.min_frequency,
                                            special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)

    if settings.type == "wordpiece":
        cls, sep = roles["cls_token"], roles["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    else:
        bos = roles["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    if tok.get_vocab_size() < len(specials) + 2:
        from strop.errors import StropError

        raise StropError(f"the tokenizer learned only {tok.get_vocab_size()} tokens: the corpus is "
                         "empty or tiny; check the datasets of the pretraining config")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   additional_special_tokens=extra or None, **roles)
    return fast
