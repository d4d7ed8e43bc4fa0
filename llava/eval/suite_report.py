"""The results of `llava eval run`: a JSON file, a Markdown table and a bar chart in the output folder.

Benchmarks report on different scales (MME's perception score goes to 2000, the others are
percentages), so the chart draws each headline as a share of its benchmark's maximum and writes
the benchmark's own number on the bar. The chart needs matplotlib (`pip install llava[eval]`);
without it the table and JSON are still written and the run says why the chart is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _row(name: str, result: dict[str, Any]) -> str:
    status = result.get("status")
    if status == "scored":
        metric, score = result["metric"], _number(result["value"])
    else:
        metric, score = f"{status}: {result.get('reason', '')}", "—"
    seconds = result.get("answer_seconds") or 0
    timing = f"{seconds:.1f} s" if result.get("answered_now") else "resumed"
    return f"| {name} | {metric} | {score} | {result.get('answers', 0)} | {timing} |"


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per benchmark: its headline metric, score, answers in the file, this run's answering time."""
    lines = [f"Suite `{summary['suite']}`, model `{summary['model']}`", "",
             "| Benchmark | Metric | Score | Answers | Answering |", "|---|---|---:|---:|---:|"]
    lines += [_row(name, result) for name, result in summary["benchmarks"].items()]
    return "\n".join(lines) + "\n"


def write_chart(summary: dict[str, Any], path: Path) -> str | None:
    """A horizontal bar per scored benchmark (share of its maximum); returns why not, or None if written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'llava[eval]'), so no chart was drawn"
    scored = [(name, r) for name, r in summary["benchmarks"].items()
              if r.get("status") == "scored" and r.get("value") is not None]
    if not scored:
        return "no benchmark has a score, so no chart was drawn"
    names = [name for name, _ in scored][::-1]
    shares = [100 * r["value"] / r["maximum"] for _, r in scored][::-1]
    labels = [f"{r['value']:.1f}" + (f" / {r['maximum']:.0f}" if r["maximum"] != 100 else "")
              for _, r in scored][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    bars = ax.barh(names, shares, color="#4c72b0")
    ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
    ax.set_xlim(0, 115)
    ax.set_xlabel("score, % of the benchmark's maximum")
    ax.set_title(f"{summary['suite']}: {Path(str(summary['model'])).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_reports(summary: dict[str, Any], out: Path) -> dict[str, str]:
    """results.json, results.md and results.png under `out` (each replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "chart": out / "results.png"}
    for key, text in (("json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n"),
                      ("markdown", markdown_table(summary))):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[key])
    chart_note = write_chart(summary, paths["chart"])
    written = {k: str(v) for k, v in paths.items() if k != "chart" or chart_note is None}
    if chart_note:
        written["chart_note"] = chart_note
    return written
