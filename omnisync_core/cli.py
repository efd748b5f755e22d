"""The ``omnisync`` command line. Each command prints one clear line on stderr and exits non-zero on bad input."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .errors import InputError, OmniSyncError


def _cmd_doctor(args: argparse.Namespace) -> int:
    """Print what this installation can use: versions, devices, optional oracles."""
    import torch

    print(f"omnisync {__version__} on Python {platform.python_version()} ({platform.machine()})")
    print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        print(f"  cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        print("  mps available")
    for module in ("av", "numpy", "safetensors", "einops", "huggingface_hub"):
        try:
            imported = __import__(module)
            print(f"{module} {getattr(imported, '__version__', '?')}")
        except ImportError:
            print(f"{module} MISSING (install the packages listed in requirements.txt)")
    return 0


def _cmd_audio_info(args: argparse.Namespace) -> int:
    """Decode an audio (or video) file's audio and report what the lip-sync pipeline will see."""
    from .audio import FrameAligner, SAMPLE_RATE, is_silent, load_audio, to_whisper_rate

    wave = load_audio(args.file)
    resampled = to_whisper_rate(wave.samples, wave.sample_rate)
    aligner = FrameAligner(args.fps)
    frames = aligner.num_frames(resampled.shape[0], SAMPLE_RATE)
    peak = float(wave.samples.abs().max())
    print(f"{args.file}: {wave.seconds:.3f} s at {wave.sample_rate} Hz, peak {peak:.3f}"
          f"{' (silent)' if is_silent(wave) else ''}")
    print(f"at {args.fps} fps this audio spans {frames} video frames")
    return 0


class ProgressBar:
    """One status line on stderr: stage, a bar, counts and an ETA (plain lines when stderr is not a terminal)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.stage, self.started, self.last_print = None, 0.0, 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self.stage:
            if self.stage is not None and self.tty:
                self.stream.write("\n")
            self.stage, self.started = stage, now
        finished = total > 0 and done >= total
        if not finished and now - self.last_print < (0.2 if self.tty else 5.0):
            return
        self.last_print = now
        fraction = done / total if total > 0 else 0.0
        elapsed = now - self.started
        eta = elapsed / fraction - elapsed if 0 < fraction < 1 else 0.0
        bar = "#" * int(24 * fraction)
        line = f"{stage:>8} [{bar:<24}] {done}/{total} {elapsed:6.1f}s" + (f" ETA {eta:6.1f}s" if eta else "")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if finished and self.tty:
            self.stream.write("\n")
            self.stage = None
        self.stream.flush()


def _parse_box(text: Optional[str]):
    if text is None:
        return None
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise InputError(f"--box takes x0,y0,x1,y1 in pixels, got {text!r}")
    return box


def _check_output(out: str, inputs: Sequence[str]) -> None:
    folder = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(folder):
        raise InputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder is not writable: {folder}")
    for path in inputs:
        if path and os.path.exists(path) and os.path.exists(out) and os.path.samefile(path, out):
            raise InputError(f"--out would overwrite the input {path}")


def _peak_memory() -> str:
    import torch

    from .memory import peak_rss_mib

    text = f"peak RAM {peak_rss_mib():.0f} MiB"
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        text += f", peak VRAM {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return text


def _cmd_lipsync(args: argparse.Namespace) -> int:
    """Lip-sync a video to an audio track with any supported model family."""
    from fractions import Fraction

    import torch

    from .families.base import GenerationOptions
    from .families.files import resolve_files
    from .io import probe_video
    from .model.bundle import DEMO_MODEL
    from .model.loading import resolve_device, resolve_dtype
    from .pipeline import LipSyncOptions, LipSyncPipeline

    for flag, path in (("--video", args.video), ("--audio", args.audio)):
        if not os.path.isfile(path):
            raise InputError(f"{flag} file not found: {path}")
    _check_output(args.out, [args.video, args.audio])
    if args.model is None and not DEMO_MODEL.is_file():
        raise InputError("no --model given and the bundled demo model is not installed")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    notes: list[str] = []
    family, files = resolve_files(args.model, args.models_dir, _companion_args(args), DEMO_MODEL, notes)
    files.prompt, files.negative_prompt = args.prompt, args.negative_prompt
    if args.prompt_embeds is not None:
        if not os.path.isfile(args.prompt_embeds):
            raise InputError(f"--prompt-embeds file not found: {args.prompt_embeds}")
        files.prompt_embeds = Path(args.prompt_embeds)
    notice = family.notice_for(files)
    if notice:
        print(notice)
    for note in notes:
        print(f"note: {note}")
    device = resolve_device(args.device)
    if args.swap_blocks < 0:
        raise InputError(f"--swap-blocks must be 0 or more, got {args.swap_blocks}")
    plan = family.memory_plan(device, resolve_dtype(args.dtype, device), offload=args.offload, fp8=args.fp8,
                              swap_blocks=args.swap_blocks, recognition=files.recognition)
    extra = {"deep_cache": False} if args.no_deep_cache else {}
    generation = GenerationOptions(steps=args.steps, tau=args.tau, guidance=args.guidance,
                                   mask_dilation=args.mask_dilation, extra=extra)
    generator = family.load(files, plan, generation, progress=ProgressBar())
    defaults = family.defaults_for(files)
    fps = Fraction(probe_video(args.video, count_frames=False).fps)
    window = family.window_length(fps, args.window, files)
    options = LipSyncOptions(window=window, overlap=args.overlap if args.overlap is not None else
                             defaults.get("overlap", 8),
                             crop_size=args.crop_size or defaults.get("crop_size", 512), seed=args.seed,
                             length_policy=args.length_policy, face_index=args.face_index, box=_parse_box(args.box),
                             color_match=args.color_match, keep_detail=not args.no_keep_detail)
    analyzer = None
    if args.detector != "none":
        from .face.analyze import FaceAnalyzer

        analyzer = FaceAnalyzer(device=device, detector=args.detector)
    pipeline = LipSyncPipeline(generator, face_analyzer=analyzer, options=options)
    report = pipeline.run(args.video, args.audio, args.out, progress=ProgressBar())
    print(f"wrote {report.output}: {report.frames} frames at {float(report.fps):.3f} fps "
          f"({report.frames / float(report.fps):.2f} s) in {report.windows} windows with "
          f"{files.recognition.label} ({plan.describe()}); "
          f"{report.seconds:.1f} s total, {report.seconds_per_output_second:.2f} s per output second; "
          f"{_peak_memory()}")
    for warning in report.warnings:
        print(f"note: {warning}")
    return 0


def _companion_args(args: argparse.Namespace) -> dict:
    return {"vae": args.vae, "audio_encoder": args.audio_encoder, "text_encoder": args.text_encoder,
            "clip_vision": args.clip_vision, "patch": args.patch}


def _cmd_encode_prompt(args: argparse.Namespace) -> int:
    """Encode a prompt pair with umT5 once and store it for --prompt-embeds."""
    from .text.prompt import encode_prompt_file

    if not os.path.isfile(args.text_encoder):
        raise InputError(f"--text-encoder file not found: {args.text_encoder}")
    _check_output(args.out, [args.text_encoder])
    path = encode_prompt_file(args.text_encoder, args.out, args.prompt, args.negative_prompt, device=args.device,
                              progress=ProgressBar())
    print(f"wrote {path}: use it with omnisync lipsync --prompt-embeds {path}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    """Fetch a family's files into a ComfyUI models folder (the only command that uses the network)."""
    from .families.download import catalogue, download, download_plan

    if args.list or not args.name:
        for name, (fam, remote) in catalogue().items():
            print(f"{name}: {fam.title} ({fam.licence}), {len(remote)} files: "
                  f"{', '.join(f'{r.name} ({r.size})' for r in remote)}")
        return 0
    if not args.models_dir:
        raise InputError("download needs --models-dir: the ComfyUI models/ folder to put the files in")
    if args.dry_run:
        for remote, target in download_plan(args.name, args.models_dir):
            print(f"{remote.repo}/{remote.path} ({remote.size}) -> {target}")
        return 0
    paths = download(args.name, args.models_dir)
    print(f"{args.name}: {len(paths)} files in {args.models_dir}; run omnisync lipsync --models-dir "
          f"{args.models_dir} --model {paths[0].name} ...")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    """Turn an upstream pickle checkpoint into safetensors without running any of its code."""
    import torch

    from .model.convert import convert_pickle

    if not os.path.isfile(args.file):
        raise InputError(f"file not found: {args.file}")
    if args.out:
        _check_output(args.out, [args.file])
    dtype = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    path = convert_pickle(args.file, args.out, expect=args.expect, dtype=dtype)
    from .families import recognise
    from .model.loading import CheckpointError

    try:
        what = recognise(path).describe()
    except CheckpointError:
        what = "converted"
    print(f"wrote {path}: {what}")
    return 0


def _cmd_import_wan(args: argparse.Namespace) -> int:
    """Turn a Wan2.1 T2V checkpoint into an OmniSync DiT initialisation (same output until trained)."""
    from .model.loading import omnisync_from_wan, save_model

    _check_output(args.out, [args.base])
    model = omnisync_from_wan(args.base, preset=args.preset, audio_dim=args.audio_dim)
    path = save_model(model, args.out, kind="dit")
    counts = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: OmniSync DiT with {counts / 1e6:.1f} M parameters (audio layers and source channels "
          f"initialised so that it equals the Wan2.1 base)")
    return 0


def _cmd_check_model(args: argparse.Namespace) -> int:
    """Say what a checkpoint is (its family and size) from its header, or in one line why it fits none."""
    from .families import recognise

    print(f"{args.file}: {recognise(args.file).describe()}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) an OmniSync model from a TOML/JSON config; torchrun launches it on several GPUs."""
    from .train.trainer import train_main

    return train_main(args.config, resume=True if args.resume else None)


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    """Turn talking-head videos (or synthetic faces) into training shards."""
    from .train.data import build_shards, synthetic_shards

    encoder = None
    if args.audio_encoder:
        from .model.loading import load_whisper

        encoder = load_whisper(args.audio_encoder)
    if args.synthetic:
        index = synthetic_shards(args.out, args.synthetic, size=args.size, seed=args.seed, audio_encoder=encoder)
    elif args.videos:
        from .face.analyze import FaceAnalyzer

        index = build_shards(args.videos, args.out, size=args.size, analyzer=FaceAnalyzer(), audio_encoder=encoder)
    else:
        raise InputError("give --videos FILES_OR_FOLDER or --synthetic N")
    print(f"wrote {index}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnisync", description="OmniSync: audio-driven lip sync of any video.")
    parser.add_argument("--version", action="version", version=f"omnisync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = commands.add_parser("doctor", help="report versions, devices and what is installed")
    doctor.set_defaults(handler=_cmd_doctor)
    info = commands.add_parser("audio-info", help="decode a file's audio and report its length in video frames")
    info.add_argument("file", help="audio or video file (any format FFmpeg reads)")
    info.add_argument("--fps", default="25", help="video frame rate, e.g. 25, 29.97 or 30000/1001 (default 25)")
    info.set_defaults(handler=_cmd_audio_info)
    _add_lipsync_parser(commands)
    __import__(f"{__package__}.eval.cli", fromlist=["add_eval_parser"]).add_eval_parser(commands)
    wan = commands.add_parser("import-wan", help="turn a Wan2.1 T2V checkpoint into an OmniSync DiT initialisation")
    wan.add_argument("--base", required=True, help="Wan2.1 T2V transformer weights (.safetensors; Wan or diffusers names)")
    wan.add_argument("--out", required=True, help="where to write the OmniSync DiT (.safetensors)")
    wan.add_argument("--preset", help="DiT preset (default: inferred from the weights)")
    wan.add_argument("--audio-dim", type=int, default=384, help="audio feature width (384 = Whisper tiny)")
    wan.set_defaults(handler=_cmd_import_wan)
    check = commands.add_parser("check-model", help="load a checkpoint and report what it is or why it does not fit")
    check.add_argument("file", help="a checkpoint (.safetensors) of any supported family, or a companion file")
    check.set_defaults(handler=_cmd_check_model)
    prompt = commands.add_parser("encode-prompt", help="encode a text prompt with umT5 once, for --prompt-embeds")
    prompt.add_argument("--text-encoder", required=True, help="umT5-xxl (umt5_xxl_fp16 or _fp8_e4m3fn_scaled)")
    prompt.add_argument("--out", required=True, help="where to write the prompt embeddings (.safetensors)")
    prompt.add_argument("--prompt", help="the prompt (default: HuMo's own talking-person prompt)")
    prompt.add_argument("--negative-prompt", help="the negative prompt (default: Wan's)")
    prompt.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    prompt.set_defaults(handler=_cmd_encode_prompt)
    convert = commands.add_parser("convert", help="turn an upstream pickle (.pt) checkpoint into .safetensors, "
                                                  "reading tensors only (no code in the file ever runs)")
    convert.add_argument("file", help="latentsync_unet.pt or whisper/tiny.pt (LatentSync's pickles)")
    convert.add_argument("--out", help="where to write (default: beside the file, .safetensors)")
    convert.add_argument("--expect", choices=["latentsync_unet", "latentsync-1.6", "whisper", "whisper-tiny"],
                         help="refuse the file unless it is this (default: recognise it by its keys)")
    convert.add_argument("--dtype", default="keep", choices=["keep", "fp16", "bf16", "fp32"],
                         help="store floating tensors in this precision (default: as in the file)")
    convert.set_defaults(handler=_cmd_convert)
    fetch = commands.add_parser("download", help="fetch a family's files into a ComfyUI models folder (network)")
    fetch.add_argument("name", help="what to fetch, e.g. humo-1.7b (omnisync download --list shows all)",
                       nargs="?")
    fetch.add_argument("--list", action="store_true", help="list what can be downloaded, with sizes")
    fetch.add_argument("--models-dir", help="the ComfyUI models/ folder to put the files in")
    fetch.add_argument("--dry-run", action="store_true", help="only print each file and where it would go")
    fetch.set_defaults(handler=_cmd_download)
    train = commands.add_parser("train", help="train an OmniSync model (torchrun for several GPUs)")
    train.add_argument("--config", required=True, help="training config (.toml or .json)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    train.set_defaults(handler=_cmd_train)
    data = commands.add_parser("prepare-data", help="make training shards from videos or synthetic faces")
    data.add_argument("--out", required=True, help="folder for the shards and index.json")
    data.add_argument("--videos", nargs="+", help="talking-head videos, or folders of them")
    data.add_argument("--synthetic", type=int, help="render this many synthetic talking-face clips instead")
    data.add_argument("--size", type=int, default=256, help="crop size in pixels (default 256)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--audio-encoder", help="Whisper encoder (.safetensors) to store features; default: raw audio")
    data.set_defaults(handler=_cmd_prepare_data)
    return parser


def _add_lipsync_parser(commands) -> None:
    from .timeline import DEFAULT_LENGTH_POLICY, LENGTH_POLICIES

    run = commands.add_parser("lipsync", help="lip-sync a video to an audio track",
                              description="Make the mouth in VIDEO follow AUDIO; writes OUT (H.264 + AAC).")
    run.add_argument("--video", required=True, help="input video (any format FFmpeg reads)")
    run.add_argument("--audio", required=True, help="speech to follow (any audio or video file)")
    run.add_argument("--out", required=True, help="output video, e.g. out.mp4 (written only when complete)")
    run.add_argument("--model", help="the lip-sync checkpoint (.safetensors) of any supported family (see "
                                     "check-model), or its name under --models-dir; default: the bundled demo model")
    run.add_argument("--models-dir", help="a ComfyUI models/ folder: companions are found in its subfolders")
    run.add_argument("--vae", help="the VAE the model needs (default: found under --models-dir)")
    run.add_argument("--audio-encoder", help="the audio encoder the model needs (default: found under --models-dir)")
    run.add_argument("--text-encoder", help="umT5-xxl, for families that take a prompt")
    run.add_argument("--clip-vision", help="CLIP vision, for families that take one")
    run.add_argument("--patch", help="a model patch, e.g. InfiniteTalk's adapter")
    run.add_argument("--prompt", help="text prompt for families that take one (default: the family's)")
    run.add_argument("--negative-prompt", help="negative prompt (default: the family's)")
    run.add_argument("--prompt-embeds", help="prompt embeddings from omnisync encode-prompt (no text encoder needed)")
    run.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                     help="GPU memory: none (fastest), model (each model on the GPU only for its stage), "
                          "sequential (also the transformer block by block: 8 GB cards)")
    run.add_argument("--fp8", action="store_true",
                     help="store the big transformer weights in float8 with scales (families that support it: "
                          "about half the VRAM of bf16; a fp8_scaled file is used as it is)")
    run.add_argument("--swap-blocks", type=int, default=0,
                     help="keep this many transformer blocks in host memory and stream them to the GPU as they "
                          "run (families that support it; default 0)")
    run.add_argument("--no-deep-cache", action="store_true",
                     help="run every denoising step in full (families with DeepCache, e.g. LatentSync: slower, "
                          "a little closer to the uncached result)")
    run.add_argument("--mask-dilation", type=float,
                     help="for families trained as generators: how far past the lower face the model may change "
                          "the picture, as a fraction of the face width (default 0.15)")
    run.add_argument("--steps", type=int, help="sampling steps of the full schedule (model default, usually 50)")
    run.add_argument("--tau", type=float, help="progressive-init noise level in [0, 1] (default 0.92)")
    run.add_argument("--window", type=int, help="frames per window, 4k+1 (default: the model's trained window)")
    run.add_argument("--overlap", type=int, help="frames shared by neighbouring windows (default 8)")
    run.add_argument("--crop-size", type=int, help="face crop side in pixels (model default)")
    run.add_argument("--guidance", choices=["ds-cfg", "cfg", "none"],
                     help="audio guidance: spatio-temporal DS-CFG, plain CFG, or none (default: the model's; "
                          "DS-CFG for OmniSync and HuMo)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps (default auto)")
    run.add_argument("--threads", type=int,
                     help="CPU threads for PyTorch (default: one per core). Use fewer when other CPU-heavy work "
                          "runs beside it: threads fighting over the same cores slow every one of them down")
    run.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    run.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same output")
    run.add_argument("--face-index", type=int, help="which face to edit when several are visible, 0 = leftmost")
    run.add_argument("--box", help="face box x0,y0,x1,y1 in pixels, used where no face is detected")
    run.add_argument("--detector", default="auto", choices=["auto", "short", "full", "none"],
                     help="face detector: auto (short range, full range as fallback), short, full, or none "
                          "(use --box or the frame centre)")
    run.add_argument("--length-policy", default=DEFAULT_LENGTH_POLICY, choices=list(LENGTH_POLICIES),
                     help="when audio and video lengths differ: pingpong/loop/hold extend the video to the audio, "
                          "trim stops at the shorter, video keeps the video length (default pingpong)")
    run.add_argument("--color-match", action="store_true", help="match the edited face's colours to the source")
    run.add_argument("--no-keep-detail", action="store_true",
                     help="paste the whole generated crop back instead of the source plus the model's edit (the "
                          "default keeps the frame's own detail wherever the model changed nothing)")
    run.set_defaults(handler=_cmd_lipsync)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except OmniSyncError as error:
        print(f"omnisync: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omnisync: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
