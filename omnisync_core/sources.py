"""Where a lip-sync job's frames come from and where they go: a video file or frames in memory.

A frame source is read twice: once in order, chunk by chunk, to track the face (``chunks``), then window by window
by output index (``read``: the length policies may show a source frame twice or play it backwards). A sink takes
the finished output frames in order (``write``), then ``close()`` (finish) or ``abort()`` (throw away): a
:class:`~omnisync_core.io.VideoWriter` (the file appears only once complete) or a :class:`TensorSink`.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from .audio import as_fraction
from .errors import InputError
from .io import VideoReader, probe_video


class VideoFileFrames:
    """Frames of a video file, decoded as they are read (uint8 ``[n, H, W, 3]``). Forward reads continue on one
    open decoder; a window that needs a frame before the decoder's position (ping-pong and loop policies) re-opens
    the file. Only the frames of the current window are kept."""

    def __init__(self, path: str, fps=None):
        self.path = path
        self.info = probe_video(path)
        self.fps = as_fraction(fps) if fps is not None else self.info.fps
        self.num_frames = self.info.num_frames
        self.frame_hw = self.info.display_size
        self._reader: Optional[VideoReader] = None
        self._iter: Optional[Iterator[Tensor]] = None
        self._position = 0                       # index of the frame the decoder yields next
        self._kept: dict[int, Tensor] = {}

    def chunks(self, size: int) -> Iterator[Tensor]:
        with VideoReader(self.path, fps=self.fps) as reader:
            for _, batch in reader.windows(size, 0):
                yield batch

    def read(self, index: Tensor) -> Tensor:
        """``[n, H, W, 3]`` uint8 frames for source indices ``index [n]`` (any order, repeats allowed)."""
        wanted = set(index.tolist())
        frames = {i: f for i, f in self._kept.items() if i in wanted}
        needed = wanted - frames.keys()
        if needed:
            if self._iter is None or min(needed) < self._position:
                self._reopen()
            last = max(needed)
            while self._position <= last:
                frame = next(self._iter, None)
                if frame is None:
                    raise InputError(f"the video ended at frame {self._position} although it reported more frames")
                if self._position in wanted:
                    frames[self._position] = frame
                self._position += 1
        self._kept = frames
        return torch.stack([frames[i] for i in index.tolist()])

    def _reopen(self) -> None:
        self.close()
        self._reader = VideoReader(self.path, fps=self.fps)
        self._reader.__enter__()
        self._iter, self._position = iter(self._reader), 0

    def close(self) -> None:
        if self._reader is not None:
            self._reader.__exit__(None, None, None)
        self._reader = self._iter = None
        self._kept = {}


def as_uint8(frames: Tensor) -> Tensor:
    if frames.dtype == torch.uint8:
        return frames
    return frames.float().clamp(0, 1).mul(255).round().to(torch.uint8)


def check_frames(frames: Tensor) -> None:
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise InputError(f"frames must be shaped [T, H, W, 3] (RGB), got {shape}")
    if frames.shape[0] == 0:
        raise InputError("there are no frames")


class TensorFrames:
    """Frames held in memory (a ComfyUI IMAGE batch ``[T, H, W, 3]``, float 0..1 or uint8), read as float 0..1."""

    def __init__(self, frames: Tensor, fps):
        check_frames(frames)
        self.frames, self.fps = frames, as_fraction(fps)
        self.num_frames, self.frame_hw = int(frames.shape[0]), tuple(frames.shape[1:3])

    def chunks(self, size: int) -> Iterator[Tensor]:
        for start in range(0, self.num_frames, size):
            yield as_uint8(self.frames[start:start + size])

    def read(self, index: Tensor) -> Tensor:
        frames = self.frames[index]
        return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()

    def close(self) -> None:
        pass


class TensorSink:
    """Collects the output frames ``[N, H, W, 3]`` float 0..1 in one tensor (``frames``)."""

    def __init__(self, num_frames: int, frame_hw: tuple[int, int]):
        self.frames = torch.empty(num_frames, *frame_hw, 3)
        self.written = 0

    def write(self, frames: Tensor) -> None:
        n = frames.shape[0]
        self.frames[self.written:self.written + n] = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames
        self.written += n

    def close(self) -> None:
        if self.written != self.frames.shape[0]:
            raise InputError(f"the job wrote {self.written} of {self.frames.shape[0]} frames")

    def abort(self) -> None:
        pass


__all__ = ["TensorFrames", "TensorSink", "VideoFileFrames", "as_uint8", "check_frames"]
