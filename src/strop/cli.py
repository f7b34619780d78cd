"""The `strop` command: one function per verb.

Each verb imports what it needs inside its body so `strop --help` and `strop validate` stay
fast (no torch import). User errors (`StropError`) print as plain lines and exit 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from strop.errors import EXIT_USAGE, NotBuiltYet, StropError

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


def _not_built(verb: str, issue: str) -> None:
    raise NotBuiltYet(f"strop {verb} is not built yet ({issue}); it will come in a later release")


@app.command(context_settings=OVERRIDES)
def validate(ctx: typer.Context, config: Path = typer.Argument(..., help="YAML config file")):
    """Check a config and print every resolved key with where its value came from."""
    from strop.config import load_config
    from strop.config.show import render_resolved

    loaded = load_config(config, ctx.args)
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
):
    """Train: pretraining, full fine-tuning, LoRA or QLoRA, as the config says."""
    _not_built("train", "the training issue")


@app.command(context_settings=OVERRIDES)
def preprocess(ctx: typer.Context, config: Path = typer.Argument(..., help="YAML config file")):
    """Tokenize, mask and pack the datasets once into dataset_prepared_path."""
    _not_built("preprocess", "the data issue")


@app.command(context_settings=OVERRIDES)
def plan(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config file"),
    gpu: str = typer.Option(None, "--gpu", help="Plan for one GPU (H100, A100-80GB, T4, ...) or cpu"),
    world_size: int = typer.Option(1, "--world-size", min=1, help="Devices training together"),
    sharding: str = typer.Option("ddp", "--sharding", help="ddp (replicas) or fsdp (sharded)"),
    as_json: bool = typer.Option(False, "--json", help="Print every figure as JSON"),
    prices: Path = typer.Option(None, "--prices", help="Your own price table (JSON)"),
    mfu: float = typer.Option(None, "--mfu", min=0.01, max=1.0, help="Assumed utilisation"),
):
    """Predict parameters, memory, FLOPs, time and cost of a run before renting a GPU."""
    import json

    from strop.config import load_config
    from strop.plan.report import build_plan, render_text, round_floats

    if sharding not in ("ddp", "fsdp"):
        raise StropError(f"--sharding {sharding}: use ddp or fsdp")
    loaded = load_config(config, ctx.args)
    result = build_plan(loaded.cfg, gpu=gpu, world_size=world_size, sharding=sharding,
                        prices_path=prices, mfu=mfu, base_dir=config.parent)
    typer.echo(json.dumps(round_floats(result), indent=2) if as_json else render_text(result))


@app.command()
def inspect(target: str = typer.Argument(..., help="Model directory, config.json or YAML config")):
    """List a model's modules and state_dict keys and suggest LoRA targets."""
    _not_built("inspect", "the adapters issue")


@data_app.command("check")
def data_check(target: Path = typer.Argument(..., help="YAML config or data file")):
    """Lint a dataset: size, duplicates, truncation, masking, EOS trained."""
    _not_built("data check", "the data issue")


@app.command()
def merge(run: Path = typer.Argument(..., help="Run directory or adapter directory")):
    """Merge a LoRA adapter into its base model, verified before writing."""
    _not_built("merge", "the adapters issue")


@app.command()
def export(run: Path = typer.Argument(..., help="Run directory or model directory")):
    """Export a model: merged Hugging Face safetensors or GGUF for llama.cpp."""
    _not_built("export", "the use-the-result issue")


@app.command()
def chat(model: Path = typer.Argument(..., help="Run directory or model directory")):
    """Chat with a trained model in the terminal."""
    _not_built("chat", "the use-the-result issue")


@app.command()
def generate(model: Path = typer.Argument(..., help="Run directory or model directory")):
    """Run prompts from a file through a model into JSONL."""
    _not_built("generate", "the use-the-result issue")


@app.command("eval")
def eval_(target: Path = typer.Argument(..., help="YAML config or run directory")):
    """Evaluate loss, perplexity and generation metrics."""
    _not_built("eval", "the use-the-result issue")


@app.command()
def report(runs: list[Path] = typer.Argument(..., help="One or more run directories")):
    """Plot a run (or compare runs) and write an HTML summary."""
    _not_built("report", "the use-the-result issue")


@app.command()
def demo():
    """Run the built-in end-to-end demo on CPU."""
    # Until the full demo lands, it checks the shipped recipes and says what it will run.
    from strop.config import load_config

    examples = sorted(Path("examples").rglob("*.yml"))
    for path in examples:
        loaded = load_config(path)
        typer.echo(f"ok  {path}  ({_describe_run(loaded.cfg)})")
    typer.echo("The end-to-end demo (pretrain a tiny Llama, then full, LoRA and QLoRA fine-tuning "
               "on CPU) is not built yet; the recipes above validate.")


def _describe_run(cfg) -> str:
    mode = "pretrain from scratch" if cfg.from_scratch else (cfg.adapter or "full fine-tune")
    return f"{mode}, {cfg.datasets[0].format_name} data, sequence_len {cfg.sequence_len}"


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv)
    except StropError as err:
        for line in err.problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
