"""Load the tokenizer a config asks for, or train one on the corpus (pretraining from scratch).

Everything that changes the tokenizer happens here, once: the class (`tokenizer_type`), fast or
not, special tokens and extra `tokens`, a pad token (the EOS token when there is none), and the
chat template chosen in the config, so that it is saved with the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from strop.errors import StropError, first_line

# Written beside a trained tokenizer: what it was trained on, so an unchanged corpus reuses it.
TRAINED_KEY_FILE = "strop-tokenizer-key.json"


def load_tokenizer(cfg):
    """The tokenizer for a config: trained (pretrain_tokenizer), or loaded from tokenizer_config,
    base_model or base_model_config; then special tokens, tokens, pad and chat template."""
    if cfg.pretrain_tokenizer is not None:
        tokenizer = trained_tokenizer(cfg)
    else:
        tokenizer = _from_pretrained(cfg)
    return configure(tokenizer, cfg)


def _from_pretrained(cfg):
    import transformers

    from strop.model.gguf import local_source

    source = cfg.tokenizer_config or cfg.model_source or cfg.base_model_config
    if not source:
        raise StropError("no tokenizer: set tokenizer_config (a tokenizer directory or hub id), "
                         "base_model, or pretrain_tokenizer to train one on the corpus")
    name = cfg.tokenizer_type or "AutoTokenizer"
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise StropError(f"tokenizer_type {name!r} is not a tokenizer class of transformers "
                         "(e.g. AutoTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast)")
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if name == "AutoTokenizer":
        kwargs["use_fast"] = cfg.tokenizer_use_fast
    if cfg.model_revision and source == cfg.model_source:
        kwargs["revision"] = cfg.model_revision
    try:
        # A GGUF's tokenizer and chat template come from the file, through its converted copy.
        source = local_source(source, cfg.model_revision)
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        where = "a local directory" if Path(source).exists() else "the Hugging Face hub"
        first = first_line(err, 200)
        raise StropError(f"cannot load the tokenizer {source!r} from {where} ({first}); check "
                         "the path or id, or set tokenizer_config") from None


def configure(tokenizer, cfg):
    """Apply the config's special tokens, added tokens, pad token and chat template."""
    if cfg.special_tokens is not None:
        wanted = cfg.special_tokens.as_dict()
        extra = wanted.pop("additional_special_tokens", None)
        if extra:
            tokenizer.add_special_tokens({"additional_special_tokens": extra},
                                         replace_extra_special_tokens=False)
        if wanted:
            tokenizer.add_special_tokens(wanted)
    if cfg.tokens:
        tokenizer.add_tokens(list(cfg.tokens))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template or cfg.chat_template_jinja:
        from strop.data.templates import resolve_template

        _, template = resolve_template(tokenizer, cfg.chat_template, cfg.chat_template_jinja)
        tokenizer.chat_template = template
    return tokenizer


# ------------------------------------------------------------------------------ from scratch


def _corpus_key(cfg) -> str:
    """What a trained tokenizer depends on: its settings and the corpus files' contents."""
    from strop.data.cache import _file_digest
    from strop.data.sources import resolve

    h = hashlib.sha256()
    settings = cfg.pretrain_tokenizer.model_dump(mode="json")
    settings.pop("save_path", None)
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(str(cfg.sequence_len).encode())
    for ds in cfg.datasets:
        h.update(json.dumps(ds.model_dump(mode="json"), sort_keys=True).encode())
        for source in resolve(ds):
            h.update(source.name.encode())
            h.update(_file_digest(source.path).encode() if source.path else
                     json.dumps([ds.name, ds.split, ds.revision]).encode())
    return h.hexdigest()


def corpus_texts(cfg):
    """The text of every usable row of the training datasets (bad rows are reported later, by
    prepare_data)."""
    from strop.data.formats import RowProblem, make_format
    from strop.data.sources import BadRow, iter_rows

    for ds in cfg.datasets:
        fmt = make_format(ds, cfg, None)
        for _, row in iter_rows(ds):
            if isinstance(row, BadRow):
                continue
            try:
                yield fmt.corpus_text(row)
            except RowProblem:
                continue


def trained_tokenizer(cfg):
    """Train `pretrain_tokenizer` on the corpus and save it, or reuse the saved one when the
    corpus and the settings are unchanged."""
    from transformers import AutoTokenizer

    from strop.model.tokenizer_train import train_tokenizer

    settings = cfg.pretrain_tokenizer
    folder = Path(settings.save_path or Path(cfg.output_dir) / "tokenizer")
    key = _corpus_key(cfg)
    key_file = folder / TRAINED_KEY_FILE
    if key_file.is_file() and json.loads(key_file.read_text()).get("key") == key:
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = train_tokenizer(corpus_texts(cfg), settings, model_max_length=cfg.sequence_len)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    key_file.write_text(json.dumps({"key": key}) + "\n")
    return tokenizer
