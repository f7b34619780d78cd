"""Where training figures go: metrics.jsonl always, the terminal, TensorBoard and W&B when asked.

On a terminal a rich progress bar shows step/total, loss, lr, tokens/s and the ETA; when output
is not a terminal (CI, nohup, a log file) each logged step is one plain line.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from strop.config.schema import StropConfig
from strop.errors import StropError


def peak_memory_bytes(device: str) -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on a CPU."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.3e}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4g}"
    return str(value)


def check_loggers(cfg: StropConfig) -> None:
    """The optional loggers the config asks for are installed: checked before any weight
    loads, not when the first metrics are written."""
    from importlib.util import find_spec

    if cfg.use_tensorboard and find_spec("tensorboard") is None:
        raise StropError("use_tensorboard: true needs the tensorboard package; "
                         "pip install tensorboard (or set use_tensorboard: false)")
    if cfg.wandb_project and find_spec("wandb") is None:
        raise StropError("wandb_project is set but the wandb package is not installed; "
                         "pip install wandb (or remove wandb_project)")


class MetricsLog:
    def __init__(self, cfg: StropConfig, output_dir: Path, total_steps: int, start_step: int,
                 resumed: bool):
        self.path = output_dir / "metrics.jsonl"
        self.file = self.path.open("a" if resumed else "w")
        self.total = total_steps
        self.interactive = sys.stdout.isatty()
        self.started = time.perf_counter()
        self.start_step = start_step
        self._progress = None
        self._task = None
        self._tb = self._tensorboard(cfg, output_dir) if cfg.use_tensorboard else None
        self._wandb = self._wandb_run(cfg, output_dir) if cfg.wandb_project else None
        if self.interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                      transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 info="")

    @staticmethod
    def _tensorboard(cfg: StropConfig, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(output_dir / "runs"))

    @staticmethod
    def _wandb_run(cfg: StropConfig, output_dir: Path):
        import wandb

        return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name,
                          id=cfg.wandb_run_id, mode=cfg.wandb_mode or "online",
                          dir=str(output_dir), resume="allow",
                          config=cfg.model_dump(mode="json", by_alias=True))

    def write(self, record: dict[str, Any]) -> None:
        """One JSON line per record; the same figures go to TensorBoard / W&B."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{record.get('kind', 'train')}/{k}": v for k, v in scalars.items()},
                            step=step)

    def show(self, step: int, shown: dict[str, Any]) -> None:
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=text)
        else:
            print(f"step {step}/{self.total}  {text}", flush=True)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self.file.close()


class QuietLog:
    """The log of a rank other than 0 under several processes: rank 0 logs for the run."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def show(self, step: int, shown: dict[str, Any]) -> None:
        pass

    def advance(self, step: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
