"""The q/k permutation makes GGML's rope (adjacent pairs) equal HF's (rotate_half)."""

import numpy as np

from strop.export.gguf_llama import gguf_name, permute, unpermute


def rope_hf(q: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """(heads, d): HF llama rotary: halves rotated together (rotate_half)."""
    d = q.shape[-1]
    freqs = pos * theta ** (-np.arange(0, d, 2) / d)          # (d/2,)
    cos, sin = np.cos(np.concatenate([freqs, freqs])), np.sin(np.concatenate([freqs, freqs]))
    rotated = np.concatenate([-q[..., d // 2:], q[..., :d // 2]], axis=-1)
    return q * cos + rotated * sin


def rope_ggml(q: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """(heads, d): GGML's normal rope: adjacent pairs (x[2i], x[2i+1]) rotated by theta_i."""
    d = q.shape[-1]
    freqs = pos * theta ** (-np.arange(0, d, 2) / d)
    x0, x1 = q[..., 0::2], q[..., 1::2]
    out = np.empty_like(q)
    out[..., 0::2] = x0 * np.cos(freqs) - x1 * np.sin(freqs)
    out[..., 1::2] = x0 * np.sin(freqs) + x1 * np.cos(freqs)
    return out


def test_permuted_weights_under_ggml_rope_equal_hf_rope():
    rng = np.random.default_rng(0)
    heads, d, hidden = 4, 16, 32
    w = rng.standard_normal((heads * d, hidden)).astype(np.float64)  # q_proj (out, in)
    h = rng.standard_normal(hidden)
    for pos in (0, 1, 7, 100):
        hf = rope_hf((w @ h).reshape(heads, d), pos)
        ggml = rope_ggml((permute(w, heads) @ h).reshape(heads, d), pos)
        # Same attention scores need the same vectors up to the fixed per-head reordering.
        np.testing.assert_allclose(permute(hf.reshape(-1, 1), heads).reshape(heads, d), ggml,
                                   atol=1e-10)


def test_unpermute_inverts_permute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute(permute(w, 8), 8), w)
    assert not np.array_equal(permute(w, 8), w)


def test_names():
    assert gguf_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
