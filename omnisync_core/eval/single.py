"""Score frames already in memory (the ComfyUI node): frames, their speech, optionally the source frames and a
ground truth -> the metrics as text, the numbers, and one picture (mouth opening against the speech envelope over
the mouth strip)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..audio import prepare_audio
from ..audio.waveform import from_array
from .faces import analyze_frames
from .score import BY_KEY, METRICS, Reference, Scorers, score_output
from .success import SuccessRule

NEEDS_SOURCE = ("psnr_outside_mouth", "ssim_outside_mouth", "psnr_face_src", "jitter_ratio", "revoice_corr_src",
                "csim")


@dataclass
class FrameScore:
    metrics: dict
    text: str
    image: Tensor            # [H, W, 3] uint8
    notes: list


def _u8(frames: Tensor) -> Tensor:
    if frames.is_floating_point():
        return (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.to(torch.uint8)


def metrics_text(metrics: dict, notes: list, rule: SuccessRule) -> str:
    lines = []
    for m in METRICS:
        v = metrics.get(m.key)
        if v is None:
            continue
        arrow = {1: " (higher is better)", -1: " (lower is better)", 0: ""}[m.better]
        value = f"{100 * v:.0f}%" if m.key == "success" else f"{v:.4g}"
        lines.append(f"{m.label}: {value}{' ' + m.unit if m.unit else ''}{arrow}")
    lines.append(f"success rule: {rule.describe()}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


PLAIN_LEGEND = ("plot: grey area = speech envelope, blue = output mouth, dark grey = source mouth, black = ground "
                "truth mouth (lip gap / face width over time)")


def _series(values) -> Tensor:
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)


def line_chart(lines: list, area: Optional[Tensor] = None, width: int = 640, height: int = 180) -> Tensor:
    """A plain chart ``[height, width, 3]`` uint8 without any plotting library: ``area [T]`` (0..1 of the height)
    filled light grey, then each ``(values [T], rgb)`` line (scaled by the largest value) drawn 2 px thick; NaN
    breaks a line."""
    img = torch.full((height, width, 3), 255, dtype=torch.uint8)
    pad = 6
    h, w = height - 2 * pad, width - 2 * pad
    peak = max([float(v[v.isfinite()].max()) for v, _ in lines if bool(v.isfinite().any())] or [1.0]) or 1.0
    n = max([v.shape[0] for v, _ in lines] + ([area.shape[0]] if area is not None else []) + [2])
    xs = lambda k: pad + k * (w - 1) / (n - 1)
    if area is not None:
        a = torch.nn.functional.interpolate(area.nan_to_num(0).view(1, 1, -1), size=w, mode="linear",
                                            align_corners=True)[0, 0].clamp(0, 1)
        top = (pad + h - a * h).round().long()
        rows = torch.arange(height)[:, None]
        fill = (rows >= top[None]) & (rows < pad + h)
        img[:, pad:pad + w][fill] = torch.tensor([215, 215, 215], dtype=torch.uint8)
    img[pad + h, pad:pad + w] = 120
    img[pad:pad + h, pad] = 120
    for values, rgb in lines:
        colour = torch.tensor(rgb, dtype=torch.uint8)
        for k in range(values.shape[0] - 1):
            a, b = float(values[k]), float(values[k + 1])
            if not (a == a and b == b):
                continue
            dy = abs(b - a) / peak * h
            t = torch.linspace(0, 1, int(max(abs(xs(k + 1) - xs(k)), dy)) * 2 + 2)
            x = (xs(k) + t * (xs(k + 1) - xs(k))).round().long()
            y = (pad + h - (a + t * (b - a)) / peak * h * 0.95).round().long()
            for oy in (0, 1):
                for ox in (0, 1):
                    img[(y + oy).clamp(0, height - 1), (x + ox).clamp(0, width - 1)] = colour
    return img


def _stack(plot: Tensor, strip: Optional[Tensor]) -> Tensor:
    if strip is None:
        return plot
    w = max(plot.shape[1], strip.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, w - x.shape[1]), value=255)
    return torch.cat([pad(plot), pad(strip)])


def _plain_picture(score, strip: Optional[Tensor]) -> Tensor:
    s = score.series
    lines = []
    if s.get("opening_source") and score.metrics.get("psnr_outside_mouth") is not None:
        lines.append((_series(s["opening_source"]), (90, 90, 90)))
    if s.get("opening_truth"):
        lines.append((_series(s["opening_truth"]), (0, 0, 0)))
    lines.append((_series(s["opening"]), (31, 119, 180)))
    return _stack(line_chart(lines, _series(s["envelope"]), width=max(640, strip.shape[1] if strip is not None else 0)),
                  strip)


def _picture(score, fps: float, strip: Optional[Tensor]) -> Tensor:
    """The envelope plot above the strip, as one uint8 image (drawn by :func:`line_chart` without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image
    except ImportError:
        return _plain_picture(score, strip)
    s = score.series
    width_px = max(640, strip.shape[1] if strip is not None else 0)
    fig, ax = plt.subplots(figsize=(width_px / 100, 2.4), dpi=100)
    t = [i / fps for i in range(len(s["envelope"]))]
    opening = [float("nan") if v is None else v for v in s["opening"]]
    peak = max([v for v in opening if v == v] or [1.0]) or 1.0
    ax.fill_between(t, [e * peak for e in s["envelope"]], color="0.85", label="speech envelope (scaled)")
    if s.get("opening_source") and score.metrics.get("psnr_outside_mouth") is not None:
        ax.plot(t, [float("nan") if v is None else v for v in s["opening_source"]], "--", color="0.4", lw=1,
                label="source mouth")
    if s.get("opening_truth"):
        ax.plot(t[:len(s["opening_truth"])], [float("nan") if v is None else v for v in s["opening_truth"]],
                color="k", lw=1, label="ground truth")
    ax.plot(t, opening, color="C0", lw=1.4, label="output mouth")
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_ylabel("lip gap / face width", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax.margins(x=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    plot = torch.from_numpy(__import__("numpy").array(Image.open(buf).convert("RGB")))
    return _stack(plot, strip)


@torch.no_grad()
def evaluate_frames(frames: Tensor, speech: Tensor, sample_rate: int, fps: float, source: Optional[Tensor] = None,
                    truth: Optional[Tensor] = None, analyzer=None, syncnet=None, arcface=None,
                    windows: Optional[tuple[int, int]] = None, rule: Optional[SuccessRule] = None,
                    length_policy: str = "pingpong") -> FrameScore:
    """All metrics of ``frames [T, H, W, 3]`` (float 0..1 or uint8) speaking ``speech`` (``[N]`` or ``[C, N]`` at
    ``sample_rate``). Without ``source`` the fidelity metrics (which compare with it) are left out."""
    if analyzer is None:
        from ..face.analyze import FaceAnalyzer

        analyzer = FaceAnalyzer()
    rule = rule or SuccessRule()
    out = _u8(frames)
    pcm = prepare_audio(from_array(torch.as_tensor(speech).float(), int(sample_rate))).samples
    src = _u8(source) if source is not None else out
    gt = _u8(truth) if truth is not None else None
    ref = Reference(src, float(fps), pcm, analyze_frames(src, analyzer), gt,
                    analyze_frames(gt, analyzer) if gt is not None else None)
    score = score_output(out, ref, Scorers(analyzer, syncnet, arcface, rule), length_policy=length_policy,
                         windows=windows)
    notes = list(score.notes)
    if source is None:
        for k in NEEDS_SOURCE:
            score.metrics[k] = None
        notes.append("no source frames given: the fidelity metrics (which compare with the source) are left out")
    if syncnet is None:
        notes.append("LSE-C / LSE-D need SyncNet weights")
    image = _picture(score, float(fps), score.strip if source is not None else None)
    text = metrics_text(score.metrics, notes, rule)
    if source is not None:
        text += "\nstrip: rows source, output, 4x difference" + (", ground truth" if truth is not None else "")
    return FrameScore(score.metrics, text + "\n" + PLAIN_LEGEND, image, notes)


__all__ = ["FrameScore", "evaluate_frames", "metrics_text", "BY_KEY"]
