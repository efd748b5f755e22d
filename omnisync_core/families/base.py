"""What a model family is (DESIGN.md §9): how its checkpoints are recognised (keys and shapes, never file names),
which companion files it needs and where ComfyUI keeps them, its trained window and fps, its defaults, its memory
plan, and how it builds a window generator (:class:`~omnisync_core.job.WindowGenerator`) from its files.

The lip-sync job never names a family: the CLI and the nodes ask :func:`omnisync_core.families.family_of` for the
family of the user's checkpoint and hand the job whatever generator that family builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ..errors import InputError

ROLES = ("model", "patch", "vae", "audio_encoder", "text_encoder", "clip_vision", "base")

# ComfyUI's models/ subfolders for each role, first the one a file is usually put in.
FOLDERS: dict[str, tuple[str, ...]] = {
    "model": ("diffusion_models", "omnisync", "unet", "checkpoints"),
    "patch": ("model_patches", "diffusion_models", "loras"),
    "vae": ("vae",),
    "audio_encoder": ("audio_encoders", "omnisync"),
    "text_encoder": ("text_encoders", "clip"),
    "clip_vision": ("clip_vision",),
}

# The CLI flag that names each companion.
FLAGS = {"patch": "--patch", "vae": "--vae", "audio_encoder": "--audio-encoder", "text_encoder": "--text-encoder",
         "clip_vision": "--clip-vision"}


@dataclass(frozen=True)
class RemoteFile:
    """A file an opt-in download fetches: where it lives on the Hugging Face Hub and the ComfyUI ``models/``
    subfolder it goes to (``size``: approximate, for the plan that is printed first; ``local_name``: the file's
    name there, when the Hub's is too generic for a shared folder, e.g. diffusers' ``diffusion_pytorch_model``)."""

    repo: str
    path: str            # inside the repo
    folder: str
    size: str
    local_name: str = ""

    @property
    def name(self) -> str:
        return self.local_name or self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Recognition:
    """What a safetensors file is. ``kind`` names the architecture (``"humo"``, ``"wan-vae"``, ``"whisper"`` ...),
    ``role`` what it is for in a job (:data:`ROLES`), ``label`` the name users know (``"HuMo 1.7B"``), ``family``
    the family whose main checkpoint it is (None for a companion several families share), ``params`` its size."""

    kind: str
    role: str
    label: str
    params: int
    family: Optional[str] = None
    details: str = ""

    def describe(self) -> str:
        size = f"{self.params / 1e9:.2f} B" if self.params >= 1e8 else f"{self.params / 1e6:.2f} M"
        what = f"{self.label}: {'model' if self.role == 'model' else self.role.replace('_', ' ')}"
        family = f" of the {self.family} family" if self.family else ""
        return f"{what}{family}, {size} parameters" + (f" ({self.details})" if self.details else "")


@dataclass(frozen=True)
class Companion:
    """A file a family needs beside its main checkpoint: its ``role``, the kinds of file that fill it, whether the
    job can run without it, and the file name artists usually have (for error messages)."""

    role: str
    kinds: tuple[str, ...]
    usual_file: str
    required: bool = True

    @property
    def flag(self) -> str:
        return FLAGS[self.role]

    @property
    def folders(self) -> tuple[str, ...]:
        return FOLDERS[self.role]


@dataclass
class ModelFiles:
    """The files of one job: the main checkpoint, what was recognised in it, and the companions by role. ``prompt``
    / ``negative_prompt`` (text) or ``prompt_embeds`` (a file from ``omnisync encode-prompt``) or ``conditioning``
    (positive, negative tensors from ComfyUI's own text encoder) condition the families that take text."""

    model: Path
    recognition: Recognition
    companions: dict[str, Path] = field(default_factory=dict)
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    prompt_embeds: Optional[Path] = None
    conditioning: Optional[tuple] = None

    def need(self, role: str) -> Path:
        if role not in self.companions:
            raise InputError(f"{self.recognition.label} needs a {role.replace('_', ' ')} file ({FLAGS[role]}, or "
                             f"--models-dir with it in {FOLDERS[role][0]}/)")
        return self.companions[role]


@dataclass(frozen=True)
class MemoryPlan:
    """Where and how a family's models run: compute ``dtype``; ``offload`` "none" (everything stays on the device),
    "model" (each model moves to the device for its stage and back) or "sequential" (also the DiT's blocks, one at a
    time: the slowest, for 8 GB cards); ``fp8`` stores the big linear weights in float8 e4m3 with scales;
    ``swap_blocks`` keeps that many transformer blocks in host memory (block swap)."""

    device: torch.device
    dtype: torch.dtype
    offload: str = "none"
    fp8: bool = False
    swap_blocks: int = 0

    def describe(self) -> str:
        parts = [str(self.device), str(self.dtype).replace("torch.", "")]
        if self.offload != "none":
            parts.append(f"{self.offload} offload")
        if self.fp8:
            parts.append("fp8 weights")
        if self.swap_blocks:
            parts.append(f"{self.swap_blocks} blocks swapped")
        return ", ".join(parts)


OFFLOAD_MODES = ("none", "model", "sequential")


@dataclass
class GenerationOptions:
    """The sampling knobs every family understands; None takes the family's default (:attr:`Family.defaults`).
    ``guidance``: "ds-cfg" (DS-CFG's spatio-temporal weight on the audio term), "cfg" (one scale everywhere) or
    "none". ``audio_scale`` / ``text_scale`` / ``image_scale``: the guidance scales of each condition (families use
    those they have). ``mask_dilation``: how far past the lower face (a fraction of the face width) the model may
    change the latent; outside it the noised source is put back at every step (families trained as generators).
    ``extra``: family-specific options by name. ``guidance`` None takes the family's (``"ds-cfg"`` unless its
    defaults say otherwise)."""

    steps: Optional[int] = None
    shift: Optional[float] = None
    tau: Optional[float] = None
    guidance: Optional[str] = None
    audio_scale: Optional[float] = None
    text_scale: Optional[float] = None
    image_scale: Optional[float] = None
    mask_dilation: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self, defaults: Mapping[str, Any]) -> "GenerationOptions":
        """These options with every None filled from ``defaults``."""
        values = {name: defaults.get(name) if getattr(self, name) is None else getattr(self, name)
                  for name in ("steps", "shift", "tau", "audio_scale", "text_scale", "image_scale", "mask_dilation")}
        guidance = self.guidance or defaults.get("guidance", "ds-cfg")
        return replace(self, **values, guidance=guidance, extra={**defaults.get("extra", {}), **self.extra})


StepCallback = Callable[[int, int, Any], None]


class Family:
    """One model family. Subclasses set the class attributes and implement :meth:`recognise` and :meth:`load`.

    ``trained_fps``: the frame rate the model was trained at (None: any rate; the family's audio front-end aligns
    to the source's frame times); ``trained_window``: video frames per window at that rate; ``window_rule``: what a
    window length must be (:data:`~omnisync_core.timeline.WINDOW_RULES`: "4k+1" behind Wan's causal VAE, "any"
    for plain frame counts); ``defaults``: sampling
    defaults (keys of :class:`GenerationOptions`, plus ``window``, ``overlap`` and ``crop_size`` for the job);
    ``companions``: the other files it needs; ``downloads``: what ``omnisync download NAME`` fetches for it, by
    NAME (opt-in, through huggingface_hub; :meth:`after_download` then prepares them, e.g. converts pickles)."""

    name: str = ""
    title: str = ""
    licence: str = ""
    trained_fps: Optional[Fraction] = None
    trained_window: int = 81
    window_rule: str = "4k+1"
    defaults: dict[str, Any] = {}
    companions: tuple[Companion, ...] = ()
    downloads: dict[str, tuple[RemoteFile, ...]] = {}
    notice: Optional[str] = None

    def recognise(self, tensors: Mapping, metadata: Mapping[str, str]) -> Optional[Recognition]:
        """What the header ``tensors`` (name -> TensorInfo) and ``metadata`` say, if this family's main
        checkpoint; None otherwise. Reads shapes only (a 14B file is recognised in milliseconds)."""
        raise NotImplementedError

    def companion_roles(self, files: "ModelFiles | None" = None) -> tuple[Companion, ...]:
        """The companions this main checkpoint needs (a bundle may carry its own: then fewer)."""
        return self.companions

    def window_length(self, fps: Fraction, requested: Optional[int] = None, files: Optional[ModelFiles] = None
                      ) -> int:
        """Output frames per window at the source's ``fps``: ``requested`` if given, else as many as make up the
        trained window at the trained rate (4k + 1, as the job's windows are)."""
        if requested:
            return int(requested)
        if self.trained_fps is None:
            return int(self.defaults_for(files).get("window", self.trained_window))
        frames = int((self.trained_window - 1) / self.trained_fps * Fraction(fps)) + 1
        return max(5, frames - (frames - 1) % 4)

    def memory_plan(self, device: torch.device, dtype: Optional[torch.dtype] = None, offload: str = "none",
                    fp8: bool = False, swap_blocks: int = 0, recognition: Optional[Recognition] = None) -> MemoryPlan:
        """The plan for ``device``: bf16 on CUDA (fp16 where bf16 is missing), fp32 on the CPU, unless ``dtype``."""
        if offload not in OFFLOAD_MODES:
            raise InputError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
        if dtype is None:
            if device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                dtype = torch.float32
        return MemoryPlan(device, dtype, offload, bool(fp8), int(swap_blocks))

    def load(self, files: ModelFiles, plan: MemoryPlan, options: GenerationOptions,
             step_callback: Optional[StepCallback] = None, progress=None):
        """A window generator for ``files``, with its models placed as ``plan`` says."""
        raise NotImplementedError

    def steps_per_window(self, options: GenerationOptions, files: Optional[ModelFiles] = None) -> int:
        """Model steps one window runs with ``options`` (for progress bars): the flow schedule's steps below tau
        (progressive init); a family whose shift is picked later (None) is counted at shift 5."""
        from ..sampling import flow_sigmas, truncate_sigmas

        opts = options.resolved(self.defaults_for(files))
        shift = 5.0 if opts.shift is None else float(opts.shift)
        return len(truncate_sigmas(flow_sigmas(int(opts.steps or 50), shift), float(opts.tau or 1.0))) - 1

    def retune(self, generator, files: ModelFiles, options: GenerationOptions) -> bool:
        """Give a loaded ``generator`` other sampling ``options`` without reloading its weights (the ComfyUI
        nodes keep one loaded between runs). True when done; False when it must be loaded anew. This default
        covers generators that read a resolved :class:`GenerationOptions` ``options`` attribute at each window."""
        if not isinstance(getattr(generator, "options", None), GenerationOptions):
            return False
        generator.options = options.resolved(self.defaults_for(files))
        return True

    def defaults_for(self, files: Optional[ModelFiles] = None) -> dict[str, Any]:
        """The defaults for these files: the family's, overridden by what the file itself carries."""
        return dict(self.defaults)

    def after_download(self, name: str, paths: list[Path], say: Callable[[str], None]) -> list[Path]:
        """Make the downloaded ``paths`` of ``name`` ready to use (default: they are); returns the usable files."""
        return paths

    def notice_for(self, files: ModelFiles) -> Optional[str]:
        """One line the CLI and the nodes print when these files run (e.g. that a demo is not a real model)."""
        return self.notice


__all__ = ["Companion", "FLAGS", "FOLDERS", "Family", "GenerationOptions", "MemoryPlan", "ModelFiles",
           "OFFLOAD_MODES", "ROLES", "Recognition", "RemoteFile", "StepCallback"]
