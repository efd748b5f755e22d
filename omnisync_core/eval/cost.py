"""Cost of a run: seconds per output second, and the peak memory while it ran.

- ``seconds_per_output_second = wall seconds of the run / (output frames / fps)`` (1.0 = real time);
- ``peak_ram_mib``: the largest resident set size of this process sampled every 20 ms during the run (Linux
  ``/proc/self/statm``; elsewhere the process's lifetime ``ru_maxrss``, which a larger earlier run may mask), so it
  includes the models the run loaded;
- ``peak_vram_mib``: ``torch.cuda.max_memory_allocated`` after a reset at the start (None without CUDA).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Optional

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> Optional[int]:
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
    except (ImportError, OSError):
        return None


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.seconds``, ``m.peak_ram_mib``, ``m.peak_vram_mib``."""

    def __init__(self, interval: float = 0.02, device=None):
        self.interval = interval
        self.device = torch.device(device) if device is not None else None
        self.peak_ram = 0
        self.peak_vram: Optional[int] = None
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _cuda(self) -> bool:
        return torch.cuda.is_available() and (self.device is None or self.device.type == "cuda")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_ram = max(self.peak_ram, rss_bytes() or 0)

    def __enter__(self) -> "PeakMemory":
        if self._cuda():
            torch.cuda.reset_peak_memory_stats()
        self.peak_ram = rss_bytes() or 0
        if self.peak_ram:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak_ram = max(self.peak_ram, rss_bytes() or 0)
        else:
            self.peak_ram = _maxrss_bytes() or 0
        if self._cuda():
            self.peak_vram = int(torch.cuda.max_memory_allocated())

    @property
    def peak_ram_mib(self) -> float:
        return self.peak_ram / 2 ** 20

    @property
    def peak_vram_mib(self) -> Optional[float]:
        return None if self.peak_vram is None else self.peak_vram / 2 ** 20


def seconds_per_output_second(seconds: float, frames: int, fps: float) -> float:
    return seconds / max(frames / float(fps), 1e-9)
