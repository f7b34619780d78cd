"""The mask-free training attention gives the same hidden states as transformers' own SDPA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from strop.model.attention import document_spans, padded_length, supports_varlen, varlen_attention


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=100)
    return AutoModelForCausalLM.from_config(config).eval()


def hidden(model, **inputs):
    return model.model(**inputs, use_cache=False).last_hidden_state


def test_document_spans():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert document_spans(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


def test_packed_rows_match_the_block_diagonal_mask(model):
    ids = torch.randint(0, 100, (2, 40))
    pos = torch.cat([torch.arange(15), torch.arange(20), torch.arange(5)])[None].repeat(2, 1)
    pos[1] = torch.arange(40)  # one row holds a single document
    with torch.no_grad():
        want = hidden(model, input_ids=ids, position_ids=pos)
        with varlen_attention(model):
            got = hidden(model, input_ids=ids, position_ids=pos)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # ... and each packed document equals that document run alone.
    with torch.no_grad(), varlen_attention(model):
        alone = hidden(model, input_ids=ids[:1, 15:35])
    torch.testing.assert_close(got[:1, 15:35], alone, rtol=1e-4, atol=1e-5)


def test_right_padded_rows_match_on_real_tokens(model):
    ids = torch.randint(0, 100, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 18:] = 0
    with torch.no_grad():
        want = hidden(model, input_ids=ids, attention_mask=mask)
        with varlen_attention(model):
            got = hidden(model, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)


def test_gradients_match(model):
    ids = torch.randint(0, 100, (1, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    grads = []
    for ctx in (False, True):
        model.zero_grad()
        if ctx:
            with varlen_attention(model):
                hidden(model, input_ids=ids, position_ids=pos).pow(2).sum().backward()
        else:
            hidden(model, input_ids=ids, position_ids=pos).pow(2).sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_the_model_gets_its_own_attention_back(model):
    with varlen_attention(model):
        assert model.config._attn_implementation != "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_only_plain_causal_architectures_use_it(model):
    assert supports_varlen(model.config, 512)
    gpt2 = AutoConfig.for_model("gpt2")
    assert not supports_varlen(gpt2, 512)
    mistral = AutoConfig.for_model("mistral", sliding_window=256)
    assert not supports_varlen(mistral, 512) and supports_varlen(mistral, 256)


def _saved_bytes(model, **inputs) -> int:
    """Bytes autograd keeps for backward (parameters excluded) over one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden(model, **inputs)
    return sum(seen.values())


def test_packed_rows_keep_no_more_for_backward_than_one_document(model):
    # Attention over documents of 96 and 160 tokens must keep what the flash kernel keeps (q, k,
    # v, output, log-sum-exp), not the (H, L, L) probabilities of SDPA's math fallback.
    ids = torch.randint(0, 100, (1, 256))
    packed = torch.cat([torch.arange(96), torch.arange(160)])[None]
    with varlen_attention(model):
        one_document = _saved_bytes(model, input_ids=ids, position_ids=torch.arange(256)[None])
        two_documents = _saved_bytes(model, input_ids=ids, position_ids=packed)
    assert two_documents <= 1.1 * one_document


def test_padded_lengths_take_few_sizes_and_cost_little():
    sizes = {padded_length(n) for n in range(1, 1025)}
    assert len(sizes) == 32 and max(sizes) == 1024
    assert all(0 <= padded_length(n) - n < max(16, n / 8) for n in range(1, 4097))
    assert [padded_length(n) for n in (1, 16, 17, 40, 256, 257, 700, 1000)] == \
        [16, 16, 32, 48, 256, 288, 704, 1024]


def test_training_attention_sees_padded_lengths_only(model, monkeypatch):
    # PyTorch's CPU bf16 attention backward keeps memory for every length it has seen: the
    # lengths it is given must come from a small set, whatever the documents' lengths.
    import strop.model.attention as attention

    seen = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        seen.append(q.shape[2])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    ids = torch.randint(0, 100, (2, 150))
    packed = torch.cat([torch.arange(37), torch.arange(113)])[None].repeat(2, 1)
    with varlen_attention(model):
        hidden(model, input_ids=ids, position_ids=packed)         # packed documents
        hidden(model, input_ids=ids[:, :75], position_ids=torch.arange(75)[None])  # one each
    assert sorted(set(seen)) == [48, 80, 128], seen


def test_packed_attention_under_compile_is_exact_and_does_not_recompile_per_packing():
    """Under torch.compile the packed documents' attention runs eagerly: new document lengths
    in rows of one shape add no graphs, and the results equal the eager ones."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from strop.model.attention import varlen_sdpa_forward

    module = SimpleNamespace(num_key_value_groups=1)

    def attend(q, k, v, pos):
        out, _ = varlen_sdpa_forward(module, q, k, v, None, position_ids=pos)
        return out * 2

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(attend)
    graphs = []
    for lengths in ([16], [3, 13], [7, 9], [10, 6], [2, 5, 9]):  # one document, then packed
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
        out = compiled(q, k, v, pos)
        out.square().sum().backward()
        got = [t.grad for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        want = attend(q, k, v, pos)
        want.square().sum().backward()
        torch.testing.assert_close(out, want)
        for g, t in zip(got, (q, k, v), strict=True):
            torch.testing.assert_close(g, t.grad)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1], graphs  # the first packed row compiled all there is
