"""The evaluation manifest: which clips, which runs, which metric models. YAML (``.yaml`` / ``.yml``, needs
PyYAML) or JSON. Paths are relative to the manifest's folder.

.. code-block:: yaml

    name: demo at its shipped settings vs the ablations
    output_dir: outputs/eval/demo      # relative to the current folder (default: outputs/eval/<file name>)
    device: auto                       # auto, cpu, cuda, ...
    threads: 2                         # CPU threads (default: PyTorch's)
    model: demo                        # the runs' default model (demo = the bundled demo bundle)
    metrics:
      syncnet: weights/syncnet_v2.safetensors   # optional (omnisync_core.eval.syncnet.convert_syncnet)
      arcface: weights/arcface_r50.safetensors  # optional (arcface_torch IResNet)
      success: {min_face_rate: 0.9, min_corr: 0.3, max_lag: 2, min_lse_c: 1.5}
      mouth_dilate: 0.15
    clips:
      - name: interview
        video: clips/interview.mp4     # the source
        audio: clips/new_line.wav      # the driving speech
        ground_truth: null             # a video of the same face saying that audio, when there is one
      - held_out: 3                    # held-out synthetic faces (made on first use; needs espeak-ng)
        size: 128
    runs:
      - name: shipped                  # the model's own defaults
      - {name: tau 1.0, settings: {tau: 1.0}}
      - {name: tau, sweep: {tau: [0.8, 0.9, 1.0]}}       # runs "tau=0.8", "tau=0.9", "tau=1.0", plotted
      - {name: theirs, outputs: "renders/{clip}.mp4", window: 81, overlap: 8}   # score existing files
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError
from .success import SuccessRule

HELD_OUT_SEED = 900_000          # omnisync_core/eval/sync.py's held-out faces


@dataclass
class ClipSpec:
    name: str
    video: Optional[Path] = None
    audio: Optional[Path] = None
    ground_truth: Optional[Path] = None
    synthetic: Optional[dict] = None     # made at run time (see omnisync_core.eval.clips)


@dataclass
class RunSpec:
    name: str
    family: str = "omnisync"
    model: Optional[str] = None
    settings: dict = field(default_factory=dict)
    outputs: Optional[str] = None         # pattern with {clip}: score existing outputs instead of running
    group: Optional[str] = None           # sweep name
    sweep_key: Optional[str] = None
    sweep_value: Any = None
    window: Optional[int] = None          # for existing outputs: how they were windowed (seam error)
    overlap: Optional[int] = None
    length_policy: str = "pingpong"

    @property
    def scores_existing(self) -> bool:
        return self.outputs is not None


@dataclass
class Manifest:
    name: str
    path: Path
    clips: list
    runs: list
    output_dir: Path
    device: str = "auto"
    threads: Optional[int] = None
    syncnet: Optional[Path] = None
    arcface: Optional[Path] = None
    rule: SuccessRule = field(default_factory=SuccessRule)
    mouth_dilate: float = 0.15


def _load(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{path.name} is YAML, which needs PyYAML (listed in requirements.txt); or write the "
                             f"manifest as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"{path.name} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path.name} must hold a mapping with clips and runs")
    return data


def _path(base: Path, value, what: str, must_exist: bool = True) -> Optional[Path]:
    if value in (None, ""):
        return None
    p = Path(str(value)).expanduser()
    p = p if p.is_absolute() else (base / p)
    if must_exist and not p.exists():
        raise InputError(f"{what} not found: {p}")
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def held_out_specs(count: int, size: int = 128, seed: int = HELD_OUT_SEED, start: int = 0) -> list[ClipSpec]:
    """The held-out re-voicing problems of :func:`omnisync_core.eval.sync.held_out_clips` (same draws: face seed,
    sentences A and B from the 8 sentences the demo never heard, voices), as clip specs."""
    import torch

    from ..train import synthetic

    sentences = synthetic.SENTENCES[32:]
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(start + count):
        a, b = torch.randperm(len(sentences), generator=g)[:2].tolist()
        va, vb = (synthetic.VOICES[int(j)] for j in torch.randint(len(synthetic.VOICES), (2,), generator=g))
        if i >= start:
            specs.append(ClipSpec(f"held-out-{i}", synthetic=dict(seed=seed + i, sentence=sentences[a], voice=va,
                                                                  driving_sentence=sentences[b], driving_voice=vb,
                                                                  driving_speed=140, size=size)))
    return specs


def _clips(base: Path, items) -> list[ClipSpec]:
    if not isinstance(items, list) or not items:
        raise InputError("the manifest needs a non-empty 'clips' list")
    clips: list[ClipSpec] = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"clip {n + 1} must be a mapping")
        if "held_out" in item:
            clips += held_out_specs(int(item["held_out"]), size=int(item.get("size", 128)),
                                    start=int(item.get("start", 0)))
        elif "synthetic" in item:
            spec = dict(item["synthetic"])
            missing = {"seed", "sentence", "driving_sentence"} - set(spec)
            if missing:
                raise InputError(f"synthetic clip {n + 1} lacks {', '.join(sorted(missing))}")
            spec.setdefault("voice", "en")
            spec.setdefault("driving_voice", "en-us")
            spec.setdefault("driving_speed", 140)
            spec.setdefault("size", 128)
            clips.append(ClipSpec(_slug(item.get("name", f"synthetic-{spec['seed']}")), synthetic=spec))
        else:
            if "video" not in item or "audio" not in item:
                raise InputError(f"clip {n + 1} needs 'video' and 'audio' (or 'held_out' / 'synthetic')")
            video = _path(base, item["video"], f"clip {n + 1} video")
            clips.append(ClipSpec(_slug(item.get("name", video.stem)), video,
                                  _path(base, item["audio"], f"clip {n + 1} audio"),
                                  _path(base, item.get("ground_truth"), f"clip {n + 1} ground truth")))
    names = [c.name for c in clips]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise InputError(f"clip names must be unique: {', '.join(dupes)}")
    return clips


def _runs(base: Path, items, model: Optional[str]) -> list[RunSpec]:
    if not isinstance(items, list) or not items:
        raise InputError("the manifest needs a non-empty 'runs' list")
    runs: list[RunSpec] = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"run {n + 1} must be a mapping")
        name = str(item.get("name", f"run-{n + 1}"))
        common = dict(family=str(item.get("family", "omnisync")), model=item.get("model", model))
        if common["model"] not in (None, "", "demo"):
            common["model"] = str(_path(base, common["model"], f"run {name!r} model"))
        settings = dict(item.get("settings") or {})
        if "outputs" in item:
            runs.append(RunSpec(name, outputs=str(item["outputs"]), window=item.get("window"),
                                overlap=item.get("overlap"), length_policy=item.get("length_policy", "pingpong"),
                                settings=settings, **common))
        elif "sweep" in item:
            sweep = item["sweep"]
            if not isinstance(sweep, dict) or len(sweep) != 1:
                raise InputError(f"run {name!r}: 'sweep' takes one setting and its values, e.g. {{tau: [0.8, 1.0]}}")
            (key, values), = sweep.items()
            for v in values:
                label = f"{key}={v}" if name == key else f"{name} {key}={v}"
                runs.append(RunSpec(label, settings={**settings, key: v}, group=name, sweep_key=key,
                                    sweep_value=v, **common))
        else:
            runs.append(RunSpec(name, settings=settings, **common))
    names = [r.name for r in runs]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise InputError(f"run names must be unique: {', '.join(dupes)}")
    return runs


def load_manifest(path, output_dir=None) -> Manifest:
    """Read and check a manifest (every named file must exist); ``output_dir`` overrides the manifest's."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    data = _load(path)
    base = path.parent
    unknown = sorted(set(data) - {"name", "output_dir", "device", "threads", "model", "metrics", "clips", "runs"})
    if unknown:
        raise InputError(f"{path.name}: unknown key(s) {', '.join(unknown)}")
    name = str(data.get("name", path.stem))
    metrics = dict(data.get("metrics") or {})
    if output_dir is not None:
        out = Path(output_dir).expanduser()
    elif data.get("output_dir"):
        out = Path(str(data["output_dir"])).expanduser()
    else:
        out = Path("outputs") / "eval" / _slug(path.stem)
    return Manifest(name=name, path=path, clips=_clips(base, data.get("clips")),
                    runs=_runs(base, data.get("runs"), data.get("model")), output_dir=out,
                    device=str(data.get("device", "auto")), threads=data.get("threads"),
                    syncnet=_path(base, metrics.get("syncnet"), "SyncNet weights"),
                    arcface=_path(base, metrics.get("arcface"), "ArcFace weights"),
                    rule=SuccessRule.from_dict(metrics.get("success")),
                    mouth_dilate=float(metrics.get("mouth_dilate", 0.15)))
