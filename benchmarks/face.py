"""Face stage throughput: detect + landmarks + crop + paste-back, frames per second at 720p and 1080p.

    .venv/bin/python benchmarks/face.py [--sizes 720p 1080p] [--frames 32] [--batch 8] [--runs 5] [--device cpu]

Frames are the astronaut photo placed in a frame of the given size with a little motion, so the detector and the
mesh do real work on a real face. Each run processes ``--frames`` frames in batches; the median of ``--runs`` runs
is reported with the per-stage split. Example (2-core CPU, quiet machine):

    size    stage        ms/frame
    1080p   detect           4.1
    ...
    1080p   total           30.2   -> 33.1 frames/s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnisync_core.face.analyze import FaceAnalyzer  # noqa: E402
from omnisync_core.face.crop import crop_faces, crop_params, paste_back  # noqa: E402
from omnisync_core.face.track import build_track  # noqa: E402

SIZES = {"720p": (720, 1280), "1080p": (1080, 1920)}


def make_frames(height: int, width: int, count: int) -> torch.Tensor:
    """uint8 [count, H, W, 3]: the astronaut's head and shoulders (60% of the frame height, so the face is about a
    third of it, as in a talking-head shot) drifting across a grey frame."""
    from skimage import data

    face = torch.from_numpy(data.astronaut()[10:330, 60:380].copy()).permute(2, 0, 1)[None].float()
    side = int(0.6 * height)
    face = F.interpolate(face, size=(side, side), mode="bilinear", antialias=True)[0].permute(1, 2, 0)
    frames = torch.full((count, height, width, 3), 110, dtype=torch.uint8)
    for i in range(count):
        y = height // 4 + int(10 * np.sin(i / 5))
        x = width // 3 + 3 * i
        frames[i, y:y + side, x:x + side] = face.round().clamp(0, 255).to(torch.uint8)
    return frames


def time_stages(frames: torch.Tensor, analyzer: FaceAnalyzer, crop_size: int, keep_detail: bool = True
                ) -> dict[str, float]:
    hw = tuple(frames.shape[1:3])
    analyzer.reset()                   # every run starts a new clip, as a real run does
    clock = time.perf_counter()
    faces = analyzer(frames)
    missed = sum(1 for f in faces if not len(f))
    if missed:
        raise SystemExit(f"the detector missed the face in {missed} of {len(faces)} frames: the timing would not "
                         "measure the full face stage")
    detected = time.perf_counter()
    track = build_track(faces, hw)
    params = crop_params(track, size=crop_size)
    tracked = time.perf_counter()
    as_float = frames.float().div_(255)
    crops = crop_faces(as_float, params)
    cropped = time.perf_counter()
    paste_back(as_float, crops, params, track.valid, inplace=True, keep_detail=keep_detail, source_crops=crops)
    pasted = time.perf_counter()
    n = frames.shape[0]
    return {"detect+landmarks": (detected - clock) / n * 1e3, "track": (tracked - detected) / n * 1e3,
            "crop": (cropped - tracked) / n * 1e3, "paste": (pasted - cropped) / n * 1e3,
            "total": (pasted - clock) / n * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["720p", "1080p"], choices=list(SIZES))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-keep-detail", action="store_true", help="time the plain paste (as --no-keep-detail)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detector", default="auto", choices=["auto", "short", "full"],
                        help="as the CLI's --detector (default auto: short range, full range where it finds nothing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    analyzer = FaceAnalyzer(device=args.device, detector=args.detector, batch_size=args.batch)
    print(f"# torch {torch.__version__}, {args.device}, {args.threads} threads, detector {args.detector}, "
          f"batch {args.batch}, crop {args.crop_size}, keep_detail {not args.no_keep_detail}, median of {args.runs} runs of {args.frames} frames")
    print(f"{'size':<7} {'stage':<17} {'ms/frame':>9}")
    for name in args.sizes:
        frames = make_frames(*SIZES[name], args.frames)
        keep = not args.no_keep_detail
        time_stages(frames[: args.batch], analyzer, args.crop_size, keep)           # warm-up
        runs = [time_stages(frames, analyzer, args.crop_size, keep) for _ in range(args.runs)]
        for stage in runs[0]:
            value = statistics.median(r[stage] for r in runs)
            suffix = f"   -> {1e3 / value:.1f} frames/s" if stage == "total" else ""
            print(f"{name:<7} {stage:<17} {value:9.1f}{suffix}")


if __name__ == "__main__":
    main()
