"""`strop plan`: parameters, memory, compute, time and cost of a run, as a dict and as text.

`build_plan` gathers everything into one JSON-ready dict (what `--json` prints); `render_text`
turns that dict into the report a person reads. Time is FLOPs / (peak x MFU): the MFU is stated
in the report, and for this machine's CPU the peak is a measured matmul. Over several devices a
step takes the longer of its compute and its communication (strop.plan.comm): the two are
assumed to overlap, as DDP's bucketed all-reduce and FSDP2's prefetched all-gathers do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strop.plan.comm import Layout, Link, layout, step_traffic
from strop.plan.cpu_speed import UNPROBED_WORK, cpu_step_seconds
from strop.plan.estimate import (
    ModelFacts,
    flops_per_token,
    model_facts,
    resolve_sharding,
    setup_for,
    training_mode,
)
from strop.plan.memory import GiB, Setup, estimate_memory
from strop.plan.tokens import TokenEstimate, estimate_tokens
from strop.recipe.hardware import Device, find_gpu, gpu_table, load_prices, this_cpu
from strop.recipe.math import nf4_bits_per_param

if TYPE_CHECKING:
    from strop.config.schema import StropConfig

# Model FLOPs utilisation assumed on a GPU: well-tuned single-GPU fine-tuning of 1-70B models
# reaches 35-50% with flash attention; 40% is the middle. QLoRA dequantizes every weight in
# each matmul, which costs about a third more time at the same FLOPs.
GPU_MFU = 0.40
QLORA_SLOWDOWN = 1.35
# This CPU's time comes from timing the step's pieces (strop.plan.cpu_speed); this MFU of a
# measured matmul is used only when the CPU is not measured (tests) or --mfu says otherwise.
CPU_MFU = 0.50


def build_plan(cfg: StropConfig, *, gpu: str | None = None, world_size: int = 1,
               sharding: str | None = None, nodes: int = 1, interconnect: str | None = None,
               prices_path: str | Path | None = None, mfu: float | None = None,
               base_dir: Path | None = None, measure_cpu: bool = True) -> dict[str, Any]:
    """sharding: ddp | fsdp, None for the config's (FSDP2 under fsdp_version: 2, else DDP).
    interconnect: a link's name or GB/s (strop.plan.comm), None for each GPU's own link."""
    spread = layout(world_size, nodes, interconnect)
    strategy_from = ("--sharding" if sharding else
                     "fsdp_version: 2 in the config" if cfg.fsdp else "no fsdp_version: 2")
    sharding = resolve_sharding(cfg, sharding)
    facts = model_facts(cfg)
    prices = load_prices(prices_path)
    table = gpu_table(prices)
    devices: list[Device] = list(table.values())
    chosen: Device | None = None
    if gpu and gpu.lower() == "cpu":
        chosen = this_cpu(_cpu_bf16(cfg), measure_cpu)
        devices = [chosen]
    elif gpu:
        chosen = find_gpu(gpu, table)
        devices = [chosen]
    else:
        devices.append(this_cpu(_cpu_bf16(cfg), measure_cpu))
    tokens = estimate_tokens(cfg, base_dir)
    run_tokens = _run_tokens(cfg, tokens, world_size)
    reference = chosen or table["H100 80GB"]
    ref_setup = setup_for(cfg, reference.kind, reference.bf16, world_size, sharding,
                          hf_config=facts.hf_config)
    ref_memory = estimate_memory(facts.shape, facts.params, ref_setup)
    rows = [_device_row(facts, cfg, d, spread, sharding, run_tokens, mfu) for d in devices]
    ref_row = next((r for r in rows if r["device"] == reference.name), None)
    if ref_row is None:  # a table without the H100 row: its step is planned alone
        ref_row = _device_row(facts, cfg, reference, spread, sharding, run_tokens, mfu)
    plan: dict[str, Any] = {
        "model": _model_section(facts, cfg),
        "mode": training_mode(cfg),
        "preference": _preference_section(cfg, ref_setup),
        "params": _params_section(facts, ref_setup),
        "setup": {**asdict(ref_setup), "device": reference.name},
        "memory": {"device": reference.name, "total_bytes": ref_memory.total,
                   "items": ref_memory.items, "peak_phase": ref_memory.peak_phase,
                   "phases": ref_memory.phases, "notes": ref_memory.notes,
                   "host_bytes": ref_memory.host_total, "host_items": ref_memory.host_items,
                   "host_bytes_per_node": ref_memory.host_total * spread.per_node},
        "distributed": _distributed_section(ref_setup, spread, strategy_from, ref_row),
        "compute": _compute_section(facts, ref_setup, tokens, run_tokens),
        "devices": rows,
        "cheapest": _cheapest(rows),
        "prices": {"date": prices.get("date"), "currency": prices.get("currency", "USD"),
                   "sources": prices.get("sources", {})},
        "assumptions": _assumptions(mfu, ref_setup),
    }
    if not any(r["fits"] for r in rows):
        plan["suggestions"] = _suggestions(cfg, facts, devices, spread, sharding, run_tokens, mfu)
    return plan


def _distributed_section(setup: Setup, spread: Layout, strategy_from: str,
                         row: dict[str, Any]) -> dict[str, Any]:
    """How the processes split the work, and the reference device's step."""
    return {"world_size": spread.world_size, "nodes": spread.nodes,
            "devices_per_node": spread.per_node,
            "strategy": "single" if spread.world_size == 1 else setup.sharding,
            "strategy_from": strategy_from,
            "reshard_after_forward": setup.reshard_after_forward if setup.sharding == "fsdp"
            else None,
            "offload_params": setup.offload_params,
            "step": row["step"]}


def _cpu_bf16(cfg: StropConfig) -> bool:
    from strop.device import detect

    return detect().cpu_bf16


def _run_tokens(cfg: StropConfig, tokens: TokenEstimate, world_size: int) -> float | None:
    """Tokens processed by the whole run: max_steps when set, else epochs over the data."""
    if cfg.max_steps:
        per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size
        return float(cfg.max_steps * per_step * cfg.sequence_len)
    if tokens.tokens_per_epoch is None:
        return None
    return tokens.tokens_per_epoch * cfg.num_epochs


def _model_section(facts: ModelFacts, cfg: StropConfig) -> dict[str, Any]:
    s = facts.shape
    return {"source": facts.source, "model_type": facts.hf_config.model_type,
            "hidden_size": s.hidden, "layers": s.layers, "heads": s.heads,
            "kv_heads": s.kv_heads, "head_dim": s.head_dim, "intermediate_size": s.intermediate,
            "vocab_size": s.vocab, "experts": s.experts, "tied_embeddings": s.tied_embeddings}


def _params_section(facts: ModelFacts, setup: Setup) -> dict[str, Any]:
    p = facts.params
    section = {"total": p.total, "trainable": p.trainable, "adapter": p.adapter,
               "modules_to_save": p.modules_to_save, "quantized": p.quantized,
               "by_dtype": p.by_dtype(setup.mode, setup.compute_bytes),
               "lora_modules": len(p.lora_modules)}
    if setup.mode == "qlora":
        section["nf4_bits_per_param"] = nf4_bits_per_param(setup.double_quant)
        section["double_quant_saving_bits_per_param"] = (nf4_bits_per_param(False)
                                                         - nf4_bits_per_param(True))
    return section


def _compute_section(facts: ModelFacts, setup: Setup, tokens: TokenEstimate,
                     run_tokens: float | None) -> dict[str, Any]:
    hardware = flops_per_token(facts, setup)
    return {
        "tokens_per_epoch": tokens.tokens_per_epoch,
        "text_tokens_per_epoch": tokens.text_tokens,
        "rows_per_epoch": tokens.rows,
        "tokens_source": tokens.source,
        "datasets_not_on_disk": list(tokens.missing),
        "tokens_total": run_tokens,
        "flops_per_token": hardware,
        "model_flops_per_token": flops_per_token(facts, setup, recompute=False),
        "flops_total": hardware * run_tokens if run_tokens is not None else None,
    }


def _mfu(device: Device, setup: Setup, mfu: float | None) -> float:
    if device.kind == "cpu":
        return mfu or CPU_MFU
    base = mfu or GPU_MFU
    return base / QLORA_SLOWDOWN if setup.mode == "qlora" else base


_cpu_timings: dict[tuple, float] = {}


def _cpu_tokens_per_second(facts: ModelFacts, setup: Setup, accumulation: int) -> float:
    """Timed once per setup in a process (suggestions re-plan the same setups)."""
    key = (facts.shape, facts.params, tuple(sorted(asdict(setup).items())), accumulation)
    if key not in _cpu_timings:
        timing = cpu_step_seconds(facts.shape, facts.params, setup, accumulation)
        _cpu_timings[key] = timing.tokens_per_second(setup.tokens)
    return _cpu_timings[key]


def _step(facts: ModelFacts, cfg: StropConfig, setup: Setup, one: float,
          link: Link | None) -> dict[str, Any]:
    """One optimizer step on each device: its compute (`one` tokens/s per device), what it sends
    and over which link, and the step time when the two overlap."""
    tokens = cfg.micro_batch_size * cfg.sequence_len * cfg.gradient_accumulation_steps
    compute = tokens / one
    traffic = step_traffic(facts.params, setup)
    sent = sum(traffic.values())
    comm = sent / link.bytes_per_second if traffic and link else 0.0 if not traffic else None
    return {"tokens_per_device": tokens, "compute_seconds": compute,
            "comm_bytes": sent, "collectives": traffic,
            "interconnect": link.name if traffic and link else None,
            "interconnect_gb_per_s": link.gb_per_s if traffic and link else None,
            "comm_seconds": comm,
            "seconds": max(compute, comm or 0.0),  # communication overlaps compute
            "bound": "communication" if comm and comm > compute else "compute"}


def _device_row(facts: ModelFacts, cfg: StropConfig, device: Device, spread: Layout,
                sharding: str, run_tokens: float | None, mfu: float | None,
                setup: Setup | None = None) -> dict[str, Any]:
    world_size = spread.world_size
    setup = setup or setup_for(cfg, device.kind, device.bf16, world_size, sharding,
                               hf_config=facts.hf_config)
    memory = estimate_memory(facts.shape, facts.params, setup)
    peak = device.peak_flops(setup.compute_bytes, fp16=bool(cfg.fp16))
    if device.kind == "cpu" and mfu is None and peak:
        # This CPU: the step's own pieces timed at their shapes; the MFU shown is what that implies.
        one = _cpu_tokens_per_second(facts, setup, cfg.gradient_accumulation_steps)
        # the timed step has no reference pass: it costs in proportion to its FLOPs
        one *= flops_per_token(facts, replace(setup, reference_forwards=0.0)) \
            / flops_per_token(facts, setup)
        used_mfu = one * flops_per_token(facts, setup) / peak
    else:
        used_mfu = _mfu(device, setup, mfu)
        one = peak * used_mfu / flops_per_token(facts, setup)
    step = _step(facts, cfg, setup, one, spread.link_for(device.link))
    tokens_per_second = world_size * step["tokens_per_device"] / step["seconds"]
    hours = run_tokens / tokens_per_second / 3600 if run_tokens else None
    per_million = 1e6 / tokens_per_second / 3600
    return {
        "device": device.name, "kind": device.kind, "count": world_size,
        "memory_bytes": device.memory_bytes, "total_bytes": memory.total,
        "fits": memory.total <= device.memory_bytes,
        "headroom_bytes": device.memory_bytes - memory.total,
        "host_bytes": memory.host_total,
        "compute_dtype": {2: "bf16" if device.bf16 else "fp16", 4: "fp32"}[setup.compute_bytes],
        "peak_flops": peak, "mfu": used_mfu, "tokens_per_second": tokens_per_second,
        "hours": hours, "step": step,
        # Every device of the run is rented for the whole run.
        "cost": {p: price * world_size * hours for p, price in device.prices.items()}
        if hours is not None else {},
        "cost_per_million_tokens": {p: price * world_size * per_million
                                    for p, price in device.prices.items()},
    }


def _cheapest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    options = [(price, row["device"], provider) for row in rows if row["fits"]
               for provider, price in row["cost_per_million_tokens"].items()]
    if not options:
        return None
    price, device, provider = min(options)
    row = next(r for r in rows if r["device"] == device)
    return {"device": device, "provider": provider, "count": row["count"],
            "cost": row["cost"].get(provider), "hours": row["hours"],
            "cost_per_million_tokens": price}


def _knobs(cfg: StropConfig) -> list[tuple[str, dict[str, Any]]]:
    """Changes that lower memory, each as (what to write in the YAML, the config update)."""
    knobs: list[tuple[str, dict[str, Any]]] = []
    if not cfg.gradient_checkpointing:
        knobs.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    if cfg.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        knobs.append(("optimizer: adamw_8bit", {"optimizer": "adamw_8bit"}))
    if cfg.micro_batch_size > 1:
        ga = cfg.gradient_accumulation_steps * cfg.micro_batch_size
        knobs.append((f"micro_batch_size: 1, gradient_accumulation_steps: {ga}",
                      {"micro_batch_size": 1, "gradient_accumulation_steps": ga}))
    if cfg.sequence_len > 512:
        half = cfg.sequence_len // 2
        knobs.append((f"sequence_len: {half}", {"sequence_len": half}))
    if not cfg.load_in_4bit:
        update: dict[str, Any] = {"adapter": "qlora", "load_in_4bit": True, "load_in_8bit": False}
        if not cfg.uses_lora:
            update.update(lora_target_linear=True, lora_r=16, lora_alpha=32)
        knobs.append(("adapter: qlora, load_in_4bit: true" +
                      ("" if cfg.uses_lora else ", lora_r: 16, lora_target_linear: true"), update))
    if len(knobs) > 1:
        combined: dict[str, Any] = {}
        for _, update in knobs:
            combined.update(update)
        knobs.append(("all of the above", combined))
    return knobs


def _suggestions(cfg: StropConfig, facts: ModelFacts, devices: list[Device], spread: Layout,
                 sharding: str, run_tokens: float | None, mfu: float | None) -> list[dict]:
    out = []
    for label, update in _knobs(cfg):
        changed = cfg.model_copy(update=update)
        new_facts = facts
        if (changed.uses_lora, changed.load_in_4bit) != (cfg.uses_lora, cfg.load_in_4bit):
            new_facts = model_facts(changed)
        rows = [_device_row(new_facts, changed, d, spread, sharding, run_tokens, mfu)
                for d in devices]
        fitting = [r["device"] for r in rows if r["fits"]]
        out.append({"change": label, "total_bytes": min(r["total_bytes"] for r in rows),
                    "fits_on": fitting, "cheapest": _cheapest(rows)})
    return out


def _assumptions(mfu: float | None, setup: Setup) -> list[str]:
    out = [
        f"time = FLOPs / (peak x MFU); MFU {mfu or GPU_MFU:.0%} on GPUs "
        f"({(mfu or GPU_MFU) / QLORA_SLOWDOWN:.0%} for QLoRA, which dequantizes in every matmul), "
        + (f"{mfu:.0%} of a measured matmul on this CPU" if mfu else
           "on this CPU, the step's own matmuls, attention, norms, loss and optimizer timed at "
           f"their shapes, x{UNPROBED_WORK} for what those probes leave out"),
        "trainable weights in fp32 with bf16/fp16 autocast; a LoRA base frozen in the compute "
        "dtype; a 4-bit base keeps its other weights in fp32",
        "gradient checkpointing recomputes each layer's forward: its FLOPs are counted in time",
    ]
    if setup.world_size > 1:
        out.append("communication: ring collectives at the link's peak bandwidth (NCCL reaches "
                   "70-90% of it); " + (
                       "DDP all-reduces the fp32 gradients once per optimizer step (no sync on "
                       "accumulation micro-batches)" if setup.sharding == "ddp" else
                       "FSDP2 all-gathers weights as stored in every micro-batch and "
                       "reduce-scatters the fp32 gradients once per optimizer step") +
                   "; step time = max(compute, communication): communication overlaps compute")
    if setup.world_size > 1 and setup.offload_params:
        out.append("offload_params: the host-device copies and the optimizer step on the CPU "
                   "are not in the time")
    return out


# ----------------------------------------------------------------------------- text

def size_text(n: float | None) -> str:
    if n is None:
        return "?"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def count_text(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _hours(h: float | None) -> str:
    if h is None:
        return "?"
    if h < 1 / 60:  # a million tokens on many fast GPUs takes seconds
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    return f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"


def _preference_section(cfg: StropConfig, setup: Setup) -> dict[str, Any] | None:
    if not cfg.preference:
        return None
    if not cfg.uses_reference:
        reference = "none"
    elif cfg.uses_lora and not cfg.precompute_ref_log_probs:
        reference = "the base with the adapter off, every step"
    else:
        reference = "scored once before training"
    return {"objective": cfg.rl, "sequences_per_row": 2, "reference": reference,
            "reference_forwards_per_token": setup.reference_forwards}


def render_text(plan: dict[str, Any]) -> str:
    m, p, mem, comp = plan["model"], plan["params"], plan["memory"], plan["compute"]
    lines = [f"model     {m['source']} ({m['model_type']}: {m['layers']} layers, hidden "
             f"{m['hidden_size']}, {m['heads']} heads / {m['kv_heads']} kv, vocab "
             f"{m['vocab_size']})",
             f"training  {plan['mode']}, micro batch {plan['setup']['micro_batch']} x "
             f"{plan['setup']['seq_len']} tokens, gradient checkpointing "
             f"{'on' if plan['setup']['gradient_checkpointing'] else 'off'}, "
             f"{plan['setup']['attention']}, {plan['setup']['optimizer']}",
             *_preference_lines(plan.get("preference")),
             "",
             f"parameters  total {count_text(p['total'])}, trainable {count_text(p['trainable'])} "
             f"({100 * p['trainable'] / max(p['total'], 1):.2f}%)"]
    lines.append("            by dtype: " + ", ".join(f"{k} {count_text(v)}"
                                                     for k, v in p["by_dtype"].items()))
    if "nf4_bits_per_param" in p:
        lines.append(f"            NF4 {p['nf4_bits_per_param']:.3f} bits/param (double "
                     f"quantization saves {p['double_quant_saving_bits_per_param']:.3f})")
    lines += ["", f"memory per device on {mem['device']} (peak at {mem['peak_phase']}):"]
    for name, value in sorted(mem["items"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<26} {size_text(value):>12}")
    lines.append(f"  {'total':<26} {size_text(mem['total_bytes']):>12}")
    lines += [f"  note: {n}" for n in mem["notes"]]
    if mem["host_bytes"]:
        lines.append(f"  host memory per process {size_text(mem['host_bytes'])} ("
                     + ", ".join(f"{k} {size_text(v)}" for k, v in mem["host_items"].items())
                     + f"); {size_text(mem['host_bytes_per_node'])} per node")
    lines += _distributed_text(plan["distributed"], mem["device"])
    lines += ["", "compute"]
    tokens = comp["tokens_per_epoch"]
    if tokens is None:
        lines.append(f"  tokens per epoch  unknown: {', '.join(comp['datasets_not_on_disk'])} "
                     "is not on disk (time and cost are per million tokens)")
    else:
        lines.append(f"  tokens per epoch  {count_text(tokens)} ({comp['tokens_source']})")
    lines.append(f"  FLOPs per token   {count_text(comp['flops_per_token'])} "
                 f"(model FLOPs {count_text(comp['model_flops_per_token'])})")
    if comp["flops_total"] is not None:
        lines.append(f"  FLOPs total       {comp['flops_total']:.3g} over "
                     f"{count_text(comp['tokens_total'])} tokens")
    lines += ["", f"{'device':<34} {'fits':<18} {'tokens/s':>10} {'time':>9}  cost"]
    for row in plan["devices"]:
        fit = (f"yes (+{size_text(row['headroom_bytes'])})" if row["fits"]
               else f"no ({size_text(-row['headroom_bytes'])} over)")
        costs = row["cost"] if row["hours"] is not None else row["cost_per_million_tokens"]
        unit = "" if row["hours"] is not None else "/M tok"
        cost = ", ".join(f"{k} ${v:,.2f}{unit}" for k, v in sorted(costs.items(), key=lambda kv: kv[1]))
        name = row["device"] if row["count"] == 1 else f"{row['count']} x {row['device']}"
        speed = row["tokens_per_second"]
        when = (_hours(row["hours"]) if row["hours"] is not None
                else _hours(1e6 / speed / 3600) + "/M")
        lines.append(f"{name[:34]:<34} {fit:<18} {speed:>10,.{0 if speed >= 100 else 1}f} "
                     f"{when:>9}  {cost or '-'}")
    cheap = plan["cheapest"]
    lines.append("")
    if cheap:
        what = (f"${cheap['cost']:,.2f} for the run" if cheap["cost"] is not None
                else f"${cheap['cost_per_million_tokens']:.3f} per million tokens")
        name = cheap["device"] if cheap["count"] == 1 else f"{cheap['count']} x {cheap['device']}"
        lines.append(f"cheapest that fits: {name} on {cheap['provider']}, {what}")
    elif plan.get("suggestions") is None:  # it fits, on devices without a price (this CPU)
        fits_on = [r["device"] for r in plan["devices"] if r["fits"]]
        lines.append(f"fits on {', '.join(fits_on)} (no rental price for it)")
    else:
        lines.append("nothing fits; each of these changes alone:")
        for s in plan.get("suggestions", []):
            where = ", ".join(s["fits_on"][:4]) if s["fits_on"] else "still nothing"
            lines.append(f"  {s['change']:<58} {size_text(s['total_bytes']):>11}  fits: {where}")
    lines += ["", f"prices of {plan['prices']['date']} ({', '.join(plan['prices']['sources'])}); "
              "edit or pass --prices FILE"]
    lines += [f"assumes: {a}" for a in plan["assumptions"]]
    return "\n".join(lines)


def _distributed_text(dist: dict[str, Any], device: str) -> list[str]:
    if dist["world_size"] == 1:
        return []
    strategy = {"ddp": "DDP", "fsdp": "FSDP2"}[dist["strategy"]]
    nodes = f"{dist['nodes']} node{'s' if dist['nodes'] > 1 else ''}"
    options = ""
    if dist["strategy"] == "fsdp":
        options = (f", reshard_after_forward {'on' if dist['reshard_after_forward'] else 'off'}"
                   f", offload_params {'on' if dist['offload_params'] else 'off'}")
    step = dist["step"]
    lines = ["", f"distributed  {strategy} ({dist['strategy_from']}) on {dist['world_size']} x "
             f"{device}, {nodes}{options}",
             "  sent per device per step  " + ", ".join(
                 f"{k} {size_text(v)}" for k, v in step["collectives"].items())
             + f" (total {size_text(step['comm_bytes'])})"]
    if step["comm_seconds"] is None:
        lines.append("  communication not timed: no link known for this device (--interconnect)")
    else:
        lines.append(f"  over {step['interconnect']} ({step['interconnect_gb_per_s']:g} GB/s): "
                     f"communication {step['comm_seconds']:.3g} s, compute "
                     f"{step['compute_seconds']:.3g} s, step {step['seconds']:.3g} s "
                     f"({step['bound']}-bound; assumes communication overlaps compute)")
    return lines


def round_floats(value: Any) -> Any:
    """JSON output: whole numbers for bytes and counts, 4 significant digits elsewhere."""
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
            return int(value)
        return float(f"{value:.4g}") if abs(value) < 1e6 else round(value)
    if isinstance(value, dict):
        return {k: round_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [round_floats(v) for v in value]
    return value


def _preference_lines(pref: dict[str, Any] | None) -> list[str]:
    if not pref:
        return []
    extra = pref["reference_forwards_per_token"]
    cost = f", +{extra:.2g} forward per token" if extra else ""
    return [f"          {pref['objective']}: micro batch counts sequences, 2 per preference row; "
            f"reference: {pref['reference']}{cost}"]
