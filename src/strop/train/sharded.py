"""Sharded checkpoints (fsdp_config.state_dict_type: SHARDED_STATE_DICT): every rank writes
its own shard of the trained weights and optimizer states with torch.distributed.checkpoint,
and nothing is gathered on one rank.

The files are DCP's safetensors storage (HuggingFaceStorageWriter/Reader): one
`sharded/shard-<rank>-model-00001-of-00001.safetensors` per rank, each tensor piece with its
offset in the file's own JSON header. DCP's default file format would also write a
`.metadata` file that its reader loads with pickle; this one holds tensors and JSON only, so
a checkpoint someone hands over stays data. The optimizer's parameter groups (learning rates,
betas: numbers, not tensors) go to `sharded.json` beside it, with the file list and the world
size that wrote it.

DCP reshards on load: a checkpoint written by N ranks resumes on M ranks, on one process, and
under DDP, each rank reading the pieces of its own shard.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.nn as nn

from strop.errors import StropError, first_line
from strop.train.checkpoint import temporary_dir
from strop.train.distributed import World, on_main

SHARD_DIR = "sharded"
INDEX = "sharded.json"


def is_sharded(directory: Path) -> bool:
    return (directory / INDEX).exists() or (directory / SHARD_DIR).is_dir()


def _options(adapter: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Under LoRA only the adapter trains; the frozen base comes from base_model on resume (so
    # loading is not strict about the base's keys; DCP has checked every adapter key is there).
    return StateDictOptions(ignore_frozen_params=adapter, strict=not adapter)


def _states(module: nn.Module, optimizer, adapter: bool) -> tuple[dict, dict]:
    """The model's and optimizer's state as this rank holds it (DTensor shards under FSDP2),
    keyed by parameter name. An optimizer that has not stepped yet gets its states made."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(module, optimizer, options=_options(adapter))


def save(output_dir: Path, step: int, module: nn.Module, optimizer, adapter: bool,
         world: World) -> dict[str, Any]:
    """Every rank writes its shard into checkpoint-<step>'s temporary directory (a collective:
    all ranks call it); strop.train.checkpoint.save_checkpoint then writes the rest there on
    rank 0 and renames it whole. Returns the index (sharded.json's content) for that."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    tmp = temporary_dir(output_dir, step)
    on_main(world, lambda: _fresh(tmp))  # every rank waits for it
    model_state, optim_state = _states(module, optimizer, adapter)
    writer = HuggingFaceStorageWriter(str(tmp / SHARD_DIR), save_distributed=True)
    try:
        dcp.save({"model": model_state, "optimizer": optim_state["state"]}, storage_writer=writer)
    except Exception as err:  # a full disk on any rank reaches every rank through DCP
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise StropError(f"saving a sharded checkpoint in {output_dir} failed ({_reason(err)}); "
                         "free some space or set save_total_limit, and resume with "
                         "--resume_from_checkpoint latest") from None
    files = sorted(p.name for p in (tmp / SHARD_DIR).glob("*.safetensors"))
    return {"world_size": world.size, "files": files,
            "param_groups": [_plain(group) for group in optim_state["param_groups"]]}


def _fresh(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def load(directory: Path, module: nn.Module, optimizer, adapter: bool) -> None:
    """Put a sharded checkpoint's weights and optimizer states into this rank's model and
    optimizer (built by setup and wrapped for this run's strategy and world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    index = read_index(directory)
    model_state, optim_state = _states(module, optimizer, adapter)
    target = {"model": model_state, "optimizer": optim_state["state"]}
    try:
        with warnings.catch_warnings():
            # one process: DCP says it assumes one process, which is what is meant
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a "
                                    "single process.*")
            dcp.load(target, storage_reader=HuggingFaceStorageReader(str(directory / SHARD_DIR)))
    except Exception as err:  # DCP wraps every rank's failure in its own exception type
        raise StropError(f"{directory}: the sharded checkpoint does not fit this model "
                         f"({_reason(err)}); resume with the config that wrote it") from None
    groups = index["param_groups"]
    if len(groups) != len(optim_state["param_groups"]):
        raise StropError(f"{directory}: the checkpoint's optimizer has {len(groups)} parameter "
                         f"groups and this run's {len(optim_state['param_groups'])}; resume with "
                         "the config that wrote it")
    set_state_dict(module, optimizer, model_state_dict=target["model"],
                   optim_state_dict={"state": target["optimizer"],
                                     "param_groups": [_tuples(g) for g in groups]},
                   options=_options(adapter))


def read_index(directory: Path) -> dict[str, Any]:
    try:
        index = json.loads((directory / INDEX).read_text())
        if not isinstance(index, dict) or not isinstance(index.get("files"), list) \
                or not isinstance(index.get("param_groups"), list):
            raise ValueError("files or param_groups missing")
    except (OSError, ValueError) as err:
        raise StropError(f"{directory / INDEX} is damaged ({first_line(err, 120)}); resume "
                         "from another checkpoint-N") from None
    return index


def damage(directory: Path) -> str | None:
    """Why a sharded checkpoint's own files cannot be read, or None: the index, and every
    shard it lists with a readable safetensors header."""
    from safetensors import safe_open

    try:
        index = read_index(directory)
    except StropError:
        return f"{INDEX} is missing or damaged"
    if not index["files"]:
        return f"{INDEX} lists no shard"
    for name in index["files"]:
        path = directory / SHARD_DIR / name
        if not path.is_file():
            return f"{SHARD_DIR}/{name} is missing"
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for damaged files
            return f"{SHARD_DIR}/{name} is damaged ({first_line(err, 80)})"
    return None


def _reason(err: BaseException) -> str:
    # DCP's CheckpointException lists each rank's traceback; the last line of the first says
    # what went wrong (a missing key, a size mismatch).
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line or "Missing key" in line]
    return (useful[-1] if useful else first_line(err, 160))[:200]


def _plain(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group as JSON: numbers, booleans, strings, lists (betas), parameter names."""
    out = {}
    for key, value in group.items():
        if hasattr(value, "item"):  # a tensor learning rate (capturable optimizers)
            value = value.item()
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _tuples(group: dict[str, Any]) -> dict[str, Any]:
    # Optimizers take betas as a tuple; JSON gave a list.
    return {k: (tuple(v) if isinstance(v, list) and k != "params" else v)
            for k, v in group.items()}
