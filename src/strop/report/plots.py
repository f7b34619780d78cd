"""PNG charts of runs with matplotlib's Agg backend: every run on the same axes, one colour each."""

from __future__ import annotations

from pathlib import Path

from strop.report.runs import RunRecord

# (file stem, title, y label, [(record kind, key, line label)], log scale)
CHARTS = [
    ("loss", "Loss", "loss", [("train", "loss", "train"), ("eval", "eval_loss", "eval")], False),
    ("learning_rate", "Learning rate", "lr", [("train", "lr", "")], False),
    ("grad_norm", "Gradient norm (before clipping)", "norm", [("train", "grad_norm", "")], True),
    ("tokens_per_s", "Throughput", "tokens/s",
     [("train", "tokens_per_s", "all"), ("train", "trained_tokens_per_s", "trained")], False),
    # preference runs (rl:): TRL's metric names
    ("rewards", "Rewards (beta x log-ratio to the reference)", "reward",
     [("train", "rewards/chosen", "chosen"), ("train", "rewards/rejected", "rejected"),
      ("train", "rewards/margins", "margin")], False),
    ("reward_accuracy", "Reward accuracy (chosen rewarded over rejected)", "accuracy",
     [("train", "rewards/accuracies", "train"), ("eval", "eval_rewards/accuracies", "eval")],
     False),
    ("logps", "Log-probs of the responses", "log-prob",
     [("train", "logps/chosen", "chosen"), ("train", "logps/rejected", "rejected")], False),
]
STYLES = ("-", "--", ":", "-.")  # one per series of a chart
SIZE = (8, 4.5)   # inches
DPI = 100         # -> 800 x 450 pixels


def plot_runs(runs: list[RunRecord], out: Path) -> list[Path]:
    """One PNG per chart that any run has data for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for stem, title, ylabel, series, log in CHARTS:
        fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
        drawn = 0
        for index, run in enumerate(runs):
            colour = colours[index % len(colours)]
            for style, (kind, key, label) in zip(STYLES, series, strict=False):
                records = run.train if kind == "train" else run.eval
                points = [(r["step"], r[key]) for r in records
                          if isinstance(r.get(key), int | float)]
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                name = run.name if len(runs) > 1 or not label else ""
                legend = " ".join(x for x in (name, label) if x) or None
                marker = "o" if kind == "eval" or len(points) < 3 else None
                ax.plot(steps, values, style, color=colour, marker=marker, markersize=4,
                        label=legend)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        if log and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if any(line.get_label() and not line.get_label().startswith("_")
               for line in ax.get_lines()):
            ax.legend()
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
