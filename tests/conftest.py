"""Shared fixtures: speech made by espeak-ng, sweeps, and small media files written with PyAV."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

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
