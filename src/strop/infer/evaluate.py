"""`strop eval`: how good is a trained model?

- loss: eval loss and perplexity on the run's validation split (val_set_size / test_datasets),
  computed exactly as training computed it (strop.train.forward: trained tokens only);
- generation (with a data file in the run's dataset format): greedy answers to each row's prompt
  compared with the row's response (strop.infer.metrics), and how often generation stopped;
- base: the same figures for the model the run started from, side by side;
- tasks: lm-eval-harness tasks, when lm-eval is installed.

`evaluate_run(...)` returns a plain dict (the demo and `--json` use it):
    {"model", "loss": {"eval_loss", "perplexity", "tokens"} | None (a preference run:
     {"eval_loss", "pairs" or "examples", "reward_accuracy", "reward_margin"}),
     "generation": {"exact_match", "contains", "token_f1", "stop_rate", "n"} | None,
     "samples": [{"prompt", "reference", "output", "stopped"}, ...],
     "base": {"model", "loss", "generation", "samples"} | None, "tasks": {...} | None}
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from strop.errors import StropError
from strop.infer.generate import Sampling, generate
from strop.infer.load import Loaded, load_for_inference
from strop.infer.metrics import answer_metrics
from strop.infer.prompts import Prompter, read_prompt_file

SAMPLES = 5  # generations kept in the result for people to read


def evaluate_run(target: Path | str, data: Path | str | None = None, base: bool = False,
                 max_new_tokens: int = 32, batch_size: int = 16, tasks: str | None = None,
                 device: str = "cpu") -> dict[str, Any]:
    if tasks:
        _require_lm_eval()
    loaded = load_for_inference(target, device)
    rows = read_prompt_file(Path(data)) if data is not None else None
    prompts = _prompts(loaded, rows, Path(data)) if rows is not None else None
    sampling = Sampling(max_new_tokens=max_new_tokens).check()

    result: dict[str, Any] = {"model": loaded.description, **_figures(loaded, prompts, sampling,
                                                                       batch_size)}
    result["tasks"] = _lm_eval(loaded, tasks, batch_size) if tasks else None
    result["base"] = None
    if base:
        with _base_of(loaded, target, device) as base_loaded:
            result["base"] = {"model": base_loaded.description,
                              **_figures(base_loaded, prompts, sampling, batch_size)}
    return result


def _figures(loaded: Loaded, prompts, sampling: Sampling, batch_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"loss": eval_loss(loaded, batch_size), "generation": None,
                           "samples": []}
    if prompts:
        generations = generate(loaded.model, loaded.tokenizer, prompts, sampling, batch_size)
        out["generation"] = answer_metrics([g.text for g in generations],
                                           [p.reference or "" for p in prompts],
                                           [g.stopped for g in generations])
        out["samples"] = [{"prompt": p.text, "reference": p.reference, "output": g.text,
                           "stopped": g.stopped}
                          for p, g in zip(prompts[:SAMPLES], generations, strict=False)]
    return out


@contextlib.contextmanager
def _base_of(loaded: Loaded, target: Path | str, device: str):
    """An adapter's base is the same model with the adapter switched off (PEFT's
    disable_adapter); a full fine-tune's base is loaded from its base_model."""
    if loaded.kind == "adapter":
        with loaded.model.disable_adapter():
            yield Loaded(loaded.model, loaded.tokenizer, loaded.cfg, loaded.source, "base",
                         loaded.description.replace("the adapter in", "without the adapter in"))
    else:
        yield load_for_inference(target, device, base=True)


def _prompts(loaded: Loaded, rows: list[dict[str, Any]], path: Path):
    from strop.data.formats import RowProblem

    prompter = Prompter(loaded.cfg, loaded.tokenizer)
    prompts = []
    for number, row in enumerate(rows, 1):
        try:
            prompt = prompter.row(row)
        except RowProblem as problem:
            raise StropError(f"{path}: row {number}: {problem.field}: {problem.problem}") from None
        if prompt.reference is None:
            raise StropError(f"{path}: row {number} has no response to compare with; eval rows "
                             "need the answer (e.g. alpaca's output field)")
        prompts.append(prompt)
    return prompts


def eval_loss(loaded: Loaded, batch_size: int = 16) -> dict[str, float | int] | None:
    """Token-weighted loss over the run's validation split; None when it has none."""
    cfg = loaded.cfg
    if cfg is None or not (cfg.val_set_size or cfg.test_datasets):
        return None
    from strop.data import prepare_data
    from strop.data.batches import BatchPlan, batch_generator, make_collator
    from strop.train.evaluate import EVAL_STREAM, evaluation_loss
    from strop.train.forward import LossModel

    data = prepare_data(cfg, loaded.tokenizer)
    if data.eval is None or not len(data.eval):
        return None
    plan = BatchPlan(data.eval, batch_size, seed=cfg.seed, shuffle=False)
    collate = make_collator(cfg, loaded.tokenizer)
    loss_model = LossModel.of(loaded.model, cfg.objective)
    if cfg.preference:
        from strop.train import preference

        if cfg.uses_reference and not hasattr(loaded.model, "disable_adapter"):
            return None  # a full fine-tune's reference is its base model, not loaded here
        loss_model = preference.of(loaded.model, loss_model, cfg, precomputed=False)
    device = next(loaded.model.parameters()).device
    batches = ({k: v.to(device) for k, v in collate(
        [data.eval[int(i)] for i in indices],
        generator=batch_generator(cfg.seed, EVAL_STREAM, index)).items()}
        for index, indices in enumerate(plan.epoch(0)))
    result = evaluation_loss(loaded.model, loss_model, batches)
    if cfg.preference:
        unit = "examples" if cfg.rl == "kto" else "pairs"
        return {"eval_loss": result["eval_loss"], unit: result[f"eval_{unit}"],
                "reward_accuracy": result.get("eval_rewards/accuracies"),
                "reward_margin": result.get("eval_rewards/margins")}
    return {"eval_loss": result["eval_loss"], "perplexity": result["eval_ppl"],
            "tokens": result["eval_tokens"]}


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise StropError("--tasks runs lm-eval-harness, which is not installed; pip install "
                         "lm-eval") from None


def _lm_eval(loaded: Loaded, tasks: str, batch_size: int) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=[t.strip() for t in tasks.split(",") if t.strip()])
    return results.get("results", {}) if results else {}


# ------------------------------------------------------------------------------------ output


def render(result: dict[str, Any]) -> Any:
    """A rich table: the run's figures, and the base's beside them with --base."""
    from rich.table import Table

    base = result.get("base")
    table = Table(title=f"strop eval: {result['model']}")
    table.add_column("metric")
    table.add_column("run", justify="right")
    if base:
        table.add_column("base", justify="right")
        table.add_column("change", justify="right")
    rows = [("loss", "eval_loss", "eval loss"), ("loss", "perplexity", "perplexity"),
            ("loss", "tokens", "eval tokens"), ("loss", "reward_accuracy", "reward accuracy"),
            ("loss", "reward_margin", "reward margin"), ("loss", "pairs", "eval pairs"),
            ("loss", "examples", "eval examples"), ("generation", "exact_match", "exact match"),
            ("generation", "contains", "contains answer"), ("generation", "token_f1", "token F1"),
            ("generation", "stop_rate", "stop rate (EOS)"), ("generation", "n", "rows")]
    for group, key, label in rows:
        if not result.get(group) and not (base and base.get(group)):
            continue
        mine = (result.get(group) or {}).get(key)
        cells = [label, _cell(mine)]
        if base:
            theirs = (base.get(group) or {}).get(key)
            change = mine - theirs if isinstance(mine, float) and isinstance(theirs, float) \
                else None
            cells += [_cell(theirs), "" if change is None else f"{change:+.4g}"]
        table.add_row(*cells)
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_missing(result: dict[str, Any]) -> list[str]:
    lines = []
    if result["loss"] is None:
        lines.append("no eval loss: the run has no validation split (set val_set_size or "
                     "test_datasets in its config)")
    if result["generation"] is None:
        lines.append("no generation metrics: give --data FILE with rows in the run's format")
    return lines
