"""OmniSync Progressive Noise Init, DS-CFG Sampler and Decode: the three stages of the generator, per window."""

from __future__ import annotations

from comfy_api.latest import io

from ..omnisync_core.frames import AudioEmbeds, FacePlan, LatentWindows, decode_latents, init_latents, sample_latents
from ._comfy import OmniSyncModel, Progress
from .options import guidance_scale_inputs, sampler_inputs, sampler_options, seed_input, tau_input, window_inputs
from .sockets import CATEGORY, AudioEmbedsType, FaceTrackType, LatentsType, OmniSyncModelType


class OmniSyncNoiseInit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncNoiseInit",
            display_name="OmniSync Progressive Noise Init",
            category=CATEGORY,
            description="Cuts the face crops into overlapping windows, encodes each with the VAE and draws its "
                        "noise. Sampling starts from the source latents noised to tau (the paper's progressive "
                        "noise initialisation), which keeps pose and identity while the mouth is re-drawn.",
            inputs=[
                OmniSyncModelType.Input("model", tooltip="The model from OmniSync Model Loader (its VAE)."),
                io.Image.Input("crops", tooltip="Face crops from OmniSync Face Crop."),
                FaceTrackType.Input("face_track", tooltip="From OmniSync Face Crop: which frames get edited."),
                tau_input(),
                seed_input(),
                *window_inputs(),
            ],
            outputs=[LatentsType.Output(display_name="latents",
                                        tooltip="Source latents and noise per window, for the DS-CFG Sampler.")],
        )

    @classmethod
    def execute(cls, model: OmniSyncModel, crops, face_track: FacePlan, tau: float, seed: int, window: int,
                overlap: int) -> io.NodeOutput:
        tau = float(model.default("tau", tau, 0.92, unset=0.0))
        window = model.window_length(face_track.fps, window)
        overlap = model.default("overlap", overlap, 8, unset=-1)
        progress = Progress()
        progress.check()
        model.load("vae")
        latents = init_latents(crops, model.generator(), face_track, window, overlap, tau, seed,
                               window_callback=progress.counter)
        return io.NodeOutput(latents)


class OmniSyncSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncSampler",
            display_name="OmniSync DS-CFG Sampler",
            category=CATEGORY,
            description="Samples every window with the diffusion transformer, conditioned on the source frames and "
                        "the audio, with Dynamic Spatiotemporal CFG: audio guidance strongest on the mouth and early "
                        "in sampling, fading elsewhere. Cancel stops it between steps.",
            inputs=[
                OmniSyncModelType.Input("model", tooltip="The model from OmniSync Model Loader."),
                LatentsType.Input("latents", tooltip="From OmniSync Progressive Noise Init."),
                AudioEmbedsType.Input("audio_embeds", tooltip="From OmniSync Audio Encode."),
                FaceTrackType.Input("face_track", tooltip="From OmniSync Face Crop: the mouth of every frame."),
                *sampler_inputs(),
                *guidance_scale_inputs(),
            ],
            outputs=[LatentsType.Output(display_name="latents", tooltip="The sampled latents, for OmniSync Decode.")],
        )

    @classmethod
    def execute(cls, model: OmniSyncModel, latents: LatentWindows, audio_embeds: AudioEmbeds, face_track: FacePlan,
                steps: int, guidance: str, omega_peak: float, omega_base: float, gamma: float, s_ratio: float,
                floor: float, cfg_scale: float) -> io.NodeOutput:
        options = sampler_options(model, steps=steps, tau=latents.tau, guidance=guidance, omega_peak=omega_peak,
                                  omega_base=omega_base, gamma=gamma, s_ratio=s_ratio, floor=floor,
                                  cfg_scale=cfg_scale)
        runs = model.steps_per_window(options)
        editable = sum(1 for w in latents.windows if w.editable)
        progress = Progress()
        model.load("dit", "vae")
        generator = model.generator(options)
        sampled = sample_latents(latents, generator, audio_embeds, face_track,
                                 step_callback=progress.step_bar(max(1, editable * runs)))
        return io.NodeOutput(sampled)


class OmniSyncDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncDecode",
            display_name="OmniSync Decode",
            category=CATEGORY,
            description="Decodes the sampled latents back to face crops and cross-fades the windows' overlaps, so "
                        "there is no seam between windows.",
            inputs=[
                OmniSyncModelType.Input("model", tooltip="The model from OmniSync Model Loader (its VAE)."),
                LatentsType.Input("latents", tooltip="From OmniSync DS-CFG Sampler."),
            ],
            outputs=[io.Image.Output(display_name="crops", tooltip="The edited face crops, for OmniSync Paste Back.")],
        )

    @classmethod
    def execute(cls, model: OmniSyncModel, latents: LatentWindows) -> io.NodeOutput:
        progress = Progress(len(latents.windows))
        model.load("vae")
        crops = decode_latents(latents, model.generator(), window_callback=progress.counter)
        return io.NodeOutput(crops)


NODES = [OmniSyncNoiseInit, OmniSyncSampler, OmniSyncDecode]
