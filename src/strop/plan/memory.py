"""Peak memory per device of a training run, itemised.

The run is modelled as strop trains: trainable parameters in fp32 (their own master copy),
compute under bf16/fp16 autocast, a LoRA base frozen in the compute dtype, a k-bit base with its
other parameters in fp32, `optimizer.zero_grad(set_to_none=True)` after each step. Memory
rises and falls within a step; the peak is the largest of these moments (after the first step,
when optimizer states exist):
- forward_end: the loss is being computed; every saved activation, the logits and, under
  autocast, the compute-dtype copies of the weights (autocast caches them until it exits);
- backward_start: the logits' gradients at their largest; without checkpointing the weight
  copies are still held by the graph;
- recompute (gradient checkpointing): the last layer re-run in backward, on top of every layer's
  checkpointed input;
- optimizer_step: gradients of every trainable parameter, the states and the step's temporaries.
The items returned are those live at the peak; they add up to the total.

Several processes (Transformer Math 101; ZeRO-3 for FSDP2):
- DDP keeps a full replica on every device, plus its gradient buckets: flat buffers the size of
  the trainable gradients that the reducer allocates once and all-reduces through
  (gradient_as_bucket_view off, torch's default).
- FSDP2 as strop.train.distributed wraps it (fully_shard per decoder layer, then the root for
  embeddings, final norm and head) keeps 1/world of the weights, gradients and optimizer
  states, and gathers each unit's weights as they are stored to run it: its
  MixedPrecisionPolicy sets only reduce_dtype (fp32), so fp32 trainable weights travel in fp32
  and autocast still casts them, its bf16 copies as large as without sharding. Between the
  micro-batches of one step gradients are not reduced (set_requires_gradient_sync(False)):
  they accumulate unsharded. See `fsdp_gathered_bytes` for which units are gathered at once.
  With offload_params the shards, gradients and optimizer step live on the CPU: host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from strop.plan.params import LayerCounts, ParamCounts
from strop.recipe import math as tm
from strop.recipe.shape import ModelShape

MiB = 2**20
GiB = 2**30

# What the framework itself takes once training runs, beyond tensors.
# CPU: the resident-set growth of training a model too small to matter (hidden 8, one layer,
# 8 tokens), measured on torch 2.13 CPU with `python benchmarks/plan_accuracy.py --overhead`:
# code pages of the forward/backward/optimizer kernels, oneDNN and OpenMP state, the Python
# objects of the model and PEFT's wrappers, bitsandbytes' 4-bit kernels. Checkpointing's
# recompute machinery adds a little.
CPU_FRAMEWORK_BYTES = {"full": 18 * MiB, "lora": 21 * MiB, "qlora": 23 * MiB, "lora8": 23 * MiB}
CPU_CHECKPOINTING_BYTES = 4 * MiB
# oneDNN caches each bf16/fp32 GEMM it builds (JIT code and its buffers), one per distinct shape
# and direction (forward, input gradient, weight gradient): about 0.55 MiB each on this CPU
# (measured by timing resident growth as new matmul shapes run). The nano model above is too
# small to use them, so they come on top.
CPU_GEMM_CACHE_BYTES = 0.55 * MiB
# CUDA: the context and loaded kernels (about 500 MiB on Hopper with lazy module loading) and
# cuBLAS workspaces; torch.cuda.max_memory_allocated does not see the context, nvidia-smi does.
CUDA_CONTEXT_BYTES = 512 * MiB
CUDA_WORKSPACE_BYTES = 32 * MiB


@dataclass(frozen=True)
class Setup:
    """How the run trains, as the memory math needs it."""

    mode: str                      # full | lora | qlora | lora8
    micro_batch: int
    seq_len: int
    compute_bytes: int = 2         # 2 under bf16/fp16 autocast, 4 in plain fp32
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    optimizer: str = "adamw_torch_fused"
    sgd_momentum: float = 0.0
    lora_dropout: bool = False
    double_quant: bool = True
    device: str = "cuda"           # cuda | cpu
    world_size: int = 1
    sharding: str = "ddp"          # ddp (replicas) | fsdp (FSDP2, fully sharded)
    reshard_after_forward: bool = True  # FSDP2: free each layer's gathered weights after forward
    accumulation: int = 1          # micro-batches per optimizer step (FSDP2 keeps their gradients)
    offload_params: bool = False   # FSDP2: shards, gradients and optimizer step on the CPU
    logits_chunk: int | None = None  # tokens scored at once by a chunked loss (None = all)
    masked: bool = False           # rows are padded or packed: transformers builds a 4-D mask
    fused_loss: bool = False       # strop's chunked head + loss (gradients in the forward pass)
    lean_norms: bool = False       # strop's lean RMSNorm and SwiGLU (strop.train.lean_activations)
    lean_swiglu: bool = False
    # preference training: forward passes of the reference model per trained token (1 when the
    # LoRA base scores every step, 1 / epochs when scored once before training, else 0)
    reference_forwards: float = 0.0

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass
class MemoryEstimate:
    total: float                   # predicted peak bytes per device, overhead included
    items: dict[str, float]        # parts live at the peak; they add up to total
    peak_phase: str
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    host_items: dict[str, float] = field(default_factory=dict)  # per process, off the device

    @property
    def host_total(self) -> float:
        return sum(self.host_items.values())


def _residual_bytes(setup: Setup) -> int:
    # The residual stream takes the dtype of the embeddings and norms: fp32 for full training
    # and for a k-bit base (its fp32 norms turn the stream fp32 from the first layer on), the
    # compute dtype for a LoRA base.
    return setup.compute_bytes if setup.mode == "lora" else tm.FP32


def weight_bytes(params: ParamCounts, setup: Setup) -> dict[str, float]:
    """Stored parameters: the base (by its storage) and the trainable adapters."""
    c = setup.compute_bytes
    if setup.mode == "full":
        return {"weights": tm.FP32 * params.total}
    base = _quantized_bytes(params, setup)
    # Norms of a k-bit base in fp32, everything else unquantized in the compute dtype
    # (strop.model.quantize); a LoRA base has no norms apart (norms_and_biases is in total).
    fp32_norms = params.norms_and_biases if params.quantized else 0
    base += tm.FP32 * fp32_norms + c * (params.total - params.quantized - fp32_norms)
    return {"weights": base, "lora_weights": tm.FP32 * params.trainable}


def _quantized_bytes(params: ParamCounts, setup: Setup) -> float:
    if setup.mode == "qlora":
        return tm.nf4_bytes(params.quantized, setup.double_quant, params.quantized_linears)
    if setup.mode == "lora8":
        return tm.int8_bytes(params.quantized, params.quantized_rows)
    return 0.0


def autocast_copy_bytes(params: ParamCounts, setup: Setup) -> tuple[float, float]:
    """(copies held through backward, copies alive only until the forward ends), in bytes.

    Autocast casts fp32 matmul weights to the compute dtype. It caches the copies of trainable
    weights until the autocast region exits, and the graph holds every copy a backward needs:
    without checkpointing all of them; with it, only the head's (outside the checkpointed
    layers).
    """
    c = setup.compute_bytes
    if c >= tm.FP32:
        return 0.0, 0.0
    if setup.mode == "full":
        copied = params.linear_weights
        head = params.head
    else:  # adapters and saved modules; a frozen base is already in the compute dtype
        copied = params.linear_weights_trainable
        head = 0
    held = c * (head if setup.gradient_checkpointing else copied)
    return held, c * copied - held


def activation_bytes(shape: ModelShape, params: ParamCounts, setup: Setup) -> dict[str, float]:
    """Saved activations per device for one micro-batch: layers, head, logits, mask."""
    c, rb = setup.compute_bytes, _residual_bytes(setup)
    pb = tm.FP32 if setup.mode in ("qlora", "lora8") else c
    per_layer = [[] for _ in range(shape.layers)]
    for module in params.lora_modules:
        index = _layer_of(module.name)
        if index is not None and index < shape.layers:
            per_layer[index].append((module.in_features, module.rank,
                                     tm.lora_reads(module.name)))
    layers = [tm.layer_activation_bytes(
        shape, setup.seq_len, attention=setup.attention, mode=setup.mode, compute_bytes=c,
        residual_bytes=rb, projection_bytes=pb, lora_inputs=inputs,
        lora_dropout=setup.lora_dropout, norms_trainable=setup.mode == "full",
        lean_norms=setup.lean_norms, lean_swiglu=setup.lean_swiglu)
        for inputs in per_layer]
    tokens = setup.tokens
    if setup.gradient_checkpointing:
        kept = shape.layers * tm.checkpointed_layer_bytes(shape, rb) * tokens
        recompute = max(layers) * tokens
    else:
        kept = sum(layers) * tokens
        recompute = 0.0
    head_trainable = setup.mode == "full"
    # The fused loss keeps no input for the head's weight gradient: it is computed in forward.
    head = tm.head_activation_bytes(shape, mode=setup.mode, compute_bytes=c, residual_bytes=rb,
                                    head_trainable=head_trainable and not setup.fused_loss)
    if setup.fused_loss:
        head_weight = tm.FP32 if head_trainable else c
        loss_peak, loss_kept = tm.fused_loss_bytes(
            shape.vocab, shape.hidden, tokens, setup.logits_chunk or tokens, compute_bytes=c,
            hidden_bytes=rb, head_trainable=head_trainable, head_weight_bytes=head_weight)
    else:
        loss_kept = tm.logits_peak_bytes(shape.vocab, tokens, setup.logits_chunk)
        # 10 B per logit while the forward computes the loss (compute-dtype logits, their fp32
        # copy, the fp32 log-softmax), 12 B at the start of backward (tm.logits_peak_bytes).
        loss_peak = loss_kept * 10 / 12
    return {
        "activations": kept,
        "recompute": recompute,
        "head": head * tokens,
        "loss_forward": loss_peak,
        "loss_backward": loss_kept,
        "attention_mask": tm.attention_mask_bytes(setup.seq_len, setup.micro_batch,
                                                  setup.attention, setup.masked, c),
    }


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for before, part in zip(parts, parts[1:], strict=False):
        if before in ("layers", "h", "layer", "blocks") and part.isdigit():
            return int(part)
    return None


def distinct_gemms(shape: ModelShape, params: ParamCounts, setup: Setup) -> int:
    """How many distinct matmuls a training step runs: each linear shape once forward, once for
    the input gradient, and once for the weight gradient when it trains."""
    d, q, kv, inter = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    base = {(d, q), (d, kv), (q, d), (d, inter), (inter, d), (d, shape.vocab)}
    lora = {(m.in_features, m.rank) for m in params.lora_modules}
    lora |= {(m.rank, m.out_features) for m in params.lora_modules}
    per_base = 3 if setup.mode == "full" else 2
    return per_base * len(base) + 3 * len(lora)


def _layers(shape: ModelShape, params: ParamCounts) -> tuple[LayerCounts, ...]:
    """The decoder layers as counted, or (for a model whose layer class was not found) the
    parameters outside embeddings and head split evenly over shape.layers."""
    if params.layers:
        return params.layers
    n = max(shape.layers, 1)
    head = 0 if shape.tied_embeddings else params.head
    added = 0 if params.trainable == params.total else params.trainable
    return (LayerCounts((params.total - params.embedding - head) // n, params.quantized // n,
                        added // n),) * n


def fsdp_unit_bytes(shape: ModelShape, params: ParamCounts,
                    setup: Setup) -> tuple[float, list[float]]:
    """Bytes of each FSDP2 unit once gathered, as stored: (the root, [each decoder layer]).

    The root is what no layer holds: embeddings, final norm, head and the trainable copies
    PEFT keeps outside the layers. A layer's base is fp32 when it trains, in the compute dtype
    when frozen under LoRA; a k-bit base keeps its packed weights and its fp32 norms.
    """
    c = setup.compute_bytes
    per_quantized = _quantized_bytes(params, setup) / params.quantized if params.quantized else 0.0

    def stored(unit: LayerCounts) -> float:
        if setup.mode == "full":
            return tm.FP32 * unit.params
        if params.quantized:  # a k-bit layer's other parameters are its norms and biases
            base = per_quantized * unit.quantized + tm.FP32 * (unit.params - unit.quantized)
        else:
            base = c * unit.params
        return base + tm.FP32 * unit.added

    layers = [stored(u) for u in _layers(shape, params)]
    return sum(weight_bytes(params, setup).values()) - sum(layers), layers


def fsdp_gathered_bytes(shape: ModelShape, params: ParamCounts, setup: Setup) -> float:
    """Gathered (unsharded) weights alive during forward and backward under FSDP2.

    The root is the module whose forward is the whole loss (strop.train.distributed's
    LossForward), so its weights are gathered through all of forward and again through all of
    backward. With reshard_after_forward, two decoder layers are in flight: the one computing
    and the next, whose all-gather FSDP2 prefetches to overlap it (forward and backward prefetch
    one unit ahead by default). Without it every layer's gathered weights stay from its forward
    until its backward.
    """
    root, layers = fsdp_unit_bytes(shape, params, setup)
    in_flight = sorted(layers)[-2:] if setup.reshard_after_forward else layers
    return root + sum(in_flight)


def estimate_memory(shape: ModelShape, params: ParamCounts, setup: Setup) -> MemoryEstimate:
    """Peak bytes per device and the items live at that moment."""
    world = max(setup.world_size, 1)
    stored = weight_bytes(params, setup)
    states = tm.optimizer_state_bytes(setup.optimizer, params.trainable_shapes, setup.sgd_momentum)
    grads = tm.FP32 * params.trainable
    step_temp = tm.optimizer_step_temp_bytes(setup.optimizer, setup.device, params.trainable,
                                             params.largest_trainable)
    held_copies, forward_copies = autocast_copy_bytes(params, setup)
    notes: list[str] = []
    gathered = unsharded_grads = buckets = 0.0
    host: dict[str, float] = {}
    if world > 1 and setup.sharding == "fsdp":
        stored = {k: v / world for k, v in stored.items()}
        states, grads = states / world, grads / world
        gathered = fsdp_gathered_bytes(shape, params, setup)
        # Gradients are fp32 (the trainable weights' dtype, reduce_dtype fp32). With one
        # micro-batch a step, one layer's wait unsharded for their reduce-scatter; with more,
        # every one accumulates unsharded until the step's last backward reduces them.
        largest = max((u.params if setup.mode == "full" else u.added)
                      for u in _layers(shape, params))
        unsharded_grads = tm.FP32 * (params.trainable if setup.accumulation > 1 else largest)
        kept = ("two decoder layers' gathered weights at a time (one computing, one prefetched)"
                if setup.reshard_after_forward else
                "every decoder layer's gathered weights from its forward to its backward "
                "(reshard_after_forward: false)")
        notes.append(f"FSDP2 over {world} devices: weights, gradients and optimizer states are "
                     f"sharded 1/{world}; the root (embeddings, head) stays gathered through "
                     f"forward and backward, plus {kept}")
        if setup.accumulation > 1:
            notes.append("FSDP2 accumulates the gradients of a step's micro-batches unsharded "
                         "(no reduce-scatter until the last): gradient_accumulation_steps: 1 "
                         "with a larger micro_batch_size avoids them")
        if setup.offload_params and setup.device == "cuda":
            # The optimizer steps on the CPU, where the shards and their gradients are.
            cpu_temp = tm.optimizer_step_temp_bytes(setup.optimizer, "cpu", params.trainable,
                                                    params.largest_trainable)
            host = {**stored, "optimizer_states": states, "gradients": grads,
                    "optimizer_step_temp": cpu_temp / world}
            stored, states, grads = {}, 0.0, 0.0
            step_temp = 0.0
            notes.append("offload_params: the shards, their gradients and the optimizer step are "
                         "in CPU memory (host_items); the device holds what is gathered")
        else:
            step_temp = step_temp / world
    elif world > 1:
        buckets = grads
        notes.append(f"DDP over {world} devices: every device holds a full replica, plus "
                     "gradient buckets the size of the gradients")
    acts = activation_bytes(shape, params, setup)
    if setup.device == "cpu":
        gemms = distinct_gemms(shape, params, setup) * CPU_GEMM_CACHE_BYTES
        recompute_code = CPU_CHECKPOINTING_BYTES if setup.gradient_checkpointing else 0
        framework = {"gemm_kernel_cache": gemms,
                     "framework": float(CPU_FRAMEWORK_BYTES[setup.mode] + recompute_code)}
    else:
        framework = {"cuda_context": float(CUDA_CONTEXT_BYTES),
                     "framework": float(CUDA_WORKSPACE_BYTES)}
    # DDP's buckets exist from the wrap on, through every phase.
    static = {**stored, "optimizer_states": states, **framework, "gradient_buckets": buckets}
    if setup.optimizer.startswith("paged_"):
        notes.append("paged optimizer: its states live in unified memory and can spill to host "
                     "memory when the GPU runs short")

    # Gathered FSDP2 weights exist only between the first all-gather of forward and the last
    # reshard of backward: not at the optimizer step.
    common = {"activations": acts["activations"], "head_activations": acts["head"],
              "attention_mask": acts["attention_mask"], "fsdp_gathered_params": gathered}
    phases = {
        "forward_end": {**static, **common, "logits_and_loss": acts["loss_forward"],
                        "autocast_weight_copies": held_copies + forward_copies,
                        # a later micro-batch's forward, on the earlier ones' gradients
                        "fsdp_unsharded_gradients": unsharded_grads
                        if setup.accumulation > 1 else 0.0},
        "backward_start": {**static, **common, "logits_and_loss": acts["loss_backward"],
                           "autocast_weight_copies": held_copies,
                           "fsdp_unsharded_gradients": unsharded_grads},
        "optimizer_step": {**static, "gradients": grads, "optimizer_step_temp": step_temp},
    }
    if setup.gradient_checkpointing:
        layer_copies = forward_copies / max(shape.layers, 1)
        phases["recompute"] = {**static, **common, "recompute_one_layer": acts["recompute"],
                               "autocast_weight_copies": held_copies + layer_copies,
                               "fsdp_unsharded_gradients": unsharded_grads}
    totals = {name: sum(items.values()) for name, items in phases.items()}
    peak = max(totals, key=totals.get)
    items = {k: v for k, v in phases[peak].items() if v}
    return MemoryEstimate(total=totals[peak], items=items, peak_phase=peak, phases=totals,
                          notes=notes, host_items={k: v for k, v in host.items() if v})


def with_setup(setup: Setup, **changes) -> Setup:
    return replace(setup, **changes)
