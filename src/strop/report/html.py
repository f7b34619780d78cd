"""The report page: summary table, plots inlined as base64 PNG, and each run's config, in one
HTML file that can be mailed or attached without its folder."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from strop.report.plots import plot_runs
from strop.report.runs import RunRecord, read_run, unique_names

# (label, how to get it from the summary)
SUMMARY_ROWS: list[tuple[str, Any]] = [
    ("outcome", lambda s: s.get("outcome")),
    ("steps", lambda s: f"{s.get('steps')} / {s.get('total_steps')}"),
    ("epochs", lambda s: s.get("epochs")),
    ("tokens", lambda s: s.get("tokens")),
    ("trained tokens", lambda s: s.get("trained_tokens")),
    ("train time (s)", lambda s: s.get("train_seconds")),
    ("tokens/s", lambda s: s.get("tokens_per_s")),
    ("trained tokens/s", lambda s: s.get("trained_tokens_per_s")),
    ("MFU", lambda s: s.get("mfu")),
    ("final eval loss", lambda s: (s.get("final_eval") or {}).get("eval_loss")),
    ("final eval perplexity", lambda s: (s.get("final_eval") or {}).get("eval_ppl")),
    ("best eval loss", lambda s: s.get("best_eval_loss")),
    ("peak memory (GiB)", lambda s: s["peak_memory_bytes"] / 2**30
     if s.get("peak_memory_bytes") else None),
    ("trainable / total params", lambda s: f"{s.get('trainable_params'):,} / "
     f"{s.get('total_params'):,}" if s.get("total_params") else None),
    ("precision, device", lambda s: f"{s.get('precision')}, {s.get('device')}"),
]


def write_report(paths: list[Path], out: Path | None = None) -> list[str]:
    """Write the PNGs and report.html; returns lines for the user."""
    messages = []
    runs = [read_run(p, n) for p, n in zip(paths, unique_names(paths), strict=True)]
    if out is None:
        out = paths[0] / "report"
        if len(paths) > 1:
            messages.append(f"comparing {len(paths)} runs; writing into the first run's directory "
                            f"({out}); choose another place with --out DIR")
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        if run.bad_lines:
            messages.append(f"{run.path}/metrics.jsonl: skipped {run.bad_lines} unreadable "
                            "line(s)")
        if run.summary is None:
            messages.append(f"{run.path}: no summary.json (the run is still going or was killed); "
                            "plotting what metrics.jsonl has")
    pngs = plot_runs(runs, out)
    page = out / "report.html"
    page.write_text(render_html(runs, pngs))
    messages += [f"wrote {p}" for p in pngs] + [f"wrote {page}"]
    return messages


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_html(runs: list[RunRecord], pngs: list[Path]) -> str:
    e = html.escape
    title = "strop report: " + ", ".join(r.name for r in runs)
    head = "".join(f"<th>{e(r.name)}</th>" for r in runs)
    rows = []
    for label, get in SUMMARY_ROWS:
        cells = []
        for run in runs:
            try:
                value = get(run.summary) if run.summary else None
            except (KeyError, TypeError):
                value = None
            cells.append(f"<td>{e(_fmt(value))}</td>")
        rows.append(f"<tr><th>{e(label)}</th>{''.join(cells)}</tr>")
    images = "\n".join(
        f'<figure><img alt="{e(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in pngs)
    configs = "\n".join(
        f"<details><summary>{e(r.name)}: strop-config.yml ({e(str(r.path))})</summary>"
        f"<pre>{e(r.config_text or '(no strop-config.yml)')}</pre></details>" for r in runs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 4px 10px; }}
td {{ text-align: right; }} tbody th {{ text-align: left; font-weight: normal; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>{e(title)}</h1>
<h2>Summary</h2>
<table><thead><tr><th></th>{head}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
<h2>Training curves</h2>
{images}
<h2>Configs</h2>
{configs}
</body></html>
"""
