"""The OmniSync family: our own DiT (the bundled demo and what ``omnisync train`` makes), as a one-file bundle
(DiT + VAE + Whisper + defaults) or a DiT checkpoint with a Wan VAE and a Whisper encoder beside it."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from ..errors import InputError
from .base import Companion, Family, GenerationOptions, MemoryPlan, ModelFiles, Recognition
from .components import param_count

DEMO_NOTICE = ("note: this is the bundled demo model, trained on synthetic cartoon faces at 64 px: on real footage it "
               "paints a smear. For real faces use a real family: HuMo 1.7B (--model humo_1.7B_fp16.safetensors; "
               "LatentSync 1.6 and InfiniteTalk are next); see the README's 'Which model' table.")


def _json(metadata: Mapping[str, str], key: str) -> dict:
    try:
        value = json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def is_demo(metadata: Mapping[str, str]) -> bool:
    return _json(metadata, "model_card").get("name") == "omnisync-demo"


class OmniSyncFamily(Family):
    name = "omnisync"
    title = "OmniSync"
    licence = "Apache-2.0 (the bundled demo)"
    trained_fps = None          # Whisper tokens are aligned to the source's own frame times
    trained_window = 81
    defaults = {"steps": 50, "shift": 5.0, "tau": 0.92, "audio_scale": 4.5, "window": 81, "overlap": 8,
                "crop_size": 512}
    companions = (Companion("vae", ("wan-vae",), "wan_2.1_vae.safetensors"),
                  Companion("audio_encoder", ("whisper-tiny", "whisper-base", "whisper-small", "whisper-medium",
                                              "whisper-large-v2", "whisper-large-v3", "whisper"),
                            "the Whisper encoder the DiT was trained with"))

    def recognise(self, tensors: Mapping, metadata: Mapping[str, str]) -> Optional[Recognition]:
        if metadata.get("format") != "omnisync" or metadata.get("kind") not in ("bundle", "dit"):
            return None
        dit = _json(metadata, "dit_config")
        shape = f"dim {dit['dim']}, {dit['num_layers']} layers" if {"dim", "num_layers"} <= dit.keys() else ""
        if metadata["kind"] == "bundle":
            crop = _json(metadata, "defaults").get("crop_size")
            if is_demo(metadata):
                return Recognition("omnisync-bundle", "model", "OmniSync demo", param_count(tensors), self.name,
                                   f"{crop} px crops, trained on synthetic cartoon faces; DiT {shape}")
            return Recognition("omnisync-bundle", "model", "OmniSync bundle", param_count(tensors), self.name,
                               ", ".join(p for p in (f"{crop} px crops" if crop else "", f"DiT {shape}") if p))
        return Recognition("omnisync-dit", "model", "OmniSync DiT", param_count(tensors), self.name, shape)

    def companion_roles(self, files: Optional[ModelFiles] = None) -> tuple[Companion, ...]:
        if files is not None and files.recognition.kind == "omnisync-bundle":
            return ()
        return self.companions

    def _metadata(self, files: Optional[ModelFiles]) -> dict:
        if files is None:
            return {}
        from ..model.loading import read_header

        return read_header(files.model)[1]

    def defaults_for(self, files: Optional[ModelFiles] = None) -> dict[str, Any]:
        return {**self.defaults, **_json(self._metadata(files), "defaults")}

    def notice_for(self, files: ModelFiles) -> Optional[str]:
        return DEMO_NOTICE if is_demo(self._metadata(files)) else None

    def load(self, files: ModelFiles, plan: MemoryPlan, options: GenerationOptions, step_callback=None,
             progress=None):
        from ..generator import OmniSyncGenerator, SamplerOptions
        from ..model.bundle import ModelBundle, load_bundle
        from ..model.loading import load_dit, load_vae, load_whisper

        if plan.offload != "none" or plan.fp8 or plan.swap_blocks:
            raise InputError("the OmniSync family runs without offload, fp8 or block swap (its models are small)")
        if files.recognition.kind == "omnisync-bundle":
            bundle = load_bundle(files.model, device=plan.device)
        else:
            bundle = ModelBundle(load_dit(files.model, device=plan.device),
                                 load_vae(files.need("vae"), device=plan.device),
                                 load_whisper(files.need("audio_encoder"), device=plan.device))
        bundle.dit.to(plan.dtype)
        defaults = {**self.defaults_for(files), **bundle.defaults}
        opts = options.resolved(defaults)
        sampler = SamplerOptions(steps=int(opts.steps), shift=float(opts.shift), tau=float(opts.tau),
                                 guidance=opts.guidance, cfg_scale=float(opts.audio_scale))
        return OmniSyncGenerator(bundle.dit, bundle.vae, sampler, device=plan.device, dtype=plan.dtype,
                                 step_callback=step_callback, audio_encoder=bundle.audio_encoder,
                                 audio_before=int(defaults.get("audio_before", 2)),
                                 audio_after=int(defaults.get("audio_after", 2)))


FAMILY = OmniSyncFamily()
