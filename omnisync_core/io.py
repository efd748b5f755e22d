"""Streaming video I/O with PyAV: probe a file, read it frame by frame or in overlapping windows, and write
H.264 + AAC atomically. Nothing here ever holds a whole video in memory (only :meth:`VideoReader.read_all`,
meant for short clips, does).

Policies (ours):

* **Frame rate.** ``VideoInfo.fps`` is an exact :class:`~fractions.Fraction`: the stream's nominal rate
  (FFmpeg's guessed ``r_frame_rate``, e.g. 30000/1001) when the stream is constant-rate and that rate agrees with
  the average within 1 %, else the stream's average rate.
* **Variable frame rate.** :class:`VideoReader` always emits a constant rate (``fps=`` or ``info.fps``) by
  timestamps: output frame k (time ``start + k / fps``, ``start`` = the first frame's pts) is the source frame
  whose pts interval ``[pts_i, pts_i+1)`` holds that instant, so frames are duplicated or dropped as needed, and
  ``round(duration * fps)`` frames come out. A pts is trusted to one tick of its time base (muxers round, e.g.
  Matroska stores milliseconds), which makes constant-rate input pass through one to one, untouched.
  ``VideoInfo.variable_frame_rate`` reports whether the pts of the first 240 frames are irregular.
* **Rotation.** The display matrix (side data that phones write; read from the first decoded frame) or the
  legacy ``rotate`` tag gives the orientation; with ``apply_rotation=True`` frames are transposed/flipped so
  they come out as a player shows them. Only multiples of 90 degrees (and mirroring) are applied.
* **Odd sizes.** yuv420p needs even width and height: :class:`VideoWriter` pads the last column/row by
  repeating it (so a 65x49 clip is stored, and read back, as 66x50) and warns once.
* **Audio.** The writer encodes exactly the samples it is given; AAC decoders (PyAV included) return whole
  1024-sample frames, so :func:`read_audio_of_video` trims the decoded track to the packets' end time.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .audio.align import FpsLike, as_fraction
from .audio.waveform import Waveform, to_float_pcm
from .errors import OmniSyncError
from .fsutil import publish

PathLike = Union[str, os.PathLike]
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
VFR_PROBE_FRAMES = 240
# swscale flags SWS_BILINEAR | SWS_FULL_CHR_H_INT | SWS_ACCURATE_RND: the default yuv420p -> rgb24 fast path
# shifts colours by about -1.2 levels (37.6 dB on a clean round trip); these give 48.9 dB at ~15x the cost.
ACCURATE_YUV_TO_RGB = 0x2 | 0x2000 | 0x40000
REORDER_MARGIN = 16  # pts of the last demuxed packets may still miss B-frames that come later in decode order


class VideoError(OmniSyncError):
    """A video file is missing, unreadable, corrupt or cannot be written."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` finds. ``width``/``height`` are the stored (coded) size before rotation.

    ``num_frames`` is exact when ``frames_counted`` says where it came from: "metadata" (the container's sample
    count: exact for mp4/mov), "packets" (every packet demuxed and counted, no decoding) or "estimate"
    (``round(duration * fps)``). ``duration`` is ``num_frames / fps`` for a constant-rate stream whose count is
    known (headers round it: mp4 edit lists and Matroska keep milliseconds), else the header's.
    """

    path: str
    width: int
    height: int
    fps: Fraction
    num_frames: int
    frames_counted: str
    duration: float
    has_audio: bool
    audio_sample_rate: Optional[int]
    audio_channels: Optional[int]
    rotation: int
    mirrored: bool
    variable_frame_rate: bool
    video_codec: str
    audio_codec: Optional[str]
    pix_fmt: Optional[str]

    @property
    def display_size(self) -> tuple[int, int]:
        """(height, width) of frames once the rotation is applied."""
        return (self.width, self.height) if self.rotation % 180 == 90 else (self.height, self.width)


# ---------------------------------------------------------------------------------------------- reading


def _av():
    import av  # local import: the rest of omnisync_core works without PyAV

    return av


def _check_input(path: PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(f"video file not found: {path}")
    if os.path.isdir(path):
        raise VideoError(f"video path is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise VideoError(f"video file is empty (0 bytes): {path}")
    return path


def _open_input(path: str):
    av = _av()
    try:
        container = av.open(path)
    except av.error.EOFError:
        raise VideoError(f"video file ends right after its header (zero frames, or truncated): {path}") from None
    except (av.FFmpegError, OSError, ValueError) as error:
        raise VideoError(f"not a readable video (unknown format, corrupt or truncated): {path} ({error})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"file has no video stream: {path}")
    return container


def _parse_clock(text: str) -> Optional[Fraction]:
    """Matroska's DURATION tag, "HH:MM:SS.fffffffff", in seconds."""
    match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", text.strip())
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + Fraction(seconds)


def _stream_seconds(stream, container=None) -> Optional[Fraction]:
    """The video stream's declared length in seconds (stream header, then Matroska's tag, then the container's
    when ``container`` is given)."""
    if stream.duration and stream.time_base:
        return stream.duration * stream.time_base
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag and (seconds := _parse_clock(tag)):
        return seconds
    if container is not None and container.duration:
        return Fraction(container.duration, 1_000_000)
    return None


def _frame_ops_from_matrix(matrix: np.ndarray) -> tuple[bool, bool, bool]:
    """(transpose, flip_rows, flip_cols) that show a frame as FFmpeg's display matrix says.

    The matrix maps a pixel (x, y) to (a x + c y, b x + d y) (layout [a b u; c d v; x y w]); with 90-degree
    steps each output axis is plus or minus one input axis.
    """
    a, b, c, d = (int(matrix[i]) for i in (0, 1, 3, 4))
    if abs(a) + abs(d) >= abs(b) + abs(c):
        return False, d < 0, a < 0
    return True, b < 0, c < 0


def _frame_ops_from_angle(ccw: int) -> tuple[bool, bool, bool]:
    return {0: (False, False, False), 90: (True, True, False), 180: (False, True, True),
            270: (True, False, True)}[ccw]


def _apply_ops(image: Tensor, ops: tuple[bool, bool, bool]) -> Tensor:
    transpose, flip_rows, flip_cols = ops
    if transpose:
        image = image.transpose(0, 1)
    dims = [axis for axis, flip in ((0, flip_rows), (1, flip_cols)) if flip]
    return image.flip(dims) if dims else image


def _angle_of_ops(ops: tuple[bool, bool, bool]) -> tuple[int, bool]:
    """The same transform as (counter-clockwise degrees, then mirrored left-right)."""
    probe = torch.arange(6).reshape(2, 3)
    shown = _apply_ops(probe, ops)
    for mirrored in (False, True):
        for quarter in range(4):
            candidate = torch.rot90(probe, quarter)
            candidate = candidate.flip(1) if mirrored else candidate
            if candidate.shape == shown.shape and torch.equal(candidate, shown):
                return 90 * quarter, mirrored
    raise AssertionError("unreachable: the eight orientations are exhausted")


def _orientation(frame, stream) -> tuple[int, bool, tuple[bool, bool, bool]]:
    """(counter-clockwise degrees, mirrored, frame ops) from the frame's display matrix or the legacy tag."""
    av = _av()
    ops = None
    for side in frame.side_data:
        if side.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            matrix = np.frombuffer(bytes(side), dtype=np.int32)
            ops = _frame_ops_from_matrix(matrix) if matrix.size == 9 else None
    if ops is None:
        tag = stream.metadata.get("rotate") or stream.metadata.get("ROTATE") or "0"
        try:
            clockwise = float(tag)
        except ValueError:
            clockwise = 0.0
        ops = _frame_ops_from_angle(int(-90 * round(clockwise / 90)) % 360)
    return (*_angle_of_ops(ops), ops)


def _irregular(pts: list[int], ticks_per_frame: Fraction) -> bool:
    """True when pts steps differ from the nominal step by more than 1.5 ticks and 2 %."""
    tolerance = max(Fraction(3, 2), ticks_per_frame / 50)
    return any(abs(b - a - ticks_per_frame) > tolerance for a, b in zip(pts, pts[1:]))


def _choose_fps(stream, vfr: bool) -> Fraction:
    average, guessed = stream.average_rate, stream.guessed_rate
    if not vfr and guessed and (not average or abs(guessed / average - 1) < Fraction(1, 100)):
        return Fraction(guessed)
    for rate in (average, guessed, stream.base_rate):
        if rate:
            return Fraction(rate)
    raise VideoError("the video stream does not say its frame rate")


def probe_video(path: PathLike, count_frames: bool = True) -> VideoInfo:
    """Read a video's header, its first frame and the pts of its first 240 packets.

    When the container gives no frame count (Matroska), ``count_frames=True`` demuxes every packet (I/O only,
    no decoding) for an exact count; ``False`` estimates ``round(duration * fps)``.
    """
    av = _av()
    path = _check_input(path)
    container = _open_input(path)
    try:
        stream = container.streams.video[0]
        first, pts, packets, ended = None, [], 0, True
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                packets += 1
                if packet.pts is not None:
                    pts.append(packet.pts)
                if first is None:
                    first = next(iter(stream.decode(packet)), None)
                if first is not None and packets >= VFR_PROBE_FRAMES:
                    ended = False
                    break
            if first is None:
                first = next(iter(stream.decode(None)), None)
        except av.FFmpegError as error:
            raise VideoError(f"video is corrupt near packet {packets}: {path} ({error})") from None
        if first is None:
            raise VideoError(f"video stream has no decodable frames (zero frames): {path}")
        pts.sort()
        if not ended:
            pts = pts[:-REORDER_MARGIN]
        guessed = stream.guessed_rate or stream.average_rate or stream.base_rate
        vfr = bool(guessed and stream.time_base and len(pts) > 2
                   and _irregular(pts, 1 / (Fraction(guessed) * stream.time_base)))
        fps = _choose_fps(stream, vfr)
        seconds = _stream_seconds(stream, container)
        if stream.frames:
            num_frames, counted = stream.frames, "metadata"
        elif count_frames:
            if not ended:
                packets += sum(1 for packet in container.demux(stream) if packet.size)
            num_frames, counted = packets, "packets"
        else:
            num_frames, counted = (round(seconds * fps) if seconds else packets), "estimate"
        if seconds is None or (not vfr and counted != "estimate" and abs(num_frames / fps - seconds) < 1 / fps):
            seconds = num_frames / fps  # headers round (mp4 edit lists and Matroska store milliseconds)
        rotation, mirrored, _ = _orientation(first, stream)
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            path=path, width=stream.width or first.width, height=stream.height or first.height, fps=fps,
            num_frames=int(num_frames), frames_counted=counted, duration=float(seconds),
            has_audio=audio is not None,
            audio_sample_rate=(audio.codec_context.sample_rate or audio.rate) if audio else None,
            audio_channels=audio.codec_context.channels if audio else None,
            rotation=rotation, mirrored=mirrored, variable_frame_rate=vfr,
            video_codec=stream.codec_context.name, audio_codec=audio.codec_context.name if audio else None,
            pix_fmt=stream.codec_context.pix_fmt)
    finally:
        container.close()


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def _drain(stream) -> None:
    """Flush a decoder left mid-stream (a reader stopped early): its frame threads end idle. Freeing a
    frame-threaded H.264 decoder with frames still in flight was seen to hang for good inside
    ``avcodec_free_context`` in a long-lived ComfyUI process (the soak test, PyAV 18.1)."""
    try:
        for _ in stream.codec_context.decode(None):
            pass
    except Exception:       # a decoder that cannot flush is freed as it is
        pass


class VideoReader:
    """Decode a video as uint8 RGB frames ``[H, W, 3]`` at a constant rate (see the module's VFR policy).

    ``accurate_color`` converts YUV to RGB with exact rounding and full chroma interpolation (slower; the fast
    path biases colours by about one level). ``apply_rotation`` shows frames upright.

    Every pass (``for frame in reader``, :meth:`windows`, :meth:`read_all`) re-opens the file, so a reader can
    be iterated again from the start without seeking. Use it as a context manager or call :meth:`close`.
    """

    def __init__(self, path: PathLike, fps: Optional[FpsLike] = None, apply_rotation: bool = True,
                 accurate_color: bool = True):
        self.accurate_color = accurate_color
        self.info = probe_video(path, count_frames=False)
        self.path = self.info.path
        self.fps = as_fraction(fps) if fps is not None else self.info.fps
        self.apply_rotation = apply_rotation
        self._container = None
        self._ops = None

    @property
    def height(self) -> int:
        return self.info.display_size[0] if self.apply_rotation else self.info.height

    @property
    def width(self) -> int:
        return self.info.display_size[1] if self.apply_rotation else self.info.width

    @property
    def num_frames(self) -> int:
        """Frames a full pass yields: the stored count for constant-rate input read at its own rate, else
        ``round(duration * fps)`` (exact once the pass has run; a pass is the authority)."""
        if not self.info.variable_frame_rate and self.fps == self.info.fps:
            return self.info.num_frames
        return _round_half_up(Fraction(self.info.duration) * self.fps)

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file of the pass in progress, if any."""
        if self._container is not None:
            self._container.close()
            self._container = None

    def __iter__(self) -> Iterator[Tensor]:
        return self.frames()

    def _image(self, frame) -> Tensor:
        range_ = frame.color_range  # honour full-range (JPEG) YUV that phones write
        array = frame.to_ndarray(format="rgb24", src_color_range=range_ or None,
                                 interpolation=ACCURATE_YUV_TO_RGB if self.accurate_color else None)
        image = torch.from_numpy(array)
        if self.apply_rotation:
            image = _apply_ops(image, self._ops)
        return image.contiguous()

    def _decoded(self) -> Iterator:
        """Source frames in presentation order; corrupt data and early ends raise :class:`VideoError`."""
        av = _av()
        self.close()
        self._container = container = _open_input(self.path)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared, count, end, finished = _stream_seconds(stream), 0, None, False
        try:
            for frame in container.decode(stream):
                if self._ops is None:
                    self._ops = _orientation(frame, stream)[2]
                if frame.pts is not None and frame.time_base:
                    end = (frame.pts + (frame.duration or 0)) * frame.time_base
                yield frame
                count += 1
            finished = True
        except (av.FFmpegError, OSError) as error:
            raise VideoError(f"video is corrupt: decoding failed after frame {count} of {self.path} "
                             f"({error})") from None
        finally:
            if not finished:
                _drain(stream)
            if self._container is container:
                self.close()
        if count == 0:
            raise VideoError(f"video stream has no decodable frames (zero frames): {self.path}")
        start = stream.start_time * stream.time_base if stream.start_time is not None and stream.time_base else 0
        # loose on purpose: edit lists and B-frame muxing make declared lengths differ by a few frames
        if declared and end is not None and end - start < declared * Fraction(9, 10) - 2 / self.info.fps:
            raise VideoError(f"video ended after {count} frames ({float(end - start):.2f} s of the "
                             f"{float(declared):.2f} s its header declares): truncated or corrupt: {self.path}")

    def frames(self) -> Iterator[Tensor]:
        """Yield ``[H, W, 3]`` uint8 frames at ``self.fps`` (duplicated frames are separate tensors)."""
        step, source_step = 1 / self.fps, 1 / self.info.fps
        start = previous = previous_time = image = None
        k, uses = 0, 0

        def emit():
            nonlocal image, uses
            if image is None:
                image, uses = self._image(previous), 0
            uses += 1
            return image if uses == 1 else image.clone()

        for frame in self._decoded():
            time_base = frame.time_base
            time = frame.pts * time_base if frame.pts is not None and time_base else None
            if time is None or (previous_time is not None and time <= previous_time):
                time = previous_time + source_step if previous_time is not None else Fraction(0)
            tolerance = min(Fraction(time_base) if time_base else Fraction(0), step / 4)
            if start is None:
                start = time
            while previous is not None and start + k * step + tolerance < time:
                yield emit()
                k += 1
            previous, previous_time, image = frame, time, None
        duration = previous.duration * previous.time_base if previous.duration and previous.time_base else None
        end = previous_time + (duration or source_step)
        for _ in range(k, _round_half_up((end - start) * self.fps)):
            yield emit()

    def windows(self, size: int, overlap: int = 0) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start_index, frames [n, H, W, 3])``: windows of ``size`` frames, each sharing its first
        ``overlap`` frames with the previous one's last. The last window may be shorter; a tail made only of
        overlap frames is not yielded again. Only the window being filled is held (a new tensor each time)."""
        if size < 1 or not 0 <= overlap < size:
            raise VideoError(f"window size must be >= 1 and 0 <= overlap < size, got size {size}, "
                             f"overlap {overlap}")
        return self._windows(size, overlap)

    def _windows(self, size: int, overlap: int) -> Iterator[tuple[int, Tensor]]:
        start, filled, window = 0, 0, None
        for image in self.frames():
            if window is None:
                window = torch.empty((size, *image.shape), dtype=torch.uint8)
            window[filled] = image
            filled += 1
            if filled == size:
                yield start, window
                tail = window[size - overlap:]
                window = torch.empty_like(window)
                window[:overlap] = tail
                start, filled = start + size - overlap, overlap
        if window is not None and (filled > overlap or start == 0):
            yield start, window[:filled]

    def read_all(self, max_frames: Optional[int] = None) -> Tensor:
        """All frames (or the first ``max_frames``) as one ``[n, H, W, 3]`` uint8 tensor: for short clips."""
        frames = []
        if max_frames is None or max_frames > 0:
            for image in self.frames():
                frames.append(image)
                if max_frames is not None and len(frames) >= max_frames:
                    break
        self.close()
        if not frames:
            return torch.empty((0, self.height, self.width, 3), dtype=torch.uint8)
        return torch.stack(frames)


def read_audio_of_video(path: PathLike) -> Optional[Waveform]:
    """The first audio stream of a media file as a mono :class:`Waveform` (channels averaged), or None when
    the file has no audio. The decoded track is trimmed to its packets' end time: AAC decoders return whole
    1024-sample frames, so this recovers the encoded length (exact for mp4 written by :class:`VideoWriter`; within
    one AAC frame for Matroska). Samples start at the first decoded audio frame: an offset between the audio and
    video starts is not applied."""
    av = _av()
    path = _check_input(path)
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as error:
        raise VideoError(f"not a readable media file: {path} ({error})") from None
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        chunks, first_pts, end, rate = [], None, None, stream.codec_context.sample_rate or stream.rate
        for packet in container.demux(stream):
            if packet.pts is not None and packet.duration and packet.time_base:
                packet_end = (packet.pts + packet.duration) * packet.time_base
                end = packet_end if end is None else max(end, packet_end)
            for frame in stream.decode(packet):
                if first_pts is None and frame.pts is not None and frame.time_base:
                    first_pts = frame.pts * frame.time_base
                rate = frame.sample_rate or rate
                array = frame.to_ndarray()
                channels = len(frame.layout.channels)
                if not frame.format.is_planar:
                    array = array.reshape(-1, channels).T
                chunks.append(to_float_pcm(array.reshape(channels, -1)).mean(dim=0))
    except av.FFmpegError as error:
        raise VideoError(f"audio of {path} is corrupt ({error})") from None
    finally:
        container.close()
    if not chunks:
        return None
    samples = torch.cat(chunks)
    if end is not None and first_pts is not None:
        samples = samples[:max(1, _round_half_up((end - first_pts) * rate))]
    return Waveform(samples.contiguous(), int(rate))


# ---------------------------------------------------------------------------------------------- writing


def _frames_uint8(frames: Union[Tensor, np.ndarray]) -> np.ndarray:
    """``[n, H, W, 3]`` or ``[H, W, 3]`` uint8, or float in [0, 1], as a uint8 numpy array ``[n, H, W, 3]``."""
    if isinstance(frames, Tensor):
        frames = frames.detach().cpu()
        if frames.is_floating_point():
            frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"frames must be [n, H, W, 3] (RGB), got shape {tuple(frames.shape)}")
    if np.issubdtype(frames.dtype, np.floating):
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    elif frames.dtype != np.uint8:
        raise VideoError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    return frames


class _PlanesAudio:
    """Float32 planes ``[C, N]`` in memory, read like a streaming audio source."""

    def __init__(self, planes: np.ndarray, rate: int):
        self.planes, self.sample_rate = planes, rate
        self.channels, self.num_samples = planes.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.planes[:, start:stop]

    def close(self) -> None:
        pass


def _audio_source(audio):
    """What the writer pulls its audio from: a streaming source (``read(start, stop) -> [C, n]``, ``sample_rate``,
    ``channels`` (1 or 2), ``num_samples``, ``close()``; e.g. :meth:`AudioTrack.clipped`) as it is, or a
    :class:`Waveform` / ``(samples, rate)`` pair held in memory."""
    if hasattr(audio, "read") and hasattr(audio, "num_samples"):
        if audio.channels not in (1, 2) or audio.num_samples <= 0:
            raise VideoError(f"audio to write must be mono or stereo and not empty, got {audio.channels} channels "
                             f"and {audio.num_samples} samples")
        if not isinstance(audio.sample_rate, (int, np.integer)) or audio.sample_rate <= 0:
            raise VideoError(f"audio sample rate must be a positive integer, got {audio.sample_rate!r}")
        return audio
    return _PlanesAudio(*_audio_planes(audio))


def _audio_planes(audio) -> tuple[np.ndarray, int]:
    """A :class:`Waveform` or ``(samples, rate)`` (``[N]``, ``[C, N]``, ``[N, C]`` or ``[1, C, N]``, C <= 2)
    as float32 ``[C, N]`` and the rate."""
    if isinstance(audio, Waveform):
        samples, rate = audio.samples, audio.sample_rate
    elif isinstance(audio, (tuple, list)) and len(audio) == 2:
        samples, rate = audio
    else:
        raise VideoError("audio must be a Waveform or a (samples, sample_rate) pair")
    planes = to_float_pcm(samples).detach().cpu()
    if planes.ndim == 3 and planes.shape[0] == 1:
        planes = planes[0]
    if planes.ndim == 1:
        planes = planes[None]
    if planes.ndim == 2 and planes.shape[0] > 2 and planes.shape[1] <= 2:
        planes = planes.T
    if planes.ndim != 2 or planes.shape[0] not in (1, 2):
        raise VideoError(f"audio must be mono or stereo, got shape {tuple(planes.shape)}")
    if planes.shape[1] == 0 or not torch.isfinite(planes).all():
        raise VideoError("audio to write is empty or holds NaN/infinite samples")
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise VideoError(f"audio sample rate must be a positive integer, got {rate!r}")
    return np.ascontiguousarray(planes.numpy(), dtype=np.float32), int(rate)


def _subsampling(pix_fmt: str) -> tuple[bool, bool]:
    """Whether the pixel format halves chroma (horizontally, vertically): odd sizes must then be padded."""
    components = _av().VideoFormat(pix_fmt, 2, 2).components
    return any(c.width == 1 for c in components), any(c.height == 1 for c in components)


class VideoWriter:
    """Write frames incrementally to an mp4/m4v/mov/mkv file: H.264 (libx264, else mpeg4) and optional audio.

    The file is written to ``.NAME.partial-XXXX.EXT`` beside the destination and renamed over it on a
    successful :meth:`close`; any exception inside the ``with`` block (KeyboardInterrupt included) deletes it
    and leaves the destination untouched. ``audio`` (a Waveform, a ``(samples, rate)`` pair, or a streaming source
    such as :meth:`AudioTrack.clipped <omnisync_core.audio.track.AudioTrack.clipped>` that is read block by block,
    so a long track never sits in memory) is muxed in step with the frames (interleaved by time); every sample
    given is encoded, none is added (trim or pad beforehand).
    The codec time base is exactly ``1 / fps`` (1001/30000 for 29.97); Matroska stores milliseconds.
    mp4/mov get ``faststart`` (index first, for streaming) unless disabled, which rewrites the file at close.
    """

    def __init__(self, path: PathLike, fps: FpsLike, audio=None, codec: Optional[str] = None, crf: int = 18,
                 preset: str = "medium", pix_fmt: str = "yuv420p", audio_codec: str = "aac",
                 audio_bitrate: int = 192_000, faststart: bool = True, options: Optional[dict] = None):
        av = _av()
        self.path = os.path.abspath(os.fspath(path))
        self.fps = as_fraction(fps)
        folder, name = os.path.split(self.path)
        stem, ext = os.path.splitext(name)
        if os.path.isdir(self.path):
            raise VideoError(f"output path is a folder: {self.path}")
        if not os.path.isdir(folder):
            raise VideoError(f"output folder does not exist (or is not a folder): {folder}")
        fmt = CONTAINER_FORMATS.get(ext.lower())
        if fmt is None:
            raise VideoError(f"output must end in one of {', '.join(CONTAINER_FORMATS)}, got {name!r}")
        self.codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        for kind, wanted in (("video", self.codec), ("audio", audio_codec if audio is not None else None)):
            if wanted is not None:
                try:
                    av.Codec(wanted, "w")
                except (av.FFmpegError, ValueError):
                    raise VideoError(f"{kind} encoder {wanted!r} is not available in PyAV's FFmpeg") from None
        self.audio = _audio_source(audio) if audio is not None else None
        self.sample_rate = self.audio.sample_rate if audio is not None else None
        rates = av.Codec(audio_codec, "w").audio_rates if audio is not None else None
        if rates and self.sample_rate not in rates:
            raise VideoError(f"{audio_codec} cannot encode {self.sample_rate} Hz audio; resample to one of "
                             f"{sorted(rates)}")
        self.crf, self.preset, self.pix_fmt, self.audio_codec = crf, preset, pix_fmt, audio_codec
        self.audio_bitrate, self.options = audio_bitrate, dict(options or {})
        self.size = self.padded_size = None
        self.frames_written = self._audio_written = 0
        self._video = self._audio_stream = None
        try:
            handle, self.partial_path = tempfile.mkstemp(prefix=f".{stem}.partial-", suffix=ext, dir=folder)
            os.close(handle)
        except OSError as error:
            raise VideoError(f"cannot write to output folder {folder}: {error.strerror}") from None
        try:
            container_options = {"movflags": "+faststart"} if faststart and fmt in ("mp4", "mov") else {}
            self._container = av.open(self.partial_path, "w", format=fmt, options=container_options)
        except (av.FFmpegError, OSError) as error:
            self._remove_partial()
            raise VideoError(f"cannot create {self.path}: {error}") from None
        self.closed = False

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        if not getattr(self, "closed", True):
            self.abort()

    def _start(self, height: int, width: int) -> None:
        sub_w, sub_h = _subsampling(self.pix_fmt)
        self.size = (height, width)
        self.padded_size = (height + (height % 2 if sub_h else 0), width + (width % 2 if sub_w else 0))
        if self.padded_size != self.size:
            warnings.warn(f"{width}x{height} is odd, which {self.pix_fmt} cannot store: padding to "
                          f"{self.padded_size[1]}x{self.padded_size[0]} by repeating the last column/row",
                          stacklevel=3)
        options = dict(self.options)
        if self.codec in ("libx264", "libx265", "h264", "hevc"):
            options = {"crf": str(self.crf), "preset": self.preset, **options}
        video = self._container.add_stream(self.codec, rate=self.fps, options=options)
        video.height, video.width = self.padded_size
        video.pix_fmt = self.pix_fmt
        video.time_base = 1 / self.fps
        video.codec_context.time_base = 1 / self.fps
        # RGB -> YUV below uses swscale's defaults (BT.601 matrix, limited range): tag the stream so
        # players decode with the same matrix instead of guessing BT.709 for larger frames.
        video.codec_context.colorspace = 6  # AVCOL_SPC_SMPTE170M (BT.601)
        video.codec_context.color_range = 1  # AVCOL_RANGE_MPEG (limited)
        if "crf" not in options:
            video.bit_rate = int(width * height * float(self.fps) * 0.3)
        self._video = video
        if self.audio is not None:
            layout = "mono" if self.audio.channels == 1 else "stereo"
            self._audio_stream = self._container.add_stream(self.audio_codec, rate=self.sample_rate, layout=layout)
            self._audio_stream.bit_rate = self.audio_bitrate
            self._audio_stream.time_base = Fraction(1, self.sample_rate)

    def write(self, frames: Union[Tensor, np.ndarray]) -> None:
        """Append frames ``[n, H, W, 3]`` (or one ``[H, W, 3]``), uint8 or float in [0, 1]."""
        if self.closed:
            raise VideoError("cannot write: the video writer is closed")
        array = _frames_uint8(frames)
        if self._video is None:
            self._start(*array.shape[1:3])
        if tuple(array.shape[1:3]) != self.size:
            raise VideoError(f"frame size {array.shape[2]}x{array.shape[1]} differs from the first frames' "
                             f"{self.size[1]}x{self.size[0]}")
        pad = ((0, 0), (0, self.padded_size[0] - self.size[0]), (0, self.padded_size[1] - self.size[1]), (0, 0))
        if any(p[1] for p in pad):
            array = np.pad(array, pad, mode="edge")
        av = _av()
        try:
            for image in array:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.pts = self.frames_written
                self._container.mux(self._video.encode(frame))
                self.frames_written += 1
            self._write_audio(final=False)
        except av.FFmpegError as error:
            raise VideoError(f"encoding failed after {self.frames_written} frames: {error}") from None

    def _write_audio(self, final: bool) -> None:
        """Encode audio up to the end time of the frames written so far (whole codec frames until the end)."""
        if self.audio is None:
            return
        av = _av()
        total = self.audio.num_samples
        chunk = self._audio_stream.codec_context.frame_size or 1024
        if final:
            target = total
        else:
            due = math.ceil(Fraction(self.frames_written) / self.fps * self.sample_rate)
            target = min(total, due - due % chunk)
        layout = "mono" if self.audio.channels == 1 else "stereo"
        while self._audio_written < target:
            stop = min(self._audio_written + chunk, target)
            block = self.audio.read(self._audio_written, stop)
            block = block.numpy() if isinstance(block, Tensor) else block
            if block.shape != (self.audio.channels, stop - self._audio_written) or not np.isfinite(block).all():
                raise VideoError(f"the audio source gave {block.shape} samples (or NaN) for samples "
                                 f"{self._audio_written}..{stop}")
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, dtype=np.float32), format="fltp",
                                               layout=layout)
            frame.sample_rate, frame.pts = self.sample_rate, self._audio_written
            frame.time_base = Fraction(1, self.sample_rate)
            self._container.mux(self._audio_stream.encode(frame))
            self._audio_written = stop

    def close(self) -> None:
        """Flush the encoders, finish the file and move it to the destination."""
        if self.closed:
            return
        if self.frames_written == 0:
            self.abort()
            raise VideoError(f"no frames were written to {self.path}")
        av = _av()
        try:
            self._container.mux(self._video.encode(None))
            self._write_audio(final=True)
            if self._audio_stream is not None:
                self._container.mux(self._audio_stream.encode(None))
            self._container.close()
            self._close_audio()
            publish(self.partial_path, self.path)
        except (av.FFmpegError, OSError) as error:
            self.abort()
            raise VideoError(f"could not finish {self.path}: {error}") from None
        except BaseException:
            self.abort()
            raise
        self.closed = True

    def abort(self) -> None:
        """Stop writing and delete the partial file; the destination is left as it was."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        try:
            self._container.close()
        except Exception:  # the file is being thrown away; a muxer complaint about it does not matter
            pass
        self._close_audio()
        self._remove_partial()

    def _close_audio(self) -> None:
        if self.audio is not None:
            self.audio.close()

    def _remove_partial(self) -> None:
        try:
            os.remove(self.partial_path)
        except FileNotFoundError:
            pass
