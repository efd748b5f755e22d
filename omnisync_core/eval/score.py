"""Every metric of one lip-synced output, against its source, its driving audio and (when there is one) the ground
truth. The formulas live in the metric modules (envelope, syncnet, lmd, fidelity, temporal, identity, success,
cost); this module lines the frames up and collects the numbers, the per-frame series the report plots, and a note
for every metric it had to skip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..timeline import source_frame_index
from . import envelope, fidelity, lmd, success, temporal
from .faces import FaceSeries, analyze_frames, fill_gaps

SCORE_VERSION = 2          # bump when a formula changes: cached scores are then recomputed


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    group: str
    better: int            # +1 higher is better, -1 lower is better, 0 informative
    unit: str
    formula: str


METRICS = [
    Metric("lse_c", "LSE-C", "sync", +1, "", "SyncNet confidence: median - min of the mean embedding distance over "
           "offsets -15..15 (Chung & Zisserman 2016; Prajwal et al. 2020)"),
    Metric("lse_d", "LSE-D", "sync", -1, "", "SyncNet distance: min over offsets of the mean embedding distance"),
    Metric("lse_offset", "SyncNet offset", "sync", 0, "frames", "argmin offset (positive: audio leads video)"),
    Metric("av_corr", "mouth-audio r", "sync", +1, "", "Pearson r of the Face Mesh inner-lip gap / face width with "
           "the speech envelope, lag 0"),
    Metric("av_corr_best", "mouth-audio r (best lag)", "sync", +1, "", "the same at the best lag within the rule's "
           "max lag"),
    Metric("av_offset", "mouth-audio lag", "sync", 0, "frames", "that best lag (positive: the mouth follows late)"),
    Metric("revoice_corr", "re-voicing r", "sync", +1, "", "Pearson r of the dark mouth-interior height read from "
           "pixels with the speech envelope (omnisync_core/eval/sync.py's score; best on synthetic faces)"),
    Metric("revoice_corr_src", "re-voicing r of source", "sync", 0, "", "the same for the source frames: the leak "
           "baseline (a copy of the source scores it)"),
    Metric("lmd", "LMD", "lips", -1, "px@256", "mean distance of the 40 lip landmarks to the ground truth's, in "
           "pixels of a 256-px-wide face (Chen et al. 2018)"),
    Metric("psnr_outside_mouth", "PSNR outside mouth", "fidelity", +1, "dB", "vs the source, face region minus the "
           "dilated mouth mask (capped at 100 dB)"),
    Metric("ssim_outside_mouth", "SSIM outside mouth", "fidelity", +1, "", "vs the source, same region (Wang et al. "
           "2004, luma, 11x11 Gaussian)"),
    Metric("psnr_face_gt", "PSNR face vs GT", "fidelity", +1, "dB", "inside the face box vs the ground truth"),
    Metric("ssim_face_gt", "SSIM face vs GT", "fidelity", +1, "", "inside the face box vs the ground truth"),
    Metric("psnr_face_src", "PSNR face vs source", "fidelity", 0, "dB", "inside the face box vs the source (the "
           "mouth is meant to change)"),
    Metric("jitter", "mouth jitter", "temporal", -1, "%w/frame^2", "100 x mean second difference of the lip points "
           "in the face's frame, over face width"),
    Metric("jitter_ratio", "jitter / source", "temporal", -1, "", "output jitter over the source's"),
    Metric("seam_error", "seam error", "temporal", -1, "levels", "mean frame-to-frame change in the face box at "
           "window hand-overs minus elsewhere (0..255)"),
    Metric("csim", "CSIM", "identity", +1, "", "mean cosine similarity of ArcFace embeddings, output vs source"),
    Metric("face_rate", "face found", "success", +1, "", "share of output frames with a face"),
    Metric("success", "success", "success", +1, "", "1 when the clip passes the success rule"),
    Metric("seconds_per_output_second", "s per output s", "cost", -1, "s/s", "run wall time over output duration"),
    Metric("peak_ram_mib", "peak RAM", "cost", -1, "MiB", "largest resident set size while the run ran"),
    Metric("peak_vram_mib", "peak VRAM", "cost", -1, "MiB", "torch.cuda.max_memory_allocated during the run"),
]
METRIC_KEYS = [m.key for m in METRICS]
BY_KEY = {m.key: m for m in METRICS}


@dataclass
class Reference:
    """What an output is compared with: the source video, the driving speech, the ground truth if any, and their
    Face Mesh (computed once per clip)."""

    source: Tensor                      # [Ts, H, W, 3] uint8
    fps: float
    speech_16k: Tensor                  # [N]
    source_faces: FaceSeries
    truth: Optional[Tensor] = None      # [Tg, H, W, 3] uint8
    truth_faces: Optional[FaceSeries] = None


@dataclass
class Scorers:
    """The face analyzer and the optional metric models."""

    analyzer: object
    syncnet: Optional[torch.nn.Module] = None
    arcface: Optional[torch.nn.Module] = None
    rule: success.SuccessRule = field(default_factory=success.SuccessRule)
    dilate: float = 0.15
    device: Optional[torch.device] = None


@dataclass
class ClipScore:
    metrics: dict                       # key -> float or None (skipped)
    series: dict                        # per-frame lists for the plots
    notes: list = field(default_factory=list)
    strip_frames: list = field(default_factory=list)      # output frame indices shown in the strip
    strip: Optional[Tensor] = None                        # mouth_strip image [h, w, 3] uint8 (not serialised)


def prepare_reference(source: Tensor, fps: float, speech_16k: Tensor, analyzer, truth: Optional[Tensor] = None
                      ) -> Reference:
    faces = analyze_frames(source, analyzer)
    truth_faces = analyze_frames(truth, analyzer) if truth is not None else None
    return Reference(source, float(fps), torch.as_tensor(speech_16k).float().reshape(-1), faces, truth, truth_faces)


def _num(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def pick_strip_frames(env: Tensor, count: int = 4) -> list[int]:
    """``count`` frames for the strips: the loudest frames, at least T / (2 count) apart."""
    order = torch.argsort(env.nan_to_num(0), descending=True).tolist()
    gap, picked = max(1, env.shape[0] // (2 * count)), []
    for i in order:
        if all(abs(i - j) >= gap for j in picked):
            picked.append(i)
        if len(picked) == count:
            break
    return sorted(picked)


@torch.no_grad()
def score_output(output: Tensor, ref: Reference, scorers: Scorers, length_policy: str = "pingpong",
                 windows: Optional[tuple[int, int]] = None, cost: Optional[dict] = None) -> ClipScore:
    """All metrics of ``output [T, H, W, 3]`` (uint8) against ``ref``. ``windows`` = (window, overlap) the output
    was made with (for the seam error); ``cost`` = the run's seconds_per_output_second / peak_ram_mib /
    peak_vram_mib."""
    m: dict = {k: None for k in METRIC_KEYS}
    notes: list[str] = []
    t = output.shape[0]
    if t == 0:
        raise ValueError("the output has no frames")
    out_faces = analyze_frames(output, scorers.analyzer)
    index = source_frame_index(torch.arange(t), ref.source.shape[0], length_policy)
    src, src_faces = ref.source[index], ref.source_faces.select(index)
    env = envelope.speech_envelope(ref.speech_16k, ref.fps, t)
    rule = scorers.rule

    m["face_rate"] = out_faces.found_rate
    opening = out_faces.mouth_opening()
    av = envelope.av_sync(opening, env, rule.max_lag)
    m["av_corr"], m["av_corr_best"], m["av_offset"] = _num(av.corr), _num(av.best_corr), av.offset
    if av.corr != av.corr:
        m["av_offset"] = None
    px = envelope.pixel_opening(output, out_faces.mouth_center(), out_faces.face_width)
    px_src = envelope.pixel_opening(src, src_faces.mouth_center(), src_faces.face_width)
    m["revoice_corr"] = _num(envelope.pearson_masked(px, env))
    m["revoice_corr_src"] = _num(envelope.pearson_masked(px_src, env))

    if scorers.syncnet is not None:
        if bool(out_faces.found.any()):
            from .syncnet import lse

            try:
                r = lse(scorers.syncnet, output, fill_gaps(out_faces.boxes), ref.speech_16k, ref.fps,
                        device=scorers.device)
                m["lse_c"], m["lse_d"], m["lse_offset"] = r.lse_c, r.lse_d, r.offset
            except Exception as e:  # too short a clip: one note, not a failed grid
                notes.append(f"LSE skipped: {e}")
        else:
            notes.append("LSE skipped: no face in the output")

    same_size = tuple(output.shape[1:3]) == tuple(ref.source.shape[1:3])
    if same_size:
        fs = fidelity.fidelity(output, src, out_faces, src_faces, dilate=scorers.dilate)
        m["psnr_outside_mouth"], m["ssim_outside_mouth"] = _num(fs.psnr_outside_mouth), _num(fs.ssim_outside_mouth)
        m["psnr_face_src"] = _num(fs.psnr_face)
    else:
        notes.append(f"fidelity vs source skipped: output {tuple(output.shape[1:3])} vs source "
                     f"{tuple(ref.source.shape[1:3])} pixels")
    if ref.truth is not None:
        n = min(t, ref.truth.shape[0])
        m["lmd"] = _num(lmd.lmd(out_faces.select(torch.arange(n)), ref.truth_faces.select(torch.arange(n))))
        if tuple(ref.truth.shape[1:3]) == tuple(output.shape[1:3]):
            fg = fidelity.fidelity(output[:n], ref.truth[:n], out_faces.select(torch.arange(n)),
                                   ref.truth_faces.select(torch.arange(n)), dilate=scorers.dilate)
            m["psnr_face_gt"], m["ssim_face_gt"] = _num(fg.psnr_face), _num(fg.ssim_face)

    m["jitter"] = _num(temporal.mouth_jitter(out_faces))
    j_src = temporal.mouth_jitter(src_faces)
    if m["jitter"] is not None and j_src == j_src and j_src > 0:
        m["jitter_ratio"] = m["jitter"] / j_src
    if windows is not None:
        m["seam_error"] = _num(temporal.seam_error(output, out_faces.boxes, *windows))

    if scorers.arcface is not None and same_size:
        from .identity import csim

        m["csim"], used = csim(scorers.arcface, output, src, out_faces, src_faces, device=scorers.device)
        m["csim"] = _num(m["csim"])
        if not used:
            notes.append("CSIM skipped: no frame with a face in both videos")
    m["success"] = float(success.is_success(m["face_rate"], av.best_corr, m["lse_c"], rule))
    for k, v in (cost or {}).items():
        m[k] = _num(v)

    truth_open = None
    if ref.truth_faces is not None:
        truth_open = ref.truth_faces.mouth_opening()[:t]
    series = {"envelope": env.tolist(), "opening": _list(opening), "opening_source": _list(src_faces.mouth_opening()),
              "opening_truth": _list(truth_open) if truth_open is not None else None,
              "face_found": out_faces.found.int().tolist(), "fps": ref.fps}
    picks = pick_strip_frames(env)
    truth = ref.truth[:t] if ref.truth is not None and tuple(ref.truth.shape[1:3]) == tuple(output.shape[1:3]) \
        else None
    strip = mouth_strip(output, src, src_faces, picks, truth=truth) if same_size else None
    return ClipScore(m, series, notes, picks, strip)


def _list(x: Optional[Tensor]):
    return None if x is None else [None if not math.isfinite(v) else round(v, 5) for v in x.double().tolist()]


def mouth_strip(output: Tensor, source: Tensor, src_faces: FaceSeries, picks: list[int], tile: int = 96,
                gain: float = 4.0, truth: Optional[Tensor] = None) -> Tensor:
    """``[rows * tile, len(picks) * tile, 3]`` uint8: for each picked output frame (a column) the source frame it
    was made from, the output and ``gain`` x |output - source| around the mouth (a square of 0.9 face widths), then
    the ground truth if given. ``source`` and ``src_faces`` are already lined up with the output frames."""
    centre = fill_gaps(src_faces.mouth_center())
    width = fill_gaps(src_faces.face_width[:, None])[:, 0]
    h, w = source.shape[1:3]
    cols = []
    for i in picks:
        c, fw = centre[i], width[i]
        if not bool(c.isfinite().all()) or not bool(fw.isfinite()):
            c, fw = torch.tensor([w / 2, h / 2]), torch.tensor(float(min(h, w)) / 2)
        half = 0.45 * fw
        u = (torch.arange(tile, dtype=torch.float32) + 0.5) / tile * 2 - 1
        gx = (c[0] + u * half) * (2.0 / w) - 1
        gy = (c[1] + u * half) * (2.0 / h) - 1
        grid = torch.stack([gx[None, :].expand(tile, tile), gy[:, None].expand(tile, tile)], -1)[None]

        def cut(frames: Tensor) -> Tensor:
            img = frames[min(i, frames.shape[0] - 1)].float().permute(2, 0, 1)[None] / 255.0
            return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]

        tiles = [cut(source), cut(output)]
        tiles.append(((tiles[1] - tiles[0]).abs().mean(0, keepdim=True) * gain).clamp(0, 1).expand(3, -1, -1))
        if truth is not None:
            tiles.append(cut(truth))
        cols.append(torch.cat(tiles, 1))
    return (torch.cat(cols, 2).permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8)
