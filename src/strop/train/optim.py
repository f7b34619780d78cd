"""Optimizers by the names axolotl and Hugging Face TrainingArguments use.

Parameter groups: weight decay only on matrices, never on biases, norm scales or other 1-D
parameters; LoRA+ gives the B matrices `loraplus_lr_ratio` times the learning rate of the A
matrices (and embedding adapters their own small rate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from strop.config.schema import StropConfig


@dataclass(frozen=True)
class Group:
    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # 1-D tensors are biases and norm scales; decaying them hurts and is never intended.
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: nn.Module, cfg: StropConfig) -> list[Group]:
    """Trainable parameters split by (learning rate, weight decay)."""
    lr = cfg.learning_rate
    buckets: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if _is_no_decay(name, param) else cfg.weight_decay
        group_lr, kind = lr, "decay" if decay else "no_decay"
        if cfg.loraplus_lr_ratio and cfg.uses_lora:
            if "lora_embedding_B" in name:
                group_lr, kind = cfg.loraplus_lr_embedding or 1e-6, f"{kind}_lora_embedding_B"
            elif "lora_B" in name:
                group_lr, kind = lr * cfg.loraplus_lr_ratio, f"{kind}_lora_B"
        buckets.setdefault((kind, group_lr, decay), []).append(param)
    return [Group(kind, params, group_lr, decay)
            for (kind, group_lr, decay), params in buckets.items()]


def _torch_groups(groups: Iterable[Group]) -> list[dict]:
    return [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name}
            for g in groups]


def _adamw(fused: bool) -> Callable:
    def build(groups, cfg: StropConfig, device: str):
        # fused AdamW runs on CUDA and (since torch 2.4) on CPU; it needs floating params on
        # one device, which the loop guarantees.
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, fused=fused or None)
    return build


def _sgd(groups, cfg: StropConfig, device: str):
    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.sgd_momentum,
                           nesterov=cfg.sgd_nesterov)


def _bnb(class_name: str) -> Callable:
    def build(groups, cfg: StropConfig, device: str):
        import bitsandbytes as bnb

        cls = getattr(bnb.optim, class_name)
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        if class_name.startswith("Lion"):
            return cls(groups, lr=cfg.learning_rate, betas=betas)
        return cls(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon)
    return build


def _adafactor(groups, cfg: StropConfig, device: str):
    from transformers.optimization import Adafactor

    # A fixed learning rate from the config (not Adafactor's relative step), as HF's Trainer
    # does for optim=adafactor.
    return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False,
                     warmup_init=False)


OPTIMIZERS: dict[str, Callable] = {
    "sgd": _sgd,
    "adamw_torch": _adamw(fused=False),
    "adamw_torch_fused": _adamw(fused=True),
    "adamw_bnb_8bit": _bnb("AdamW8bit"),
    "adamw_8bit": _bnb("AdamW8bit"),
    "paged_adamw_8bit": _bnb("PagedAdamW8bit"),
    "paged_adamw_32bit": _bnb("PagedAdamW32bit"),
    "lion_8bit": _bnb("Lion8bit"),
    "adafactor": _adafactor,
}


def build_optimizer(model: nn.Module, cfg: StropConfig, device: str) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not groups:
        from strop.errors import StropError

        raise StropError("nothing to train: every parameter is frozen; check adapter and "
                         "lora_target_modules")
    return OPTIMIZERS[cfg.optimizer](_torch_groups(groups), cfg, device)
