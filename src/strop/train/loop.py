"""The one training recipe: setup -> loop -> save, for pretraining, full fine-tuning, LoRA and QLoRA.

Modes differ only in what `setup` builds (a fresh or pretrained model, an adapter or not, a
4-bit base or not); the loop below is the same for all of them:

    micro-batches -> loss -> backward -> accumulate -> clip -> step -> schedule -> log
                  -> evaluate -> save
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from strop import runtime
from strop.config.load import LoadedConfig
from strop.errors import StropError
from strop.precision import Precision
from strop.train import checkpoint as ckpt
from strop.train import distributed, sharded
from strop.train.compile_cache import compiled
from strop.train.distributed import SINGLE, World
from strop.train.evaluate import EVAL_STREAM, evaluation_loss
from strop.train.forward import LossModel, unwrap
from strop.train.log import MetricsLog, QuietLog, check_loggers, peak_memory_bytes
from strop.train.loss import count_trained_tokens
from strop.train.optim import build_optimizer
from strop.train.output_dir import prepare_output_dir
from strop.train.run import Run, my_batches, run_summary
from strop.train.schedule import Schedule, warmup_steps_for
from strop.train.signals import GracefulStop
from strop.train.speedups import training_speedups

# ------------------------------------------------------------------------------------------ setup


def _every(steps_per_epoch: int, steps: int | None, per_epoch: int | None) -> int | None:
    if steps:
        return steps
    if per_epoch:
        return max(steps_per_epoch // per_epoch, 1)
    return None


def setup(loaded: LoadedConfig, overwrite: bool = False, world: World = SINGLE) -> Run:
    import warnings

    from transformers import set_seed

    from strop.config.show import render_resolved
    from strop.data import prepare_data
    from strop.data.batches import BatchPlan, make_collator
    from strop.model.load import load_model
    from strop.model.quantize import parameter_count
    from strop.model.tokenizer import load_tokenizer
    from strop.recipe.decide import decide_for
    from strop.recipe.math import training_flops_per_token

    cfg = loaded.cfg
    out = Path(cfg.output_dir)
    # Rank 0 alone touches output_dir; every rank resumes from the checkpoint it chose.
    resume_dir = distributed.on_main(world, lambda: prepare_output_dir(cfg, out, overwrite))
    set_seed(cfg.seed)  # the same on every rank: the same initial weights and adapter

    # A tokenizer trained for a from-scratch run is saved in output_dir and reused on resume.
    # Rank 0 first: it trains that tokenizer and fills the prepared-data cache the others read.
    with distributed.main_first(world):
        tokenizer = load_tokenizer(cfg)
        decisions = decide_for(cfg, tokenizer, world.strategy)
        # Preference rows compute their prompt once when strop's attention runs the model
        # (the only one that reads a branch); otherwise each side is a whole document.
        data = prepare_data(cfg, tokenizer, share_prompt=decisions.varlen)
    precision = decisions.precision
    if precision.note:
        warnings.warn(precision.note, UserWarning, stacklevel=2)
    # fp32 master weights; a frozen base under LoRA in the compute dtype
    weights_dtype = precision.compute if cfg.uses_lora else torch.float32
    skeleton = distributed.builds_skeleton(cfg, world)  # its weights come from rank 0
    model = load_model(cfg, tokenizer, precision.device, weights_dtype, skeleton=skeleton)
    if cfg.uses_lora:
        from strop.adapters.lora import apply_lora

        model, report = apply_lora(model, cfg)
        print(report.render(), flush=True)
    if cfg.gradient_checkpointing:
        # transformers also makes the embeddings' output require grad, which checkpointed
        # blocks need when every base weight is frozen (LoRA).
        unwrap(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": cfg.checkpointing_reentrant})
    loss_model = LossModel.of(model, cfg.objective)
    if cfg.preference:
        from strop.train.preference import loss_model_for_run

        loss_model = loss_model_for_run(cfg, model, loss_model, data, tokenizer, decisions, world)
    if cfg.compile_model:
        loss_model = compiled(loss_model)
    # logical shapes: a 4-bit base counts its values, not its packed bytes (as the adapter
    # report does)
    trainable = parameter_count(model, trainable_only=True)
    total = parameter_count(model)
    if resume_dir is not None and not skeleton and not sharded.is_sharded(resume_dir):
        ckpt.load_weights(model, resume_dir, cfg.uses_lora)  # whole, before FSDP2 shards them
    step_module = distributed.wrap(loss_model, cfg, world, precision.device)
    if world.rank:
        torch.manual_seed(cfg.seed + world.rank)  # each rank its own dropout

    train_plan = BatchPlan(data.train, cfg.micro_batch_size, seed=cfg.seed, shuffle=True,
                           group_by_length=cfg.group_by_length)
    eval_plan = BatchPlan(data.eval, cfg.effective_eval_batch_size, seed=cfg.seed, shuffle=False) \
        if data.eval is not None and len(data.eval) else None
    accum = cfg.gradient_accumulation_steps
    per_step = accum * world.size  # micro-batches of one optimizer step, over all ranks
    if per_step > len(train_plan) and world.main:
        across = f" x {world.size} processes" if world.many else ""
        print(f"warning: gradient_accumulation_steps {accum}{across} is more than the "
              f"{len(train_plan)} micro-batches of an epoch, so each optimizer step accumulates "
              f"one epoch ({len(train_plan)} micro-batches, not {per_step}); set "
              f"gradient_accumulation_steps: {max(len(train_plan) // world.size, 1)} or less, or "
              "add data", file=sys.stderr, flush=True)
    steps_per_epoch = max(math.ceil(len(train_plan) / per_step), 1)
    total_steps = cfg.max_steps or max(math.ceil(cfg.num_epochs * steps_per_epoch), 1)

    optimizer = build_optimizer(model, cfg, precision.device)
    schedule = Schedule(cfg.lr_scheduler, total_steps,
                        warmup_steps_for(total_steps, cfg.warmup_steps, cfg.warmup_ratio),
                        min_lr_ratio=cfg.cosine_min_lr_ratio or 0.0, div_factor=cfg.lr_div_factor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(precision.device) if precision.scaler else None

    state = ckpt.TrainerState()
    if resume_dir is not None:
        if sharded.is_sharded(resume_dir):  # the weights too, each rank its own shard
            sharded.load(resume_dir, step_module, optimizer, cfg.uses_lora)
        else:
            ckpt.load_optimizer(resume_dir, optimizer,
                                step_module if world.strategy == "fsdp" else None)
        state = ckpt.load_schedule(resume_dir, scheduler, scaler)
        print(f"resuming from {resume_dir} at step {state.step}", flush=True)

    hf = unwrap(model)
    # Attention FLOPs follow the documents' real lengths, not sequence_len: short rows (or
    # packed documents, which attend only within themselves) would otherwise inflate the MFU.
    attended = min(cfg.sequence_len, max(1, round(data.train.attended_length())))
    flops = training_flops_per_token(hf.config, seq_len=attended,
                                     trainable_params=trainable, total_params=total)
    eval_every = _every(steps_per_epoch, cfg.eval_steps, cfg.evals_per_epoch) \
        if eval_plan is not None else None
    run = Run(cfg=cfg, config_text=render_resolved(loaded), out=out, decisions=decisions,
               tokenizer=tokenizer, loss_model=loss_model, data=data, train_plan=train_plan,
               eval_plan=eval_plan, collate=make_collator(cfg, tokenizer),
               optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, eval_every=eval_every,
               save_every=_every(steps_per_epoch, cfg.save_steps, cfg.saves_per_epoch),
               log_every=cfg.logging_steps or max(total_steps // 100, 1),
               flops_per_token=flops, peak_flops=_peak_flops(precision), state=state,
               resumed_from=resume_dir, trainable_params=trainable, total_params=total,
               world=world, step_module=step_module)
    if resume_dir is not None:
        # Last: anything above may draw random numbers (adapter init, a matmul benchmark);
        # the next step must see exactly the generators the interrupted run had. A rank the
        # checkpoint's run did not have keeps the seed it was given above.
        ckpt.restore_rng(resume_dir, world.rank)
    return run


def _peak_flops(precision: Precision) -> float | None:
    from strop.recipe.hardware import device_peak_flops

    return device_peak_flops(precision.device, precision.name)


# ------------------------------------------------------------------------------------------- loop


def evaluate(run: Run) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the whole eval split (each rank its
    share), dropout off."""
    batches, _ = my_batches(run, run.data.eval, list(enumerate(run.eval_plan.epoch(0))),
                             EVAL_STREAM)
    return evaluation_loss(run.model, run.loss_model, batches, run.precision.autocast(),
                           run.world, forward=run.step_module)


@dataclass
class StepResult:
    loss: float  # the window's loss, each unit's sum over its count
    grad_norm: float
    trained: int  # trained tokens of the window (all ranks)
    tokens: int
    weight: int  # how many of the loss's first unit (tokens, pairs): its weight in a log line
    metrics: dict[str, tuple[float, float]]  # name -> (sum, count), all ranks


def window_loss(loss_model: Any, batches: list[dict[str, torch.Tensor]],
                world: World) -> dict[str, float]:
    """Each unit of the loss over the window of all ranks: tokens (SFT), or pairs and the chosen
    tokens of an NLL term (preference). Counted before any forward, since every micro-batch's
    backward needs them."""
    counts: dict[str, float] = {}
    for batch in batches:
        for unit, n in loss_model.counts(batch).items():
            counts[unit] = counts.get(unit, 0) + n
    units = sorted(counts)
    return dict(zip(units, distributed.all_sum(world, *(counts[u] for u in units)), strict=True))


def _train_step(run: Run, window: list[tuple[int, Any]]) -> StepResult:
    """One optimizer step over a window of micro-batches.

    A non-finite loss or gradient leaves the weights untouched and is returned as is, for the
    caller to count.
    """
    world = run.world
    batches, tokens = my_batches(run, run.data.train, window, run.state.epoch)
    # Normalise by every unit of the window (of all ranks), not per micro-batch: the same loss
    # and gradients whatever the micro_batch_size x gradient_accumulation_steps x processes
    # split. DDP and FSDP2 average gradients over ranks, hence the world size.
    units = window_loss(run.loss_model, batches, world)
    local = sum(count_trained_tokens(b["labels"], run.loss_model.shift) for b in batches)
    trained, tokens = (int(x) for x in distributed.all_sum(world, local, tokens))
    totals = dict.fromkeys(units, 0.0)
    metrics: dict[str, list[float]] = {}
    for i, batch in enumerate(batches):
        with distributed.accumulating(run.step_module, world, last=i == len(batches) - 1):
            with run.precision.autocast():
                sums, batch_metrics = run.step_module(batch)
            loss = sum(value * (world.size / max(units[unit], 1)) for unit, value in sums.items())
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        for unit, value in sums.items():
            totals[unit] += float(value.detach())
        for name, (value, count) in batch_metrics.items():
            kept = metrics.setdefault(name, [0.0, 0.0])
            kept[0] += float(value)
            kept[1] += float(count)
    names = sorted(metrics)
    summed = distributed.all_sum(world, *(totals[u] for u in units),
                                 *(x for n in names for x in metrics[n]))
    loss_value = sum(v / max(units[u], 1) for u, v in zip(units, summed, strict=False))
    rest = summed[len(units):]
    window_metrics = {n: (rest[2 * k], rest[2 * k + 1]) for k, n in enumerate(names)}
    params = [p for p in run.model.parameters() if p.requires_grad]
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    clip = run.cfg.max_grad_norm or float("inf")
    grad_norm = distributed.full_norm(torch.nn.utils.clip_grad_norm_(params, clip))
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        if run.scaler:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
    elif run.scaler:
        run.scaler.update()  # let the scaler back off after an overflow
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    weight = int(next(iter(units.values()))) if units else 0
    return StepResult(loss_value, grad_norm, trained, tokens, weight, window_metrics)


def _windows(run: Run, epoch: int) -> list[list[tuple[int, Any]]]:
    """The epoch's micro-batches (index, row indices) grouped into optimizer steps; the last
    step of an epoch may have fewer micro-batches."""
    batches = list(enumerate(run.train_plan.epoch(epoch)))
    per_step = run.cfg.gradient_accumulation_steps * run.world.size
    return [batches[i:i + per_step] for i in range(0, len(batches), per_step)]


@dataclass
class Outcome:
    reason: str  # "completed", "early_stopping", "signal", "non_finite", "loss_watchdog"
    message: str = ""

    @property
    def stopped(self) -> bool:
        return self.reason != "completed"


@dataclass
class SinceLog:
    """What the steps since the last logged one trained (finite steps only)."""

    loss_sum: float = 0.0  # loss x its weight (trained tokens, pairs), summed
    weight: int = 0
    trained: int = 0
    tokens: int = 0
    seconds: float = 0.0
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # (sum, count)

    def add(self, step: StepResult, seconds: float) -> SinceLog:
        metrics = dict(self.metrics)
        for name, (value, count) in step.metrics.items():
            had = metrics.get(name, (0.0, 0.0))
            metrics[name] = (had[0] + value, had[1] + count)
        return SinceLog(self.loss_sum + step.loss * step.weight, self.weight + step.weight,
                        self.trained + step.trained, self.tokens + step.tokens,
                        self.seconds + seconds, metrics)


def fit(run: Run) -> dict[str, Any]:
    cfg, state = run.cfg, run.state
    log = MetricsLog(cfg, run.out, run.total_steps, state.step,
                     resumed=run.resumed_from is not None) \
        if run.world.main else QuietLog()
    log.message(f"training {run.trainable_params:,} of {run.total_params:,} parameters "
                f"({100 * run.trainable_params / max(run.total_params, 1):.2f}%), "
                f"{run.total_steps} steps ({run.steps_per_epoch} per epoch), {run.precision.name} "
                f"on {run.precision.device}, {runtime.active_allocator()}")
    run.model.train()
    outcome = Outcome("completed")
    since_log = SinceLog()
    try:
        with GracefulStop() as stop, training_speedups(run):
            for window in _remaining_windows(run):
                outcome, since_log = _step(run, window, log, since_log)
                # A signal to one rank stops them all, at the same step.
                if distributed.any_rank(run.world, stop.requested is not None) \
                        and not outcome.stopped:
                    outcome = Outcome("signal", f"stopped by {stop.requested or 'SIGTERM'}")
                if run.save_every and state.step % run.save_every == 0 \
                        and state.step < run.total_steps and not outcome.stopped:
                    _save_checkpoint(run)
                if state.step >= run.total_steps or outcome.stopped:
                    break
            if outcome.reason in ("completed", "early_stopping") and run.eval_plan is not None \
                    and not _evaluated_at(state, state.step):
                _evaluate_and_maybe_stop(run, log, final=True)
    finally:
        log.close()
    return _finish(run, outcome)


def _remaining_windows(run: Run) -> Iterator[list[tuple[int, Any]]]:
    """The optimizer steps still to train, epoch after epoch, from where the state stands (a
    resumed run continues inside its epoch). The caller stops at total_steps."""
    state = run.state
    while state.step < run.total_steps:
        yield from _windows(run, state.epoch)[state.window_in_epoch:]
        state.epoch += 1
        state.window_in_epoch = 0


def _step(run: Run, window: list[tuple[int, Any]], log: MetricsLog,
          since_log: SinceLog) -> tuple[Outcome, SinceLog]:
    """Train one optimizer step, count it, log it when due, evaluate when due."""
    state = run.state
    started = time.perf_counter()
    result = _train_step(run, window)
    elapsed = time.perf_counter() - started
    state.step += 1
    state.window_in_epoch += 1
    state.train_seconds += elapsed
    outcome = _check_step(run, result.loss, result.grad_norm)
    if math.isfinite(result.loss):
        state.tokens += result.tokens
        state.trained_tokens += result.trained
        since_log = since_log.add(result, elapsed)
    if state.step % run.log_every == 0 or state.step == run.total_steps:
        _log_train(run, log, result.grad_norm, since_log)
        since_log = SinceLog()
    else:
        log.advance(state.step)
    if not outcome.stopped and run.eval_every and state.step % run.eval_every == 0 \
            and state.step < run.total_steps:
        outcome = _evaluate_and_maybe_stop(run, log)
    return outcome, since_log


def _check_step(run: Run, loss: float, grad_norm: float) -> Outcome:
    """Count non-finite steps and the loss watchdog; decide whether to stop."""
    state, cfg = run.state, run.cfg
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and run.scaler is None):
        state.skipped_steps += 1
        state.bad_in_a_row += 1
        if state.bad_in_a_row >= cfg.max_bad_steps:
            return Outcome("non_finite", f"{state.bad_in_a_row} steps in a row had a non-finite "
                           f"{'loss' if not math.isfinite(loss) else 'gradient'} and were skipped. "
                           "Likely causes: a learning rate too high (try 10x lower), fp16 overflow "
                           "(use bf16), or bad data (run strop data check). The last good weights "
                           "are saved")
        return Outcome("completed")
    state.bad_in_a_row = 0
    threshold = cfg.loss_watchdog_threshold
    if threshold is not None:
        state.watchdog_in_a_row = state.watchdog_in_a_row + 1 if loss > threshold else 0
        if state.watchdog_in_a_row >= cfg.loss_watchdog_patience:
            return Outcome("loss_watchdog", f"loss stayed above loss_watchdog_threshold "
                           f"{threshold} for {state.watchdog_in_a_row} steps (last {loss:.3f}); "
                           "lower the learning rate or check the data")
    return Outcome("completed")


def _log_train(run: Run, log: MetricsLog, grad_norm: float, since: SinceLog) -> None:
    state = run.state
    loss = since.loss_sum / since.weight if since.weight else float("nan")
    seconds = since.seconds
    trained_per_s = since.trained / seconds if seconds else 0.0
    tokens_per_s = since.tokens / seconds if seconds else 0.0
    record = {"kind": "train", "step": state.step, "epoch": round(state.epoch + state.window_in_epoch
                                                                  / run.steps_per_epoch, 4),
              "loss": loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
              "trained_tokens": state.trained_tokens, "tokens": state.tokens,
              "trained_tokens_per_s": trained_per_s, "tokens_per_s": tokens_per_s,
              "mfu": run.mfu(tokens_per_s),
              "peak_memory_bytes": peak_memory_bytes(run.precision.device),
              "skipped_steps": state.skipped_steps, "world_size": run.world.size,
              **{name: value / count for name, (value, count) in since.metrics.items() if count}}
    log.write(record)
    shown = {"loss": loss, "lr": record["lr"], "tok/s": round(trained_per_s)}
    if "rewards/accuracies" in record:  # a preference run: is the chosen reply rewarded more?
        shown["reward acc"] = round(record["rewards/accuracies"], 3)
    log.show(state.step, shown)


def _evaluated_at(state: ckpt.TrainerState, step: int) -> bool:
    return any(h.get("step") == step for h in state.history)


def _evaluate_and_maybe_stop(run: Run, log: MetricsLog, final: bool = False) -> Outcome:
    state, cfg = run.state, run.cfg
    result = evaluate(run)
    result = {"kind": "eval", "step": state.step, **result}
    state.history.append(result)
    log.write(result)
    said = f"perplexity {result['eval_ppl']:.2f}" if "eval_ppl" in result else \
        f"reward accuracy {result.get('eval_rewards/accuracies', float('nan')):.3f}"
    log.message(f"eval at step {state.step}: loss {result['eval_loss']:.4f}, {said}")
    if state.best_eval_loss is None or result["eval_loss"] < state.best_eval_loss:
        state.best_eval_loss = result["eval_loss"]
        state.best_checkpoint = f"checkpoint-{state.step}"
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    patience = cfg.early_stopping_patience
    if not final and patience and state.evals_without_improvement >= patience:
        return Outcome("early_stopping", f"eval loss did not improve for {patience} evaluations "
                       f"(best {state.best_eval_loss:.4f}); stopping early")
    return Outcome("completed")


def _save_checkpoint(run: Run) -> Path:
    """Every rank takes part (FSDP2 gathers the shards, or each rank writes its own; every
    rank's RNG states are collected); rank 0 writes the rest. Either format resumes on any
    number of processes."""
    world = run.world
    weights = optimizer_state = shards = None
    if run.cfg.sharded_checkpoints:  # each rank writes its own shard
        shards = sharded.save(run.out, run.state.step, run.step_module, run.optimizer,
                              run.cfg.uses_lora, world)
    elif world.strategy == "fsdp":
        weights, named = distributed.full_state_dicts(run.step_module, run.optimizer, world)
        if world.main:
            optimizer_state = ckpt.by_index(named, run.optimizer, run.step_module)
    rngs = distributed.gather_objects(world, ckpt.rng_state())

    def write() -> Path:
        path = ckpt.save_checkpoint(run.out, run.model, run.tokenizer, run.optimizer,
                                    run.scheduler, run.state, run.config_text, run.scaler,
                                    weights=weights, optimizer_state=optimizer_state,
                                    rng_states=rngs, shards=shards)
        keep = {run.state.best_checkpoint} if run.state.best_checkpoint else set()
        ckpt.prune(run.out, run.cfg.save_total_limit, keep)
        return path

    return Path(distributed.on_main(world, write))


def _finish(run: Run, outcome: Outcome) -> dict[str, Any]:
    """Save what the run produced and say how it ended."""
    import json

    state = run.state
    interrupted = outcome.reason == "signal"
    last = _save_checkpoint(run) if interrupted or outcome.reason == "non_finite" else None
    if not interrupted:
        weights = None
        if run.world.strategy == "fsdp":
            weights = distributed.full_state_dicts(run.step_module, None, run.world)[0]

        def write() -> None:
            ckpt.save_model_files(run.model, run.tokenizer, run.out, run.config_text, weights)
            hf = unwrap(run.model)
            if not run.cfg.uses_lora and getattr(hf, "generation_config", None):
                hf.generation_config.save_pretrained(run.out)

        distributed.on_main(run.world, write)
    if not run.world.main:
        return {"outcome": outcome.reason, "message": outcome.message, "steps": state.step}
    summary = run_summary(run, outcome.reason, outcome.message)
    if interrupted:
        summary["resume"] = f"strop train <config> --resume_from_checkpoint {last}"
        print(f"{outcome.message}: saved {last}. Resume with: strop train <your config> "
              f"--resume_from_checkpoint {last}", flush=True)
        (run.out / "interrupted.json").write_text(json.dumps(summary, indent=2))
        return summary
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    if outcome.message:
        print(outcome.message, flush=True)
    print(f"saved the {'adapter' if run.cfg.uses_lora else 'model'} to {run.out}", flush=True)
    return summary


def train(loaded: LoadedConfig, overwrite: bool = False) -> dict[str, Any]:
    """Run the config's training: setup, loop, save. Returns the run's summary."""
    from strop.device import detect
    from strop.model.context import check_sequence_len
    from strop.precision import run_device
    from strop.train.run_lock import exclusive_output_dir

    cfg = loaded.cfg
    check_sequence_len(cfg)  # from the model's config.json, before anything is written
    check_loggers(cfg)
    world = distributed.start(cfg, run_device(cfg, detect()))
    try:
        with contextlib.ExitStack() as held:
            # Rank 0 holds output_dir for the whole run; it alone writes there.
            distributed.on_main(world, lambda: held.enter_context(
                exclusive_output_dir(Path(cfg.output_dir))))
            return fit(setup(loaded, overwrite, world))
    except RuntimeError as err:
        if said := distributed.collective_failure(world, cfg, err):
            raise StropError(said) from None
        raise
    finally:
        distributed.stop(world)
