"""Charts of the report pages, drawn with matplotlib as self-contained SVG (text as paths, no fonts or scripts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nightshift.reports.store import write_text

CANDIDATE, BASELINE = "#017cee", "#f0a30a"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "path", "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "nightshift"})
    return plt


def _svg_document(fig: Any) -> str:
    import io

    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    _pyplot().close(fig)
    return buffer.getvalue()


def _save(fig: Any, path: Path) -> Path:
    return write_text(path, _svg_document(fig))


def svg_text(fig: Any) -> str:
    """Return a figure as an inline ``<svg>`` element (no XML prologue) and close it."""
    text = _svg_document(fig)
    return text[text.index("<svg"):]


def histogram_svg(histogram: dict[str, list[float]], title: str, xlabel: str, path: Path) -> Path:
    """Bars of a histogram given by bin edges and counts."""
    plt = _pyplot()
    edges, counts = histogram["edges"], histogram["counts"]
    fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=100)
    widths = [b - a for a, b in zip(edges, edges[1:], strict=False)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=CANDIDATE, edgecolor="white", linewidth=0.5)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("documents")
    return _save(fig, path)


def shares_svg(top: list[dict[str, Any]], total: int, title: str, path: Path) -> Path:
    """Horizontal bars of each value's share of the documents."""
    plt = _pyplot()
    values = [str(t["value"])[:32] for t in top][::-1]
    shares = [t["count"] / max(total, 1) for t in top][::-1]
    fig, ax = plt.subplots(figsize=(4.2, max(1.6, 0.9 + 0.28 * len(values))), dpi=100)
    ax.barh(values, shares, color=CANDIDATE)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of documents")
    ax.set_title(title)
    return _save(fig, path)


def drift_svg(shape: dict[str, Any], title: str, target_label: str, reference_label: str, path: Path) -> Path:
    """The new version's distribution over the reference's: histograms on shared bins, or category shares."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=100)
    if shape["kind"] == "numeric":
        edges = shape["edges"]
        mids = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
        ax.step(mids, shape["reference"], where="mid", color=BASELINE, label=reference_label)
        ax.step(mids, shape["target"], where="mid", color=CANDIDATE, label=target_label)
        ax.set_ylabel("share of documents")
    else:
        values = [str(v)[:16] for v in shape["values"]]
        x = range(len(values))
        ax.bar([i - 0.2 for i in x], shape["reference"], width=0.4, color=BASELINE, label=reference_label)
        ax.bar([i + 0.2 for i in x], shape["target"], width=0.4, color=CANDIDATE, label=target_label)
        ax.set_xticks(list(x), values, rotation=30, ha="right")
        ax.set_ylabel("share")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def loss_svg(losses: list[float], title: str, path: Path) -> Path:
    """Training loss per optimizer step."""
    return _save(_loss(losses, title), path)


def loss_figure(losses: list[float], title: str) -> str:
    """The loss curve as an inline ``<svg>`` element."""
    return svg_text(_loss(losses, title))


def _loss(losses: list[float], title: str) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3, color=CANDIDATE)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def scores_figure(rows: list[tuple[str, float, float]], candidate: str, baseline: str) -> str:
    """Grouped bars of candidate and champion per 0-1 score (nan bars are left out)."""
    import math

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(3.5, 1.1 * len(rows) + 1.5), 3), dpi=100)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [0 if math.isnan(r[2]) else r[2] for r in rows], 0.4, color=BASELINE,
           label=baseline[:30])
    ax.bar([x + 0.2 for x in xs], [0 if math.isnan(r[1]) else r[1] for r in rows], 0.4, color=CANDIDATE,
           label=candidate[:30])
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=7, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (higher is better)")
    ax.legend(fontsize=7, loc="upper right")
    return svg_text(fig)


def intervals_figure(rows: list[tuple[str, float, float, float, bool]], confidence: float) -> str:
    """Each metric's difference (candidate - champion, relative for perplexities) with its interval.

    Rows are (name, difference, low, high, higher_is_better); points are green where the candidate is
    better, orange where worse.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2), dpi=100)
    for y, (_name, diff, low, high, higher) in enumerate(reversed(rows)):
        better = diff > 0 if higher else diff < 0
        color = "#15803d" if better else ("#64748b" if diff == 0 else "#c2410c")
        ax.plot([low, high], [y, y], color=color, linewidth=2)
        ax.plot([diff], [y], "o", color=color)
    ax.axvline(0, color="#334155", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel(f"candidate - champion, {confidence:.0%} interval (perplexity: relative change)")
    ax.grid(axis="x", alpha=0.3)
    return svg_text(fig)


def comparison_svg(metrics: list[tuple[str, float, float]], candidate: str, baseline: str, title: str,
                   path: Path) -> Path:
    """Paired bars of candidate and baseline per metric (each metric on its own scale)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(2.2 * max(len(metrics), 1), 2.8), dpi=100,
                             squeeze=False)
    for ax, (name, cand, base) in zip(axes[0], metrics, strict=False):
        ax.bar([0, 1], [base, cand], color=[BASELINE, CANDIDATE])
        ax.set_xticks([0, 1], [baseline[:14], candidate[:14]], fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


PALETTE = ("#017cee", "#f0a30a", "#11a36a", "#c2410c", "#7c3aed", "#0891b2")


def hourly_svg(series: dict[str, list[tuple[str, float | None]]], title: str, ylabel: str, path: Path,
               threshold: float | None = None, bands: dict[str, list[tuple[str, float, float]]] | None = None) -> Path:
    """Lines of a value per hour, one per label (a model version); an optional threshold line and interval bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 2.6), dpi=100)
    hours = sorted({h for points in series.values() for h, _ in points} |
                   {h for points in (bands or {}).values() for h, _, _ in points})
    index = {h: i for i, h in enumerate(hours)}
    for n, (label, points) in enumerate(sorted(series.items())):
        kept = [(index[h], v) for h, v in points if v is not None]
        if kept:
            ax.plot([x for x, _ in kept], [y for _, y in kept], marker="o", markersize=3, linewidth=1.2,
                    color=PALETTE[n % len(PALETTE)], label=label)
    for n, (label, points) in enumerate(sorted((bands or {}).items())):
        if points:
            xs = [index[h] for h, _, _ in points]
            ax.fill_between(xs, [lo for _, lo, _ in points], [hi for _, _, hi in points], alpha=0.2,
                            color=PALETTE[n % len(PALETTE)], label=f"{label} interval")
    if threshold is not None:
        ax.axhline(threshold, color="#b91c1c", linewidth=0.8, linestyle="--", label="policy")
    ticks = list(range(0, len(hours), max(1, len(hours) // 6)))
    ax.set_xticks(ticks, [hours[i][5:13].replace("T", " ") + "h" for i in ticks], rotation=0)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:  # a series with no value in any hour draws nothing to name
        ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def candidates_figure(rows: list[tuple[str, float, float, float]], metric: str, higher_is_better: bool,
                      confidence: float) -> str:
    """Each candidate's difference from the base on one metric, with its paired bootstrap interval (the base is 0)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.3), dpi=100)
    for y, (_name, diff, low, high) in enumerate(reversed(rows)):
        better = diff > 0 if higher_is_better else diff < 0
        color = "#15803d" if better else ("#64748b" if diff == 0 else "#c2410c")
        ax.plot([low, high], [y, y], color=color, linewidth=2)
        ax.plot([diff], [y], "o", color=color)
    ax.axvline(0, color="#334155", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r[0][:28] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel(f"{metric}: candidate - base, {confidence:.0%} interval "
                  f"({'higher' if higher_is_better else 'lower'} is better)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return svg_text(fig)


def quality_cost_figure(points: list[tuple[str, float, float, bool]], metric: str) -> str:
    """Quality against cost per 1,000 tokens, one labelled point per candidate (``True``: an API model)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, cost, quality, api in points:
        ax.scatter([cost], [quality], color=PALETTE[1] if api else PALETTE[0], s=36)
        ax.annotate(name[:24], (cost, quality), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("cost per 1,000 tokens (local: compute time; API: its prices)", fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.grid(alpha=0.3)
    ax.scatter([], [], color=PALETTE[0], label="local")
    ax.scatter([], [], color=PALETTE[1], label="API")
    ax.legend(fontsize=7)
    return svg_text(fig)


def latency_figure(rows: list[tuple[str, float, float]]) -> str:
    """Mean and p95 seconds per answer of each candidate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(rows) + 1.2), dpi=100)
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r[2] for r in reversed(rows)], 0.4, color=BASELINE, label="p95")
    ax.barh([y - 0.2 for y in ys], [r[1] for r in reversed(rows)], 0.4, color=CANDIDATE, label="mean")
    ax.set_yticks(list(ys), [r[0][:28] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("seconds per answer", fontsize=8)
    ax.legend(fontsize=7)
    return svg_text(fig)
