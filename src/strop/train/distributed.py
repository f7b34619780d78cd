"""Several processes training one model: torch.distributed, started by torchrun.

torchrun (or `strop train --nproc N`, which runs torch's own launcher) starts one process per
device and sets RANK, WORLD_SIZE and LOCAL_RANK; nothing here launches or talks to processes
itself. Each process runs the same loop (strop.train.loop) on its share of every optimizer step:

- Data: all ranks build the same batch plan (same seed), and the micro-batches of one optimizer
  step (micro_batch_size x gradient_accumulation_steps x world size rows) are dealt out
  round-robin, so the ranks' shares are disjoint and together are exactly what one process with
  world-size-times the accumulation would train on.
- Loss: each rank's summed loss is divided by the trained tokens of the whole global step (an
  all-reduce), and multiplied by the world size because DDP and FSDP2 average gradients over
  ranks; the gradients are then those of the global step's token-mean loss, as in one process.
- Strategy: DDP (a replica per rank, gradients all-reduced) by default; FSDP2 (`fully_shard` on
  every decoder layer and on the whole, parameters, gradients and optimizer states sharded) with
  `fsdp_version: 2`.

Only rank 0 writes: logs, metrics, checkpoints and the final model.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from strop.errors import ReportedByRank0, StropError

if TYPE_CHECKING:
    from strop.config.schema import StropConfig


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "single"  # single | ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1


SINGLE = World()
_HEALTH: Any = None


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def launched_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(cfg: StropConfig, device: str) -> World:
    """Join the process group torchrun set up; one process alone starts none."""
    size = launched_size()
    if size <= 1:
        return SINGLE
    rank, local = launched_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)  # "cuda" below means this rank's own GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.ddp_timeout))
    global _HEALTH
    # A second gloo group, for the monitored barrier that names a silent rank after a timeout:
    # a timed-out collective closes its own group's connections.
    _HEALTH = dist.new_group(backend="gloo")
    if rank:
        # Rank 0 speaks for the run: the others' progress, reports, library warnings and
        # library progress bars (transformers' "Loading weights", on stderr) would repeat it N
        # times. Their errors still reach stderr (strop.cli prints them per rank).
        from datasets.utils import logging as datasets_logging
        from transformers.utils import logging as hf_logging

        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        warnings.filterwarnings("ignore")
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        datasets_logging.disable_progress_bar()
    return World(rank, size, local, "fsdp" if cfg.fsdp is not None else "ddp")


def stop(world: World) -> None:
    if world.many and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ numbers


def all_sum(world: World, *values: float) -> list[float]:
    """The sums over all ranks of a few numbers (float64: token counts stay exact)."""
    if not world.many:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_sum_array(world: World, values: np.ndarray) -> np.ndarray:
    """The elementwise sum over all ranks of a float32 array (each rank filled its share)."""
    if not world.many:
        return values
    tensor = torch.from_numpy(values).to(_comm_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when it is true on one (a stop signal, a failure)."""
    return bool(all_sum(world, float(flag))[0]) if world.many else flag


def barrier(world: World) -> None:
    if world.many:
        dist.barrier()


def gather_objects(world: World, value: Any) -> list[Any]:
    """Every rank's value, on every rank (small things: RNG states)."""
    if not world.many:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def on_main(world: World, work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 only and hand its result (small, picklable) to every rank. A user
    error there (a StropError) reaches every rank: rank 0 raises it and prints it, the others
    raise ReportedByRank0 and end quietly. Any other failure ends rank 0, and torchrun the
    others."""
    if not world.many:
        return work()
    failure: StropError | None = None
    result = None
    if world.main:
        try:
            result = work()
        except StropError as err:
            failure = err
    box = [(failure is not None, result)]
    dist.broadcast_object_list(box, src=0)
    failed, result = box[0]
    if failure is not None:
        raise failure
    if failed:
        raise ReportedByRank0
    return result


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block first (it writes caches), then the other ranks (they read them)."""
    if world.many and not world.main:
        dist.barrier()
    yield
    if world.many and world.main:
        dist.barrier()


def collective_failure(world: World, cfg: StropConfig, err: BaseException) -> str | None:
    """One line for a collective that failed under several processes: it timed out (naming
    the ranks that did not answer), or another rank died under it (its connection closed or
    reset); None for any other error. torchrun ends the job either way."""
    if not (world.many and isinstance(err, RuntimeError)):
        return None
    said = str(err).splitlines()[0].split("] ")[-1]  # without gloo's "[file.cc:line] "
    if "timed out" in str(err).lower():
        return (f"waited ddp_timeout ({cfg.ddp_timeout} s) for the other processes in a "
                f"collective and gave up ({said}){_silent_ranks(cfg)}; look at the other "
                "ranks' output, and resume with --resume_from_checkpoint latest")
    if re.search(r"Connection (closed|reset) by peer|Broken pipe", str(err)):
        return (f"lost another process of the run ({said.split('. ')[0]}): it died or was "
                "killed; look at its output, and resume with --resume_from_checkpoint latest")
    return None


def _silent_ranks(cfg: StropConfig) -> str:
    """Which ranks did not answer, found by a monitored barrier on the second gloo group (rank
    0 hears from every rank that still runs); strop.cli names the rank that waited."""
    try:
        dist.monitored_barrier(_HEALTH, timeout=datetime.timedelta(
            seconds=min(cfg.ddp_timeout, 30)), wait_all_ranks=True)
    except RuntimeError as barrier:
        found = re.search(r"[Rr]anks? ([\d, ]+) failed to pass", str(barrier))
        if found:
            return f"; rank {found.group(1).strip()} did not answer (hung or died)"
    return ""


def _comm_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


# ------------------------------------------------------------------------------- the step's share


def share(world: World, window: list[Any]) -> list[Any | None]:
    """This rank's micro-batches of one global optimizer step, dealt round-robin, padded with
    None to the same count on every rank: under DDP and FSDP2 every rank must run as many
    forward/backward passes as the others, or the collectives of the last one would wait
    forever. A None is run as a micro-batch with nothing trained (the caller's job)."""
    mine = window[world.rank::world.size]
    most = -(-len(window) // world.size)
    return mine + [None] * (most - len(mine))


@contextlib.contextmanager
def accumulating(module: nn.Module, world: World, last: bool) -> Iterator[None]:
    """Gradients of a micro-batch that is not the step's last stay local (no communication)."""
    if world.strategy == "ddp" and not last:
        with module.no_sync():
            yield
    elif world.strategy == "fsdp":
        module.set_requires_gradient_sync(last)
        yield
    else:
        yield


# ------------------------------------------------------------------------------------ wrapping


class LossForward(nn.Module):
    """The loss as one module, so that DDP and FSDP2 see a forward they can hook: strop's loss
    runs the decoder and the output head separately (strop.train.forward), never the model's
    own forward."""

    def __init__(self, loss_model: Any) -> None:
        super().__init__()
        self.model = loss_model.model
        self._loss_model = loss_model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        return self._loss_model.parts(batch)


def wrap(loss_model: Any, cfg: StropConfig, world: World, device: str) -> nn.Module:
    """The module the loop runs forward and backward through: the loss itself on one process,
    DDP or FSDP2 around it on several."""
    module = LossForward(loss_model)
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        kwargs: dict[str, Any] = {
            "find_unused_parameters": bool(cfg.ddp_find_unused_parameters),
            "forward_sync_buffers": bool(cfg.ddp_broadcast_buffers)}
        if cfg.ddp_bucket_cap_mb:
            kwargs["bucket_cap_mb"] = cfg.ddp_bucket_cap_mb
        if device == "cuda":
            kwargs["device_ids"] = [torch.cuda.current_device()]
        return DistributedDataParallel(module, **kwargs)
    if world.strategy == "fsdp":
        return _fully_shard(module, loss_model, cfg, world, device)
    return module


def builds_skeleton(cfg: StropConfig, world: World) -> bool:
    """Whether this rank builds the model on the meta device and receives its shard from rank 0
    (fsdp_config.cpu_ram_efficient_loading): one copy of the weights read, not one per rank."""
    return world.strategy == "fsdp" and cfg.fsdp.cpu_ram_efficient_loading and not world.main


def _fully_shard(module: LossForward, loss_model: Any, cfg: StropConfig, world: World,
                 device: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from strop.train.forward import unwrap

    options = cfg.fsdp
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": options.reshard_after_forward,
                              # fp32 gradient reduction: the sum over ranks is what one
                              # process would have accumulated
                              "mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.float32)}
    if options.offload_params and device == "cpu":
        # as fp16 falls back on a CPU: a GPU config still runs on a laptop
        warnings.warn("fsdp_config.offload_params moves a GPU run's shards to CPU memory; "
                      "training on the CPU they are there already, so it is not used",
                      stacklevel=2)
    elif options.offload_params:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    hf = unwrap(loss_model.model)
    layers = _decoder_layers(hf, options.transformer_layer_cls_to_wrap)
    # Rank 0's whole tensors, kept until they are dealt out below.
    whole = module.state_dict() if options.cpu_ram_efficient_loading and world.main else {}
    for layer in layers:
        fully_shard(layer, **kwargs)
    # The root: embeddings, final norm and the output head (tied or not) in one group, which
    # LossForward's forward gathers before the decoder runs.
    fully_shard(module, **kwargs)
    if options.cpu_ram_efficient_loading:
        _from_rank0(module, whole, world, device)
    return module


def _from_rank0(module: nn.Module, whole: dict[str, torch.Tensor], world: World,
                device: str) -> None:
    """Each rank's shards from rank 0's whole tensors (the other ranks' are on the meta device
    until now), and every buffer from rank 0: those outside the state dict (rotary
    frequencies) exist nowhere else."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not world.main:
        module.to_empty(device=device)
    set_model_state_dict(module, whole, options=StateDictOptions(full_state_dict=True,
                                                                 broadcast_from_rank0=True))
    for _, buffer in module.named_buffers():
        dist.broadcast(buffer, src=0)


def _decoder_layers(hf: nn.Module, class_name: str | None) -> list[nn.Module]:
    from strop.model.layers import decoder_layers

    layers = [module for _, module in decoder_layers(hf, class_name)]
    if not layers:
        names = {class_name} if class_name else set(getattr(hf, "_no_split_modules", None) or [])
        found = sorted({type(m).__name__ for m in hf.modules() if "Layer" in type(m).__name__})
        raise StropError(f"fsdp_config.transformer_layer_cls_to_wrap: no "
                         f"{' / '.join(sorted(names)) or 'decoder layer class'} in this model; "
                         f"its layer classes are {', '.join(found) or 'unknown'}")
    return layers


def full_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a number: FSDP2's is a DTensor whose full value needs the shards."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def full_state_dicts(module: nn.Module, optimizer, world: World) -> tuple[dict, dict]:
    """The whole model's and optimizer's state on rank 0 (collectives on every rank), in the
    names and shapes one process would have (the model's keys without LossForward's "model."
    prefix); the other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_sd, optim_sd = get_model_state_dict(module, options=options), {}
    else:
        model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
    if not world.main:
        return {}, {}
    return {k.removeprefix("model."): v for k, v in model_sd.items()}, optim_sd
