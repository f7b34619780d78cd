"""The sizes of a transformer that the math needs, read from its config.json.

One small dataclass so the formulas in `strop.recipe.math` take plain numbers, not a
PretrainedConfig with family-specific spellings (GPT-2's n_embd, BERT's missing kv heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Families whose MLP has two input projections (gate and up) and one output projection.
_GATED_MLP = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
              "gemma", "gemma2", "gemma3_text", "gemma3", "olmo", "olmo2", "granite", "cohere",
              "starcoder2_gated", "deepseek_v3", "smollm3", "exaone4"}


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder (or encoder) stack; every length is in elements, not bytes."""

    hidden: int            # d: width of the residual stream
    layers: int            # L
    heads: int             # h: query heads
    kv_heads: int          # g: key/value heads (GQA/MQA when < h)
    head_dim: int          # per-head width; q_dim = h * head_dim need not equal d (Gemma)
    intermediate: int      # I: MLP width (per expert for mixture-of-experts)
    vocab: int             # V
    gated_mlp: bool        # SwiGLU/GeGLU (3 matrices) rather than a plain 2-matrix MLP
    tied_embeddings: bool  # lm_head shares the embedding matrix
    experts: int = 1       # experts per MoE layer (1 = dense)
    experts_per_token: int = 1

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def attention_matmul_params(self) -> int:
        """Weights of q, k, v and o per layer (biases are too small to matter for FLOPs)."""
        return self.hidden * (2 * self.q_dim + 2 * self.kv_dim)

    @property
    def mlp_matmul_params(self) -> int:
        """MLP weights per layer that one token multiplies through (active experts only)."""
        per_expert = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        router = self.hidden * self.experts if self.experts > 1 else 0
        return per_expert * self.experts_per_token + router

    @property
    def matmul_params_per_token(self) -> int:
        """N in '6N': weights a token multiplies through, the output head included (a tied
        head still costs its matmul); the embedding lookup is not a matmul."""
        layer = self.attention_matmul_params + self.mlp_matmul_params
        return self.layers * layer + self.vocab * self.hidden


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_shape(hf_config: Any) -> ModelShape:
    """ModelShape from a transformers PretrainedConfig (a text_config is used when present)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    hidden = int(_get(text, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(text, "num_attention_heads", "n_head", "num_heads"))
    kv_heads = int(_get(text, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_get(text, "head_dim", default=hidden // heads))
    experts = int(_get(text, "num_local_experts", "num_experts", "n_routed_experts", default=1))
    # Qwen-MoE style configs give the per-expert width separately; Mixtral reuses intermediate.
    names = ("moe_intermediate_size",) if experts > 1 else ()
    intermediate = _get(text, *names, "intermediate_size", "n_inner", "ffn_dim")
    model_type = getattr(text, "model_type", "")
    return ModelShape(
        hidden=hidden,
        layers=int(_get(text, "num_hidden_layers", "n_layer", "num_layers")),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=int(intermediate or 4 * hidden),
        vocab=int(_get(text, "vocab_size", default=_get(hf_config, "vocab_size"))),
        gated_mlp=model_type in _GATED_MLP or experts > 1,
        tied_embeddings=bool(_get(hf_config, "tie_word_embeddings", default=False)),
        experts=max(experts, 1),
        experts_per_token=int(_get(text, "num_experts_per_tok", "moe_topk", default=1))
        if experts > 1 else 1,
    )
