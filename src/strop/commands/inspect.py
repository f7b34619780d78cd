"""`strop inspect`: what a model is made of, read from its config.json on the meta device.

No weights are loaded, so a 70B model inspects in a second on a laptop. Given a strop YAML
config, it also counts what LoRA would train at the config's rank and targets, with the same
PEFT wrapping training uses, so the numbers match the run's report exactly.
"""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strop.errors import StropError

if TYPE_CHECKING:
    import torch.nn as nn
    from transformers import PretrainedConfig

    from strop.config.schema import StropConfig

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class TensorGroup:
    """state_dict keys that differ only by layer index: model.layers.{0-31}.mlp.up_proj.weight."""

    name: str
    module_type: str
    shape: list[int]
    count: int
    params: int  # all of them together
    tied_to: str | None = None  # the same tensor as another key (tied embeddings)


@dataclass
class LinearGroup:
    suffix: str
    count: int
    in_features: int
    out_features: int
    module_type: str
    output_head: bool = False


@dataclass
class LoraEstimate:
    method: str
    r: int
    alpha: float
    targets: dict[str, int]  # suffix -> modules wrapped
    modules_to_save: list[str]
    trainable_params: int
    ratio_to_full: float  # trainable / parameters full fine-tuning would train


@dataclass
class Inspection:
    source: str
    architecture: str
    model_type: str
    dtype: str
    hidden_size: int | None
    num_layers: int | None
    vocab_size: int | None
    total_params: int
    params_by_module_type: dict[str, int]
    tensors: list[TensorGroup]
    linear_layers: list[LinearGroup]
    suggested_target_modules: list[str]
    lora: LoraEstimate | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ reading


def inspect_target(target: str | Path, every_layer: bool = False,
                   lora_rank_hint: int = 16) -> Inspection:
    """Inspect a model directory, a config.json, a hub id or a strop YAML config; every_layer
    lists each layer's keys instead of one line per key pattern."""
    from strop.model.meta import config_from_source, resolve_model_config

    text = str(target)
    path = Path(text).expanduser()
    cfg: StropConfig | None = None
    if path.suffix in (".yml", ".yaml"):
        from strop.config import load_config

        cfg = load_config(path).cfg
        hf_config = resolve_model_config(cfg)
    else:
        if path.suffix == ".json" and not path.exists():
            raise StropError(f"{text}: no such file; give a model directory, a config.json, a hub "
                             "id or a strop YAML config")
        hf_config = config_from_source(text)
    objective = cfg.objective if cfg else _objective_of(hf_config)
    model = _meta_model(hf_config, objective)
    result = describe(model, hf_config, text, every_layer)
    if cfg is not None and cfg.from_scratch:
        result.notes.append("a model built from scratch: its vocabulary is sized to the tokenizer "
                            "when training starts, so the embedding counts above may change")
    if cfg is not None and cfg.uses_lora:
        result.lora = lora_estimate(model, cfg)
    else:
        full = result.total_params
        per_rank = sum(g.count * (g.in_features + g.out_features)
                       for g in result.linear_layers if not g.output_head)
        if full and per_rank:
            result.notes.append(
                f"LoRA r={lora_rank_hint} on every linear layer (lora_target_linear: true) would "
                f"train {lora_rank_hint * per_rank:,} parameters, "
                f"{100 * lora_rank_hint * per_rank / full:.2f}% of full fine-tuning")
    return result


def _objective_of(hf_config: PretrainedConfig) -> str:
    architectures = getattr(hf_config, "architectures", None) or []
    return "masked_lm" if any(a.endswith("ForMaskedLM") for a in architectures) else "causal_lm"


def _meta_model(hf_config: PretrainedConfig, objective: str) -> nn.Module:
    from strop.model.meta import meta_model

    try:
        return meta_model(hf_config, objective)
    except StropError:
        # An encoder such as BERT has no causal-LM class: inspect its masked-LM model instead.
        other = "masked_lm" if objective == "causal_lm" else "causal_lm"
        return meta_model(hf_config, other)


def describe(model: nn.Module, hf_config: PretrainedConfig, source: str,
             every_layer: bool = False) -> Inspection:
    from strop.adapters.lora_config import output_head_names

    params_by_type: Counter[str] = Counter()
    seen: set[int] = set()  # a tied weight counts once, for the module that holds it first
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                params_by_type[type(module).__name__] += param.numel()
    heads = output_head_names(model)
    linears = _linear_groups(model, heads)
    return Inspection(
        source=source,
        architecture=type(model).__name__,
        model_type=hf_config.model_type,
        dtype=_dtype_name(hf_config),
        hidden_size=_first_attr(hf_config, "hidden_size", "n_embd", "d_model"),
        num_layers=_first_attr(hf_config, "num_hidden_layers", "n_layer", "num_layers"),
        vocab_size=getattr(hf_config, "vocab_size", None),
        total_params=sum(p.numel() for p in model.parameters()),
        params_by_module_type=dict(params_by_type.most_common()),
        tensors=_tensor_groups(model, collapse=not every_layer),
        linear_layers=linears,
        suggested_target_modules=list(dict.fromkeys(g.suffix for g in linears
                                                    if not g.output_head)),
    )


def _first_attr(obj: Any, *names: str) -> Any:
    return next((getattr(obj, n) for n in names if getattr(obj, n, None) is not None), None)


def _dtype_name(hf_config: PretrainedConfig) -> str:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if dtype is None:
        return "float32 (config gives none)"
    return str(dtype).removeprefix("torch.")


def _collapse(name: str) -> tuple[str, int | None]:
    match = _LAYER_INDEX.search(name)
    if not match:
        return name, None
    return name[:match.start()] + ".{i}." + name[match.end():], int(match.group(1))


def _tensor_groups(model: nn.Module, collapse: bool = True) -> list[TensorGroup]:
    """state_dict keys grouped across layers (or one per key), in the model's own order."""
    modules = dict(model.named_modules())
    first_key: dict[int, str] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = modules.get(key.rsplit(".", 1)[0]) if "." in key else model
        pattern, index = _collapse(key) if collapse else (key, None)
        group = groups.setdefault(pattern, {"indices": [], "shape": list(tensor.shape),
                                            "type": type(owner).__name__, "params": 0,
                                            "tied": None})
        group["indices"].append(index)
        tied = first_key.setdefault(id(tensor), key)
        if tied != key:
            group["tied"] = tied
        else:
            group["params"] += tensor.numel()
        if list(tensor.shape) != group["shape"]:
            group["shape"] = []  # differs between layers (rare): shown as "varies"
    out = []
    for pattern, group in groups.items():
        indices = [i for i in group["indices"] if i is not None]
        name = pattern
        if indices:
            name = pattern.replace("{i}", f"{{{min(indices)}-{max(indices)}}}"
                                   if len(indices) > 1 else str(indices[0]))
        out.append(TensorGroup(name=name, module_type=group["type"], shape=group["shape"],
                               count=len(group["indices"]), params=group["params"],
                               tied_to=group["tied"]))
    return out


def _linear_groups(model: nn.Module, heads: set[str]) -> list[LinearGroup]:
    from transformers.pytorch_utils import Conv1D

    from strop.adapters.lora_config import linear_module_names

    modules = dict(model.named_modules())
    grouped: dict[tuple[str, int, int, str, bool], int] = defaultdict(int)
    for name in linear_module_names(model):
        module = modules[name]
        if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
            fan_in, fan_out = module.weight.shape
        else:
            fan_in, fan_out = module.in_features, module.out_features
        key = (name.rsplit(".", 1)[-1], fan_in, fan_out, type(module).__name__, name in heads)
        grouped[key] += 1
    return [LinearGroup(suffix=s, count=n, in_features=i, out_features=o, module_type=t,
                        output_head=h) for (s, i, o, t, h), n in grouped.items()]


def lora_estimate(model: nn.Module, cfg: StropConfig) -> LoraEstimate:
    """What LoRA would train on this model with this config: PEFT's own wrapping, on meta."""
    import torch

    from strop.adapters.lora import wrapped_module_counts
    from strop.adapters.lora_config import build_lora_config, peft_wrap
    from strop.model.quantize import parameter_count

    full = parameter_count(model)
    lora_config = build_lora_config(model, cfg)
    with torch.device("meta"):
        peft_model = peft_wrap(model, lora_config)
    trainable = parameter_count(peft_model, trainable_only=True)
    method = ("rs" if lora_config.use_rslora else "") + ("DoRA" if lora_config.use_dora else "LoRA")
    return LoraEstimate(method=method, r=lora_config.r, alpha=lora_config.lora_alpha,
                        targets=wrapped_module_counts(peft_model),
                        modules_to_save=sorted(lora_config.modules_to_save or []),
                        trainable_params=trainable, ratio_to_full=trainable / full)


# ------------------------------------------------------------------------------------ rendering


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def render(result: Inspection, width: int | None = None) -> str:
    """The inspection as readable text: a summary, then tables."""
    import shutil

    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    # Keys are never wrapped (people copy them into lora_target_modules): the console is as wide
    # as the longest key needs, even past the terminal's width.
    longest = max((len(g.name) for g in result.tensors), default=0)
    longest_tied = max((len(g.tied_to or "") for g in result.tensors), default=0)
    width = width or max(shutil.get_terminal_size((120, 24)).columns, 100,
                         longest + longest_tied + 70)
    console = Console(file=buffer, width=width, color_system=None, highlight=False, markup=False,
                      emoji=False)
    console.print(f"{result.architecture} ({result.model_type}) from {result.source}")
    facts = [("parameters", f"{result.total_params:,} ({_human(result.total_params)})"),
             ("dtype", result.dtype),
             ("hidden size", f"{result.hidden_size} (the largest useful LoRA rank)"),
             ("layers", str(result.num_layers)),
             ("vocabulary", f"{result.vocab_size:,}" if result.vocab_size else "n/a")]
    for label, value in facts:
        console.print(f"  {label:<12} {value}")

    by_type = Table(title="Parameters by module type", title_justify="left")
    by_type.add_column("module type")
    by_type.add_column("parameters", justify="right")
    by_type.add_column("share", justify="right")
    for kind, count in result.params_by_module_type.items():
        by_type.add_row(kind, f"{count:,}", f"{100 * count / max(result.total_params, 1):.1f}%")
    console.print(by_type)

    any_tied = any(g.tied_to for g in result.tensors)
    collapsed = any("{" in g.name for g in result.tensors)
    title = "state_dict keys" + (" ({a-b}: the same key in each of those layers)" if collapsed
                                 else "")
    tensors = Table(title=title, title_justify="left")
    tensors.add_column("key", no_wrap=True, min_width=longest)
    for column in ("module type", "shape", "count") + (("same tensor as",) if any_tied else ()):
        tensors.add_column(column, justify="right" if column == "count" else "left",
                           no_wrap=column == "same tensor as")
    for group in result.tensors:
        shape = " x ".join(map(str, group.shape)) if group.shape else "varies"
        row = [group.name, group.module_type, shape, str(group.count)]
        tensors.add_row(*row, *([group.tied_to or ""] if any_tied else []))
    console.print(tensors)

    linears = Table(title="Linear layers by name (LoRA targets)", title_justify="left")
    for column in ("name", "count", "in -> out", "type", "LoRA params per unit of r"):
        linears.add_column(column, justify="left" if column in ("name", "in -> out", "type")
                           else "right")
    for g in result.linear_layers:
        per_rank = "output head, not a target" if g.output_head \
            else f"{g.count * (g.in_features + g.out_features):,}"
        linears.add_row(g.suffix, str(g.count), f"{g.in_features} -> {g.out_features}",
                        g.module_type, per_rank)
    console.print(linears)
    targets = ", ".join(result.suggested_target_modules)
    console.print(f"suggested: lora_target_modules: [{targets}]  (the same as "
                  "lora_target_linear: true)")

    if result.lora:
        lora = result.lora
        wrapped = ", ".join(f"{k} x{v}" for k, v in lora.targets.items())
        console.print(f"{lora.method} r={lora.r} alpha={lora.alpha:g} from the config wraps "
                      f"{sum(lora.targets.values())} modules ({wrapped})"
                      + (f" and trains {', '.join(lora.modules_to_save)} in full"
                         if lora.modules_to_save else ""))
        console.print(f"trainable parameters: {lora.trainable_params:,} "
                      f"({_human(lora.trainable_params)}), {100 * lora.ratio_to_full:.3f}% of "
                      f"full fine-tuning's {result.total_params:,}")
    for note in result.notes:
        console.print(note)
    return buffer.getvalue().rstrip("\n")
