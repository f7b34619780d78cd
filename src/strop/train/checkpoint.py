"""Checkpoints that resume exactly, written so that a crash never leaves a broken one.

A checkpoint is `output_dir/checkpoint-<step>/`: the model (only the adapter under LoRA) as
safetensors, optimizer.pt, scheduler.pt, rng.pt (python, numpy, torch and CUDA generators),
trainer_state.json (step, epoch, position in the epoch, best eval loss, counters) and the
resolved config. A sharded checkpoint (strop.train.sharded) holds every rank's shard of the
weights and optimizer states instead of the model files and optimizer.pt. It is written to `.tmp-checkpoint-<step>` and renamed: the rename is atomic, so
`checkpoint-*` directories are always complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from strop.errors import StropError, first_line

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "strop-config.yml"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next step belongs to
    window_in_epoch: int = 0  # optimizer steps of that epoch already done
    tokens: int = 0  # tokens seen (padding excluded)
    trained_tokens: int = 0  # tokens whose loss was trained
    skipped_steps: int = 0  # non-finite losses or gradients, skipped
    bad_in_a_row: int = 0
    watchdog_in_a_row: int = 0
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # eval results

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> TrainerState:
        try:
            data = json.loads(path.read_text())
            state = cls(**data)
        except (OSError, ValueError, TypeError) as err:
            raise StropError(f"{path} is damaged ({first_line(err, 120)}); resume from another "
                             "checkpoint-N or start again") from None
        if not isinstance(state.step, int) or state.step < 0:
            raise StropError(f"{path}: step {state.step!r} is not a step count; resume from "
                             "another checkpoint-N")
        return state


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := _CKPT.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def damage(directory: Path, adapter: bool) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it looks whole: every file there,
    the trainer state readable, the weights' safetensors headers and the .pt archives intact.
    Reads headers and directories only, not the tensors."""
    import zipfile

    from safetensors import safe_open

    from strop.train import sharded  # it builds on this module

    if sharded.is_sharded(directory):
        weights, archives = [], ["scheduler.pt", "rng.pt"]
        why = sharded.damage(directory)
        if why:
            return why
    else:
        weights = ["adapter_model.safetensors"] if adapter else \
            sorted(p.name for p in directory.glob("*.safetensors"))
        archives = ["optimizer.pt", "scheduler.pt", "rng.pt"]
        if not weights:
            return "it holds no model weights (*.safetensors)"
    for name in [*weights, *archives, STATE_FILE]:
        if not (directory / name).is_file():
            return f"{name} is missing"
    try:
        TrainerState.from_file(directory / STATE_FILE)
    except StropError:
        return f"{STATE_FILE} is damaged"
    for name in weights:
        try:
            with safe_open(directory / name, framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for damaged files
            return f"{name} is damaged ({first_line(err, 80)})"
    for name in archives:
        try:
            with zipfile.ZipFile(directory / name) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"{name} is damaged ({first_line(err, 80)})"
    return None


def remove_partial(output_dir: Path) -> None:
    """Delete checkpoint directories an interrupted save left half-written."""
    if output_dir.is_dir():
        for p in output_dir.glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, lists and numbers only, so that it loads with
    torch.load(weights_only=True): a checkpoint is data and its loading runs no code."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path) -> Any:
    """A checkpoint's .pt file as data: tensors, dicts, lists and numbers, never code
    (weights_only=True). A file that is missing, damaged or holds anything else is one line."""
    import pickle

    if not path.is_file():
        raise StropError(f"{path} is missing: the checkpoint is incomplete; resume from another "
                         "checkpoint-N or start again")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        # torch's message is a page; the line naming what the file asked for is the useful one.
        found = re.search(r"Unsupported [^\n]*", str(err))
        what = found.group(0).rstrip(". ") if found else first_line(err, 120)
        raise StropError(f"{path}: refused to load it, it holds more than tensors and numbers "
                         f"({what[:120]}); strop never runs code from a checkpoint. Resume "
                         "from a checkpoint strop wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise StropError(f"{path} is damaged ({first_line(err, 120)}); resume from another "
                         "checkpoint-N or start again") from None


def save_model_files(model: nn.Module, tokenizer: Any, directory: Path, config_text: str,
                     weights: dict[str, torch.Tensor] | None = None) -> None:
    """The model as Hugging Face / PEFT files, the tokenizer and the resolved config.
    `weights`: the model's whole state dict when the model's own tensors are shards (FSDP2)."""
    if weights is None:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / CONFIG_FILE).write_text(config_text)


def rng_file(rank: int) -> str:
    """Rank 0's RNG states are rng.pt, as one process writes them; rank r's rng-rank{r}.pt."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def temporary_dir(output_dir: Path, step: int) -> Path:
    """Where checkpoint-<step> is written before the rename that makes it whole."""
    return output_dir / f".tmp-checkpoint-{step}"


def save_checkpoint(output_dir: Path, model: nn.Module, tokenizer: Any, optimizer, scheduler,
                    state: TrainerState, config_text: str, scaler=None, *,
                    weights: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    rng_states: list[dict[str, Any]] | None = None,
                    shards: dict[str, Any] | None = None) -> Path:
    """A checkpoint, written to a temporary directory and renamed when whole. Under several
    processes rank 0 writes it, from the gathered `weights` / `optimizer_state` (FSDP2) and
    every rank's `rng_states`; or, with `shards` (strop.train.sharded's index), around the
    shards every rank has already written to the temporary directory."""
    from strop.train import sharded  # it builds on this module

    final = output_dir / f"checkpoint-{state.step}"
    tmp = temporary_dir(output_dir, state.step)
    if shards is None:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True, exist_ok=shards is not None)
        if shards is None:
            save_model_files(model, tokenizer, tmp, config_text, weights)
            torch.save(optimizer_state if optimizer_state is not None else
                       optimizer.state_dict(), tmp / "optimizer.pt")
        else:
            tokenizer.save_pretrained(tmp)
            (tmp / CONFIG_FILE).write_text(config_text)
            (tmp / sharded.INDEX).write_text(json.dumps(shards, indent=2))
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in enumerate(rng_states or [rng_state()]):
            torch.save(rng, tmp / rng_file(rank))
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / STATE_FILE).write_text(state.to_json())  # last: its presence marks completeness
    except Exception as err:
        # The half-written directory goes (it would fill the disk further); earlier
        # checkpoints are untouched, so the run can resume from the newest of them. A full
        # disk reaches here as OSError, or as RuntimeError from torch.save's zip writer.
        free_then = shutil.disk_usage(output_dir).free if output_dir.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        message = _save_failed(output_dir, model, optimizer, err, free_then)
        if message is None:
            raise
        raise StropError(message) from None
    if final.exists():  # re-saving the same step (e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _save_failed(output_dir: Path, model: nn.Module, optimizer, err: Exception,
                 free_then: int) -> str | None:
    """The one-line message for a save that failed on the filesystem; None for anything else
    (a bug, which keeps its traceback)."""
    import errno

    # What a checkpoint holds: the trained weights (the whole model, or the adapter) and the
    # optimizer's state for them; the tokenizer and configs are small.
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                  for t in s.values() if torch.is_tensor(t))
    need = trained + moments
    free = shutil.disk_usage(output_dir).free if output_dir.exists() else 0
    last = checkpoints(output_dir)
    resume = f"; resume from {last[-1].name} with --resume_from_checkpoint latest" if last else ""
    # Judged by the space left when the write failed (the partial files still there).
    full = getattr(err, "errno", None) == errno.ENOSPC or free_then < need
    if full:
        what = "the disk is full"
    elif isinstance(err, OSError):
        what = err.strerror or first_line(err, 120)
    else:
        return None
    return (f"saving a checkpoint in {output_dir} failed ({what}): a checkpoint needs about "
            f"{need / 2**20:,.0f} MiB and {free / 2**20:,.0f} MiB are free; "
            f"free some space or set save_total_limit{resume}")


def load_weights(model: nn.Module, directory: Path, adapter: bool) -> None:
    """Put a checkpoint's weights into the model built by setup (same architecture)."""
    from safetensors.torch import load_file

    if adapter:
        from peft import set_peft_model_state_dict

        try:
            result = set_peft_model_state_dict(model,
                                               load_file(directory / "adapter_model.safetensors"))
        except RuntimeError as err:  # size mismatch: another rank or target set
            raise StropError(f"{directory}: the adapter does not fit this model "
                             f"({first_line(err, 160)}); resume with the lora_r and targets that "
                             "wrote it") from None
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise StropError(f"{directory}: adapter does not fit this model (unexpected keys, e.g. "
                             f"{unexpected[0]}); resume with the config that wrote it")
        return
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise StropError(f"{directory}: no model weights (*.safetensors) in this checkpoint")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise StropError(f"{directory}: weights do not fit this model ({first_line(err, 160)}); "
                         "resume with the config that wrote the checkpoint") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied and not _is_tied_copy(model, k, state)]
    if really_missing or unexpected:
        key = (really_missing or unexpected)[0]
        raise StropError(f"{directory}: weights do not fit this model ({key}); resume with the "
                         "config that wrote the checkpoint")


def _is_tied_copy(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    # A tied output head is saved once, under the embedding's name.
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(key)
    return target is not None and any(p is target for k, p in params.items() if k in state)


def load_optimizer(directory: Path, optimizer, module: nn.Module | None = None) -> None:
    """The optimizer's state; `module` (the FSDP2-sharded model) when each rank holds a shard
    of it: the saved whole state is then cut to this rank's shards."""
    saved = load_state(directory / "optimizer.pt")
    if module is None:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, by_name(saved, optimizer, module),
                             options=StateDictOptions(full_state_dict=True))


def load_schedule(directory: Path, scheduler, scaler=None) -> TrainerState:
    scheduler.load_state_dict(load_state(directory / "scheduler.pt"))
    if scaler is not None and (directory / "scaler.pt").exists():
        scaler.load_state_dict(load_state(directory / "scaler.pt"))
    return TrainerState.from_file(directory / STATE_FILE)


def restore_rng(directory: Path, rank: int = 0) -> None:
    """This rank's RNG states from the checkpoint; a rank the saving run did not have (it ran
    on fewer processes) keeps the generators it has."""
    path = directory / rng_file(rank)
    if rank == 0 or path.exists():
        set_rng_state(load_state(path))


def parameter_names(optimizer, module: nn.Module) -> list[str]:
    """The names of the optimizer's parameters, in its order, as torch.distributed.checkpoint
    names them (wrappers' prefixes dropped)."""
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    cleaned = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            for wrapper in ("_orig_mod.", "module.", "_checkpoint_wrapped_module."):
                name = name.replace(wrapper, "")
            cleaned.append(name)
    return cleaned


def by_index(named: dict[str, Any], optimizer, module: nn.Module) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) as one
    process's optimizer.state_dict() keys it: by the parameter's place in the optimizer."""
    index = {n: i for i, n in enumerate(parameter_names(optimizer, module))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    return {"state": {index[n]: v for n, v in named["state"].items()}, "param_groups": groups}


def by_name(indexed: dict[str, Any], optimizer, module: nn.Module) -> dict[str, Any]:
    """The inverse of by_index."""
    names = parameter_names(optimizer, module)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in indexed["state"].items()},
            "param_groups": groups}


def prune(output_dir: Path, limit: int | None, keep: set[str]) -> list[Path]:
    """Remove the oldest checkpoints beyond `limit`, never the latest nor those in `keep`."""
    found = checkpoints(output_dir)
    if not limit or len(found) <= limit:
        return []
    protected = {found[-1].name} | keep
    removable = [p for p in found if p.name not in protected]
    excess = len(found) - limit
    removed = removable[:max(excess, 0)]
    for p in removed:
        shutil.rmtree(p)
    return removed
