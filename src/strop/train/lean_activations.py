"""Training with fewer saved activations: RMSNorm and SwiGLU that keep only what backward needs.

Autograd keeps every intermediate an op asks for. In a Llama-style layer three of them are pure
overhead (measured on the benchmark Llama, LoRA in bf16: 22 KB saved per token per layer
before, 14 KB after):

- RMSNorm upcasts its input to fp32 and `pow`/`mul` save that fp32 copy (2 bytes per element
  more than the input itself, twice per layer); this version saves the input as it came and
  the per-token 1/rms, and computes the gradient from them.
- SwiGLU's `silu(gate) * up` saves silu's output for the product's backward, beside gate and up
  which are saved anyway; this version saves gate and up only and recomputes silu in backward
  (one elementwise op), about an eighth of the layer's saved bytes;
- down_proj keeps its input (the product) for its weight gradient, or its LoRA A's: another
  eighth, which backward rebuilds from gate and up (silu and a multiply) instead.

Forward results are the same ops in the same order as transformers' modules, so outputs are
bitwise equal; gradients are equal up to float rounding (tests compare both). The modules are
swapped in for training only and swapped back after, with the same parameter objects under
the same names, so state_dict keys, checkpoints and saved adapters do not change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from strop.recipe.decide import LEAN_MLPS, LEAN_NORMS, silu_mlp


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)) with x upcast to fp32 for the statistics, as LlamaRMSNorm does."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.float32)
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (xf * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, inv_rms = ctx.saved_tensors
        xhat = x.to(torch.float32) * inv_rms  # (..., H)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0) \
                .to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).to(x.dtype).to(torch.float32)  # as autograd rounds it
            # d/dx of x * r(x), r = mean(x^2)^-1/2: r * (g - xhat * mean(g * xhat))
            grad_x = (inv_rms * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_up = grad_out * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate) \
            if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


@dataclass(frozen=True)
class _Rebuild:
    """Stands for a saved view of SwiGLU's product, which backward rebuilds."""

    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


class LeanRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight  # the same Parameter, under the same name
        self.eps = norm.variance_epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(hidden_states, self.weight, self.eps)


class LeanSwiGLU(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        # The same (maybe LoRA-wrapped) projections under the same names.
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, I) each
        product = _SiluMul.apply(gate, up)

        # down_proj's weight gradient (a trained weight, or its LoRA A) needs its input: instead
        # of keeping `product`, keep a note to rebuild it from gate and up, which _SiluMul
        # keeps anyway. Rebuilding repeats the forward's ops, so it is bitwise the same tensor.
        # What a linear saves is a (B*T, I) view of `product`, so views of its storage are what
        # is rebuilt. Autograd keeps both hooks with each saved tensor, so they must not hold
        # `product` itself. These hooks are the innermost, so inside down_proj they also stand
        # in for any outer ones (gradient checkpointing's): the loop does not use both.
        storage = product.untyped_storage().data_ptr()

        def pack(saved: torch.Tensor):
            if saved.untyped_storage().data_ptr() != storage:
                return saved
            return _Rebuild(saved.shape, saved.stride(), saved.storage_offset())

        def unpack(saved):
            if not isinstance(saved, _Rebuild):
                return saved
            return F.silu(gate).mul_(up).as_strided(saved.shape, saved.stride, saved.offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return self.down_proj(product)


def _lean_version(module: nn.Module, config) -> nn.Module | None:
    name = type(module).__name__
    if name in LEAN_NORMS and hasattr(module, "variance_epsilon"):
        return LeanRMSNorm(module)
    if name in LEAN_MLPS and silu_mlp(config):
        return LeanSwiGLU(module)
    return None


@contextlib.contextmanager
def lean_activations(model: nn.Module):
    """Train `model` (a transformers model, maybe inside PEFT) with the lean modules above in
    place of the ones they reproduce; the originals come back on exit. Yields how many were
    swapped (0 for architectures it does not know)."""
    config = getattr(model, "config", None)
    swaps = []  # (parent, attribute, original)
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            lean = _lean_version(child, config)
            if lean is not None:
                swaps.append((parent, attr, child))
                setattr(parent, attr, lean)
    try:
        yield len(swaps)
    finally:
        for parent, attr, original in reversed(swaps):
            setattr(parent, attr, original)
