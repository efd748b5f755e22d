"""Peak memory of a lip sync against clip length: constant memory means the same peak for 10 s and for 10 min.

    .venv/bin/python benchmarks/memory.py [--seconds 10 240 600] [--steps 8] [--model PATH] [--node [--node-only]]

It makes a talking-head clip of each length (the bundled example face, ``examples/face.mp4``, looped at 15 fps, and
the example speech looped to the same length), lip-syncs it with the bundled demo model and the real face analyzer
in a fresh process each (``omnisync lipsync``, whose summary reports its peak RSS), and prints the peaks, the
ratio of each to the shortest and the growth per second of video. ``--node`` does the same through the streaming
OmniSync Lip Sync (Video) node in-process in a real ComfyUI (``COMFYUI_PATH`` and its venv's python, see
scripts/comfyui_test.sh); there the AUDIO input itself is held by the host (4 bytes per sample), which is
reported and subtracted, and the peak of the process's anonymous memory (RssAnon, sampled) is printed too: the
file-backed pages of a CUDA build of torch move the total by tens of MiB from one run to the next.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnisync_core.io import VideoReader, VideoWriter  # noqa: E402

FPS = 15
EXAMPLE_VIDEO = ROOT / "examples" / "face.mp4"
EXAMPLE_SPEECH = ROOT / "examples" / "speech.wav"


def write_clip(path: Path, seconds: float, width: int = 0, height: int = 0, fps: int = FPS) -> Path:
    """The example face looped to ``seconds`` at ``fps`` (written chunk by chunk: making it takes no memory).
    ``width``/``height`` > 0 draw a smooth moving picture of that size instead (no face)."""
    frames = int(round(seconds * fps))
    with VideoWriter(path, Fraction(fps), crf=23, preset="veryfast") as writer:
        if width and height:
            for start in range(0, frames, 50):
                writer.write(_pattern(start, min(start + 50, frames), width, height))
            return path
        with VideoReader(EXAMPLE_VIDEO, fps=Fraction(fps)) as reader:
            loop = reader.read_all()
        for start in range(0, frames, 60):
            writer.write(loop[torch.arange(start, min(start + 60, frames)) % loop.shape[0]])
    return path


def _pattern(a: int, b: int, width: int, height: int) -> torch.Tensor:
    y = torch.linspace(0, 1, height).view(1, -1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, -1)
    t = torch.arange(a, b, dtype=torch.float32).view(-1, 1, 1)
    r = 0.5 + 0.4 * torch.sin(2 * torch.pi * (x + 0.02 * t))
    g = 0.5 + 0.4 * torch.cos(2 * torch.pi * (y - 0.015 * t))
    blue = (0.5 + 0.3 * torch.sin(0.1 * t)).expand_as(r * g)
    return torch.stack([r.expand_as(blue), g.expand_as(blue), blue], -1)


def write_speech(path: Path, seconds: float) -> Path:
    """The example speech looped to ``seconds`` (int16 WAV at its own rate)."""
    with wave.open(str(EXAMPLE_SPEECH), "rb") as handle:
        rate = handle.getframerate()
        data = np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16)
    need = int(seconds * rate)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.resize(data, need).tobytes())
    return path


def write_tone(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((signal * 32767).astype(np.int16).tobytes())
    return path


def run_cli(folder: Path, seconds: float, steps: int, model: str | None, threads: int) -> dict:
    clip, speech = write_clip(folder / f"clip{seconds}.mp4", seconds), write_speech(folder / f"speech{seconds}.wav",
                                                                                    seconds)
    out = folder / f"out{seconds}.mp4"
    command = [sys.executable, "-m", "omnisync_core.cli", "lipsync", "--video", str(clip), "--audio", str(speech),
               "--out", str(out), "--steps", str(steps), "--threads", str(threads)]
    command += ["--model", model] if model else []
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"lipsync failed for {seconds} s: {result.stderr.strip()[-400:]}")
    found = re.search(r"peak RAM (\d+) MiB", result.stdout)
    return {"seconds": seconds, "rss_mib": int(found.group(1)), "wall_s": time.perf_counter() - started}


NODE_CHILD = r"""
import json, os, sys, threading, time
def status_mib(field):                  # VmHWM, not ru_maxrss: that one keeps the forking parent's resident size
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024
def anon_mib():
    return status_mib("RssAnon:")
anon_peak = [0.0]
def sample_anon():
    while True:
        anon_peak[0] = max(anon_peak[0], anon_mib())
        time.sleep(0.005)
threading.Thread(target=sample_anon, daemon=True).start()
sys.path.insert(0, os.path.join(os.environ["OMNISYNC_ROOT"], "tests"))
from comfy_helpers import InProcessComfy, temp_root
cf = InProcessComfy(temp_root("omnisync-memory-"))
from comfy_api.latest import InputImpl
import av, numpy as np, torch
clip, speech, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
with av.open(speech) as container:
    rate = container.streams.audio[0].rate
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
wave = torch.from_numpy(pcm.astype(np.float32) / 32768.0).view(1, 1, -1)
del pcm                                 # the host keeps the AUDIO (subtracted below), not the decoder's int16 copy
model = cf.run("OmniSyncModelLoader", model="omnisync_demo (bundled)", vae="from bundle",
               audio_encoder="from bundle", precision="auto", download="")[0]
cf.run("OmniSyncLipSyncVideo", model=model, video=InputImpl.VideoFromFile(clip),
       audio={"waveform": wave, "sample_rate": rate}, filename_prefix="memory/run", seed=0, steps=steps,
       guidance="ds-cfg", tau=0.0, length_policy="pingpong", detector="auto", face_index=-1, box="", crop_size=0,
       crop_margin=0.3, window=0, overlap=-1, color_match=False)
anon_peak[0] = max(anon_peak[0], anon_mib())
print(json.dumps({"rss_mib": status_mib("VmHWM:"), "anon_mib": anon_peak[0],
                  "audio_mib": wave.numel() * 4 / 2**20}))
"""


def run_node(folder: Path, seconds: float, steps: int, python: str) -> dict:
    clip, speech = write_clip(folder / f"clip{seconds}.mp4", seconds), write_speech(folder / f"speech{seconds}.wav",
                                                                                    seconds)
    env = dict(os.environ, OMNISYNC_ROOT=str(ROOT))
    started = time.perf_counter()
    result = subprocess.run([python, "-c", NODE_CHILD, str(clip), str(speech), str(steps)], capture_output=True,
                            text=True, cwd=folder, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"node run failed for {seconds} s: {result.stderr.strip()[-800:]}")
    import json

    row = json.loads(result.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "rss_mib": row["rss_mib"] - row["audio_mib"], "host_audio_mib": row["audio_mib"],
            "anon_mib": row["anon_mib"] - row["audio_mib"], "wall_s": time.perf_counter() - started}


def report(rows: list[dict], title: str) -> None:
    """Peaks, their ratio to the shortest clip's, and the growth per video second from the shortest clip and from
    the previous row (Whisper encodes audio in chunks of up to 30 s, so a clip under 30 s peaks a little lower:
    the growth between two longer clips is what each second really costs)."""
    first = rows[0]
    print(title)
    print(f"{'clip s':>7} {'peak MiB':>9} {'ratio':>7} {'MiB/s from first':>17} {'MiB/s from prev':>16} {'wall s':>8}")
    for previous, row in zip([None, *rows], rows):
        def slope(base):
            return (row["rss_mib"] - base["rss_mib"]) / (row["seconds"] - base["seconds"]) if base else 0.0
        print(f"{row['seconds']:7.0f} {row['rss_mib']:9.1f} {row['rss_mib'] / first['rss_mib']:7.3f} "
              f"{slope(first if row is not first else None):17.4f} {slope(previous):16.4f} {row['wall_s']:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", nargs="+", type=float, default=[10, 240, 600])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", help="a model bundle (default: the bundled demo model)")
    parser.add_argument("--node", action="store_true", help="also run the streaming node in a real ComfyUI")
    parser.add_argument("--node-only", action="store_true", help="with --node: skip the CLI runs")
    parser.add_argument("--comfy-python", default=os.environ.get("COMFY_PYTHON", "/work/comfy-venv/bin/python"))
    args = parser.parse_args()
    lengths = sorted(args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not (args.node and args.node_only):
            report([run_cli(folder, s, args.steps, args.model, args.threads) for s in lengths],
                   f"omnisync lipsync, demo model, real face analyzer, --steps {args.steps}")
        if args.node:
            if not os.environ.get("COMFYUI_PATH"):
                sys.exit("--node needs COMFYUI_PATH (a ComfyUI checkout) and its venv's python (--comfy-python)")
            rows = [run_node(folder, s, args.steps, args.comfy_python) for s in lengths]
            subtracted = ", ".join(f"{r['host_audio_mib']:.1f}" for r in rows)
            report(rows, f"OmniSync Lip Sync (Video) node in-process (host's AUDIO input subtracted: {subtracted} MiB)")
            # a CUDA build of torch maps ~0.5 GB of libraries whose resident pages vary from run to run by tens of
            # MiB; the process's own (anonymous) memory, sampled every 5 ms, shows the growth without that noise
            report([dict(r, rss_mib=r["anon_mib"]) for r in rows], "the same runs, peak anonymous RSS (RssAnon)")


if __name__ == "__main__":
    main()
