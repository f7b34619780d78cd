"""What a multi-process step sends between devices, and how long a link takes to send it.

Bytes are per device and per optimizer step, for ring collectives over N devices (each device
sends and receives the same amount; Transformer Math 101, the ZeRO paper):
- DDP all-reduces the trainable gradients (fp32) once per step, the accumulation micro-batches
  running without the sync (DDP's no_sync): 2(N-1)/N x the gradient bytes.
- FSDP2, as strop.train.distributed wraps it, gathers every unit's weights as they are stored
  (fp32 when they train: its MixedPrecisionPolicy sets only reduce_dtype) in each micro-batch's
  forward, and again in its backward when reshard_after_forward freed them (the root too:
  strop sets reshard_after_forward on every unit), and reduce-scatters the trainable gradients
  (fp32) once, in the step's last backward (set_requires_gradient_sync(False) before it):
  (N-1)/N x the bytes each.
One process sends nothing.

The links are a data file beside this module (interconnects.json): peak bandwidth in one
direction, per GPU inside a node and per node between nodes. A ring moves the same bytes over
every hop, so the slowest hop sets the time; across nodes that is the network.
"""

from __future__ import annotations

from dataclasses import dataclass

from strop.errors import StropError
from strop.plan.memory import Setup, weight_bytes
from strop.plan.params import ParamCounts
from strop.recipe import math as tm
from strop.recipe.hardware import read_json


@dataclass(frozen=True)
class Link:
    name: str
    gb_per_s: float                # GB/s (1e9 bytes per second), one direction
    joins: str                     # gpus (inside a node) | nodes (between nodes) | any (a number)
    about: str

    @property
    def bytes_per_second(self) -> float:
        return self.gb_per_s * 1e9


def links() -> dict[str, Link]:
    return {name: Link(name, float(spec["gb_per_s"]), spec["joins"], spec["about"])
            for name, spec in read_json("interconnects.json")["links"].items()}


def parse_link(text: str) -> Link:
    """--interconnect: a link's name from interconnects.json, or a bandwidth in GB/s."""
    known = links()
    if text.lower() in known:
        return known[text.lower()]
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise StropError(f"--interconnect {text}: give one of {', '.join(known)} or a bandwidth "
                         "in GB/s (e.g. --interconnect 100)")
    return Link(f"{value:g} GB/s", value, "any", "given on the command line")


@dataclass(frozen=True)
class Layout:
    """How the processes are spread: world_size devices over `nodes` machines."""

    world_size: int = 1
    nodes: int = 1
    interconnect: Link | None = None  # what --interconnect named; None: each device's own link

    @property
    def per_node(self) -> int:
        return self.world_size // self.nodes

    def link_for(self, device_link: str | None) -> Link | None:
        """The slowest hop of a ring for devices of this kind, or None when nothing says (a CPU
        without --interconnect)."""
        if self.nodes == 1:
            return self.interconnect or links().get(device_link or "")
        between = self.interconnect or links()["infiniband"]
        inside = links().get(device_link or "") if self.per_node > 1 else None
        return min((between, inside), key=lambda link: link.gb_per_s if link else float("inf"))


def layout(world_size: int, nodes: int, interconnect: str | None) -> Layout:
    """The command line's --world-size, --nodes and --interconnect, checked together."""
    if nodes > world_size or world_size % nodes:
        raise StropError(f"--nodes {nodes}: --world-size {world_size} must be a multiple of it "
                         "(the same number of devices on every node)")
    link = parse_link(interconnect) if interconnect else None
    if link and nodes > 1 and link.joins == "gpus":
        raise StropError(f"--interconnect {interconnect} joins GPUs inside one node; between "
                         f"{nodes} nodes give infiniband, ethernet or a bandwidth in GB/s")
    if link and nodes == 1 and link.joins == "nodes":
        raise StropError(f"--interconnect {interconnect} joins nodes; with --nodes 1 give the link "
                         "between the GPUs (nvlink, pcie, ...) or pass --nodes")
    return Layout(world_size, nodes, link)


def step_traffic(params: ParamCounts, setup: Setup) -> dict[str, float]:
    """Bytes each device sends per optimizer step, by collective (empty for one process)."""
    n = setup.world_size
    if n <= 1:
        return {}
    share, accumulation = (n - 1) / n, setup.accumulation
    grads = tm.FP32 * params.trainable
    if setup.sharding == "ddp":
        return {"all_reduce_gradients": 2 * share * grads}
    gathered = sum(weight_bytes(params, setup).values())  # every unit, as stored
    traffic = {"all_gather_forward": accumulation * share * gathered}
    if setup.reshard_after_forward:
        traffic["all_gather_backward"] = accumulation * share * gathered
    traffic["reduce_scatter_gradients"] = share * grads
    return traffic
