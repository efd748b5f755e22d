"""Does a model lip-sync? Re-voice held-out synthetic faces with other speech and read the mouths back.

Each held-out clip is a face (a style no training clip used) speaking sentence A; it is lip-synced to sentence B
spoken by another voice. The synthetic renderer knows the mouth openness B implies, so the score is the Pearson
correlation between the openness measured in the generated crops and B's openness track: high when the mouth
follows the new audio. The same correlation for the *source* crops (which speak A) is the leak check: a model
that copies the source mouth scores near it. Identity preservation is the PSNR between generated and source
crops away from the mouth.

Crops come from the face pipeline (FaceAnalyzer -> track -> crop), exactly as inference makes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..audio import FrameAligner, prepare_audio
from ..audio.features import TOKEN_RATE, encode_audio
from ..face.crop import crop_faces, crop_params, mouth_in_crop
from ..face.track import build_track
from ..generator import OmniSyncGenerator, SamplerOptions
from ..train import synthetic

HELD_OUT_SEED = 900_000


@dataclass
class HeldOutClip:
    """Source crops speaking A, B's audio windows and B's true openness, all per frame."""

    crops: Tensor            # [T, S, S, 3] float 0..1
    mouth_xy: Tensor         # [T, 2] crop pixels
    face_width: Tensor       # [T] crop pixels
    audio: Tensor            # [T, A, D] Whisper tokens of sentence B
    new_openness: Tensor     # [T] what B implies
    source_openness: Tensor  # [T] what the source shows (A)


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def held_out_clips(count: int, audio_encoder, analyzer, sentences: Sequence[str], crop_size: int = 64,
                   render_size: int = 128, fps: int = 25, audio_before: int = 2, audio_after: int = 2,
                   seed: int = HELD_OUT_SEED) -> list[HeldOutClip]:
    """``count`` re-voicing problems over ``sentences`` (use ones the model never heard)."""
    clips = []
    g = torch.Generator().manual_seed(seed)
    voices = synthetic.VOICES
    for i in range(count):
        a, b = torch.randperm(len(sentences), generator=g)[:2].tolist()
        va, vb = (voices[int(j)] for j in torch.randint(len(voices), (2,), generator=g))
        clip, _ = synthetic.make_example(sentences[a], seed + i, size=render_size, fps=fps, voice=va)
        _, wave_b = synthetic.make_example(sentences[b], seed + 10_000 + i, size=32, fps=fps, voice=vb, speed=140)
        track_b = synthetic.mouth_track(wave_b.samples, fps)
        n = min(len(clip), len(track_b))
        frames = (clip.frames[:n] * 255).round().to(torch.uint8)
        analyzer.reset()
        track = build_track(analyzer(frames), tuple(frames.shape[1:3]))
        params = crop_params(track, size=crop_size)
        mouth, width = mouth_in_crop(track, params)
        feats = encode_audio(prepare_audio(wave_b).samples, audio_encoder)
        tokens = FrameAligner(fps, feature_rate=TOKEN_RATE).gather(feats, torch.arange(n), audio_before, audio_after)
        clips.append(HeldOutClip(crop_faces(frames.float() / 255, params), mouth, width, tokens.float(),
                                 track_b.openness[:n].float(), clip.openness[:n].float()))
    return clips


@dataclass
class SyncScore:
    corr_generated: float        # generated mouth vs the new audio (all frames pooled)
    corr_generated_clip_mean: float
    corr_source: float           # source mouth vs the new audio (leak check)
    psnr_outside_mouth: float    # identity preservation, dB
    seconds_per_frame: float
    model_calls_per_window: int
    per_clip: list = field(default_factory=list)


def _outside_mouth(size: int, mouth: Tensor, width: Tensor) -> Tensor:
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    d = ((xs - mouth[:, 0, None, None]).square() + (ys - mouth[:, 1, None, None]).square()).sqrt()
    return d > 0.45 * width[:, None, None]


@torch.no_grad()
def score(dit, codec, clips: Sequence[HeldOutClip], options: SamplerOptions, window: int = 9,
          seed: int = 0) -> SyncScore:
    """Lip-sync every clip window by window (disjoint windows) and score it."""
    generator = OmniSyncGenerator(dit, codec, options)
    gen_open, new_open, src_open, per_clip, sq_err, count = [], [], [], [], 0.0, 0
    started, frames = time.perf_counter(), 0
    for clip in clips:
        n = clip.crops.shape[0]
        out = torch.cat([generator.edit(clip.crops[s:s + window], clip.audio[s:s + window], clip.mouth_xy[s:s + window],
                                   clip.face_width[s:s + window], seed=seed + s) for s in range(0, n, window)])
        frames += n
        g = synthetic.measure_openness(out, clip.mouth_xy, clip.face_width)
        src = synthetic.measure_openness(clip.crops, clip.mouth_xy, clip.face_width)
        gen_open.append(g)
        src_open.append(src)
        new_open.append(clip.new_openness)
        per_clip.append(pearson(g, clip.new_openness))
        keep = _outside_mouth(out.shape[1], clip.mouth_xy, clip.face_width)
        sq_err += float((out - clip.crops).square().mean(-1)[keep].sum())
        count += int(keep.sum())
    mse = sq_err / max(count, 1)
    return SyncScore(pearson(torch.cat(gen_open), torch.cat(new_open)), sum(per_clip) / len(per_clip),
                     pearson(torch.cat(src_open), torch.cat(new_open)),
                     10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item(),
                     (time.perf_counter() - started) / max(frames, 1), generator.last_stats.model_calls, per_clip)


def compare(dit, codec, clips, steps: int, shift: float, window: int, variants: Optional[dict] = None) -> dict:
    """The default sampler (progressive init at tau 0.92, DS-CFG) beside the ablations: tau = 1.0 (start from
    pure noise) and plain CFG."""
    variants = variants or {"default (tau 0.92, DS-CFG)": dict(tau=0.92, guidance="ds-cfg"),
                            "tau 1.0 (no progressive init)": dict(tau=1.0, guidance="ds-cfg"),
                            "plain CFG": dict(tau=0.92, guidance="cfg"),
                            "no guidance": dict(tau=0.92, guidance="none")}
    return {name: score(dit, codec, clips, SamplerOptions(steps=steps, shift=shift, **kw), window)
            for name, kw in variants.items()}
