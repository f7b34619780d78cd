"""`strop data check`: what a dataset will teach, before paying for a run.

Figures come from the same reading, formatting and tokenization as training (rows are kept
whole here, so truncation can be measured): sizes, bad rows, prompt and response lengths,
truncation, duplicates (exact, and near through MinHash), empty responses, rows with nothing to
train or whose end token is not trained, diversity, packing efficiency and tokens per epoch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from strop.data.encode import Encoder
from strop.data.packing import best_fit_decreasing
from strop.data.prepare import reason_of, tokenize_dataset
from strop.data.rows import IGNORE, TokenRows

SHORT_RESPONSE = 3        # responses under this many tokens (EOS aside) are "very short"
NEAR_DUP_THRESHOLD = 0.8  # estimated Jaccard similarity of token 3-gram sets
BAD_ROWS_LISTED = 20


@dataclass
class Checked:
    figures: dict[str, Any]
    rows: TokenRows                # every valid row, untruncated
    prompt_lengths: np.ndarray     # untrained tokens per row
    response_lengths: np.ndarray   # trained tokens per row (untruncated)


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def check(cfg, tokenizer) -> Checked:
    encoder = Encoder(tokenizer)
    parts = [tokenize_dataset(ds, cfg, tokenizer, encoder, keep_all=True) for ds in cfg.datasets]
    rows = TokenRows.concat([p.rows for p in parts])
    bad = [b for p in parts for b in p.bad]
    seq = cfg.sequence_len
    special = np.array(sorted(encoder.special), dtype=np.int64)

    lengths = rows.lengths
    trained = rows.labels != IGNORE
    response = rows.trained_per_row()
    prompt = lengths - response
    n = len(rows)
    starts = rows.offsets[:-1]

    # What training sees: each row cut to sequence_len (pretraining text is laid in blocks).
    cut = np.minimum(lengths, seq)
    trained_before_cut = np.concatenate([[0], np.cumsum(trained)])
    trained_cut = trained_before_cut[starts + cut] - trained_before_cut[starts]
    text_rows = np.concatenate([np.full(len(p.rows), p.text) for p in parts]) if parts else \
        np.zeros(0, dtype=bool)
    truncated = (lengths > seq) & ~text_rows
    nothing = (trained_cut == 0) & ~text_rows

    # The end token is trained when the last trained token (within sequence_len) is special.
    eos_trained = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(trained_cut > 0):
        a = int(starts[i])
        where = np.flatnonzero(trained[a:a + int(cut[i])])
        eos_trained[i] = rows.input_ids[a + where[-1]] in special
    no_eos = (~eos_trained) & (trained_cut > 0) & ~text_rows

    content = response - np.array([_specials_trained(rows, i, special) for i in range(n)],
                                  dtype=np.int64) if n else response
    empty = (content == 0) & ~text_rows
    short = (content > 0) & (content < SHORT_RESPONSE) & ~text_rows

    exact, near = duplicates([t for p in parts for t in p.texts])
    kept_lengths = np.where(text_rows, lengths, cut)
    figures: dict[str, Any] = {
        "rows": n + len(bad),
        "valid_rows": n,
        "invalid_rows": len(bad),
        "invalid_reasons": dict(Counter(reason_of(b) for b in bad).most_common()),
        "bad_rows": [str(b) for b in bad[:BAD_ROWS_LISTED]],
        "sequence_len": seq,
        "tokens": int(lengths.sum()),
        "trained_tokens": int(response.sum()),
        "prompt_tokens": _summary(prompt),
        "response_tokens": _summary(response),
        "truncated_rows": int(truncated.sum()),
        "truncated_pct": _pct(int(truncated.sum()), n),
        "exact_duplicate_rows": int(exact.sum()),
        "exact_duplicate_pct": _pct(int(exact.sum()), n),
        "near_duplicate_rows": int(near.sum()),
        "near_duplicate_pct": _pct(int(near.sum()), n),
        "empty_responses": int(empty.sum()),
        "very_short_responses": int(short.sum()),
        "nothing_trained_rows": int(nothing.sum()),
        "eos_not_trained_rows": int(no_eos.sum()),
        "distinct_1": 0.0,
        "distinct_2": 0.0,
        "packing_efficiency": _packing(kept_lengths[~text_rows], seq),
        "tokens_per_epoch": int(kept_lengths.sum()),
        "trained_tokens_per_epoch": int(np.where(text_rows, lengths, trained_cut).sum()),
    }
    figures["distinct_1"], figures["distinct_2"] = distinct_ratios(rows, special)
    if "side" in rows.extra:
        figures["preference"] = preference_figures(rows, response, trained_cut, seq)
    return Checked(figures, rows, prompt, response)


def preference_figures(rows: TokenRows, response: np.ndarray, trained_cut: np.ndarray,
                       seq: int) -> dict[str, Any]:
    """What only preference data can get wrong: pairs whose two responses are the same (they
    teach nothing), responses cut by sequence_len (the end token the model should learn to
    prefer is lost, or the whole response), and a length bias between chosen and rejected
    (a model learns "longer wins" before it learns what was asked). kto: the balance of
    desirable and undesirable completions. Every document is a row of `rows`."""
    from strop.data.preference import CHOSEN, DESIRABLE, REJECTED, UNDESIRABLE

    sides = rows.extra["side"][rows.offsets[:-1]] if len(rows) else np.zeros(0, np.int8)
    cut = trained_cut < response  # a response loses tokens to sequence_len
    if (sides == DESIRABLE).any() or (sides == UNDESIRABLE).any():
        good, bad = int((sides == DESIRABLE).sum()), int((sides == UNDESIRABLE).sum())
        return {"examples": good + bad, "desirable": good, "undesirable": bad,
                "cut_responses": int(cut.sum())}
    chosen, rejected = np.flatnonzero(sides == CHOSEN), np.flatnonzero(sides == REJECTED)
    pairs = len(chosen)

    def trained_ids(i: int) -> np.ndarray:
        a, b = int(rows.offsets[i]), int(rows.offsets[i + 1])
        return rows.input_ids[a:b][rows.labels[a:b] != IGNORE]

    identical = sum(np.array_equal(trained_ids(c), trained_ids(r))
                    for c, r in zip(chosen, rejected, strict=True))
    longer = response[chosen] > response[rejected]
    return {
        "pairs": pairs,
        "identical_pairs": int(identical),
        "cut_pairs": int((cut[chosen] | cut[rejected]).sum()),
        "chosen_response_tokens": round(float(response[chosen].mean()), 1) if pairs else 0.0,
        "rejected_response_tokens": round(float(response[rejected].mean()), 1) if pairs else 0.0,
        "chosen_longer_pct": _pct(int(longer.sum()), pairs),
    }


def preference_lines(f: dict[str, Any]) -> list[str]:
    if "desirable" in f:
        return [f"kto examples      {f['examples']}  (desirable {f['desirable']}, undesirable "
                f"{f['undesirable']})",
                f"cut responses     {f['cut_responses']} (over sequence_len)"]
    bias = f["chosen_longer_pct"]
    note = "  <- length bias: a model can learn 'longer wins'" if pairs_biased(f) else ""
    return [f"pairs             {f['pairs']}  (each side counted as a row above)",
            f"identical pairs   {f['identical_pairs']}  (chosen == rejected: nothing to learn)",
            f"cut pairs         {f['cut_pairs']}  (a response cut by sequence_len)",
            f"length            chosen {f['chosen_response_tokens']} vs rejected "
            f"{f['rejected_response_tokens']} response tokens; chosen longer in {bias}%{note}"]


def pairs_biased(f: dict[str, Any]) -> bool:
    """Chosen is the longer response in over 3/4 (or under 1/4) of 20 or more pairs."""
    return f.get("pairs", 0) >= 20 and not 25 <= f["chosen_longer_pct"] <= 75


def _specials_trained(rows: TokenRows, i: int, special: np.ndarray) -> int:
    a, b = int(rows.offsets[i]), int(rows.offsets[i + 1])
    ids, labels = rows.input_ids[a:b], rows.labels[a:b]
    return int(np.count_nonzero((labels != IGNORE) & np.isin(ids, special)))


def _summary(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"mean": 0, "p50": 0, "p95": 0, "max": 0}
    return {"mean": round(float(values.mean()), 1), "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)), "max": int(values.max())}


def _packing(lengths: np.ndarray, seq: int) -> float:
    lengths = lengths[lengths > 0]
    if not len(lengths):
        return 0.0
    bins = best_fit_decreasing(np.minimum(lengths, seq), seq)
    return round(float(np.minimum(lengths, seq).sum()) / (len(bins) * seq), 4)


# ------------------------------------------------------------------------------ duplicates


def duplicates(texts: list[str], num_perm: int = 64, bands: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(exact, near): row i repeats an earlier row's own text (template aside) exactly, or nearly:
    MinHash over word 3-grams with estimated Jaccard >= NEAR_DUP_THRESHOLD. A row counts in at
    most one of the two."""
    n = len(texts)
    exact = np.zeros(n, dtype=bool)
    near = np.zeros(n, dtype=bool)
    seen: set[str] = set()
    words: dict[str, int] = {}
    rng = np.random.default_rng(0)
    mult = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)
    add = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    per_band = num_perm // bands
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    signatures = np.zeros((n, num_perm), dtype=np.uint64)
    for i, text in enumerate(texts):
        key = " ".join(text.split())
        if key in seen:
            exact[i] = True
            continue
        seen.add(key)
        ids = np.array([words.setdefault(w, len(words)) for w in key.lower().split()], dtype=np.uint64)
        if len(ids) < 3:
            continue
        with np.errstate(over="ignore"):
            # Multiply-shift hashing of each 3-gram, then num_perm hash functions (wrap mod 2^64).
            grams = np.unique(ids[:-2] * np.uint64(0x9E3779B97F4A7C15)
                              ^ ids[1:-1] * np.uint64(0xC2B2AE3D27D4EB4F) ^ ids[2:])
            signatures[i] = ((grams[:, None] * mult + add) >> np.uint64(32)).min(axis=0)
        candidates: set[int] = set()
        for band in range(bands):
            chunk = signatures[i, band * per_band:(band + 1) * per_band].tobytes()
            holders = buckets[band].setdefault(chunk, [])
            candidates.update(holders)
            holders.append(i)
        for j in sorted(candidates):
            if np.mean(signatures[i] == signatures[j]) >= NEAR_DUP_THRESHOLD:
                near[i] = True
                break
    return exact, near


def distinct_ratios(rows: TokenRows, special: np.ndarray) -> tuple[float, float]:
    """distinct-1 and distinct-2 of the trained (response) tokens, specials aside."""
    keep = (rows.labels != IGNORE) & ~np.isin(rows.input_ids, special)
    ids = np.asarray(rows.input_ids)[keep].astype(np.int64)
    if not len(ids):
        return 0.0, 0.0
    # Bigrams only between neighbours of the same row and the same trained run.
    index = np.flatnonzero(keep)
    row_of = np.searchsorted(rows.offsets, index, side="right")
    same = (np.diff(index) == 1) & (np.diff(row_of) == 0)
    pairs = ids[:-1][same] * (int(ids.max()) + 1) + ids[1:][same]
    d1 = len(np.unique(ids)) / len(ids)
    d2 = len(np.unique(pairs)) / len(pairs) if len(pairs) else 0.0
    return round(d1, 4), round(d2, 4)


# ------------------------------------------------------------------------------- rendering


def _edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Whole-token bin edges over the values' range: at most `bins` bins, each >= 1 token wide."""
    lo, hi = int(values.min()), int(values.max())
    width = max(1, -(-(hi - lo + 1) // bins))
    return lo + width * np.arange(-(-(hi - lo + 1) // width) + 1)


def histogram_lines(values: np.ndarray, title: str, bins: int = 10, width: int = 40) -> list[str]:
    """A text histogram: one line per bin, `lo-hi | ████ count` (hi inclusive)."""
    if not len(values):
        return [f"{title}: no rows"]
    edges = _edges(values, bins)
    counts, _ = np.histogram(values, bins=edges)
    top = max(int(counts.max()), 1)
    labels = [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    pad = max(map(len, labels))
    lines = [f"{title} (tokens per row)"]
    for count, label in zip(counts, labels, strict=True):
        lines.append(f"  {label.rjust(pad)} | {'█' * round(width * int(count) / top)} {int(count)}")
    return lines


def save_png(checked: Checked, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    seq = checked.figures["sequence_len"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, values, title, color in ((axes[0], checked.prompt_lengths, "prompt (not trained)", "#4C72B0"),
                                     (axes[1], checked.response_lengths, "response (trained)", "#55A868")):
        if len(values):
            edges = _edges(values, 30)
            ax.hist(values, bins=edges, color=color)
            if values.max() >= seq / 2:  # the limit is worth drawing when rows come near it
                ax.axvline(seq, color="red", linestyle="--", linewidth=1, label=f"sequence_len {seq}")
                ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{title}: tokens per row")
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
    fig.suptitle(f"{len(checked.rows)} rows, sequence_len {seq}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_lines(figures: dict[str, Any]) -> list[str]:
    f = figures
    lines = [
        f"rows              {f['rows']}  (valid {f['valid_rows']}, invalid {f['invalid_rows']})",
        f"tokens            {f['tokens']}  (trained {f['trained_tokens']})",
        f"prompt tokens     mean {f['prompt_tokens']['mean']}  p50 {f['prompt_tokens']['p50']:.0f}"
        f"  p95 {f['prompt_tokens']['p95']:.0f}  max {f['prompt_tokens']['max']}",
        f"response tokens   mean {f['response_tokens']['mean']}  p50 "
        f"{f['response_tokens']['p50']:.0f}  p95 {f['response_tokens']['p95']:.0f}  max "
        f"{f['response_tokens']['max']}",
        f"truncated         {f['truncated_rows']} rows ({f['truncated_pct']}%) over sequence_len "
        f"{f['sequence_len']}",
        f"exact duplicates  {f['exact_duplicate_rows']} rows ({f['exact_duplicate_pct']}%)",
        f"near duplicates   {f['near_duplicate_rows']} rows ({f['near_duplicate_pct']}%)",
        f"empty responses   {f['empty_responses']}  (very short, under {SHORT_RESPONSE} tokens: "
        f"{f['very_short_responses']})",
        f"nothing trained   {f['nothing_trained_rows']} rows (after truncation)",
        f"EOS not trained   {f['eos_not_trained_rows']} rows",
        f"diversity         distinct-1 {f['distinct_1']}  distinct-2 {f['distinct_2']}",
        f"packing           {f['packing_efficiency'] * 100:.1f}% of token slots used",
        f"tokens per epoch  {f['tokens_per_epoch']}  (trained {f['trained_tokens_per_epoch']})",
    ]
    if "preference" in f:
        lines += preference_lines(f["preference"])
    if f["invalid_rows"]:
        lines.append("bad rows:")
        lines += [f"  {b}" for b in f["bad_rows"]]
        if f["invalid_rows"] > len(f["bad_rows"]):
            lines.append(f"  ... and {f['invalid_rows'] - len(f['bad_rows'])} more")
    return lines


def sample_text(rows: TokenRows, index: int, tokenizer, plain: bool = False):
    """Row `index` as rich Text: trained tokens bold green, masked ones dim; `plain` (not a
    terminal) wraps trained runs in ⟦ ⟧ instead, so the split survives without colour."""
    from rich.text import Text

    a, b = int(rows.offsets[index]), int(rows.offsets[index + 1])
    ids, labels = rows.input_ids[a:b].tolist(), rows.labels[a:b].tolist()
    out = Text()
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] != IGNORE) != (labels[start] != IGNORE):
            piece = tokenizer.decode(ids[start:end])
            trained = labels[start] != IGNORE
            if plain and trained:
                piece = f"⟦{piece}⟧"
            out.append(piece, style="bold green" if trained else "dim")
            start = end
    return out
