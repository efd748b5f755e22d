"""The grid: every run on every clip, cached per (clip, run), with one progress bar over all of it.

Two caches under ``<output_dir>/cache``: an output video is keyed by the hash of what makes it (the clip's video
and audio bytes, the model file's bytes, the resolved settings), a score by the hash of the output, the ground truth,
the metric models and their options and :data:`~omnisync_core.eval.score.SCORE_VERSION`. So a re-run runs only the
settings that changed, and re-scores only what a new metric model or rule touches.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import OmniSyncError
from . import clips as clipio
from .manifest import Manifest, RunSpec, _slug
from .run import Models, model_path, resolve_settings, run_setting
from .score import SCORE_VERSION, Scorers, prepare_reference, score_output


@dataclass
class CellResult:
    clip: str
    run: str
    metrics: dict
    notes: list = field(default_factory=list)
    series: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    output: Optional[str] = None
    strip: Optional[str] = None          # PNG path
    strip_frames: list = field(default_factory=list)
    error: Optional[str] = None
    generated: bool = False              # False: the output came from the cache (or existed)
    scored: bool = False                 # False: the score came from the cache


@dataclass
class EvalResults:
    manifest: Manifest
    cells: list
    notes: list
    seconds: float

    def cell(self, clip: str, run: str) -> Optional[CellResult]:
        return next((c for c in self.cells if c.clip == clip and c.run == run), None)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class GridProgress:
    """One line on stderr over the whole grid: cells done (fractional), the current cell and stage, an ETA."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = max(total, 1), stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done, self.started, self.last = 0.0, time.monotonic(), 0.0
        self.label = ""

    def update(self, done: float, label: str, force: bool = False) -> None:
        self.done, self.label = done, label
        now = time.monotonic()
        if not force and now - self.last < (0.25 if self.tty else 10.0):
            return
        self.last = now
        frac = min(self.done / self.total, 1.0)
        elapsed = now - self.started
        eta = f" ETA {elapsed / frac - elapsed:5.0f}s" if 0.02 < frac < 1 else ""
        line = f"eval [{'#' * int(30 * frac):<30}] {self.done:5.1f}/{self.total} {elapsed:5.0f}s{eta}  {label}"
        self.stream.write(("\r" + line[:160].ljust(160)) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.update(self.total, "done", force=True)
        if self.tty:
            self.stream.write("\n")


def _setup_scorers(m: Manifest, device: torch.device, memo: dict) -> tuple[Scorers, dict, list]:
    from ..face.analyze import FaceAnalyzer

    notes, digests = [], {}
    syncnet = arcface = None
    if m.syncnet is not None:
        from .syncnet import load_syncnet

        syncnet = load_syncnet(m.syncnet, device=device)
        digests["syncnet"] = clipio.file_digest(m.syncnet, memo)
    else:
        notes.append("LSE-C / LSE-D skipped: no SyncNet weights (metrics.syncnet: syncnet_v2.model converted with "
                     "omnisync_core.eval.syncnet.convert_syncnet).")
    if m.arcface is not None:
        from .identity import load_arcface

        arcface = load_arcface(m.arcface, device=device)
        digests["arcface"] = clipio.file_digest(m.arcface, memo)
    else:
        notes.append("CSIM skipped: no face-identity model (metrics.arcface: an arcface_torch IResNet as "
                     "safetensors).")
    return Scorers(FaceAnalyzer(device=device), syncnet, arcface, m.rule, m.mouth_dilate, device), digests, notes


def _existing_output(m: Manifest, run: RunSpec, clip: str) -> Path:
    p = Path(run.outputs.format(clip=clip)).expanduser()
    return p if p.is_absolute() else m.path.parent / p


def _save_png(image: torch.Tensor, path: Path) -> Optional[str]:
    try:
        from PIL import Image
    except ImportError:
        return None
    Image.fromarray(image.numpy()).save(path)
    return str(path)


def evaluate_manifest(m: Manifest, progress: Optional[GridProgress] = None, force: bool = False,
                      log: Callable[[str], None] = lambda s: None) -> EvalResults:
    """Run and score the grid of ``m`` (``force`` ignores the caches). Errors of one cell are recorded in it and
    the grid goes on."""
    from ..model.loading import resolve_device

    started = time.perf_counter()
    if m.threads:
        torch.set_num_threads(int(m.threads))
    device = resolve_device(m.device)
    cache = m.output_dir / "cache"
    for sub in ("outputs", "scores", "clips"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    memo_path = cache / "digests.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    scorers, metric_digests, notes = _setup_scorers(m, device, memo)
    models = Models()
    progress = progress or GridProgress(len(m.clips) * len(m.runs), stream=_Null())
    cells, step = [], 0
    for spec in m.clips:
        progress.update(step, f"{spec.name}: preparing the clip", force=True)
        files = clipio.clip_files(spec, cache)
        clip_digest = {"video": clipio.file_digest(Path(files.video), memo),
                       "audio": clipio.file_digest(Path(files.audio), memo),
                       "truth": clipio.file_digest(Path(files.ground_truth), memo) if files.ground_truth else None}
        reference = None
        for run in m.runs:
            label = f"{spec.name} x {run.name}"
            cell = CellResult(spec.name, run.name, {})
            try:
                reference = _one_cell(m, spec.name, run, files, clip_digest, cell, cache, memo, models, device,
                                      scorers, metric_digests, reference, force,
                                      lambda f, stage: progress.update(step + f, f"{label}: {stage}"))
            except (OmniSyncError, OSError, ValueError, RuntimeError) as e:
                cell.error = f"{type(e).__name__}: {e}"
                cell.metrics = {"success": 0.0}
                log(f"{label} failed: {cell.error}")
                log("".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-3)))
            cells.append(cell)
            step += 1
            progress.update(step, label, force=True)
        memo_path.write_text(json.dumps(memo))
    progress.close()
    return EvalResults(m, cells, notes, time.perf_counter() - started)


class _Null:
    def write(self, _):
        pass

    def flush(self):
        pass

    def isatty(self):
        return False


def _one_cell(m, clip_name, run: RunSpec, files, clip_digest, cell: CellResult, cache: Path, memo, models: Models,
              device, scorers, metric_digests, reference, force, report):
    """Make (or find) the output of ``run`` on the clip, then score it (or read its cached score). Returns the
    clip's Reference (built on first need) for the next runs."""
    slug = _slug(run.name)
    if run.scores_existing:
        output = _existing_output(m, run, clip_name)
        if not output.is_file():
            raise OmniSyncError(f"existing output not found: {output}")
        settings = {"outputs": str(output), "window": run.window, "overlap": run.overlap,
                    "length_policy": run.length_policy}
        gen_key, record = clipio.file_digest(output, memo), None
        windows = (run.window, run.overlap or 0) if run.window else None
        policy = run.length_policy
    else:
        settings = resolve_settings(run.family, run.model, run.settings, models)
        model_file = model_path(run.family, run.model)
        gen_key = _hash({"family": run.family, "model": clipio.file_digest(model_file, memo), "settings": settings,
                         "video": clip_digest["video"], "audio": clip_digest["audio"]})
        out_dir = cache / "outputs" / clip_name
        out_dir.mkdir(parents=True, exist_ok=True)
        output, record_path = out_dir / f"{slug}-{gen_key}.mp4", out_dir / f"{slug}-{gen_key}.json"
        if force or not (output.is_file() and record_path.is_file()):
            def stage(name, done, total):
                weight = {"faces": (0.0, 0.15), "lipsync": (0.15, 0.7)}.get(name, (0.0, 0.0))
                report(weight[0] + weight[1] * done / max(total, 1), f"{name} {done}/{total}")

            rec = run_setting(run.family, run.model, settings, str(files.video), str(files.audio), str(output),
                              models, device=str(device), progress=stage)
            record_path.write_text(json.dumps(asdict(rec)))
            cell.generated = True
        record = json.loads(record_path.read_text())
        windows = (int(settings["window"]), int(settings["overlap"]))
        policy = settings["length_policy"]
    cell.settings, cell.output = settings, str(output)

    score_key = _hash({"output": gen_key, "truth": clip_digest["truth"], "speech": clip_digest["audio"],
                       "source": clip_digest["video"], "version": SCORE_VERSION, "rule": scorers.rule.to_dict(),
                       "dilate": scorers.dilate, "models": metric_digests, "windows": windows, "policy": policy,
                       "cost": record})
    score_dir = cache / "scores" / clip_name
    score_dir.mkdir(parents=True, exist_ok=True)
    score_path, strip_path = score_dir / f"{slug}-{score_key}.json", score_dir / f"{slug}-{score_key}.png"
    if not force and score_path.is_file():
        saved = json.loads(score_path.read_text())
        cell.metrics, cell.notes, cell.series = saved["metrics"], saved["notes"], saved["series"]
        cell.strip_frames = saved.get("strip_frames", [])
        cell.strip = str(strip_path) if strip_path.is_file() else None
        return reference
    report(0.85, "scoring")
    if reference is None:
        source, fps = clipio.read_frames(files.video)
        truth = clipio.read_frames(files.ground_truth)[0] if files.ground_truth else None
        reference = prepare_reference(source, fps, clipio.read_speech(files.audio), scorers.analyzer, truth)
    frames, _ = clipio.read_frames(output)
    cost = None
    if record is not None:
        cost = {"seconds_per_output_second": record["seconds"] / max(record["frames"] / record["fps"], 1e-9),
                "peak_ram_mib": record["peak_ram_mib"], "peak_vram_mib": record["peak_vram_mib"]}
        cell.notes.extend(record.get("warnings", []))
    score = score_output(frames, reference, scorers, length_policy=policy, windows=windows, cost=cost)
    cell.metrics, cell.series, cell.strip_frames = score.metrics, score.series, score.strip_frames
    cell.notes.extend(score.notes)
    cell.scored = True
    if score.strip is not None:
        cell.strip = _save_png(score.strip, strip_path)
    score_path.write_text(json.dumps({"metrics": cell.metrics, "notes": cell.notes, "series": cell.series,
                                      "strip_frames": cell.strip_frames}))
    return reference
