"""Shared fixtures: speech made by espeak-ng, sweeps, and small media files written with PyAV."""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

# The suite runs at the thread count CI uses (2) unless OMP_NUM_THREADS asks for another: results that depend on the
# thread count (float reduction order) are compared with tolerances, so the suite is green at 1 and at 2 threads.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))

if os.environ.get("OMNISYNC_TEST_MISALIGNED_WEIGHTS") == "1":
    # Proof that no test depends on where loaded weights sit: every tensor the loader returns is a view at an odd
    # offset (8 bytes past a 64-byte boundary, as safetensors' own tensors were) instead of its own aligned storage.
    from omnisync_core.model import loading as _loading

    def _misaligned(t, device, dtype):
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        size = torch.empty(0, dtype=cast).element_size()
        raw = torch.empty(t.numel() * size + 64 + 8, dtype=torch.uint8, device=device)
        start = (-raw.data_ptr()) % 64 + 8
        out = raw[start:start + t.numel() * size].view(cast).view(t.shape)
        return out.copy_(t)

    _loading._owned = _misaligned

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Peter Piper picked a peck of pickled peppers, and then he sat down by the river.",
]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """int16 PCM WAV -> float32 mono samples and rate (test-side reader, independent of the product's decoder)."""
    with wave.open(str(path), "rb") as handle:
        rate, channels = handle.getframerate(), handle.getnchannels()
        data = np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16)
    return data.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0, rate


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """float samples [N] or [N, C] in [-1, 1] -> int16 PCM WAV."""
    data = np.clip(np.round(np.asarray(samples) * 32767.0), -32768, 32767).astype(np.int16)
    channels = 1 if data.ndim == 1 else data.shape[1]
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(data.tobytes())
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """A few seconds of real synthetic speech (espeak-ng, 22050 Hz mono int16 WAV)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/test.sh installs it where apt is available)")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), " ".join(SENTENCES)], check=True,
                   capture_output=True)
    return path


def log_sweep(rate: int, seconds: float, f0: float, f1: float) -> np.ndarray:
    """A logarithmic sine sweep from f0 to f1 Hz (float64)."""
    t = np.arange(int(round(rate * seconds))) / rate
    k = np.log(f1 / f0) / t[-1]
    return np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)


@pytest.fixture(scope="session")
def short_speech_wav(tmp_path_factory) -> Path:
    """About one second of espeak-ng speech, for end-to-end runs of real models on the CPU."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/test.sh installs it where apt is available)")
    path = tmp_path_factory.mktemp("speech") / "short.wav"
    subprocess.run(["espeak-ng", "-s", "190", "-w", str(path), "Hello there."], check=True, capture_output=True)
    return path


def _load_benchmark(name: str):
    """Import a script from benchmarks/ (not a package) so tests can reuse its helpers."""
    import importlib.util
    import sys as _sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    _sys.modules[f"benchmarks_{name}"] = module
    spec.loader.exec_module(module)
    return module


_load_benchmark("memory")
