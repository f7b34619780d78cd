"""GGUF for llama.cpp, written with the gguf package's GGUFWriter (architecture "llama").

Layout follows llama.cpp's own HF converter (convert_hf_to_gguf.py, LlamaModel):
- hyperparameters under llama.*; the tokenizer as a GPT-2 style BPE vocabulary (tokens, token
  types, merges) with its BOS/EOS/PAD ids and chat template;
- tensors under llama.cpp names (token_embd, blk.N.attn_q, ..., output);
- q_proj / k_proj rows permuted: HF stores each head's rotary pairs as two halves
  (rotate_half), GGML's rope rotates adjacent pairs, so rows (h, 2, d/2) become (h, d/2, 2).
Norms stay f32; matrices are f16 or q8_0 (gguf.quants).

Verification reads the file back (GGUFReader), dequantizes, undoes the permutation and compares
every tensor with the source state dict.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from strop.errors import StropError

SUPPORTED_FAMILIES = ("llama",)
QUANTS = ("f16", "q8_0")

# HF name inside layer N -> llama.cpp name inside blk.N
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


# ------------------------------------------------------------------------------ rotary layout


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half layout -> GGML adjacent-pair layout, per head: (h, 2, d/2) -> (h, d/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]) \
        .swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]) \
        .swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------ mapping


def check_family(config: Any) -> None:
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise StropError(f"GGUF export supports the {', '.join(SUPPORTED_FAMILIES)} family; this "
                         f"model is {family!r}. Export it as a Hugging Face directory with "
                         "--format hf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise StropError("GGUF export: this llama model has attention or MLP biases, which "
                         "strop's llama writer does not map; use --format hf")
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ("default", None):
        raise StropError(f"GGUF export: rope_scaling {kind!r} is not supported by strop's llama "
                         "writer yet; use --format hf")


def gguf_name(hf_name: str) -> str | None:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and parts[2].isdigit():
        inner = ".".join(parts[3:])
        if inner in LAYER_NAMES:
            return f"blk.{parts[2]}.{LAYER_NAMES[inner]}"
    return None


def _heads(config: Any) -> tuple[int, int, int]:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return n_head, n_kv, head_dim


def gguf_tensors(state_dict: dict[str, Any], config: Any) -> dict[str, tuple[str, np.ndarray]]:
    """llama.cpp name -> (HF name, fp32 array as the file should hold it, permuted)."""
    n_head, n_kv, _ = _heads(config)
    out = {}
    for hf, tensor in state_dict.items():
        name = gguf_name(hf)
        if name is None:
            if hf.endswith("rotary_emb.inv_freq"):
                continue  # recomputed by llama.cpp from rope.freq_base
            raise StropError(f"GGUF export: no llama.cpp name for tensor {hf}; use --format hf")
        array = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            array = permute(array, n_head)
        elif name.endswith("attn_k.weight"):
            array = permute(array, n_kv)
        out[name] = (hf, array)
    if "output.weight" in out and getattr(config, "tie_word_embeddings", False):
        del out["output.weight"]  # llama.cpp reuses token_embd when output is absent
    return out


# ---------------------------------------------------------------------------------- tokenizer


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    notes: list[str] = field(default_factory=list)


def bpe_vocab(tokenizer: Any, vocab_rows: int) -> Vocab:
    """The tokenizer as llama.cpp's "gpt2" BPE model, padded to the embedding's rows."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise StropError("GGUF export needs a fast (tokenizer.json) tokenizer")
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise StropError(f"GGUF export: strop writes byte-level BPE tokenizers; this one is "
                         f"{model.get('type')!r}")
    notes = []
    pre = data.get("pre_tokenizer") or {}
    kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", [])]
    if "ByteLevel" in kinds and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        pre_name = "gpt-2"  # the GPT-2 split regex that ByteLevel(use_regex=True) uses
    else:
        pre_name = "default"
        notes.append(f"the pre-tokenizer ({pre.get('type')}) has no exact llama.cpp match; wrote "
                     "'default', so llama.cpp may split text differently")
    vocab = tokenizer.get_vocab()
    size = max(vocab_rows, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = gguf.TokenType.NORMAL
    for index, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if index < size:
            tokens[index] = added.content
            types[index] = gguf.TokenType.CONTROL if added.special else \
                gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab(tokens, [int(t) for t in types], merges, pre_name, notes)


def adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


# ------------------------------------------------------------------------------------- write


def write_gguf(model: Any, tokenizer: Any, path: Path, quant: str = "f16",
               name: str = "strop-export") -> list[str]:
    """Write a llama GGUF; returns notes for the user."""
    import gguf

    if quant not in QUANTS:
        raise StropError(f"--quant {quant}: choose {' or '.join(QUANTS)}")
    config = model.config
    check_family(config)
    n_head, n_kv, head_dim = _heads(config)
    tensors = gguf_tensors(model.state_dict(), config)
    vocab = bpe_vocab(tokenizer, tensors["token_embd.weight"][1].shape[0])

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = getattr(config, "rope_theta", None) or \
        (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(len(vocab.tokens))
    file_type = gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for key, adder in (("bos_token_id", writer.add_bos_token_id),
                       ("eos_token_id", writer.add_eos_token_id),
                       ("pad_token_id", writer.add_pad_token_id),
                       ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            adder(int(value))
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

    for gname, (_, array) in tensors.items():
        qtype = _tensor_type(array, quant)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gname, array.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vocab.notes


def _tensor_type(array: np.ndarray, quant: str):
    import gguf

    if array.ndim == 1:
        return gguf.GGMLQuantizationType.F32  # norms: tiny, and precision-sensitive
    if quant == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[
            gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


# ------------------------------------------------------------------------------------ verify


@dataclass
class TensorCheck:
    name: str
    kind: str
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class Verification:
    checks: list[TensorCheck]
    missing: list[str]
    # HF name -> the values the file holds (dequantized, un-permuted): what llama.cpp computes
    # with, so the parity check runs PyTorch on the same numbers.
    written: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        return not self.missing and all(c.passed for c in self.checks)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=0.0)

    def failures(self) -> list[str]:
        return [f"{c.name} ({c.kind}): max |diff| {c.max_abs_diff:.3g} > tolerance "
                f"{c.tolerance:.3g}" for c in self.checks if not c.passed] + \
            [f"{name}: missing from the file" for name in self.missing]


def tolerance(kind: str, source: np.ndarray) -> float:
    """How far a faithful round trip may move a value: f16 rounds to 11 significant bits;
    q8_0 rounds to steps of (block max / 127), with an f16 scale."""
    amax = float(np.abs(source).max()) if source.size else 0.0
    if kind == "F32":
        return 1e-6 * max(amax, 1.0)
    if kind == "F16":
        return amax * 2.0 ** -10 + 1e-7
    return amax / 127.0 + amax * 2.0 ** -10 + 1e-7  # Q8_0: half a step is amax/254 at most


def read_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a GGUF file, dequantized to fp32 in row-major (HF) shape."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, np.asarray(values, dtype=np.float32).reshape(shape))
    return out


def verify_gguf(path: Path, state_dict: dict[str, Any], config: Any) -> Verification:
    n_head, n_kv, _ = _heads(config)
    written = read_tensors(path)
    expected = gguf_tensors(state_dict, config)
    checks, missing, as_written = [], [], {}
    for gname, (hf, _) in expected.items():
        if gname not in written:
            missing.append(gname)
            continue
        kind, array = written[gname]
        if gname.endswith("attn_q.weight"):
            array = unpermute(array, n_head)
        elif gname.endswith("attn_k.weight"):
            array = unpermute(array, n_kv)
        source = state_dict[hf].detach().float().cpu().numpy()
        as_written[hf] = array
        if array.shape != source.shape:
            checks.append(TensorCheck(gname, kind, float("inf"), 0.0))
            continue
        diff = float(np.abs(array - source).max()) if source.size else 0.0
        checks.append(TensorCheck(gname, kind, diff, tolerance(kind, source)))
    return Verification(checks, missing, as_written)


# ------------------------------------------------------------------------- llama.cpp parity


PROBES = ("The quick brown fox jumps over the lazy dog.",
          "Below is an instruction that describes a task.\n\n### Instruction:\nName a river.")


def llama_cpp_parity(path: Path, model: Any, tokenizer: Any,
                     written: dict[str, np.ndarray] | None = None) -> dict[str, Any] | None:
    """Next-token logits and greedy tokens of llama.cpp (llama-cpp-python) against PyTorch on
    the same token ids; None when llama_cpp is not installed.

    With `written` (Verification.written), PyTorch runs on the weights as the file holds them
    (rounded to f16 or q8_0): the comparison is then of the two runtimes on the same numbers,
    and the rounding, checked tensor by tensor already, does not add up over the layers into the
    logit difference (on SmolLM2-135M, 30 layers, f16 rounding alone moves logits by ~0.1)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import torch

    with _weights(model, written or {}):
        return _parity(path, model, tokenizer, Llama, torch)


@contextlib.contextmanager
def _weights(model: Any, values: dict[str, np.ndarray]):
    """The model with `values` in place of its weights, put back afterwards."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    originals = {}
    try:
        for name, array in values.items():
            param = params.get(name)
            if param is None or tuple(param.shape) != array.shape:
                continue
            originals[name] = param.data
            param.data = torch.from_numpy(np.array(array)).to(param.dtype)
        yield model
    finally:
        for name, data in originals.items():
            params[name].data = data


def _parity(path: Path, model: Any, tokenizer: Any, Llama: Any, torch: Any) -> dict[str, Any]:
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                seed=0)
    worst, agree, total, tokenized_same = 0.0, 0, 0, 0
    scale, kl_sum = 0.0, 0.0
    for text in PROBES:
        ids = tokenizer(text)["input_ids"][:200]
        cpp_ids = llm.tokenize(text.encode(), add_bos=adds_bos(tokenizer), special=True)
        tokenized_same += int(cpp_ids == ids)
        llm.reset()
        llm.eval(ids)
        cpp = np.asarray(llm.scores[:len(ids)], dtype=np.float32)  # (T, V)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # (T, V)
        cpp = cpp[:, :ref.shape[1]]
        worst = max(worst, float(np.abs(cpp - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        agree += int((cpp.argmax(-1) == ref.argmax(-1)).sum())
        kl_sum += float(_kl(ref, cpp).sum())
        total += len(ids)
    return {"max_abs_logit_diff": worst, "logit_scale": scale, "greedy_agreement": agree / total,
            "mean_kl": kl_sum / total, "positions": total,
            "same_tokenization": f"{tokenized_same}/{len(PROBES)}"}


def _kl(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(other)) per position, in nats: (T, V) -> (T,)."""
    log_p = ref - ref.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = other - other.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)
