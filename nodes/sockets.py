"""The pack's socket types. Each carries a typed omnisync_core object between nodes."""

from __future__ import annotations

from comfy_api.latest import io

# OmniSyncModel (nodes/_comfy.py): DiT + VAE/codec + Whisper encoder under ComfyUI model management.
OmniSyncModelType = io.Custom("OMNISYNC_MODEL")
# omnisync_core.frames.AudioEmbeds: Whisper features of the whole track, aligned to video frames.
AudioEmbedsType = io.Custom("OMNISYNC_AUDIO_EMBEDS")
# omnisync_core.frames.FacePlan: the face track, the output timeline and the crop of every output frame.
FaceTrackType = io.Custom("OMNISYNC_FACE_TRACK")
# omnisync_core.frames.LatentWindows: per-window source latents and noise (then the sampled latents).
LatentsType = io.Custom("OMNISYNC_LATENTS")

CATEGORY = "OmniSync"
