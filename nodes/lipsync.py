"""OmniSync Lip Sync (IMAGE + AUDIO -> IMAGE + AUDIO, all in one node) and OmniSync Lip Sync (Video), which streams
a VIDEO file to a VIDEO file in the output folder in constant memory."""

from __future__ import annotations

import os
import tempfile

from comfy_api.latest import InputImpl, io, ui

import folder_paths

from ..omnisync_core.frames import aligned_audio, lipsync_frames
from ..omnisync_core.io import probe_video
from ..omnisync_core.pipeline import LipSyncPipeline
from ._comfy import OmniSyncModel, Progress, comfy_audio, face_analyzer, read_audio, read_fps
from .options import face_inputs, lipsync_options, sampler_inputs, sampler_options, seed_input, tau_input, \
    window_inputs
from .sockets import CATEGORY, OmniSyncModelType


def _common_inputs() -> list:
    return [seed_input(), *sampler_inputs(), tau_input(), *face_inputs(), *window_inputs(),
            io.Boolean.Input("color_match", default=False,
                             tooltip="Match the edited face's colours to the source before pasting it back.")]


def _setup(model: OmniSyncModel, kw: dict, fps):
    options = lipsync_options(model, length_policy=kw["length_policy"], detector=kw["detector"],
                              face_index=kw["face_index"], box=kw["box"], crop_size=kw["crop_size"],
                              crop_margin=kw["crop_margin"], window=kw["window"], overlap=kw["overlap"],
                              seed=kw["seed"], color_match=kw["color_match"], fps=fps)
    sampler = sampler_options(model, steps=kw["steps"], tau=kw["tau"], guidance=kw["guidance"])
    return options, sampler


def _total_steps(model, sampler, options, num_video_frames: int, samples, rate, fps) -> int:
    """Sampler steps of the whole run (windows x the model's steps per window), for one progress bar over all."""
    from ..omnisync_core.audio.track import AudioTrack
    from ..omnisync_core.timeline import plan_timeline, plan_windows

    audio_frames = AudioTrack.from_samples(samples, rate).num_frames(fps)
    timeline = plan_timeline(max(1, num_video_frames), max(1, audio_frames), options.length_policy)
    windows = plan_windows(timeline.num_frames, options.window, options.overlap, options.window_rule)
    return max(1, model.steps_per_window(sampler) * len(windows))


def _reporter(progress: Progress, generator, total_steps: int):
    """core's progress(stage, done, total): the face pass fills the bar once, then it restarts over every sampler
    step of every window; Cancel is honoured at each call."""

    def report(stage: str, done: int, total: int) -> None:
        if stage == "faces":
            progress.stage(stage, done, total)
            if done >= total:
                generator.step_callback = progress.step_bar(total_steps)
        else:
            progress.check()

    return report


class OmniSyncLipSync(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncLipSync",
            display_name="OmniSync Lip Sync",
            category=CATEGORY,
            description="Makes the mouth in the frames follow the audio, in one node: face tracking and crop, audio "
                        "features, progressive noise init, DS-CFG sampling window by window, and paste-back. No "
                        "mask and no reference image; works on real and stylized faces. Returns the frames, the "
                        "audio trimmed or padded to exactly their length, the frame count and fps (connect them to "
                        "Create Video).",
            inputs=[
                OmniSyncModelType.Input("model", tooltip="The model from OmniSync Model Loader."),
                io.Image.Input("images", tooltip="The video frames (e.g. from Get Video Components)."),
                io.Audio.Input("audio", tooltip="The speech the mouth should follow (e.g. from Load Audio)."),
                io.Float.Input("fps", default=25.0, min=1.0, max=1000.0, step=0.001,
                               tooltip="Frame rate of the frames (connect Get Video Components' fps)."),
                *_common_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The lip-synced frames."),
                io.Audio.Output(display_name="audio", tooltip="The audio, exactly as long as the frames."),
                io.Int.Output(display_name="frame_count", tooltip="Number of output frames."),
                io.Float.Output(display_name="fps", tooltip="Frame rate of the output."),
            ],
        )

    @classmethod
    def execute(cls, model: OmniSyncModel, images, audio, fps: float, **kw) -> io.NodeOutput:
        samples, rate = read_audio(audio)
        rate_fps = read_fps(fps)
        options, sampler = _setup(model, kw, rate_fps)
        total = _total_steps(model, sampler, options, images.shape[0], samples, rate, rate_fps)
        progress = Progress(images.shape[0])
        model.load("audio", "dit", "vae")
        generator = model.generator(sampler, step_callback=progress.step_bar(total))
        result = lipsync_frames(images, samples, rate, rate_fps, generator,
                                face_analyzer=face_analyzer(kw["detector"], model.device), options=options,
                                progress=_reporter(progress, generator, total))
        progress.bar.update_absolute(total, total)
        return io.NodeOutput(result.frames, comfy_audio(result.audio, result.sample_rate), result.num_frames,
                             float(result.fps))


class OmniSyncLipSyncVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncLipSyncVideo",
            display_name="OmniSync Lip Sync (Video)",
            category=CATEGORY,
            description="Lip-syncs a whole video file to the audio and writes the result (H.264 + AAC, the "
                        "input's exact frame rate) to the output folder, streaming window by window: memory stays "
                        "constant however long the video is, so hour-long clips never sit in RAM. The file appears "
                        "only once it is complete.",
            inputs=[
                OmniSyncModelType.Input("model", tooltip="The model from OmniSync Model Loader."),
                io.Video.Input("video", tooltip="The video to lip-sync (e.g. from Load Video)."),
                io.Audio.Input("audio", tooltip="The speech the mouth should follow (e.g. from Load Audio)."),
                io.String.Input("filename_prefix", default="video/OmniSync",
                                tooltip="Where to save in the output folder; a counter and .mp4 are added."),
                *_common_inputs(),
            ],
            outputs=[
                io.Video.Output(display_name="video", tooltip="The saved lip-synced video (a file, not frames)."),
                io.Audio.Output(display_name="audio", tooltip="The audio, exactly as long as the video."),
                io.Int.Output(display_name="frame_count", tooltip="Number of frames written."),
                io.Float.Output(display_name="fps", tooltip="Frame rate of the written video."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: OmniSyncModel, video, audio, filename_prefix: str, **kw) -> io.NodeOutput:
        samples, rate = read_audio(audio)
        progress = Progress()
        source, temporary = _video_path(video)
        try:
            info = probe_video(source)       # core's one-line VideoError for a corrupt or frameless file
            options, sampler = _setup(model, kw, info.fps)
            height, width = info.display_size
            folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
                filename_prefix, folder_paths.get_output_directory(), width, height)
            name = f"{filename}_{counter:05}_.mp4"
            out = os.path.join(folder, name)
            total = _total_steps(model, sampler, options, info.num_frames, samples, rate, info.fps)
            model.load("audio", "dit", "vae")
            generator = model.generator(sampler, step_callback=progress.step_bar(total))
            pipeline = LipSyncPipeline(generator, face_analyzer=face_analyzer(kw["detector"], model.device),
                                       options=options)
            result = pipeline.run(source, comfy_audio(samples, rate), out,
                                  progress=_reporter(progress, generator, total))
            progress.bar.update_absolute(total, total)
        finally:
            if temporary:
                os.unlink(source)
        track = aligned_audio(samples, rate, result.frames, result.fps)
        saved = ui.PreviewVideo([ui.SavedResult(name, subfolder, io.FolderType.output)])
        return io.NodeOutput(InputImpl.VideoFromFile(out), comfy_audio(track, rate), result.frames, float(result.fps),
                             ui=saved)


def _video_path(video) -> tuple[str, bool]:
    """A file path for a VIDEO: the file itself when it is one, else a temporary mp4 (removed after the run)."""
    try:
        source = video.get_stream_source()
    except Exception:   # frames in memory: the default implementation cannot pick a container for a buffer
        source = None
    if isinstance(source, str):            # a file (a missing one gets core's "video file not found")
        return source, False
    os.makedirs(folder_paths.get_temp_directory(), exist_ok=True)
    handle, path = tempfile.mkstemp(suffix=".mp4", dir=folder_paths.get_temp_directory())
    os.close(handle)
    try:
        if source is not None and hasattr(source, "read"):
            with open(path, "wb") as out:
                out.write(source.read())
        else:
            video.save_to(path)
    except Exception:
        os.unlink(path)
        raise
    return path, True


NODES = [OmniSyncLipSync, OmniSyncLipSyncVideo]
