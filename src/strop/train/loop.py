"""The one training recipe: setup -> loop -> save, for pretraining, full fine-tuning, LoRA and QLoRA.

Modes differ only in what `setup` builds (a fresh or pretrained model, an adapter or not, a
4-bit base or not); the loop below is the same for all of them:

    micro-batches -> loss -> backward -> accumulate -> clip -> step -> schedule -> log
                  -> evaluate -> save
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from strop import runtime
from strop.config.load import LoadedConfig
from strop.config.schema import StropConfig
from strop.data.batches import batch_generator
from strop.errors import StropError
from strop.train import checkpoint as ckpt
from strop.train import distributed, sharded
from strop.train.distributed import SINGLE, World
from strop.train.forward import LossModel, unwrap
from strop.train.log import MetricsLog, QuietLog, peak_memory_bytes
from strop.train.loss import count_trained_tokens
from strop.train.optim import build_optimizer
from strop.train.precision import Precision, resolve_precision
from strop.train.schedule import Schedule, warmup_steps_for
from strop.train.signals import GracefulStop


@dataclass
class Run:
    """Everything setup builds; the loop only reads it (and updates `state`)."""

    cfg: StropConfig
    config_text: str  # the resolved config, saved beside every checkpoint
    out: Path
    precision: Precision
    tokenizer: Any
    loss_model: LossModel
    data: Any  # strop.data.PreparedData
    train_plan: Any  # strop.data.batches.BatchPlan
    eval_plan: Any | None
    collate: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    total_steps: int
    eval_every: int | None
    save_every: int | None
    log_every: int
    flops_per_token: float
    peak_flops: float | None
    state: ckpt.TrainerState
    resumed_from: Path | None
    trainable_params: int
    total_params: int
    world: World = SINGLE
    # What forward and backward run through: the loss as a module, inside DDP or FSDP2 when
    # several processes train (strop.train.distributed).
    step_module: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        return self.loss_model.model


# ------------------------------------------------------------------------------------------ setup


def _prepare_output_dir(cfg: StropConfig, out: Path, overwrite: bool) -> Path | None:
    """Protect finished and unfinished runs; return the checkpoint to resume from, if any."""
    ckpt.remove_partial(out)
    found = ckpt.checkpoints(out)
    resume = cfg.resume_from_checkpoint
    if resume:
        if resume == "latest":
            if not found:
                raise StropError(f"resume_from_checkpoint: latest, but {out} holds no checkpoint; "
                                 "remove it to start a new run")
            return _newest_whole(found, cfg.uses_lora)
        path = Path(resume)
        if not (path / ckpt.STATE_FILE).exists():
            raise StropError(f"resume_from_checkpoint: {resume} is not a strop checkpoint "
                             f"(no {ckpt.STATE_FILE}); give a checkpoint-N directory or 'latest'")
        why = ckpt.damage(path, cfg.uses_lora)
        if why:
            raise StropError(f"resume_from_checkpoint: {resume} cannot be resumed: {why}; give "
                             "another checkpoint-N, or 'latest' for the newest whole one")
        return path
    if cfg.auto_resume_from_checkpoints and found and not overwrite:
        return _newest_whole(found, cfg.uses_lora)
    finished = (out / "summary.json").exists()
    if (finished or found) and not overwrite:
        what = "a finished run" if finished else f"an unfinished run ({found[-1].name})"
        fix = "" if finished else "continue it with --resume_from_checkpoint latest, or "
        raise StropError(f"output_dir {out} holds {what}; {fix}pass --overwrite to replace it, "
                         "or choose another output_dir")
    if overwrite and out.exists():
        for path in [*found, out / "summary.json", out / "metrics.jsonl", out / "runs"]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return None


def _newest_whole(found: list[Path], adapter: bool) -> Path:
    """The newest checkpoint that is whole; each newer damaged one is named with its damage."""
    for path in reversed(found):
        why = ckpt.damage(path, adapter)
        if why is None:
            return path
        print(f"warning: skipping {path.name}: {why}", file=sys.stderr, flush=True)
    raise StropError(f"no checkpoint in {found[0].parent} can be resumed (each is damaged, see "
                     "the warnings above); start again with --overwrite")


def _every(steps_per_epoch: int, steps: int | None, per_epoch: int | None) -> int | None:
    if steps:
        return steps
    if per_epoch:
        return max(steps_per_epoch // per_epoch, 1)
    return None


def setup(loaded: LoadedConfig, overwrite: bool = False, world: World = SINGLE) -> Run:
    from transformers import set_seed

    from strop.config.show import render_resolved
    from strop.data import prepare_data
    from strop.data.batches import BatchPlan, make_collator
    from strop.model.load import load_model
    from strop.model.tokenizer import load_tokenizer
    from strop.plan.math import training_flops_per_token

    cfg = loaded.cfg
    out = Path(cfg.output_dir)
    # Rank 0 alone touches output_dir; every rank resumes from the checkpoint it chose.
    resume_dir = distributed.on_main(world, lambda: _prepare_output_dir(cfg, out, overwrite))
    set_seed(cfg.seed)  # the same on every rank: the same initial weights and adapter
    precision = resolve_precision(cfg)

    # A tokenizer trained for a from-scratch run is saved in output_dir and reused on resume.
    # Rank 0 first: it trains that tokenizer and fills the prepared-data cache the others read.
    with distributed.main_first(world):
        tokenizer = load_tokenizer(cfg)
        data = prepare_data(cfg, tokenizer)
    weights_dtype = precision.frozen_weights if cfg.uses_lora else torch.float32
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
    if cfg.compile_model:
        loss_model = _compiled(loss_model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
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
    run = Run(cfg=cfg, config_text=render_resolved(loaded), out=out, precision=precision,
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


def _compiled(loss_model: LossModel) -> LossModel:
    from strop.train.compile_cache import enable_persistent_cache

    enable_persistent_cache()  # before the first compile reads the cache location
    # dynamic=None: the first graph is specialised to the first batch's shape and only a
    # shape change recompiles it with that dimension symbolic. Packed rows padded to
    # sequence_len keep one shape and keep the faster static graph (full fine-tuning of the
    # benchmark Llama at 4 x 1024, one run each: 1183 tokens/s static, 1132 dynamic).
    if loss_model.decoder is not None:
        loss_model.decoder = torch.compile(loss_model.decoder, dynamic=None)
    else:
        loss_model.model = torch.compile(loss_model.model, dynamic=None)
    return loss_model


def _peak_flops(precision: Precision) -> float | None:
    from strop.plan.hardware import device_peak_flops

    return device_peak_flops(precision.device, precision.name)


# ------------------------------------------------------------------------------------------- loop


def _to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


EVAL_STREAM = 1_000_000  # the "epoch" of evaluation batches' random choices (masked LM)


def evaluate(run: Run) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the whole eval split, dropout off."""
    model = run.model
    model.eval()
    total, count = 0.0, 0
    batches, _ = _my_batches(run, run.data.eval, list(enumerate(run.eval_plan.epoch(0))),
                             EVAL_STREAM)
    with torch.no_grad(), run.precision.autocast():
        for batch in batches:
            loss_sum, n = run.step_module(batch)
            total += float(loss_sum.detach())
            count += n
    total, count = distributed.all_sum(run.world, total, count)
    count = int(count)
    model.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def _rows(rows: Any, indices) -> list[dict[str, list[int]]]:
    return [rows[int(i)] for i in indices]


def _my_batches(run: Run, rows: Any, window: list[tuple[int, Any]],
                stream: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """This rank's share of `window` ((index, row indices) micro-batches) as device batches,
    and their tokens (padding excluded). A short share is padded (distributed.share) with a
    pass whose labels are all -100: it trains and counts nothing but keeps the ranks in step.
    Random choices in collation (masked LM) come from a generator seeded by the batch's place,
    so a resumed run makes the same ones."""
    batches, tokens = [], 0
    for item in distributed.share(run.world, window):
        index, indices = item or window[0]
        group = _rows(rows, indices)
        batch = _to_device(run.collate(group, generator=batch_generator(run.cfg.seed, stream,
                                                                         index)),
                           run.precision.device)
        if item is None:
            batch["labels"].fill_(-100)
        else:
            tokens += sum(len(r["input_ids"]) for r in group)
        batches.append(batch)
    return batches, tokens


def _train_step(run: Run, window: list[tuple[int, Any]]) -> tuple[float, float, int, int]:
    """One optimizer step over a window of micro-batches.

    Returns (loss, grad norm, trained tokens, tokens); a non-finite loss or gradient leaves the
    weights untouched and returns it as is, for the caller to count.
    """
    world = run.world
    batches, tokens = _my_batches(run, run.data.train, window, run.state.epoch)
    # Normalise by every trained token of the window (of all ranks), not per micro-batch: the
    # same loss and gradients whatever the micro_batch_size x gradient_accumulation_steps x
    # processes split. DDP and FSDP2 average gradients over ranks, hence the world size.
    local = sum(count_trained_tokens(b["labels"], run.loss_model.shift) for b in batches)
    n_window, tokens = (int(x) for x in distributed.all_sum(world, local, tokens))
    total = 0.0
    for i, batch in enumerate(batches):
        with distributed.accumulating(run.step_module, world, last=i == len(batches) - 1):
            with run.precision.autocast():
                loss_sum, _ = run.step_module(batch)
            loss = loss_sum * (world.size / max(n_window, 1))
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        total += float(loss_sum.detach())
    total = distributed.all_sum(world, total)[0]
    loss_value = total / max(n_window, 1)
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
    return loss_value, grad_norm, n_window, tokens


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
    speedups = _training_speedups(run)
    window_loss, window_tokens, window_trained, window_time = 0.0, 0, 0, 0.0
    try:
        with GracefulStop() as stop, speedups:
            while state.step < run.total_steps and outcome.reason == "completed":
                windows = _windows(run, state.epoch)
                for window in windows[state.window_in_epoch:]:
                    started = time.perf_counter()
                    loss, grad_norm, trained, tokens = _train_step(run, window)
                    elapsed = time.perf_counter() - started
                    state.step += 1
                    state.window_in_epoch += 1
                    state.train_seconds += elapsed
                    outcome = _check_step(run, loss, grad_norm)
                    if math.isfinite(loss):
                        state.tokens += tokens
                        state.trained_tokens += trained
                        window_loss += loss * trained
                        window_trained += trained
                        window_tokens += tokens
                        window_time += elapsed
                    if state.step % run.log_every == 0 or state.step == run.total_steps:
                        _log_train(run, log, grad_norm, window_loss, window_trained, window_tokens,
                                   window_time)
                        window_loss, window_tokens, window_trained, window_time = 0.0, 0, 0, 0.0
                    else:
                        log.advance(state.step)
                    if outcome.reason == "completed" and run.eval_every and \
                            state.step % run.eval_every == 0 and state.step < run.total_steps:
                        outcome = _evaluate_and_maybe_stop(run, log)
                    # A signal to one rank stops them all, at the same step.
                    signalled = distributed.any_rank(run.world, stop.requested is not None)
                    if signalled and outcome.reason == "completed":
                        outcome = Outcome("signal", f"stopped by {stop.requested or 'SIGTERM'}")
                    if run.save_every and state.step % run.save_every == 0 \
                            and state.step < run.total_steps and outcome.reason == "completed":
                        _save_checkpoint(run)
                    if state.step >= run.total_steps or outcome.reason != "completed":
                        break
                else:
                    state.epoch += 1
                    state.window_in_epoch = 0
            if outcome.reason in ("completed", "early_stopping") and run.eval_plan is not None \
                    and not _evaluated_at(state, state.step):
                _evaluate_and_maybe_stop(run, log, final=True)
    finally:
        log.close()
    return _finish(run, outcome)


def _training_speedups(run: Run) -> contextlib.ExitStack:
    """Settings that make training faster without changing its result, undone afterwards so
    the saved model and later generation see the model as loaded."""
    from strop.model.attention import supports_varlen, varlen_attention
    from strop.train import lean_activations

    stack = contextlib.ExitStack()
    hf = unwrap(run.model)
    if run.loss_model.decoder is not None and supports_varlen(hf.config, run.cfg.sequence_len):
        stack.enter_context(varlen_attention(hf))
    # Not under FSDP2: the lean modules hold the norms' parameters themselves, and FSDP2 swaps
    # sharded and gathered parameters on the modules that held them when it sharded.
    if lean_activations.used_for(run.cfg) and run.world.strategy != "fsdp":
        stack.enter_context(lean_activations.lean_activations(hf))
    if run.cfg.uses_lora and run.precision.compute != torch.float32:
        # PEFT casts each LoRA input to the adapter's fp32 and autocast casts it back to bf16
        # for the matmul: two copies of every activation for nothing under autocast.
        from peft.helpers import disable_input_dtype_casting

        stack.enter_context(disable_input_dtype_casting(run.model))
    return stack


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


def _log_train(run: Run, log: MetricsLog, grad_norm: float, loss_sum: float, trained: int,
               tokens: int, seconds: float) -> None:
    state = run.state
    loss = loss_sum / trained if trained else float("nan")
    trained_per_s = trained / seconds if seconds else 0.0
    record = {"kind": "train", "step": state.step, "epoch": round(state.epoch + state.window_in_epoch
                                                                  / run.steps_per_epoch, 4),
              "loss": loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
              "trained_tokens": state.trained_tokens, "tokens": state.tokens,
              "trained_tokens_per_s": trained_per_s,
              "tokens_per_s": tokens / seconds if seconds else 0.0,
              "mfu": _mfu(run, tokens / seconds if seconds else 0.0),
              "peak_memory_bytes": peak_memory_bytes(run.precision.device),
              "skipped_steps": state.skipped_steps, "world_size": run.world.size}
    log.write(record)
    log.show(state.step, {"loss": loss, "lr": record["lr"], "tok/s": round(trained_per_s)})


def _mfu(run: Run, tokens_per_s: float) -> float | None:
    if not run.peak_flops:
        return None
    return run.flops_per_token * tokens_per_s / run.peak_flops


def _evaluated_at(state: ckpt.TrainerState, step: int) -> bool:
    return any(h.get("step") == step for h in state.history)


def _evaluate_and_maybe_stop(run: Run, log: MetricsLog, final: bool = False) -> Outcome:
    state, cfg = run.state, run.cfg
    result = evaluate(run)
    result = {"kind": "eval", "step": state.step, **result}
    state.history.append(result)
    log.write(result)
    log.message(f"eval at step {state.step}: loss {result['eval_loss']:.4f}, "
                f"perplexity {result['eval_ppl']:.2f}")
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
    seconds = state.train_seconds
    summary = {
        "outcome": outcome.reason, "message": outcome.message, "steps": state.step,
        "total_steps": run.total_steps, "epochs": state.epoch + state.window_in_epoch
        / run.steps_per_epoch, "tokens": state.tokens, "trained_tokens": state.trained_tokens,
        "train_seconds": seconds, "trained_tokens_per_s": state.trained_tokens / seconds
        if seconds else 0.0, "tokens_per_s": state.tokens / seconds if seconds else 0.0,
        "mfu": _mfu(run, state.tokens / seconds if seconds else 0.0),
        "skipped_steps": state.skipped_steps, "best_eval_loss": state.best_eval_loss,
        "final_eval": state.history[-1] if state.history else None,
        "peak_memory_bytes": peak_memory_bytes(run.precision.device),
        "trainable_params": run.trainable_params, "total_params": run.total_params,
        "precision": run.precision.name, "device": run.precision.device,
        "world_size": run.world.size, "strategy": run.world.strategy,
        "data": run.data.stats.as_dict() if hasattr(run.data.stats, "as_dict") else None,
    }
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
    from strop.train.run_lock import exclusive_output_dir

    cfg = loaded.cfg
    check_sequence_len(cfg)  # from the model's config.json, before anything is written
    world = distributed.start(cfg, detect().resolve(cfg.device))
    try:
        with contextlib.ExitStack() as held:
            # Rank 0 holds output_dir for the whole run; it alone writes there.
            distributed.on_main(world, lambda: held.enter_context(
                exclusive_output_dir(Path(cfg.output_dir))))
            return fit(setup(loaded, overwrite, world))
    except RuntimeError as err:
        if distributed.timed_out(world, err):
            raise StropError(distributed.timeout_message(world, cfg, err)) from None
        raise
    finally:
        distributed.stop(world)
