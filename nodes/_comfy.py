"""What the nodes need from ComfyUI itself: model folders, downloads on request, model management, progress and
interruption. Everything else the nodes do is a call into omnisync_core."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from ..omnisync_core.errors import InputError
from ..omnisync_core.audio.waveform import comfy_audio_channels
from ..omnisync_core.frames import fps_fraction
from ..omnisync_core.model.bundle import DEMO_MODEL

log = logging.getLogger("omnisync")

MODEL_FOLDER = "omnisync"
DEMO_ENTRY = "omnisync_demo (bundled)"
FROM_BUNDLE = "from bundle"
AUTO = "auto"
# ComfyUI folders that may hold a family's main checkpoint, after models/omnisync (HuMo and Wan ship in
# diffusion_models; older installs call it unet)
FAMILY_MODEL_FOLDERS = ("diffusion_models", "unet")
# ComfyUI's folder for each companion role of omnisync_core.families.base.FOLDERS
COMPANION_FOLDERS = ("vae", "audio_encoders", "text_encoders", "clip_vision", "model_patches")


# --------------------------------------------------------------------------------------------------- model folders

def register_model_folders() -> None:
    """``models/omnisync`` (safetensors only) next to ComfyUI's ``vae`` and ``audio_encoders``. Folders given in
    extra_model_paths.yaml under ``omnisync:`` are kept, and searched before the default one."""
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    folder_paths.add_model_folder_path(MODEL_FOLDER, default)        # creates the entry or appends the default
    paths, extensions = folder_paths.folder_names_and_paths[MODEL_FOLDER]
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(extensions) | {".safetensors"})
    for name in (*COMPANION_FOLDERS, *FAMILY_MODEL_FOLDERS):
        if name not in folder_paths.folder_names_and_paths:        # older ComfyUI without audio_encoders ...
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def _safetensors(names: list[str]) -> list[str]:
    return [n for n in names if n.lower().endswith(".safetensors")]


def _family_models(folder: str) -> list[str]:
    """The files in ``folder`` whose header is a model family's main checkpoint (HuMo, LatentSync, Wan I2V ...),
    not every diffusion model the user has."""
    from ..omnisync_core.families.files import recognise_cached

    names = []
    for name in _safetensors(folder_paths.get_filename_list(folder)):
        try:
            found = recognise_cached(Path(folder_paths.get_full_path(folder, name)))
        except Exception:       # unreadable or unknown files are simply not offered
            continue
        if found.role == "model" and found.family is not None:
            names.append(name)
    return names


def model_choices() -> list[str]:
    """The bundled demo, everything in models/omnisync, and the family checkpoints in models/diffusion_models."""
    names = [DEMO_ENTRY] + _safetensors(folder_paths.get_filename_list(MODEL_FOLDER))
    for folder in FAMILY_MODEL_FOLDERS:
        names += [n for n in _family_models(folder) if n not in names]
    return names


def part_choices(folder: str, first: str = FROM_BUNDLE) -> list[str]:
    return [first] + _safetensors(folder_paths.get_filename_list(folder))


def resolve_model(name: str) -> Path:
    if name == DEMO_ENTRY:
        if not DEMO_MODEL.is_file():
            raise InputError(f"The bundled demo model is not installed (expected at {DEMO_MODEL}); put an OmniSync "
                             f"model in models/{MODEL_FOLDER} and choose it instead.")
        return DEMO_MODEL
    for folder in (MODEL_FOLDER, *FAMILY_MODEL_FOLDERS):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return Path(path)
    raise InputError(f"model {name!r} was not found in models/{MODEL_FOLDER} "
                     f"({', '.join(folder_paths.get_folder_paths(MODEL_FOLDER))}) nor in models/diffusion_models.")


def model_index():
    """omnisync_core's index of ComfyUI's own model folders (every path extra_model_paths.yaml adds too)."""
    from ..omnisync_core.families.base import FOLDERS
    from ..omnisync_core.families.files import ModelIndex

    names = dict.fromkeys(f for fs in FOLDERS.values() for f in fs if f in folder_paths.folder_names_and_paths)
    return ModelIndex.from_folders({n: [Path(p) for p in folder_paths.get_folder_paths(n)] for n in names},
                                   "ComfyUI's models")


def resolve_part(folder: str, name: str) -> Path:
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise InputError(f"{name!r} was not found in models/{folder}.")
    return Path(path)


def download_model(spec: str) -> Path:
    """Fetch ``owner/repo/path/in/repo.safetensors`` from the Hugging Face Hub into the first ``models/omnisync``
    folder, unless it is already there. Only ever called when the user fills in the loader's download field."""
    spec = spec.strip().strip("/")
    parts = spec.split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith(".safetensors"):
        raise InputError(f"download takes owner/repo/file.safetensors (safetensors only), got {spec!r}")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    target_dir = Path(folder_paths.get_folder_paths(MODEL_FOLDER)[0])
    local = target_dir / filename
    if local.is_file():
        return local
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise InputError("downloading needs huggingface_hub: install the packages listed in this pack's "
                         "requirements.txt") from None
    target_dir.mkdir(parents=True, exist_ok=True)
    log.info("OmniSync: downloading %s from %s into %s", filename, repo_id, target_dir)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=str(target_dir)))
    except Exception as error:  # the hub client raises many types; the user needs one line
        raise InputError(f"could not download {filename} from {repo_id}: {error}") from None


# --------------------------------------------------------------------------------------------- model management

def _precision(name: str, device: torch.device) -> torch.dtype:
    if name == "fp32":
        return torch.float32
    if name == "fp16":
        return torch.float16
    if name == "bf16":
        return torch.bfloat16
    if mm.is_device_cpu(device):
        return torch.float32
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


@dataclass
class OmniSyncModel:
    """The OMNISYNC_MODEL socket: the DiT, the VAE (or pixel codec) and the Whisper encoder, each under a ComfyUI
    ModelPatcher so that ComfyUI loads them onto its device and offloads them when memory is needed."""

    name: str
    dit: torch.nn.Module
    vae: torch.nn.Module
    audio_encoder: torch.nn.Module
    defaults: dict
    dtype: torch.dtype
    patchers: dict = field(default_factory=dict)

    @staticmethod
    def wrap(name, dit, vae, audio_encoder, defaults, precision: str = "auto") -> "OmniSyncModel":
        device, offload = mm.get_torch_device(), mm.unet_offload_device()
        dtype = _precision(precision, device)
        dit.to(offload, dtype).eval()
        vae.to(offload).eval()
        audio_encoder.to(offload).eval()
        patchers = {part: comfy.model_patcher.ModelPatcher(module, load_device=device, offload_device=offload)
                    for part, module in (("dit", dit), ("vae", vae), ("audio", audio_encoder))}
        return OmniSyncModel(name, dit, vae, audio_encoder, dict(defaults or {}), dtype, patchers)

    @property
    def device(self) -> torch.device:
        return self.patchers["dit"].load_device

    def load(self, *parts: str) -> torch.device:
        """Put these parts on ComfyUI's device (freeing other models if needed) and return the device."""
        mm.load_models_gpu([self.patchers[p] for p in parts], force_full_load=True)
        return self.device

    def offload(self, *parts: str) -> None:
        """Hand these parts back to the offload device through ComfyUI's model management."""
        wanted = [self.patchers[p] for p in parts]
        for index in range(len(mm.current_loaded_models) - 1, -1, -1):
            loaded = mm.current_loaded_models[index]
            if any(loaded.model is patcher for patcher in wanted):
                loaded.model_unload()
                mm.current_loaded_models.pop(index)
        mm.soft_empty_cache()

    def generator(self, sampler=None, step_callback=None):
        """The window generator of this model, running on ComfyUI's device (load its parts first)."""
        from ..omnisync_core.generator import OmniSyncGenerator

        d = self.defaults
        return OmniSyncGenerator(self.dit, self.vae, sampler, device=self.device, dtype=self.dtype,
                                 step_callback=step_callback, audio_encoder=self.audio_encoder,
                                 audio_before=int(d.get("audio_before", 2)), audio_after=int(d.get("audio_after", 2)))

    def default(self, key: str, value: Any, fallback: Any, unset: Any = 0) -> Any:
        """``value``, or the model's default for ``key`` when the user left the widget at ``unset``."""
        return self.defaults.get(key, fallback) if value == unset else value

    window_rule = "4k+1"

    def window_length(self, fps, requested: int = 0) -> int:
        return int(requested or self.defaults.get("window", 81))

    def steps_per_window(self, sampler) -> int:
        """Sampler steps one window runs: the schedule's steps below tau."""
        from ..omnisync_core.sampling import flow_sigmas, truncate_sigmas

        return len(truncate_sigmas(flow_sigmas(sampler.steps, sampler.shift), sampler.tau)) - 1


_LOADED: dict = {}      # one family generator at a time, by what it was loaded from


def _conditioning_key(conditioning) -> Optional[str]:
    """A digest of ComfyUI CONDITIONING's tensors: the same prompt encoded again gives the same key."""
    if conditioning is None:
        return None
    digest = hashlib.sha1()
    for part in conditioning:
        while isinstance(part, (list, tuple)) and part:
            part = part[0]
        if isinstance(part, torch.Tensor):
            digest.update(str((tuple(part.shape), part.dtype)).encode())
            digest.update(part.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class FamilyModel:
    """The OMNISYNC_MODEL socket for the model families other than OmniSync's own (HuMo, LatentSync,
    InfiniteTalk): the files and the memory plan. The weights load on first use through the family
    (``family.load``) and stay loaded, for the next node and the next run, while the same files, text and plan are
    asked for (one family model at a time: another one frees it); other sampling settings are given to the loaded
    generator (``family.retune``). While it loads and runs, ComfyUI's own models leave the GPU; the family places
    its models as the plan says (offload, fp8, block swap)."""

    name: str
    family: Any
    files: Any
    plan: Any
    defaults: dict

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def dtype(self) -> torch.dtype:
        return self.plan.dtype

    @property
    def key(self) -> tuple:
        f = self.files
        return (self.family.name, str(f.model), tuple(sorted((k, str(v)) for k, v in f.companions.items())),
                f.prompt, f.negative_prompt, str(f.prompt_embeds), _conditioning_key(f.conditioning),
                self.plan.describe())

    def load(self, *parts: str) -> torch.device:
        """Make room on the device: ComfyUI's own models go back to the host while a family model runs."""
        mm.unload_all_models()
        mm.soft_empty_cache()
        return self.device

    def offload(self, *parts: str) -> None:
        """The family keeps its own models where its plan says."""

    default = OmniSyncModel.default

    @property
    def window_rule(self) -> str:
        return self.family.window_rule

    def steps_per_window(self, sampler) -> int:
        return self.family.steps_per_window(self.options(sampler), self.files)

    def window_length(self, fps, requested: int = 0) -> int:
        return self.family.window_length(fps_fraction(fps), int(requested) or None, self.files)

    def options(self, sampler=None):
        from ..omnisync_core.families.base import GenerationOptions

        if sampler is None:
            return GenerationOptions()
        guidance = None if sampler.guidance == AUTO else sampler.guidance
        return GenerationOptions(steps=int(sampler.steps), tau=float(sampler.tau), guidance=guidance)

    def generator(self, sampler=None, step_callback=None):
        """The family's window generator, loaded once and given the ``sampler``'s options (the stages that do
        not sample, given none, keep what it has)."""
        options, key = self.options(sampler), self.key
        generator = _LOADED.get(key)
        if generator is None or (sampler is not None and not self.family.retune(generator, self.files, options)):
            release_family_models()
            self.load()
            notice = self.family.notice_for(self.files)
            if notice:
                log.warning("OmniSync: %s", notice)
            generator = self.family.load(self.files, self.plan, options)
            _LOADED[key] = generator
        generator.step_callback = step_callback
        return generator


def release_family_models() -> None:
    """Free the loaded family model's weights."""
    _LOADED.clear()
    gc.collect()
    mm.soft_empty_cache()


# ------------------------------------------------------------------------------------------- progress, interrupts

class Progress:
    """A ComfyUI progress bar that also stops the work when the user presses Cancel (checked at every update, i.e.
    between face batches, windows and sampler steps)."""

    def __init__(self, total: int = 1):
        self.bar = comfy.utils.ProgressBar(max(1, total))
        self.steps_done = 0

    def check(self) -> None:
        mm.throw_exception_if_processing_interrupted()

    def stage(self, stage: str, done: int, total: int) -> None:
        """``progress(stage, done, total)`` callback of omnisync_core."""
        self.check()
        self.bar.update_absolute(done, max(1, total))

    def counter(self, done: int, total: int) -> None:
        self.check()
        self.bar.update_absolute(done, max(1, total))

    def step_bar(self, total_steps: int):
        """A sampler step callback that advances one bar over ``total_steps`` steps in all."""
        self.steps_done = 0
        self.bar.update_absolute(0, max(1, total_steps))

        def step(_index: int, _total: int, _x) -> None:
            self.check()
            self.steps_done += 1
            self.bar.update_absolute(min(self.steps_done, total_steps), max(1, total_steps))

        return step


# ------------------------------------------------------------------------------------------------- type helpers

def read_audio(audio: Mapping) -> tuple[torch.Tensor, int]:
    """ComfyUI AUDIO -> float32 ``[C, N]`` and its rate (read by key; integer PCM normalised)."""
    return comfy_audio_channels(audio)


def comfy_audio(samples: torch.Tensor, rate: int) -> dict:
    """float32 ``[C, N]`` -> ComfyUI AUDIO."""
    return {"waveform": samples.unsqueeze(0).contiguous().float(), "sample_rate": int(rate)}


def read_fps(fps: float):
    return fps_fraction(float(fps))


def parse_box(text: str):
    text = (text or "").strip()
    if not text:
        return None
    try:
        box = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise InputError(f"box takes x0,y0,x1,y1 in pixels (x1 > x0, y1 > y0), got {text!r}")
    return box


_ANALYZERS: dict = {}


def face_analyzer(detector: str, device: torch.device):
    """The face analyzer for ``detector`` on ``device``, built once per process and reset for each video.
    Rebuilding it every run re-read its three weight files, ~70 ms and ~20 KB that safetensors' ``get_tensor``
    never gives back (about 56 bytes a call, in 0.8.0)."""
    if detector == "none":
        return None
    from ..omnisync_core.face.analyze import FaceAnalyzer

    key = (detector, str(device))
    if key not in _ANALYZERS:
        _ANALYZERS[key] = FaceAnalyzer(device=device, detector=detector)
    analyzer = _ANALYZERS[key]
    analyzer.reset()                    # it follows faces from frame to frame: start each video afresh
    return analyzer
