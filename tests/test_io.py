"""Streaming video I/O: round trips, windows, VFR resampling, rotation, atomic writes, bad input."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from omnisync_core.audio import Waveform
from omnisync_core.errors import OmniSyncError
from omnisync_core.io import VideoError, VideoReader, VideoWriter, probe_video, read_audio_of_video

from conftest import write_wav


def gradient_clip(n: int, height: int, width: int) -> np.ndarray:
    """A smooth moving colour gradient ``[n, H, W, 3]`` uint8 (what yuv420p can hold well)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = [np.stack([128 + 90 * np.sin((x + 2 * i) / width * 2 * np.pi),
                        128 + 90 * np.cos((y - i) / height * 2 * np.pi),
                        128 + 50 * np.sin((x + y + 3 * i) / (width + height) * 2 * np.pi)], axis=-1)
              for i in range(n)]
    return np.clip(np.round(np.stack(frames)), 0, 255).astype(np.uint8)


def flat_clip(n: int, height: int = 32, width: int = 48, step: int = 11) -> np.ndarray:
    """Frame i is flat grey ``i * step``: a decoded frame tells which source frame it is."""
    return np.stack([np.full((height, width, 3), i * step, np.uint8) for i in range(n)])


def identities(frames: torch.Tensor, step: int = 11) -> list[int]:
    return [int(round(frame.float().mean().item() / step)) for frame in frames]


def psnr(a, b) -> torch.Tensor:
    mse = (torch.as_tensor(a).float() - torch.as_tensor(b).float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def write_with_pyav(path, frames, rate=25, pts=None, time_base=None, rotation=None, hflip=False,
                    metadata=None, options=None, fmt_options=None):
    """Encode frames with PyAV directly (independent of VideoWriter): optional irregular pts and rotation."""
    container = av.open(str(path), "w", options=fmt_options or {})
    stream = container.add_stream("libx264", rate=rate, options={"preset": "ultrafast", **(options or {})})
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv444p"
    if time_base is not None:
        stream.codec_context.time_base = stream.time_base = time_base
    if rotation is not None:
        stream.set_display_rotation(rotation, hflip=hflip)
    for key, value in (metadata or {}).items():
        stream.metadata[key] = value
    for i, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i if pts is None else pts[i]
        if time_base is not None:
            frame.time_base = time_base
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    return path


@pytest.fixture(scope="module")
def short_mp4(tmp_path_factory):
    """23 flat grey frames at 25 fps, written by VideoWriter."""
    path = tmp_path_factory.mktemp("clips") / "short.mp4"
    with VideoWriter(path, 25, preset="ultrafast") as writer:
        writer.write(flat_clip(23))
    return path


# ------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("fps", ["25", "24000/1001", "30000/1001", "60"])
def test_round_trip_exact_rate_frames_and_audio(tmp_path, fps):
    fps = Fraction(fps)
    frames, rate = gradient_clip(36, 48, 64), 16000
    samples = int(36 / fps * rate) - 123                     # not a multiple of the AAC frame on purpose
    tone = (0.4 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate)).astype(np.float32)
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, fps, audio=Waveform(torch.from_numpy(tone), rate)) as writer:
        writer.write(frames[:10])
        writer.write(torch.from_numpy(frames[10:]).float() / 255)   # float 0..1 frames too
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]

    info = probe_video(path)
    assert info.fps == fps and isinstance(info.fps, Fraction)
    assert (info.num_frames, info.frames_counted) == (36, "metadata")
    assert info.duration == pytest.approx(float(36 / fps), abs=1e-6)
    assert (info.width, info.height, info.rotation, info.variable_frame_rate) == (64, 48, 0, False)
    assert (info.video_codec, info.pix_fmt, info.audio_codec) == ("h264", "yuv420p", "aac")
    assert (info.has_audio, info.audio_sample_rate, info.audio_channels) == (True, rate, 1)

    with av.open(str(path)) as container:                     # the time base holds 1/fps exactly
        stream = container.streams.video[0]
        times = [frame.pts * frame.time_base for frame in container.decode(stream)]
    assert times == [Fraction(i) / fps for i in range(36)]

    with VideoReader(path) as reader:
        decoded = reader.read_all()
    assert decoded.shape == (36, 48, 64, 3) and decoded.dtype == torch.uint8
    assert psnr(decoded, frames).min() >= 35.0

    audio = read_audio_of_video(path)
    assert audio.sample_rate == rate
    assert abs(audio.samples.shape[0] - samples) <= 1024
    assert audio.samples.shape[0] == samples                  # mp4 keeps the exact length (packet durations)
    overlap = min(samples, audio.samples.shape[0])
    assert np.corrcoef(audio.samples[:overlap].numpy(), tone[:overlap])[0, 1] > 0.99


def test_stereo_audio_mkv_and_mpeg4(tmp_path):
    rate, frames = 48000, gradient_clip(12, 48, 64)
    stereo = np.stack([np.sin(np.arange(rate // 2) * 0.03), np.sin(np.arange(rate // 2) * 0.05)]) * 0.3
    path = tmp_path / "clip.mkv"
    with VideoWriter(path, 24, audio=(stereo.astype(np.float32), rate), preset="ultrafast") as writer:
        writer.write(frames)
    info = probe_video(path)
    assert (info.audio_channels, info.audio_sample_rate, info.num_frames) == (2, rate, 12)
    assert info.frames_counted == "packets"
    audio = read_audio_of_video(path)                          # Matroska: within one AAC frame
    assert 0 <= audio.samples.shape[0] - rate // 2 <= 1024

    path = tmp_path / "fallback.mov"
    with VideoWriter(path, 25, codec="mpeg4") as writer:
        writer.write(frames)
    info = probe_video(path)
    assert (info.video_codec, info.num_frames, info.has_audio) == ("mpeg4", 12, False)
    assert psnr(VideoReader(path).read_all(), frames).min() >= 30.0
    assert read_audio_of_video(path) is None


def test_odd_size_is_padded_by_one_pixel(tmp_path):
    frames = gradient_clip(6, 49, 65)
    path = tmp_path / "odd.mp4"
    with pytest.warns(UserWarning, match="padding to 66x50"):
        with VideoWriter(path, 25, preset="ultrafast") as writer:
            writer.write(frames)
    assert writer.padded_size == (50, 66)
    info = probe_video(path)
    assert (info.width, info.height) == (66, 50)
    decoded = VideoReader(path).read_all()
    assert decoded.shape == (6, 50, 66, 3)
    assert psnr(decoded[:, :49, :65], frames).min() >= 35.0
    # the padding repeats the last column / row
    assert (decoded[:, :49, 65].float() - decoded[:, :49, 64].float()).abs().mean() < 3


# ------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize("size, overlap", [(8, 3), (8, 2), (5, 0), (23, 4), (40, 1), (1, 0)])
def test_windows_cover_every_frame_once(short_mp4, size, overlap):
    with VideoReader(short_mp4) as reader:
        everything = reader.read_all()
        windows = list(reader.windows(size, overlap))
    assert everything.shape[0] == 23 and identities(everything) == list(range(23))
    covered, previous = [], None
    for start, window in windows:
        assert window.dtype == torch.uint8 and 1 <= window.shape[0] <= size
        assert window.shape[1:] == everything.shape[1:]
        assert torch.equal(window, everything[start:start + window.shape[0]])
        if previous is None:
            assert start == 0
            covered += list(range(window.shape[0]))
        else:
            assert start == previous[0] + size - overlap
            assert torch.equal(window[:overlap], previous[1][-overlap:] if overlap else window[:0])
            covered += list(range(start + overlap, start + window.shape[0]))
        previous = (start, window)
    assert covered == list(range(23))                          # every frame once, in order
    assert all(w.shape[0] == size for _, w in windows[:-1])    # only the last window may be short
    for (_, a), (_, b) in zip(windows, windows[1:]):           # separate buffers: no aliasing between windows
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_windows_reject_bad_sizes_and_restart(short_mp4):
    reader = VideoReader(short_mp4)
    with pytest.raises(VideoError, match="overlap < size"):
        reader.windows(4, 4)
    with pytest.raises(VideoError, match="overlap < size"):
        reader.windows(0, 0)
    first = next(iter(reader))                                 # abandon a pass midway, then start over
    assert identities(reader.read_all(max_frames=3)) == [0, 1, 2]
    assert torch.equal(first, reader.read_all(max_frames=1)[0])
    reader.close()


# ------------------------------------------------------------------------------------------- frame rate


def test_variable_frame_rate_is_resampled_by_timestamps(tmp_path):
    pts = [0, 40, 70, 150, 160, 200, 290, 300, 380, 500, 530, 610, 700, 720, 800, 840, 960, 1000, 1130]
    last = 40                                                  # the muxer gives the last frame 1/25 s
    path = write_with_pyav(tmp_path / "vfr.mp4", flat_clip(len(pts)), rate=25, pts=pts,
                           time_base=Fraction(1, 1000), options={"bf": "0"})
    info = probe_video(path)
    assert info.variable_frame_rate
    assert info.duration == pytest.approx((pts[-1] + last) / 1000)
    reader = VideoReader(path, fps=25)
    out = reader.read_all()
    expected_count = round(info.duration * 25)
    assert out.shape[0] == expected_count == reader.num_frames
    # output frame k shows the source frame whose pts interval [pts_i, pts_i+1) holds k / 25 s
    expected = [max(i for i, p in enumerate(pts) if p <= k * 40) for k in range(expected_count)]
    assert identities(out) == expected
    assert set(identities(out)) != set(range(len(pts)))        # some frames dropped (1130 vs 1000 ...)
    fast = VideoReader(path, fps=50).read_all()
    assert identities(fast) == [max(i for i, p in enumerate(pts) if p <= k * 20) for k in range(len(fast))]
    # 1.17 s * 50 = 58.5 exactly: counts round half up in exact arithmetic (as FrameAligner.num_frames does)
    assert len(fast) == math.floor(Fraction(pts[-1] + last, 1000) * 50 + Fraction(1, 2)) == 59


@pytest.mark.parametrize("suffix, fps", [(".mkv", Fraction(30000, 1001)), (".mp4", Fraction(24000, 1001))])
def test_constant_rate_passes_through_untouched(tmp_path, suffix, fps):
    # Matroska stores milliseconds, so 29.97 fps pts are rounded: still one output per source frame
    path = write_with_pyav(tmp_path / f"cfr{suffix}", flat_clip(20), rate=fps)
    info = probe_video(path)
    assert info.fps == fps and not info.variable_frame_rate and info.num_frames == 20
    with av.open(str(path)) as container:
        stored = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    out = VideoReader(path, accurate_color=False).read_all()
    assert identities(out) == list(range(20))
    assert torch.equal(out, torch.from_numpy(np.stack(stored)))
    doubled = VideoReader(path, fps=2 * fps).read_all()        # an explicit rate resamples CFR input too
    assert identities(doubled) == [i // 2 for i in range(40)]


# ------------------------------------------------------------------------------------------- rotation


def asymmetric_frames(n=3, height=32, width=48):
    image = np.zeros((height, width, 3), np.uint8)
    image[:8, :16] = (255, 0, 0)
    image[-8:, :] = (0, 255, 0)
    image[:, -8:, 2] = 255
    return np.stack([image] * n)


@pytest.mark.parametrize("degrees, hflip", [(90, False), (180, False), (270, False), (-90, False), (90, True),
                                            (0, True)])
def test_display_matrix_rotation_comes_out_upright(tmp_path, degrees, hflip):
    frames = asymmetric_frames()
    path = write_with_pyav(tmp_path / "phone.mp4", frames, rotation=degrees, hflip=hflip)
    info = probe_video(path)
    assert (info.rotation, info.mirrored) == (degrees % 360, hflip)
    shown = np.rot90(frames[0], degrees // 90)                 # PyAV's rotation is counter-clockwise
    shown = shown[:, ::-1] if hflip else shown                 # and its hflip mirrors after rotating
    with VideoReader(path) as reader:
        out = reader.read_all()
        assert (reader.height, reader.width) == shown.shape[:2] == info.display_size
    assert out.shape == (3, *shown.shape)
    assert (out[0].int() - torch.from_numpy(shown.copy()).int()).abs().max() < 24
    stored = VideoReader(path, apply_rotation=False).read_all()
    assert stored.shape == frames.shape
    if shutil.which("ffmpeg"):                                 # FFmpeg's own autorotate as an oracle
        raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
                              "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        oracle = torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(shown.shape).copy())
        assert (out[0].int() - oracle.int()).abs().max() < 24


def test_legacy_rotate_tag(tmp_path):
    # PyAV's FFmpeg drops a "rotate" tag in mp4 but keeps it as a Matroska tag: it means clockwise degrees
    frames = asymmetric_frames()
    path = write_with_pyav(tmp_path / "tagged.mkv", frames, metadata={"rotate": "90"})
    info = probe_video(path)
    assert (info.rotation, info.mirrored) == (270, False)
    out = VideoReader(path).read_all()
    assert (out[0].int() - torch.from_numpy(np.rot90(frames[0], -1).copy()).int()).abs().max() < 24


# ------------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_nothing(tmp_path, error):
    path = tmp_path / "out.mp4"
    with pytest.raises(error):
        with VideoWriter(path, 25, preset="ultrafast") as writer:
            writer.write(flat_clip(5))
            assert any(name.startswith(".out.partial-") for name in os.listdir(tmp_path))
            raise error("stop")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_previous_file_and_success_replaces_it(tmp_path):
    path = tmp_path / "out.mkv"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError):
        with VideoWriter(path, 25) as writer:
            writer.write(flat_clip(2))
            raise ValueError
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.mkv"]
    with VideoWriter(path, 25, preset="ultrafast") as writer:
        writer.write(flat_clip(4))
    assert os.listdir(tmp_path) == ["out.mkv"] and probe_video(path).num_frames == 4


def test_unwritable_or_bad_destination_fails_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    for bad in (tmp_path / "missing" / "out.mp4", blocker / "out.mp4"):
        with pytest.raises(VideoError, match="output folder"):
            VideoWriter(bad, 25)
    with pytest.raises(VideoError, match="must end in"):
        VideoWriter(tmp_path / "out.avi", 25)
    with pytest.raises(VideoError, match="is a folder"):
        VideoWriter(tmp_path, 25)
    with pytest.raises(VideoError, match="12345 Hz"):
        VideoWriter(tmp_path / "out.mp4", 25, audio=(np.zeros(100, np.float32), 12345))
    with pytest.raises(VideoError, match="no frames"):
        VideoWriter(tmp_path / "empty.mp4", 25).close()
    writer = VideoWriter(tmp_path / "sizes.mp4", 25, preset="ultrafast")
    writer.write(flat_clip(1))
    with pytest.raises(VideoError, match="differs"):
        writer.write(flat_clip(1, height=16))
    writer.abort()
    assert sorted(os.listdir(tmp_path)) == ["file"]
    assert issubclass(VideoError, OmniSyncError)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(tmp_path, short_mp4):
    cases = {"missing.mp4": None, "empty.mp4": b"", "garbage.mp4": b"definitely not a video file " * 150}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    with pytest.raises(VideoError, match="not found"):
        probe_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="empty"):
        VideoReader(tmp_path / "empty.mp4")
    with pytest.raises(VideoError, match="not a readable video"):
        probe_video(tmp_path / "garbage.mp4")
    with pytest.raises(VideoError, match="folder"):
        probe_video(tmp_path)

    for suffix in (".mkv", ".mp4"):                             # a video stream, but not one frame in it
        container = av.open(str(tmp_path / f"zero{suffix}"), "w")
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = 64, 48
        container.start_encoding()
        container.close()
        with pytest.raises(VideoError, match="zero frames|no video stream"):
            VideoReader(tmp_path / f"zero{suffix}").read_all()

    wav = write_wav(tmp_path / "speech.wav", np.zeros(8000, np.float32), 16000)
    with pytest.raises(VideoError, match="no video stream"):
        probe_video(wav)
    assert read_audio_of_video(wav).samples.shape[0] == 8000


def test_truncated_files(tmp_path):
    frames = gradient_clip(50, 48, 64)
    # moov index at the end (no faststart): half a file has no index at all
    whole = tmp_path / "plain.mp4"
    with VideoWriter(whole, 25, faststart=False, preset="ultrafast") as writer:
        writer.write(frames)
    cut = tmp_path / "cut_plain.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(VideoError, match="not a readable video"):
        VideoReader(cut)
    # index first (faststart): the file opens, then the data runs out (or turns to garbage) mid-decode
    whole = tmp_path / "fast.mp4"
    with VideoWriter(whole, 25, preset="ultrafast") as writer:
        writer.write(frames)
    data = whole.read_bytes()
    cut = tmp_path / "cut_fast.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"corrupt|truncated"):
        VideoReader(cut).read_all()
    damaged = tmp_path / "damaged.mp4"
    middle = len(data) // 2
    damaged.write_bytes(data[:middle] + b"\xab" * 4000 + data[middle + 4000:])
    with pytest.raises(VideoError, match=r"corrupt: decoding failed after frame (\d+)") as caught:
        VideoReader(damaged).read_all()
    assert 0 < int(caught.value.args[0].split("after frame ")[1].split()[0]) < 50
    # Matroska decodes a cut file silently: the declared length gives it away
    whole = tmp_path / "clip.mkv"
    with VideoWriter(whole, 25, preset="ultrafast") as writer:
        writer.write(frames)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(VideoError, match="truncated"):
        for _ in VideoReader(cut).windows(8, 2):
            pass


def test_finished_files_get_ordinary_permissions(tmp_path):
    """Outputs are written to a private temp file, but the published file has the umask's usual mode."""
    import os
    import stat

    from omnisync_core.model.loading import save_model

    umask = os.umask(0o022)
    try:
        with VideoWriter(tmp_path / "out.mp4", 25) as writer:
            writer.write(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
        save_model({"w": torch.zeros(2)}, tmp_path / "w.safetensors", kind="dit", config={})
    finally:
        os.umask(umask)
    for name in ("out.mp4", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
