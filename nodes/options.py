"""Inputs shared by several nodes, and turning their values into omnisync_core options."""

from __future__ import annotations

from comfy_api.latest import io

from ..omnisync_core.generator import GUIDANCE_MODES, SamplerOptions
from ..omnisync_core.pipeline import LipSyncOptions
from ..omnisync_core.sampling import DSCFGParams
from ..omnisync_core.timeline import DEFAULT_LENGTH_POLICY, LENGTH_POLICIES
from ._comfy import AUTO, OmniSyncModel, parse_box

DETECTORS = ["auto", "short", "full", "none"]


def face_inputs() -> list:
    return [
        io.Combo.Input("length_policy", options=list(LENGTH_POLICIES), default=DEFAULT_LENGTH_POLICY,
                       tooltip="When the audio and the video differ in length. pingpong/loop/hold extend a short "
                               "video to the audio (back and forth, looped, or holding the last frame) and trim a "
                               "long one; trim stops at the shorter; video keeps the video's length (frames past "
                               "the audio are left untouched)."),
        io.Combo.Input("detector", options=DETECTORS, default="auto",
                       tooltip="Face detector: auto (short range, then full range for small faces), short, full, or "
                               "none (use the box, or the frame centre)."),
        io.Int.Input("face_index", default=-1, min=-1, max=16,
                     tooltip="Which face to edit when several are visible: -1 = the largest, 0 = the leftmost, "
                             "1 = the next one to the right, ..."),
        io.String.Input("box", default="", multiline=False,
                        tooltip="Optional face box x0,y0,x1,y1 in pixels, used where no face is detected. Empty: "
                                "the frame centre. A clip without a detected face never fails."),
        io.Int.Input("crop_size", default=0, min=0, max=2048, step=16,
                     tooltip="Side of the square face crop the model edits, in pixels. 0 = the model's own size "
                             "(what it was trained at)."),
        io.Float.Input("crop_margin", default=0.3, min=0.0, max=2.0, step=0.05,
                       tooltip="Extra room around the face in the crop, as a fraction of the face size."),
    ]


def window_inputs() -> list:
    return [
        io.Int.Input("window", default=0, min=0, max=257, step=4,
                     tooltip="Frames the model edits at once (4k + 1, e.g. 81). 0 = the model's default. Memory "
                             "grows with the window, not with the video's length."),
        io.Int.Input("overlap", default=-1, min=-1, max=128,
                     tooltip="Frames shared by neighbouring windows and cross-faded. -1 = the model's default."),
    ]


def sampler_inputs() -> list:
    return [
        io.Int.Input("steps", default=0, min=0, max=200,
                     tooltip="Steps of the full noise schedule; progressive init runs only those below tau. "
                             "0 = the model's default."),
        io.Combo.Input("guidance", options=[AUTO, *GUIDANCE_MODES], default=AUTO,
                       tooltip="Audio guidance: auto (the model's own: ds-cfg for OmniSync, HuMo and InfiniteTalk, "
                               "LatentSync's plain cfg 1.5), ds-cfg (strong on the mouth, early in sampling; the "
                               "paper's), cfg (one scale everywhere), or none (no unconditional pass: fastest)."),
    ]


def tau_input() -> io.Float.Input:
    return io.Float.Input("tau", default=0.0, min=0.0, max=1.0, step=0.01,
                          tooltip="Progressive noise initialisation: sampling starts from the source noised to "
                                  "this level (higher = more freedom for the mouth, less fidelity). 0 = the model's "
                                  "default (0.92 in the paper).")


def seed_input() -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                        tooltip="Random seed of the sampling noise: the same seed gives the same result.")


def guidance_scale_inputs() -> list:
    return [
        io.Float.Input("omega_peak", default=4.5, min=0.0, max=20.0, step=0.1,
                       tooltip="DS-CFG: guidance scale at the mouth centre at the start of sampling."),
        io.Float.Input("omega_base", default=1.0, min=0.0, max=20.0, step=0.1,
                       tooltip="DS-CFG: guidance scale far from the mouth."),
        io.Float.Input("gamma", default=1.5, min=0.0, max=10.0, step=0.1,
                       tooltip="DS-CFG: how fast guidance fades as sampling proceeds (weight times "
                               "(sigma / tau) ^ gamma)."),
        io.Float.Input("s_ratio", default=0.15, min=0.01, max=2.0, step=0.01,
                       tooltip="DS-CFG: width of the mouth bump as a fraction of the face width."),
        io.Float.Input("floor", default=1.0, min=0.0, max=20.0, step=0.1,
                       tooltip="DS-CFG: lowest guidance weight. 1 skips the unconditional pass wherever guidance "
                               "has faded (faster); 0 is the paper's formula exactly."),
        io.Float.Input("cfg_scale", default=4.5, min=0.0, max=20.0, step=0.1,
                       tooltip="Guidance scale of plain cfg (guidance = cfg); unused by ds-cfg and none."),
    ]


def lipsync_options(model: OmniSyncModel, *, length_policy, detector, face_index, box, crop_size, crop_margin,
                    window=0, overlap=-1, seed=0, feather=0.1, color_match=False, fps=25) -> LipSyncOptions:
    """The job's options; ``window`` 0 takes the model's (a family trained at a fixed rate: its trained span at
    ``fps``)."""
    return LipSyncOptions(
        window=model.window_length(fps, window), overlap=model.default("overlap", overlap, 8, unset=-1),
        crop_size=model.default("crop_size", crop_size, 512), crop_margin=float(crop_margin), seed=int(seed),
        length_policy=length_policy, face_index=None if face_index < 0 else int(face_index), box=parse_box(box),
        feather=float(feather), color_match=bool(color_match), window_rule=model.window_rule)


def sampler_options(model: OmniSyncModel, *, steps=0, tau=0.0, guidance=AUTO, omega_peak=4.5, omega_base=1.0,
                    gamma=1.5, s_ratio=0.15, floor=1.0, cfg_scale=4.5) -> SamplerOptions:
    """The sampler's settings; 0 / auto take the model's. The DS-CFG shape and cfg_scale are the OmniSync
    family's knobs; the other families take their own guidance scales (see the README)."""
    if guidance == AUTO and isinstance(model, OmniSyncModel):
        guidance = model.defaults.get("guidance", "ds-cfg")
    shift = model.defaults.get("shift")                  # None: the family picks it (e.g. by crop size)
    return SamplerOptions(steps=model.default("steps", steps, 50), shift=float(5.0 if shift is None else shift),
                          tau=float(model.default("tau", tau, 0.92, unset=0.0)), guidance=guidance,
                          cfg_scale=float(cfg_scale),
                          ds_cfg=DSCFGParams(omega_base=float(omega_base), omega_peak=float(omega_peak),
                                             gamma=float(gamma), s_ratio=float(s_ratio), floor=float(floor)))
