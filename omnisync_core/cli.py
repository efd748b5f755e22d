"""The ``omnisync`` command line. Each command prints one clear line on stderr and exits non-zero on bad input."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import OmniSyncError


def _cmd_doctor(args: argparse.Namespace) -> int:
    """Print what this installation can use: versions, devices, optional oracles."""
    import torch

    print(f"omnisync {__version__} on Python {platform.python_version()} ({platform.machine()})")
    print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        print(f"  cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        print("  mps available")
    for module in ("av", "numpy", "safetensors", "einops", "huggingface_hub"):
        try:
            imported = __import__(module)
            print(f"{module} {getattr(imported, '__version__', '?')}")
        except ImportError:
            print(f"{module} MISSING (pip install -r requirements.txt)")
    return 0


def _cmd_audio_info(args: argparse.Namespace) -> int:
    """Decode an audio (or video) file's audio and report what the lip-sync pipeline will see."""
    from .audio import FrameAligner, SAMPLE_RATE, is_silent, load_audio, to_whisper_rate

    wave = load_audio(args.file)
    resampled = to_whisper_rate(wave.samples, wave.sample_rate)
    aligner = FrameAligner(args.fps)
    frames = aligner.num_frames(resampled.shape[0], SAMPLE_RATE)
    peak = float(wave.samples.abs().max())
    print(f"{args.file}: {wave.seconds:.3f} s at {wave.sample_rate} Hz, peak {peak:.3f}"
          f"{' (silent)' if is_silent(wave) else ''}")
    print(f"at {args.fps} fps this audio spans {frames} video frames")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnisync", description="OmniSync: audio-driven lip sync of any video.")
    parser.add_argument("--version", action="version", version=f"omnisync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = commands.add_parser("doctor", help="report versions, devices and what is installed")
    doctor.set_defaults(handler=_cmd_doctor)
    info = commands.add_parser("audio-info", help="decode a file's audio and report its length in video frames")
    info.add_argument("file", help="audio or video file (any format FFmpeg reads)")
    info.add_argument("--fps", default="25", help="video frame rate, e.g. 25, 29.97 or 30000/1001 (default 25)")
    info.set_defaults(handler=_cmd_audio_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except OmniSyncError as error:
        print(f"omnisync: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omnisync: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
