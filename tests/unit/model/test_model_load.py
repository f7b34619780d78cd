"""load_model: pretrained directories, models from scratch, added tokens, attention fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import TINY_SIZES, make_tokenizer
from strop.config import load_dict
from strop.errors import StropError
from strop.model.load import load_model, resize_embeddings

DATA = [{"path": "d.jsonl", "type": "alpaca"}]


def cfg_of(**kw):
    return load_dict({"datasets": DATA, "learning_rate": 1e-4, "bf16": False, **kw}).cfg


def scratch_cfg(family, **kw):
    sizes = dict(n_embd=64, n_layer=2, n_head=4) if family == "gpt2" else \
        {k: v for k, v in TINY_SIZES.items() if family != "bert" or k != "num_key_value_heads"}
    model_config = kw.pop("model_config", {"model_type": family, **sizes})
    return cfg_of(model_config=model_config, pretrain_tokenizer={"type": "bpe"},
                  **({"objective": "masked_lm"} if family == "bert" else {}), **kw)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_pretrained_directory_loads_its_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_dir("llama")
    model = load_model(cfg_of(base_model=str(base)), AutoTokenizer.from_pretrained(base))
    plain = AutoModelForCausalLM.from_pretrained(base)
    for (name, got), want in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("scratch", [False, True])
def test_a_skeleton_is_the_same_model_on_the_meta_device(tiny_model_dir, tok, scratch):
    # what the ranks other than 0 build under fsdp_config.cpu_ram_efficient_loading
    from transformers import AutoTokenizer

    if scratch:
        cfg, tokenizer = scratch_cfg("llama"), tok
    else:
        base = tiny_model_dir("llama")
        cfg, tokenizer = cfg_of(base_model=str(base)), AutoTokenizer.from_pretrained(base)
    real = load_model(cfg, tokenizer, dtype=torch.bfloat16)
    skeleton = load_model(cfg, tokenizer, dtype=torch.bfloat16, skeleton=True)
    assert type(skeleton) is type(real)
    shapes = {n: (p.shape, p.dtype) for n, p in real.named_parameters()}
    assert {n: (p.shape, p.dtype) for n, p in skeleton.named_parameters()} == shapes
    assert all(p.is_meta for p in skeleton.parameters())
    assert all(b.is_meta for b in skeleton.buffers())


def test_masked_lm_objective_and_model_type_pick_the_class(tiny_model_dir):
    from transformers import AutoTokenizer

    bert = tiny_model_dir("bert")
    model = load_model(cfg_of(base_model=str(bert), objective="masked_lm"),
                       AutoTokenizer.from_pretrained(bert))
    assert type(model).__name__ == "BertForMaskedLM"
    llama = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(llama)
    model = load_model(cfg_of(base_model=str(llama), model_type="LlamaForCausalLM"), tok)
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(StropError, match="did you mean LlamaForCausalLM"):
        load_model(cfg_of(base_model=str(llama), model_type="LlamaForCausalLm2"), tok)


def test_hub_id_offline_is_one_line_naming_the_id_and_the_fix(tok):
    with pytest.raises(StropError) as err:
        load_model(cfg_of(base_model="strop-test/no-such-model"), tok)
    message = str(err.value)
    assert "strop-test/no-such-model" in message and "local directory" in message
    assert "\n" not in message
    with pytest.raises(StropError, match="does not exist"):
        load_model(cfg_of(base_model="./no/such/dir"), tok)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_from_scratch_sizes_vocab_to_tokenizer_and_is_seeded(family, tok):
    if family == "bert":
        tok = make_tokenizer("wordpiece")
    model = load_model(scratch_cfg(family), tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    torch.rand(1000)  # randomness consumed before loading must not change the initialisation
    again = load_model(scratch_cfg(family), tok)
    other = load_model(scratch_cfg(family, seed=7), tok)
    weights = [m.get_input_embeddings().weight for m in (model, again, other)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_weights_dtype_is_the_callers_choice(tiny_model_dir):
    from transformers import AutoTokenizer

    base = tiny_model_dir("llama")
    model = load_model(cfg_of(base_model=str(base)), AutoTokenizer.from_pretrained(base), "cpu",
                       torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_added_tokens_grow_embeddings_with_mean_rows(tiny_model_dir):
    from transformers import AutoTokenizer

    base = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(base)
    before = len(tok)
    tok.add_tokens(["<tool>", "</tool>"])
    model = load_model(cfg_of(base_model=str(base)), tok)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert embed.shape[0] == head.shape[0] == before + 2 == model.config.vocab_size
    for weight in (embed, head):
        assert torch.allclose(weight[before], weight[:before].mean(0), atol=1e-6)
        assert torch.equal(weight[before], weight[before + 1])
    assert resize_embeddings(model, before) == 0  # never shrinks


def test_tokens_added_under_lora_warn_unless_embeddings_are_trained(tiny_model_dir):
    from transformers import AutoTokenizer

    base = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<tool>"])
    lora = dict(base_model=str(base), adapter="lora", lora_target_linear=True)
    with pytest.warns(UserWarning, match="embed_tokens and lm_head to lora_modules_to_save"):
        load_model(cfg_of(**lora), tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(cfg_of(**lora, lora_modules_to_save=["embed_tokens", "lm_head"]), tok)


def test_unavailable_attention_falls_back_to_sdpa_with_one_line(tiny_model_dir):
    from transformers import AutoTokenizer

    base = tiny_model_dir("llama")
    with pytest.warns(UserWarning) as caught:
        model = load_model(cfg_of(base_model=str(base), attn_implementation="flash_attention_2"),
                           AutoTokenizer.from_pretrained(base), "cpu")
    assert model.config._attn_implementation == "sdpa"
    message = str(caught[0].message)
    assert "flash_attention_2" in message and "sdpa" in message and "\n" not in message
    eager = load_model(cfg_of(base_model=str(base), attn_implementation="eager"),
                       AutoTokenizer.from_pretrained(base))
    assert eager.config._attn_implementation == "eager"


def test_architecture_without_the_kernel_falls_back(tok):
    # GPT-2 has no flex attention path in transformers; strop says so and uses sdpa.
    from strop.model.load import _with_attention_fallback, build_from_scratch

    cfg = scratch_cfg("gpt2")
    with pytest.warns(UserWarning, match="does not support attention flex_attention; using sdpa"):
        model = _with_attention_fallback(
            lambda impl: build_from_scratch(cfg, tok, torch.float32, impl), "flex_attention")
    assert model.config._attn_implementation == "sdpa"


def test_load_in_4bit_quantizes_linears_and_keeps_them_trainable(tiny_model_dir):
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    base = tiny_model_dir("llama")
    cfg = cfg_of(base_model=str(base), adapter="qlora", load_in_4bit=True, lora_target_linear=True)
    model = load_model(cfg, AutoTokenizer.from_pretrained(base), "cpu", torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 per block; the output head stays in full precision
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
    assert layers[0].weight.quant_type == "nf4"


def test_model_config_vocab_smaller_than_the_tokenizer_grows_with_a_warning(tok):
    with pytest.warns(UserWarning, match="vocab_size 100 is smaller than the tokenizer's"):
        model = load_model(scratch_cfg("llama", model_config={
            "model_type": "llama", **TINY_SIZES, "vocab_size": 100}), tok)
    assert model.config.vocab_size == len(tok)
    padded = load_model(scratch_cfg("llama", model_config={
        "model_type": "llama", **TINY_SIZES, "vocab_size": 1024}), tok)
    assert padded.config.vocab_size == 1024  # a padded vocabulary is kept
