"""Settings that make training faster without changing its result, for the length of a run."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from strop.train.forward import unwrap

if TYPE_CHECKING:
    from strop.train.run import Run


def training_speedups(run: Run) -> contextlib.ExitStack:
    """Settings that make training faster without changing its result, undone afterwards so
    the saved model and later generation see the model as loaded."""
    from strop.model.attention import varlen_attention
    from strop.train import lean_activations

    stack = contextlib.ExitStack()
    hf = unwrap(run.model)
    if run.decisions.varlen:
        stack.enter_context(varlen_attention(hf))
    if run.decisions.lean:
        stack.enter_context(lean_activations.lean_activations(hf))
    if run.precision.device == "cuda" and run.cfg.tf32 in (True, "auto"):
        stack.enter_context(_tf32())
    if run.cfg.uses_lora and run.precision.compute != torch.float32:
        # PEFT casts each LoRA input to the adapter's fp32 and autocast casts it back to bf16
        # for the matmul: two copies of every activation for nothing under autocast.
        from peft.helpers import disable_input_dtype_casting

        stack.enter_context(disable_input_dtype_casting(run.model))
    return stack


@contextlib.contextmanager
def _tf32():
    """TF32 matmuls for the run, the process's previous setting back afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
