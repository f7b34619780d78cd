"""What a run finds in output_dir before it starts: a run to resume, a finished or unfinished
run to protect, half-written checkpoints to remove."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from strop.config.schema import StropConfig
from strop.errors import StropError
from strop.train import checkpoint as ckpt


def prepare_output_dir(cfg: StropConfig, out: Path, overwrite: bool) -> Path | None:
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
