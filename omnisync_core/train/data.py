"""Training data: face-crop shards built from talking-head videos (or synthetic clips), and the paired dataset of
paper Eq. 1-3 over them.

Shard format (safetensors, written atomically): for clip ``i`` of the shard, ``{i}.frames`` uint8 ``[T, S, S, 3]``
face crops; ``{i}.pose`` float32 ``[T, 10]`` head-pose proxy (the eyes, nose tip and ears BlazeFace keypoints in
crop coordinates scaled to [-1, 1]; the mouth keypoint is left out because it moves with the lips);
``{i}.mouth_xy`` ``[T, 2]`` and ``{i}.face_width`` ``[T]`` in crop pixels; ``{i}.features`` float16 ``[N, D]``
Whisper features at 50 per second, or ``{i}.samples`` float32 16 kHz audio when no encoder was given;
optional ``{i}.openness`` ``[T]`` (synthetic ground truth) and ``{i}.pseudo_frames`` ``[T, S, S, 3]`` (the same
frames with other lips: a rendered pseudo pair, see :func:`synthetic_shards`). The ``__metadata__`` key ``clips`` holds a JSON list of
per-clip records (name, source, fps, frames, first_frame, feature_start / sample_start). ``index.json`` in the
shard folder lists the shards and every input that was skipped, with the reason.

Audio alignment: clip frame ``j`` is source frame ``first_frame + j``; its Whisper token is
``FrameAligner(fps).feature_of_frame(first_frame + j) - feature_start`` in the stored features (the stored
samples start at sample ``feature_start * 320`` so that features computed from them later align the same way).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from ..audio import FrameAligner, SAMPLE_RATE, Waveform, prepare_audio
from ..audio.align import as_fraction
from ..audio.features import TOKEN_RATE, TOKEN_SAMPLES, encode_audio
from ..errors import InputError, OmniSyncError
from ..fsutil import publish
from ..face.crop import crop_faces, crop_params, mouth_in_crop
from ..face.track import FaceTrack, build_track, frame_signatures, shot_changes_from_signatures
from ..face.types import FrameFaces

__all__ = ["ShardError", "ShardWriter", "build_shards", "synthetic_shards", "LipSyncDataset", "PairSampler",
           "mix_seed", "INDEX_NAME", "POSE_KEYPOINTS"]

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SHARD_FORMAT = "omnisync-shard"
POSE_KEYPOINTS = (0, 1, 2, 4, 5)     # BlazeFace: right eye, left eye, nose tip, right ear, left ear (no mouth)
AUDIO_MARGIN = 8                     # extra Whisper tokens kept either side of a clip for the edge windows
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")


class ShardError(OmniSyncError):
    """A shard folder or file is missing or unusable."""


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each value), so (seed, step, item) streams never collide."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


# ------------------------------------------------------------------------------------------------ writing shards


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
        publish(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _atomic_json(obj, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj, indent=1))
    os.replace(partial, path)


class ShardWriter:
    """Collects clips and writes ``shard_NNNNN.safetensors`` files of ``shard_size`` clips, then ``index.json``."""

    def __init__(self, out_dir: Union[str, Path], size: int, shard_size: int = 8, audio: str = "features"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.size, self.shard_size, self.audio = int(size), max(1, int(shard_size)), audio
        self.pending: list[tuple[dict, dict]] = []
        self.shards: list[dict] = []
        self.skipped: list[dict] = []

    def add(self, record: dict, tensors: dict[str, Tensor]) -> None:
        self.pending.append((record, tensors))
        if len(self.pending) >= self.shard_size:
            self.flush()

    def skip(self, source: str, reason: str) -> None:
        log.warning("skipping %s: %s", source, reason)
        self.skipped.append({"source": source, "reason": reason})

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard_{len(self.shards):05d}.safetensors"
        tensors, records = {}, []
        for i, (record, parts) in enumerate(self.pending):
            tensors.update({f"{i}.{k}": v for k, v in parts.items()})
            records.append(record)
        _atomic_save(tensors, self.out_dir / name, {"format": SHARD_FORMAT, "version": "1",
                                                    "clips": json.dumps(records)})
        self.shards.append({"file": name, "clips": [{"name": r["name"], "frames": r["frames"]} for r in records]})
        self.pending = []

    def close(self, extra: Optional[dict] = None) -> Path:
        """Write the last shard and the index; returns the index path."""
        self.flush()
        index = {"format": "omnisync-shards", "version": 1, "size": self.size, "audio": self.audio,
                 "shards": self.shards, "skipped": self.skipped, **(extra or {})}
        path = self.out_dir / INDEX_NAME
        _atomic_json(index, path)
        return path


def _chosen_keypoints(faces: Sequence[FrameFaces], track: FaceTrack) -> Tensor:
    """``[T, 6, 2]`` keypoints of the tracked face per frame (the detection nearest the track's box); frames
    without a detection take the nearest frame's keypoints shifted with the box, or box-derived points."""
    T = len(track)
    centre = (track.boxes[:, :2] + track.boxes[:, 2:]) / 2
    kps = torch.zeros(T, 6, 2)
    have = torch.zeros(T, dtype=torch.bool)
    for t, ff in enumerate(faces):
        if len(ff):
            d = ((ff.boxes[:, :2] + ff.boxes[:, 2:]) / 2 - centre[t]).norm(dim=-1)
            kps[t], have[t] = ff.keypoints[int(d.argmin())].float(), True
    if not have.any():
        b = track.boxes
        w, h = (b[:, 2] - b[:, 0])[:, None], (b[:, 3] - b[:, 1])[:, None]
        rel = torch.tensor([[0.33, 0.38], [0.67, 0.38], [0.5, 0.6], [0.5, 0.78], [0.05, 0.45], [0.95, 0.45]])
        return b[:, None, :2] + rel[None] * torch.stack([w, h], -1)
    seen = have.nonzero().flatten()
    for t in (~have).nonzero().flatten().tolist():
        s = int(seen[(seen - t).abs().argmin()])
        kps[t] = kps[s] + (centre[t] - centre[s])
    return kps


def pose_features(faces: Sequence[FrameFaces], track: FaceTrack, params) -> Tensor:
    """Head-pose proxy ``[T, 10]``: eyes, nose tip and ears in crop coordinates scaled to [-1, 1]."""
    kps = _chosen_keypoints(faces, track)[:, list(POSE_KEYPOINTS)].double()
    m = params.crop_from_frame.double()
    p = kps @ m[:, :, :2].transpose(-1, -2) + m[:, None, :, 2]
    return (p * (2.0 / params.size) - 1.0).flatten(1).float()


def _audio_slice(wave: Optional[Waveform], features: Optional[Tensor], fps: Fraction, a: int, b: int
                 ) -> tuple[dict[str, Tensor], dict]:
    """Audio tensors and alignment record for source frames ``[a, b)``."""
    aligner = FrameAligner(fps, feature_rate=TOKEN_RATE)
    if features is not None:
        total = features.shape[0]
    else:
        total = -(-wave.samples.shape[0] // TOKEN_SAMPLES)
    lo = max(0, aligner.feature_of_frame(a) - AUDIO_MARGIN)
    hi = min(total, aligner.feature_of_frame(b) + AUDIO_MARGIN + 1)
    if hi <= lo:
        raise InputError("the audio ends before these frames")
    if features is not None:
        return {"features": features[lo:hi].to(torch.float16).cpu()}, {"feature_start": lo}
    samples = wave.samples[lo * TOKEN_SAMPLES: hi * TOKEN_SAMPLES].float()
    return {"samples": samples.contiguous()}, {"feature_start": lo}


def _segments(shot_ids: Tensor, clip_frames: Optional[int], min_frames: int) -> list[tuple[int, int]]:
    """Frame ranges: shots split into pieces of ``clip_frames`` (the last piece merged if too short)."""
    out, T, start = [], int(shot_ids.shape[0]), 0
    for t in range(1, T + 1):
        if t == T or shot_ids[t] != shot_ids[start]:
            n = t - start
            step = clip_frames or n
            cuts = list(range(start, t, step)) + [t]
            if len(cuts) > 2 and cuts[-1] - cuts[-2] < min_frames:
                cuts.pop(-2)
            out.extend((a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b - a >= min_frames)
            start = t
    return out


def _clip_tensors(crops: Tensor, faces: Sequence[FrameFaces], track: FaceTrack, params) -> dict[str, Tensor]:
    mouth, width = mouth_in_crop(track, params)
    return {"frames": crops, "pose": pose_features(faces, track, params), "mouth_xy": mouth, "face_width": width}


def _to_uint8(frames: Tensor) -> Tensor:
    return frames if frames.dtype == torch.uint8 else frames.clamp(0, 1).mul(255).round().to(torch.uint8)


def _encode(wave: Waveform, encoder) -> Optional[Tensor]:
    if encoder is None:
        return None
    return encode_audio(wave.samples.to(next(encoder.parameters()).device), encoder).float().cpu()


def _video_files(video_dir_or_files) -> list[Path]:
    if isinstance(video_dir_or_files, (str, os.PathLike)):
        p = Path(video_dir_or_files)
        if p.is_dir():
            return sorted(q for q in p.rglob("*") if q.suffix.lower() in VIDEO_SUFFIXES)
        return [p]
    return [Path(p) for p in video_dir_or_files]


def _process_video(path: Path, writer: ShardWriter, size: int, fps, clip_frames: Optional[int], min_frames: int,
                   margin: float, analyzer, encoder, chunk: int) -> int:
    """Two streaming passes over one video (faces, then crops); returns the number of clips written."""
    from ..io import VideoReader, read_audio_of_video

    wave = read_audio_of_video(path)
    if wave is None or wave.samples.numel() == 0:
        writer.skip(str(path), "the video has no audio track")
        return 0
    wave = prepare_audio(wave)
    with VideoReader(path, fps=fps) as reader:
        rate, hw = reader.fps, (reader.height, reader.width)
        faces, signatures = [], []
        for _, window in reader.windows(chunk):
            faces.extend(analyzer(window) if analyzer is not None else [FrameFaces.empty()] * window.shape[0])
            signatures.append(frame_signatures(window))
        if not faces:
            writer.skip(str(path), "the video has no frames")
            return 0
        track = build_track(faces, hw, shot_changes=shot_changes_from_signatures(torch.cat(signatures)))
        params = crop_params(track, size=size, margin=margin)
        segments = _segments(track.shot_ids, clip_frames, min_frames)
        if not segments:
            writer.skip(str(path), f"no shot of at least {min_frames} frames")
            return 0
        features = _encode(wave, encoder)
        crops = torch.empty(len(track), size, size, 3, dtype=torch.uint8)
        seg_iter, written = iter(segments), 0
        current = next(seg_iter)
        for start, window in reader.windows(chunk):
            n = window.shape[0]
            crops[start:start + n] = _to_uint8(crop_faces(window.float() / 255, params[start:start + n]))
            # emit every segment whose frames are all cropped, so only the current shard stays in memory
            while current is not None and current[1] <= start + n:
                a, b = current
                written += _emit(writer, f"{path.stem}_{a:06d}", str(path), rate, a, b, crops[a:b].clone(),
                                 faces[a:b], track[a:b], params[a:b], wave, features)
                current = next(seg_iter, None)
    return written


def _emit(writer, name, source, rate, a, b, crops, faces, track, params, wave, features, extra=None) -> int:
    try:
        audio, align = _audio_slice(wave, features, rate, a, b)
    except InputError as e:
        writer.skip(f"{source}[{a}:{b}]", str(e))
        return 0
    tensors = {**_clip_tensors(crops, faces, track, params), **audio, **(extra or {})}
    record = {"name": name, "source": source, "fps": f"{rate.numerator}/{rate.denominator}", "frames": b - a,
              "first_frame": a, **align}
    writer.add(record, tensors)
    return 1


def build_shards(video_dir_or_files, out_dir, size: int = 512, fps=None, clip_frames: Optional[int] = 250,
                 analyzer=None, audio_encoder=None, shard_size: int = 8, min_frames: int = 24,
                 margin: float = 0.3, chunk: int = 64) -> Path:
    """Face-crop shards from talking-head videos; returns the path of ``index.json``.

    Each video is decoded at ``fps`` (default: its own rate), faces are found with ``analyzer`` (a
    :class:`~omnisync_core.face.analyze.FaceAnalyzer`; None uses the centred fallback box), tracked and cropped to
    ``size`` pixels as at inference (``margin``), split at shot changes and into clips of ``clip_frames``
    frames (pieces under ``min_frames`` are dropped). The video's own audio gives Whisper features when
    ``audio_encoder`` is given, else 16 kHz samples are stored. A video that cannot be read or has no audio is
    skipped with a logged warning and listed under ``skipped`` in the index.
    """
    files = _video_files(video_dir_or_files)
    writer = ShardWriter(out_dir, size, shard_size, "features" if audio_encoder is not None else "samples")
    for path in files:
        try:
            _process_video(path, writer, size, fps, clip_frames, min_frames, margin, analyzer, audio_encoder, chunk)
        except OmniSyncError as e:
            writer.skip(str(path), str(e))
    return writer.close({"margin": margin})


def synthetic_shards(out_dir, num_clips: int, size: int = 256, seed: int = 0, fps=25, sentences=None, voices=None,
                     render_size: Optional[int] = None, audio_encoder=None, shard_size: int = 8,
                     margin: float = 0.3, speeds: tuple[int, int] = (130, 180), pseudo_pairs: bool = False,
                     analyzer=None, analyze_every: int = 1) -> Path:
    """Shards of synthetic talking faces (:func:`~omnisync_core.train.synthetic.make_example`) in the format of
    :func:`build_shards`, plus the ground-truth mouth ``openness``. Clip ``i`` uses seed ``seed + i`` for its
    face and a sentence, voice and speaking rate drawn from it; returns the path of ``index.json``.

    ``pseudo_pairs`` also stores ``pseudo_frames``: the same face, pose and blinks speaking the previous clip's
    sentence (the first clip: its own, time-reversed), cropped with the same boxes, which
    :class:`LipSyncDataset` uses as the pseudo-paired reference of paper Eq. 3.

    ``analyzer`` (a :class:`~omnisync_core.face.analyze.FaceAnalyzer`) crops where the face pipeline finds the
    face, as inference will; without it the crops follow the rendered ground truth. ``analyze_every`` > 1 runs it
    on every n-th frame only and lets the tracker interpolate between (the synthetic heads move smoothly)."""
    from . import synthetic

    sentences = list(sentences or synthetic.SENTENCES)
    voices = list(voices or synthetic.VOICES)
    rate = as_fraction(fps)
    writer = ShardWriter(out_dir, size, shard_size, "features" if audio_encoder is not None else "samples")
    previous = None
    for i in range(int(num_clips)):
        g = torch.Generator().manual_seed(mix_seed(seed, i))
        text = sentences[int(torch.randint(len(sentences), (), generator=g))]
        voice = voices[int(torch.randint(len(voices), (), generator=g))]
        speed = int(torch.randint(speeds[0], speeds[1] + 1, (), generator=g))
        try:
            clip, wave = synthetic.make_example(text, seed + i, size=render_size or size, fps=rate, voice=voice,
                                                speed=speed)
        except OmniSyncError as e:
            writer.skip(f"synthetic[{i}]", str(e))
            continue
        if analyzer is not None:
            analyzer.reset()
            seen = iter(analyzer(_to_uint8(clip.frames[::analyze_every])))
            faces = [next(seen) if t % analyze_every == 0 else FrameFaces.empty() for t in range(len(clip))]
        else:
            faces = clip.to_frame_faces()
        with _quiet_warnings():
            track = build_track(faces, tuple(clip.frames.shape[1:3]))
        params = crop_params(track, size=size, margin=margin)
        crops = _to_uint8(crop_faces(clip.frames, params))
        extra = {"openness": clip.openness.float()}
        if pseudo_pairs:
            own = synthetic.MouthTrack(clip.openness, clip.width, clip.fps)
            other = previous or synthetic.MouthTrack(clip.openness.flip(0), clip.width.flip(0), clip.fps)
            swapped = synthetic.lip_swap(seed + i, other, len(clip), size=render_size or size,
                                         offset=int(torch.randint(len(other), (), generator=g)))
            extra["pseudo_frames"] = _to_uint8(crop_faces(swapped.frames, params))
            previous = own
        _emit(writer, f"synthetic_{seed + i:06d}", f"synthetic:{text}|{voice}|{speed}", rate, 0, len(clip), crops,
              faces, track, params, wave, _encode(wave, audio_encoder), extra)
    return writer.close({"margin": margin, "synthetic": True})


class _quiet_warnings:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# ------------------------------------------------------------------------------------------------- the dataset


@dataclass
class _Clip:
    shard: Path
    key: int
    name: str
    fps: Fraction
    frames: int
    first_frame: int
    feature_start: int
    audio: str              # "features" or "samples"
    pose: Tensor            # [T, 10]
    mouth_xy: Optional[Tensor] = None      # [T, 2] crop pixels
    face_width: Optional[Tensor] = None    # [T] crop pixels
    has_pseudo: bool = False               # the shard stores rendered pseudo pairs (pseudo_frames)


class LipSyncDataset(Dataset):
    """Paired samples over shard folders (paper Eq. 1-3).

    Item ``i`` is a target window ``V_ab`` of ``window`` (= 4k+1) frames: the ``i``-th of the non-overlapping
    windows of all clips. :meth:`sample` (or ``dataset[(i, sigma, seed)]``) also returns its audio windows
    ``A_ab [n, A, D]`` and a reference ``V_cd`` of the same clip that never touches the target's frames nor
    the ``exclusion`` frames on either side. For ``sigma > pair_threshold`` the reference is pseudo-paired: frame
    ``j`` of ``V_cd`` is the allowed frame whose head pose is nearest that of target frame ``j`` (``pseudo_mode``
    "frames"), or the allowed contiguous segment with the least summed pose distance ("segment"); otherwise it
    is a uniformly drawn allowed contiguous segment.

    Shards that cannot be read and clips too short for a pair are skipped with a logged warning and listed in
    :attr:`skipped`. Shards with raw samples need ``audio_encoder`` (features are computed once per clip and
    cached). Videos come as float32 ``[3, n, S, S]`` in [-1, 1].
    """

    def __init__(self, roots: Union[str, Path, Sequence[Union[str, Path]]], window: int = 21, audio_before: int = 2,
                 audio_after: int = 2, pair_threshold: float = 0.85, exclusion: int = 2, pseudo_mode: str = "frames",
                 audio_encoder=None, stride: Optional[int] = None):
        if window < 1 or window % 4 != 1:
            raise InputError(f"window must be 4k+1 frames (5, 9, ..., 81), got {window}")
        if pseudo_mode not in ("frames", "segment"):
            raise InputError(f"pseudo_mode must be 'frames' or 'segment', got {pseudo_mode!r}")
        self.window, self.before, self.after = int(window), int(audio_before), int(audio_after)
        self.pair_threshold, self.exclusion, self.pseudo_mode = float(pair_threshold), int(exclusion), pseudo_mode
        self.audio_encoder = audio_encoder
        self.stride = int(stride or window)
        self.clips: list[_Clip] = []
        self.items: list[tuple[int, int]] = []
        self.skipped: list[dict] = []
        self.size: Optional[int] = None
        self._features: dict[int, Tensor] = {}
        self._handles: dict[Path, object] = {}
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        for root in roots:
            self._load_index(Path(root))
        if not self.items:
            raise ShardError(f"no usable training windows of {window} frames in {', '.join(map(str, roots))}")

    # ------------------------------------------------------------------ index

    def _skip(self, what: str, reason: str) -> None:
        log.warning("skipping %s: %s", what, reason)
        self.skipped.append({"source": what, "reason": reason})

    def _load_index(self, root: Path) -> None:
        path = root / INDEX_NAME if root.is_dir() else root
        try:
            index = json.loads(path.read_text())
            shards = index["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{path} is not a readable shard index ({e})") from None
        if self.size is not None and index.get("size") != self.size:
            raise ShardError(f"{path} holds {index.get('size')} px crops but other shards hold {self.size} px")
        self.size = index.get("size")
        for entry in shards:
            shard = path.parent / entry["file"]
            try:
                self._load_shard(shard)
            except Exception as e:   # any corrupt file is skipped, never fatal
                self._skip(str(shard), f"unreadable shard ({type(e).__name__}: {e})")

    def _load_shard(self, shard: Path) -> None:
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SHARD_FORMAT:
                raise ShardError("not an OmniSync shard")
            records = json.loads(meta["clips"])
            keys = set(f.keys())
            poses = []
            for i, r in enumerate(records):
                audio = "features" if f"{i}.features" in keys else "samples" if f"{i}.samples" in keys else None
                if audio is None or f"{i}.frames" not in keys:
                    raise ShardError(f"clip {i} lacks frames or audio")
                shape = f.get_slice(f"{i}.frames").get_shape()
                if shape[0] != r["frames"]:
                    raise ShardError(f"clip {i} has {shape[0]} frames, its record says {r['frames']}")
                get = lambda name: f.get_tensor(f"{i}.{name}").float() if f"{i}.{name}" in keys else None  # noqa
                poses.append((audio, get("pose"), get("mouth_xy"), get("face_width"), f"{i}.pseudo_frames" in keys))
        # everything parsed: only now register the clips (a bad shard adds nothing)
        for i, (r, (audio, pose, mouth, width, has_pseudo)) in enumerate(zip(records, poses)):
            clip = _Clip(shard, i, r["name"], as_fraction(Fraction(r["fps"])), int(r["frames"]),
                         int(r.get("first_frame", 0)), int(r.get("feature_start", 0)), audio, pose, mouth, width,
                         has_pseudo)
            if audio == "samples" and self.audio_encoder is None:
                self._skip(f"{shard.name}:{r['name']}", "stores raw audio samples but no audio_encoder was given")
                continue
            n, k = self.window, self.exclusion
            if clip.frames < 2 * n + k:
                self._skip(f"{shard.name}:{r['name']}", f"{clip.frames} frames is too short for two "
                                                         f"{n}-frame windows {k} frames apart")
                continue
            c = len(self.clips)
            self.clips.append(clip)
            self.items.extend((c, a) for a in range(0, clip.frames - n + 1, self.stride))

    # ------------------------------------------------------------------ reading

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}     # file handles do not cross process boundaries
        return state

    def _handle(self, path: Path):
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = safe_open(str(path), framework="pt")
        return h

    def frames(self, clip: int, index: Tensor, name: str = "frames") -> Tensor:
        """Frames ``index`` of a clip (``name``: ``frames`` or ``pseudo_frames``) as float32 ``[3, n, S, S]`` in
        [-1, 1]."""
        c = self.clips[clip]
        lo, hi = int(index.min()), int(index.max()) + 1
        block = self._handle(c.shard).get_slice(f"{c.key}.{name}")[lo:hi]
        x = block[index - lo].permute(3, 0, 1, 2).float()
        return x.div_(127.5).sub_(1.0)

    def features(self, clip: int) -> Tensor:
        """Whisper features ``[N, D]`` of a clip (computed from stored samples once, then cached)."""
        feats = self._features.get(clip)
        if feats is None:
            c = self.clips[clip]
            h = self._handle(c.shard)
            if c.audio == "features":
                feats = h.get_tensor(f"{c.key}.features").float()
            else:
                samples = h.get_tensor(f"{c.key}.samples").float()
                feats = _encode(Waveform(samples, SAMPLE_RATE), self.audio_encoder)
            self._features[clip] = feats
        return feats

    def audio_windows(self, clip: int, index: Tensor) -> Tensor:
        """Per-frame audio token windows ``[n, before + 1 + after, D]`` for clip frames ``index``."""
        c = self.clips[clip]
        feats = self.features(clip)
        aligner = FrameAligner(c.fps, feature_rate=TOKEN_RATE)
        centre = aligner.feature_indices(index + c.first_frame) - c.feature_start
        idx = (centre[:, None] + torch.arange(-self.before, self.after + 1)).clamp_(0, feats.shape[0] - 1)
        return feats[idx]

    # ------------------------------------------------------------------ pairing

    def __len__(self) -> int:
        return len(self.items)

    def allowed(self, clip: int, start: int) -> Tensor:
        """Bool ``[T]``: frames a reference may use for the target starting at ``start``."""
        T, n, k = self.clips[clip].frames, self.window, self.exclusion
        ok = torch.ones(T, dtype=torch.bool)
        ok[max(0, start - k): start + n + k] = False
        return ok

    def _segment_starts(self, clip: int, start: int) -> Tensor:
        ok = self.allowed(clip, start).int()
        runs = torch.nn.functional.pad(ok.cumsum(0), (1, 0))
        full = runs[self.window:] - runs[:-self.window] == self.window   # every frame of [c, c+n) allowed
        return full.nonzero().flatten()

    def reference(self, clip: int, start: int, sigma: float, generator: Optional[torch.Generator] = None
                  ) -> tuple[Tensor, bool]:
        """Frame indices ``[n]`` of V_cd for the target at ``start`` and whether it is a pseudo-pair (Eq. 3).
        A clip with rendered pseudo pairs answers the target's own indices: :meth:`sample` then reads them from
        ``pseudo_frames`` (same pose, other lips)."""
        n = self.window
        target = torch.arange(start, start + n)
        pose = self.clips[clip].pose
        if sigma > self.pair_threshold:
            if self.clips[clip].has_pseudo:
                return target, True
            if self.pseudo_mode == "frames":
                ok = self.allowed(clip, start)
                d = torch.cdist(pose[target], pose).masked_fill(~ok[None], float("inf"))
                return d.argmin(1), True
            starts = self._segment_starts(clip, start)
            cost = torch.stack([(pose[target] - pose[c:c + n]).norm(dim=-1).sum() for c in starts.tolist()])
            c = int(starts[int(cost.argmin())])
            return torch.arange(c, c + n), True
        starts = self._segment_starts(clip, start)
        c = int(starts[int(torch.randint(len(starts), (), generator=generator))])
        return torch.arange(c, c + n), False

    def sample(self, index: int, sigma: float, generator: Optional[torch.Generator] = None) -> dict:
        """One training example for item ``index`` at noise level ``sigma``.

        Returns ``video`` (V_ab) and ``reference`` (V_cd) float32 ``[3, n, S, S]``, ``audio`` (A_ab) ``[n, A, D]``,
        ``sigma``, ``pseudo`` (bool), ``target_frames`` / ``reference_frames`` ``[n]``, ``pose_distance`` (mean
        per-frame pose distance between V_ab and V_cd), ``clip`` and ``start``.
        """
        clip, start = self.items[index]
        c = self.clips[clip]
        target = torch.arange(start, start + self.window)
        ref, pseudo = self.reference(clip, start, float(sigma), generator)
        rendered = pseudo and c.has_pseudo
        n = self.window
        return {"video": self.frames(clip, target),
                "reference": self.frames(clip, ref, "pseudo_frames" if rendered else "frames"),
                "audio": self.audio_windows(clip, target), "sigma": float(sigma), "pseudo": pseudo,
                "target_frames": target, "reference_frames": ref,
                "reference_kind": "rendered" if rendered else "pseudo" if pseudo else "segment",
                "pose_distance": float((c.pose[target] - c.pose[ref]).norm(dim=-1).mean()), "clip": clip,
                "start": start,
                "mouth_xy": c.mouth_xy[target] if c.mouth_xy is not None else torch.full((n, 2), float("nan")),
                "face_width": c.face_width[target] if c.face_width is not None else torch.full((n,), float("nan"))}

    def __getitem__(self, key) -> dict:
        if isinstance(key, tuple):
            index, sigma, seed = key
            g = torch.Generator().manual_seed(int(seed))
            return self.sample(int(index), float(sigma), g)
        return self.sample(int(key), 0.0, None)


class PairSampler:
    """Deterministic global batches from ``(seed, step)``: for each of ``batch_size`` positions, the item (epoch
    permutations over the dataset, like DistributedSampler), its noise level from ``sigma_fn(generator)`` drawn
    first, and a per-item seed for the pairing, noise and audio dropout. :meth:`shard` gives one rank's part;
    the union over ranks is the whole batch, so results do not depend on the number of processes."""

    def __init__(self, num_items: int, batch_size: int, seed: int, sigma_fn: Callable[[torch.Generator], float]):
        if num_items < 1 or batch_size < 1:
            raise InputError("PairSampler needs at least one item and a positive batch size")
        self.num_items, self.batch_size, self.seed, self.sigma_fn = int(num_items), int(batch_size), int(seed), sigma_fn
        self._perm: dict[int, Tensor] = {}

    def _permutation(self, epoch: int) -> Tensor:
        perm = self._perm.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5EED, epoch))
            perm = torch.randperm(self.num_items, generator=g)
            self._perm = {epoch: perm}
        return perm

    def item(self, step: int, position: int) -> tuple[int, float, int]:
        """(dataset index, sigma, item seed) of batch position ``position`` at ``step``."""
        pos = int(step) * self.batch_size + int(position)
        index = int(self._permutation(pos // self.num_items)[pos % self.num_items])
        item_seed = mix_seed(self.seed, step, position)
        sigma = float(self.sigma_fn(torch.Generator().manual_seed(mix_seed(item_seed, 1))))
        return index, sigma, item_seed

    def batch(self, step: int) -> list[tuple[int, float, int]]:
        return [self.item(step, j) for j in range(self.batch_size)]

    def shard(self, step: int, rank: int, world: int) -> list[tuple[int, float, int]]:
        """Rank ``rank``'s contiguous slice of the global batch (batch_size must divide by ``world``)."""
        if self.batch_size % world:
            raise InputError(f"batch size {self.batch_size} does not split over {world} processes")
        per = self.batch_size // world
        return [self.item(step, j) for j in range(rank * per, (rank + 1) * per)]
