"""4-bit and 8-bit loading through bitsandbytes, and preparing a quantized model for training.

Quantization is one step and LoRA another (QLoRA is both): this module only turns the config's
load_in_4bit / load_in_8bit / bnb_4bit_* keys into transformers' BitsAndBytesConfig and makes a
loaded quantized model safe to train adapters on.

One bitsandbytes behaviour is worked around here, and only here (see
`keep_4bit_weights_trainable`): on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit
layer's weights into an inference-only layout the first time the layer runs in eval mode without
gradients, and every later backward pass through a repacked layer drops the gradient of the
frozen base path (the packed matmul has no autograd formula), so LoRA gradients come out wrong
after the first evaluation. tests/unit/model/test_quantize.py measures it and fails once
bitsandbytes no longer needs the workaround.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from strop.errors import StropError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn
    from transformers import BitsAndBytesConfig

    from strop.config.schema import StropConfig

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class _DropOptionalKernelNotice(logging.Filter):
    """bitsandbytes' CPU backend asks the `kernels` package (a dependency of transformers) for
    a faster kernel from the hub when it is imported (by strop, transformers or PEFT), for its
    inference-only repacked layout. Offline, two loggers then warn about it: bitsandbytes that
    the kernel failed to load, and kernels (0.19 and later) that it skipped its publisher trust
    check. strop never runs that layout (keep_4bit_weights_trainable turns it off), so neither
    notice says anything a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _KERNEL_REPO not in record.getMessage()


_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
_NOTICE_FILTER = _DropOptionalKernelNotice()
# The loggers that speak of it: bitsandbytes 0.50's CPU ops, and kernels 0.19's hub access.
_NOTICE_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def quiet_bitsandbytes_notice() -> None:
    """Drop those notices from whichever import of bitsandbytes comes first (idempotent)."""
    for name in _NOTICE_LOGGERS:
        logger = logging.getLogger(name)
        if _NOTICE_FILTER not in logger.filters:
            logger.addFilter(_NOTICE_FILTER)


def import_bitsandbytes():
    """`import bitsandbytes`, without its notice about the optional `kernels` package."""
    quiet_bitsandbytes_notice()
    try:
        import bitsandbytes
    except ImportError as err:  # a dependency of strop; missing only in a broken install
        raise StropError(f"load_in_4bit / load_in_8bit need bitsandbytes ({err}); "
                         "pip install 'bitsandbytes>=0.50.2,<0.51'") from None
    return bitsandbytes


def compute_dtype(cfg: StropConfig, device: str) -> torch.dtype:
    """dtype of the 4-bit matmuls: bnb_4bit_compute_dtype, else what the run computes in
    (strop.precision: bf16 where the config asks and the device has it, fp16 for an
    fp16 run on a GPU, else fp32)."""
    import torch

    from strop.device import detect
    from strop.precision import decide_precision

    explicit = cfg.bnb_4bit["bnb_4bit_compute_dtype"]
    if explicit:
        return getattr(torch, _DTYPES[explicit])
    caps = detect()
    return decide_precision(cfg, caps, caps.resolve(device)).compute


def bnb_config(cfg: StropConfig, device: str) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for load_in_4bit / load_in_8bit; None when neither."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    settings = cfg.bnb_4bit
    extra: dict[str, Any] = {}
    if settings["bnb_4bit_quant_storage"]:
        import torch

        storage = settings["bnb_4bit_quant_storage"]
        extra["bnb_4bit_quant_storage"] = torch.uint8 if storage == "uint8" else \
            getattr(torch, _DTYPES[storage])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=settings["bnb_4bit_use_double_quant"],
        bnb_4bit_compute_dtype=compute_dtype(cfg, device),
        **extra,
    )


def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters as the model has them, a bitsandbytes 4-bit weight counted by its logical
    shape (its storage packs two values per byte)."""
    import math

    total = 0
    for param in model.parameters():
        if trainable_only and not param.requires_grad:
            continue
        state = getattr(param, "quant_state", None)
        if param.__class__.__name__ == "Params4bit" and state is not None:
            total += math.prod(state.shape)
        else:
            total += param.numel()
    return total


def quantized_linear_layers(model: nn.Module) -> list[nn.Module]:
    """Every bitsandbytes 4-bit or 8-bit linear layer of the model."""
    if "bitsandbytes" not in sys.modules:
        return []  # nothing can be quantized if bitsandbytes was never imported
    bnb = import_bitsandbytes()
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [m for m in model.modules() if isinstance(m, kinds)]


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_linear_layers(model))


def keep_4bit_weights_trainable(model: nn.Module) -> int:
    """Keep every 4-bit layer in the layout its backward pass understands; returns their count.

    Why: a bitsandbytes 0.50 Linear4bit on a CPU with AVX512-BF16 repacks its weights for a fast
    inference kernel the first time it runs in eval mode on an input without gradients (an
    evaluation pass). After that, training forwards take the packed path too, whose op has no
    autograd formula: the base layer's contribution to the input gradient is silently dropped,
    and LoRA gradients of every earlier layer come out wrong (measured: up to 98% off after one
    eval pass on a tiny Llama). The repack also rounds the block scales to bf16 (weights move by
    up to 0.8% of their range) and asserts on layers whose output size is not a multiple of 32.

    The layer decides from its own `support_avx512bf16_for_cpu` flag, which bitsandbytes sets from
    the CPU's features; clearing it keeps the regular dequantize-and-matmul path, which is exact
    in both directions. Evaluation costs a little more (about 15% on a 30M Llama in fp32), which
    is cheap next to silently wrong training.
    """
    if "bitsandbytes" not in sys.modules:
        return 0
    bnb = import_bitsandbytes()
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, ...: matched by name because every
    # architecture defines its own RMSNorm class.
    return "norm" in type(module).__name__.lower()


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Freeze the quantized base and keep its norms in fp32 before adapters are added.

    PEFT's prepare_model_for_kbit_training does this too, but it also casts every other bf16
    parameter to fp32, embeddings and output head included (a 4k x 128k head alone is 2 GiB in
    fp32), which undoes much of what QLoRA saves; strop casts only the norms, whose small
    weights matter for stability. With gradient checkpointing, the embeddings' output is made
    to require gradients: every base weight is frozen, so a reentrant checkpointed block would
    otherwise see no input that needs a gradient and skip the backward pass through its LoRA
    weights. (transformers 5's gradient_checkpointing_enable does the same; doing it here keeps
    the preparation complete whatever turns checkpointing on.)
    """
    import torch

    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if _is_norm(module):
            for param in module.parameters(recurse=False):
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
    keep_4bit_weights_trainable(model)
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model
