"""The evaluation report: one self-contained HTML file (no network: styles inline, plots and strips as base64 PNG),
plus ``results.csv`` (one row per clip and run) and ``results.json`` (every number, every series, the notes).

Layout, for an artist first: the summary table (one row per run, the best value of each column in bold, arrows
saying which way is better), a bar chart of the main metrics per run, metric-against-setting plots for sweeps,
then per run a table of mean / median / worst clip, then per clip the mouth opening against the speech envelope and
the mouth strips (source, output, amplified difference, ground truth), then the glossary of formulas.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

from .runner import EvalResults
from .score import BY_KEY, METRICS

SUMMARY_KEYS = ("success", "av_corr_best", "revoice_corr", "lse_c", "lse_d", "lmd", "psnr_outside_mouth",
                "ssim_outside_mouth", "psnr_face_gt", "jitter_ratio", "seam_error", "csim",
                "seconds_per_output_second", "peak_ram_mib", "peak_vram_mib")
PLOT_KEYS = ("av_corr_best", "revoice_corr", "lse_c", "lmd", "psnr_outside_mouth", "jitter_ratio", "seam_error")


def _values(results: EvalResults, run: str, key: str) -> list[tuple[str, float]]:
    out = []
    for c in results.cells:
        if c.run == run:
            v = c.metrics.get(key)
            if v is not None and math.isfinite(v):
                out.append((c.clip, float(v)))
    return out


def aggregate(results: EvalResults) -> dict:
    """``{run: {metric: {"mean", "median", "worst", "worst_clip", "n"}}}`` over the clips with a value; the success
    rate counts failed cells as failures."""
    table = {}
    for run in results.manifest.runs:
        row = {}
        for m in METRICS:
            vals = _values(results, run.name, m.key)
            if m.key == "success":
                cells = [c for c in results.cells if c.run == run.name]
                vals = [(c.clip, float(c.metrics.get("success") or 0.0)) for c in cells]
            if not vals:
                continue
            nums = [v for _, v in vals]
            worst = None
            if m.better:
                worst = (min if m.better > 0 else max)(vals, key=lambda cv: cv[1])
            row[m.key] = {"mean": statistics.fmean(nums), "median": statistics.median(nums), "n": len(nums),
                          "worst": worst[1] if worst else None, "worst_clip": worst[0] if worst else None}
        table[run.name] = row
    return table


# ------------------------------------------------------------------------------------------------ files

def write_csv(results: EvalResults, path: Path) -> Path:
    keys = [m.key for m in METRICS]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["clip", "run", "sweep", "sweep_value", "error", *keys])
        runs = {r.name: r for r in results.manifest.runs}
        for c in results.cells:
            r = runs[c.run]
            w.writerow([c.clip, c.run, r.sweep_key or "", "" if r.sweep_value is None else r.sweep_value,
                        c.error or "", *["" if c.metrics.get(k) is None else f"{c.metrics[k]:.6g}" for k in keys]])
    return path


def write_json(results: EvalResults, path: Path) -> Path:
    m = results.manifest
    data = {"name": m.name, "manifest": str(m.path), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": results.seconds, "notes": results.notes, "success_rule": m.rule.describe(),
            "metrics": {x.key: {"label": x.label, "group": x.group, "better": x.better, "unit": x.unit,
                                "formula": x.formula} for x in METRICS},
            "runs": [{"name": r.name, "family": r.family, "model": r.model, "settings": r.settings,
                      "sweep": r.sweep_key, "sweep_value": r.sweep_value, "group": r.group,
                      "outputs": r.outputs} for r in m.runs],
            "aggregate": aggregate(results),
            "cells": [{"clip": c.clip, "run": c.run, "metrics": c.metrics, "notes": c.notes, "error": c.error,
                       "settings": c.settings, "output": c.output, "series": c.series,
                       "strip_frames": c.strip_frames} for c in results.cells]}
    path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ plots

def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _png(fig, plt) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: Optional[str], alt: str, cls: str = "plot") -> str:
    if not b64:
        return ""
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _label(key: str) -> str:
    m = BY_KEY[key]
    arrow = {1: " ↑", -1: " ↓", 0: ""}[m.better]
    return f"{m.label}{arrow}"


def bar_chart(results: EvalResults, agg: dict, plt) -> Optional[str]:
    """One panel per main metric, one bar per run (the clips' mean, error bar = min..max)."""
    keys = [k for k in PLOT_KEYS if any(k in agg[r.name] for r in results.manifest.runs)]
    runs = [r.name for r in results.manifest.runs if r.group is None] or [r.name for r in results.manifest.runs]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows + 0.6 * (len(runs) > 4)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        means, lo, hi = [], [], []
        for r in runs:
            vals = [v for _, v in _values(results, r, key)]
            mu = statistics.fmean(vals) if vals else float("nan")
            means.append(mu)
            lo.append(mu - min(vals) if vals else 0)
            hi.append(max(vals) - mu if vals else 0)
        ax.bar(range(len(runs)), means, yerr=[lo, hi], color=[colours[i % len(colours)] for i in range(len(runs))],
               capsize=3)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(runs, rotation=30, ha="right", fontsize=7)
        ax.set_title(_label(key), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig, plt)


def sweep_plots(results: EvalResults, plt) -> list[tuple[str, str]]:
    """(group, PNG) per sweep: each main metric's clip mean (and each clip, faint) against the swept value."""
    out = []
    groups = {}
    for r in results.manifest.runs:
        if r.group is not None:
            groups.setdefault(r.group, []).append(r)
    for group, runs in groups.items():
        key_name = runs[0].sweep_key
        numeric = all(isinstance(r.sweep_value, (int, float)) for r in runs)
        xs = [r.sweep_value if numeric else i for i, r in enumerate(runs)]
        keys = [k for k in PLOT_KEYS if any(_values(results, r.name, k) for r in runs)]
        if not keys:
            continue
        cols = min(4, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
        clips = [c.name for c in results.manifest.clips]
        for ax, key in zip(axes.flat, keys):
            for clip in clips:
                ys = [next((v for c, v in _values(results, r.name, key) if c == clip), float("nan")) for r in runs]
                ax.plot(xs, ys, color="0.7", lw=0.8)
            means = [statistics.fmean([v for _, v in _values(results, r.name, key)] or [float("nan")]) for r in runs]
            ax.plot(xs, means, "o-", color="C0", lw=2)
            ax.set_title(_label(key), fontsize=9)
            ax.set_xlabel(key_name, fontsize=8)
            if not numeric:
                ax.set_xticks(xs)
                ax.set_xticklabels([str(r.sweep_value) for r in runs], fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        out.append((group, _png(fig, plt)))
    return out


def envelope_plot(results: EvalResults, clip: str, plt) -> Optional[str]:
    """The speech envelope and the mouth opening over time: source, ground truth and every run."""
    cells = [c for c in results.cells if c.clip == clip and c.series.get("envelope")]
    if not cells:
        return None
    fps = float(cells[0].series.get("fps") or 25.0)
    fig, ax = plt.subplots(figsize=(10, 2.6))
    env = cells[0].series["envelope"]
    t = [i / fps for i in range(len(env))]
    peak = max([v for c in cells for v in (c.series.get("opening") or []) if v is not None] or [1.0]) or 1.0
    ax.fill_between(t, [e * peak for e in env], color="0.85", label="speech envelope (scaled)")

    def line(values, **kw):
        if values:
            ax.plot([i / fps for i in range(len(values))], [float("nan") if v is None else v for v in values], **kw)

    line(cells[0].series.get("opening_source"), color="0.45", ls="--", lw=1, label="source mouth")
    line(cells[0].series.get("opening_truth"), color="k", lw=1.2, label="ground truth mouth")
    for i, c in enumerate(cells):
        line(c.series.get("opening"), color=f"C{i % 10}", lw=1.2, label=c.run)
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_ylabel("inner-lip gap / face width", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, ncol=4, loc="upper right", framealpha=0.8)
    ax.margins(x=0)
    fig.tight_layout()
    return _png(fig, plt)


# ------------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1400px;color:#222;
padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{margin-bottom:6px}.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.86em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.name,th.name{text-align:left}tr:nth-child(even) td{background:#fafafa}
td.best{font-weight:700;color:#05620b}.fail{color:#a00}.note{color:#8a5a00;font-size:.9em}
img.plot{max-width:100%;display:block;margin:6px 0}img.strip{image-rendering:pixelated;max-width:100%;
border:1px solid #ccc}.strips{display:flex;flex-wrap:wrap;gap:14px}.strips figure{margin:0}
figcaption{font-size:.8em;color:#555}code{background:#f4f4f4;padding:0 3px}.scroll{overflow-x:auto}
#summary-table th{white-space:normal;max-width:110px;vertical-align:bottom}
.runs{display:flex;flex-wrap:wrap;gap:0 28px}.runs>div{flex:0 0 auto;max-width:660px}
"""


def _fmt(v, key: str) -> str:
    if v is None:
        return "—"
    if key == "success":
        return f"{100 * v:.0f}%"
    if key in ("peak_ram_mib", "peak_vram_mib"):
        return f"{v:.0f}"
    if key in ("av_offset", "lse_offset"):
        return f"{v:+.1f}" if v != int(v) else f"{int(v):+d}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"


def _summary_table(results: EvalResults, agg: dict) -> str:
    runs = results.manifest.runs
    keys = [k for k in SUMMARY_KEYS if any(k in agg[r.name] for r in runs)]
    head = "".join(f'<th title="{html.escape(BY_KEY[k].formula)}">{html.escape(_label(k))}</th>' for k in keys)
    rows = []
    for r in runs:
        tds = []
        for k in keys:
            v = agg[r.name].get(k, {}).get("mean")
            others = [agg[x.name][k]["mean"] for x in runs if k in agg[x.name]]
            best = (BY_KEY[k].better and v is not None and len(others) > 1
                    and v == (max(others) if BY_KEY[k].better > 0 else min(others)))
            tds.append(f'<td class="{"best" if best else ""}">{_fmt(v, k)}</td>')
        rows.append(f'<tr><td class="name">{html.escape(r.name)}</td>{"".join(tds)}</tr>')
    return (f'<div class="scroll"><table id="summary-table"><thead><tr><th class="name">run</th>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table></div>')


def _run_table(results: EvalResults, agg: dict, run) -> str:
    rows = []
    for m in METRICS:
        a = agg[run.name].get(m.key)
        if a is None:
            continue
        worst = f'{_fmt(a["worst"], m.key)} <span class="meta">({html.escape(a["worst_clip"])})</span>' \
            if a["worst_clip"] else "—"
        rows.append(f'<tr><td class="name" title="{html.escape(m.formula)}">{html.escape(_label(m.key))}</td>'
                    f'<td>{_fmt(a["mean"], m.key)}</td><td>{_fmt(a["median"], m.key)}</td><td>{worst}</td>'
                    f'<td>{a["n"]}</td><td class="name meta">{html.escape(m.unit)}</td></tr>')
    return ('<table class="run-table"><thead><tr><th class="name">metric</th><th>mean</th><th>median</th>'
            '<th>worst clip</th><th>clips</th><th class="name">unit</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _settings_text(cell_settings: dict) -> str:
    shown = {k: v for k, v in cell_settings.items() if v is not None}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def render_html(results: EvalResults) -> str:
    m = results.manifest
    agg = aggregate(results)
    plt = _plt()
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(m.name)} — OmniSync "
             f"eval</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(m.name)}</h1>",
             f"<p class='meta'>{len(m.clips)} clips × {len(m.runs)} runs from <code>{html.escape(str(m.path))}</code>"
             f", {time.strftime('%Y-%m-%d %H:%M')}, {results.seconds:.0f} s on {html.escape(platform.node())} "
             f"({html.escape(platform.machine())}). Success rule: {html.escape(m.rule.describe())}.</p>"]
    if plt is None:
        parts.append("<p class='note'>matplotlib is not installed: the report has tables and strips but no "
                     "plots.</p>")
    for note in results.notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("<section id='summary'><h2>Summary</h2><p class='meta'>Mean over clips; ↑ higher is better, ↓ lower "
                 "is better; the best run of each column in bold. Hover a header for its formula.</p>")
    parts.append(_summary_table(results, agg))
    if plt is not None:
        parts.append(_img(bar_chart(results, agg, plt), "main metrics per run"))
    parts.append("</section>")
    if plt is not None:
        sweeps = sweep_plots(results, plt)
        if sweeps:
            parts.append("<section id='sweeps'><h2>Sweeps</h2>")
            for group, png in sweeps:
                parts.append(f"<h3>{html.escape(group)}</h3>{_img(png, f'metrics against {group}')}")
            parts.append("</section>")
    parts.append("<section id='runs'><h2>Runs</h2><div class='runs'>")
    for run in m.runs:
        cells = [c for c in results.cells if c.run == run.name]
        settings = next((c.settings for c in cells if c.settings), run.settings)
        parts.append(f"<div><h3>{html.escape(run.name)}</h3><p class='meta'>{html.escape(run.family)} · "
                     f"{html.escape(str(run.model or 'demo'))} · {html.escape(_settings_text(settings))}</p>")
        parts.append(_run_table(results, agg, run))
        for c in cells:
            if c.error:
                parts.append(f"<p class='fail'>{html.escape(c.clip)}: {html.escape(c.error)}</p>")
        parts.append("</div>")
    parts.append("</div></section><section id='clips'><h2>Clips</h2>")
    for clip in m.clips:
        parts.append(f"<h3>{html.escape(clip.name)}</h3>")
        if plt is not None:
            parts.append(_img(envelope_plot(results, clip.name, plt), f"mouth opening against speech, {clip.name}"))
        strips = []
        for c in results.cells:
            if c.clip == clip.name and c.strip and Path(c.strip).is_file():
                b64 = base64.b64encode(Path(c.strip).read_bytes()).decode()
                frames = ", ".join(str(i) for i in c.strip_frames)
                strips.append(f"<figure>{_img(b64, f'mouth strip {clip.name} {c.run}', 'strip')}<figcaption>"
                              f"<b>{html.escape(c.run)}</b> · frames {frames} · rows: source, output, 4× "
                              f"difference{', ground truth' if c.series.get('opening_truth') else ''}"
                              f"</figcaption></figure>")
        if strips:
            parts.append(f"<div class='strips'>{''.join(strips)}</div>")
        for c in results.cells:
            for note in c.notes if c.clip == clip.name else []:
                parts.append(f"<p class='note'>{html.escape(c.run)}: {html.escape(note)}</p>")
    parts.append("</section><section id='glossary'><h2>Metrics</h2><table><thead><tr><th class='name'>metric</th>"
                 "<th class='name'>group</th><th class='name'>formula and source</th></tr></thead><tbody>")
    for x in METRICS:
        parts.append(f"<tr><td class='name'>{html.escape(_label(x.key))}</td><td class='name'>{x.group}</td>"
                     f"<td class='name' style='white-space:normal'>{html.escape(x.formula)}</td></tr>")
    parts.append("</tbody></table></section></body></html>")
    return "\n".join(parts)


def write_report(results: EvalResults, folder: Optional[Path] = None) -> dict:
    """Write report.html, results.csv and results.json into ``folder`` (the manifest's output_dir); returns
    their paths."""
    folder = Path(folder or results.manifest.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"html": folder / "report.html", "csv": folder / "results.csv", "json": folder / "results.json"}
    paths["html"].write_text(render_html(results), encoding="utf-8")
    write_csv(results, paths["csv"])
    write_json(results, paths["json"])
    return paths
