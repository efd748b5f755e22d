"""Build and run one evaluated setting: a model and its settings applied to one clip, through the stable lip-sync
facade (:class:`omnisync_core.pipeline.LipSyncPipeline`), exactly as ``omnisync lipsync`` builds it.

This is the only module of the evaluator that knows how a model is loaded and driven; a new model family plugs in
here (:func:`resolve_settings` and :func:`run_setting`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import InputError
from .cost import PeakMemory

FAMILIES = ("omnisync",)
# Settings a run may give, with the CLI's fallbacks where the model has no default.
SAMPLER_KEYS = {"steps": 50, "tau": 0.92, "shift": 5.0, "guidance": "ds-cfg", "cfg_scale": 4.5}
DS_CFG_KEYS = ("omega_base", "omega_peak", "gamma", "s_ratio", "floor")
JOB_KEYS = {"window": 81, "overlap": 8, "crop_size": 512, "seed": 0, "length_policy": "pingpong",
            "face_index": None, "box": None, "color_match": False, "keep_detail": True, "detector": "auto"}
SETTING_KEYS = (*SAMPLER_KEYS, *DS_CFG_KEYS, *JOB_KEYS, "dtype")


@dataclass
class RunRecord:
    """What running a setting on a clip did."""

    output: str
    frames: int
    fps: float
    windows: int
    seconds: float
    peak_ram_mib: float
    peak_vram_mib: Optional[float]
    warnings: list = field(default_factory=list)

    @property
    def seconds_per_output_second(self) -> float:
        return self.seconds / max(self.frames / self.fps, 1e-9)


def model_path(family: str, model: Optional[str]) -> Path:
    """The checkpoint a run names (None or "demo": the bundled demo model)."""
    if family not in FAMILIES:
        raise InputError(f"unknown model family {family!r}; this evaluator runs {', '.join(FAMILIES)}")
    from ..model.bundle import DEMO_MODEL

    path = DEMO_MODEL if model in (None, "", "demo") else Path(model).expanduser()
    if not path.is_file():
        raise InputError(f"model not found: {path}")
    return path


class Models:
    """Loaded bundles by (path, device), so a grid loads each model once."""

    def __init__(self):
        self._bundles: dict = {}

    def bundle(self, path: Path, device: torch.device):
        from ..model.bundle import load_bundle

        key = (str(path), str(device))
        if key not in self._bundles:
            self._bundles[key] = load_bundle(path, device=device)
        return self._bundles[key]

    def defaults(self, path: Path) -> dict:
        """The checkpoint's defaults, read from its header only."""
        import json

        from ..model.loading import read_header

        _, meta = read_header(path)
        try:
            return json.loads(meta.get("defaults", "{}"))
        except json.JSONDecodeError:
            return {}


def resolve_settings(family: str, model: Optional[str], settings: dict, models: Models) -> dict:
    """Every knob of the run, the run's own values over the model's defaults over the CLI's fallbacks: the dict
    that is hashed for the cache and printed in the report."""
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_KEYS)}")
    defaults = models.defaults(model_path(family, model))
    from ..sampling import DSCFGParams

    out = {k: defaults.get(k, v) for k, v in {**SAMPLER_KEYS, **JOB_KEYS}.items()}
    out.update({k: getattr(DSCFGParams(), k) for k in DS_CFG_KEYS})
    out.update({"audio_before": defaults.get("audio_before", 2), "audio_after": defaults.get("audio_after", 2),
                "dtype": "auto"})
    out.update(settings)
    return out


def run_setting(family: str, model: Optional[str], settings: dict, video: str, audio: str, out: str,
                models: Models, device: str = "auto", progress: Optional[Callable[[str, int, int], None]] = None
                ) -> RunRecord:
    """Lip-sync ``video`` to ``audio`` into ``out`` with resolved ``settings`` (see :func:`resolve_settings`)."""
    from ..generator import OmniSyncGenerator, SamplerOptions
    from ..model.loading import resolve_device, resolve_dtype
    from ..pipeline import LipSyncOptions, LipSyncPipeline
    from ..sampling import DSCFGParams

    s = settings
    dev = resolve_device(device)
    dtype = resolve_dtype(s.get("dtype", "auto"), dev)
    bundle = models.bundle(model_path(family, model), dev)
    bundle.dit.to(dtype)
    with PeakMemory(device=dev) as cost:
        sampler = SamplerOptions(steps=int(s["steps"]), tau=float(s["tau"]), shift=float(s["shift"]),
                                 guidance=s["guidance"], cfg_scale=float(s["cfg_scale"]),
                                 ds_cfg=DSCFGParams(**{k: float(s[k]) for k in DS_CFG_KEYS}))
        options = LipSyncOptions(window=int(s["window"]), overlap=int(s["overlap"]), crop_size=int(s["crop_size"]),
                                 seed=int(s["seed"]), length_policy=s["length_policy"], face_index=s["face_index"],
                                 box=s["box"], color_match=bool(s["color_match"]), keep_detail=bool(s["keep_detail"]))
        analyzer = None
        if s["detector"] != "none":
            from ..face.analyze import FaceAnalyzer

            analyzer = FaceAnalyzer(device=dev, detector=s["detector"])
        generator = OmniSyncGenerator(bundle.dit, bundle.vae, sampler, device=dev, dtype=dtype,
                                      audio_encoder=bundle.audio_encoder, audio_before=int(s["audio_before"]),
                                      audio_after=int(s["audio_after"]))
        pipeline = LipSyncPipeline(generator, face_analyzer=analyzer, options=options)
        report = pipeline.run(os.fspath(video), os.fspath(audio), os.fspath(out), progress=progress)
    # the pipeline's own clock (decode to encode; model loading excluded, as in `omnisync lipsync`'s summary)
    return RunRecord(report.output, report.frames, float(report.fps), report.windows, report.seconds,
                     cost.peak_ram_mib, cost.peak_vram_mib, list(report.warnings))
