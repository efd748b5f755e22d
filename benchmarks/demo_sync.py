"""Does the demo model lip-sync? Held-out synthetic faces re-voiced with held-out sentences (see
omnisync_core/eval/sync.py), scored for the default sampler and its ablations.

    .venv/bin/python benchmarks/demo_sync.py [--model PATH] [--clips 8] [--steps N]

Prints, per sampler variant, the correlation between the generated mouth openness and the new audio (want >= 0.6),
the same for the source mouth (the leak check, want <= 0.2), the PSNR away from the mouth, and seconds per frame.
Needs espeak-ng.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnisync_core.eval.sync import compare, held_out_clips  # noqa: E402
from omnisync_core.face.analyze import FaceAnalyzer  # noqa: E402
from omnisync_core.model.bundle import DEMO_MODEL, load_bundle  # noqa: E402
from omnisync_core.train.synthetic import SENTENCES  # noqa: E402

HELD_OUT = SENTENCES[32:]      # the demo model trained on SENTENCES[:32]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bundle = load_bundle(a.model)
    d = bundle.defaults
    clips = held_out_clips(a.clips, bundle.audio_encoder, FaceAnalyzer(), HELD_OUT, crop_size=d.get("crop_size", 64),
                           audio_before=d.get("audio_before", 2), audio_after=d.get("audio_after", 2))
    results = compare(bundle.dit, bundle.vae, clips, steps=a.steps or d.get("steps", 50), shift=d.get("shift", 5.0),
                      window=d.get("window", 9))
    print(f"{a.clips} held-out faces re-voiced with held-out sentences ({sum(c.crops.shape[0] for c in clips)} frames)")
    print(f"{'sampler':32s} {'corr(gen, new audio)':>21s} {'per-clip mean':>14s} {'corr(source, new)':>18s} "
          f"{'PSNR off-mouth':>15s} {'s/frame':>8s} {'calls/window':>13s}")
    for name, r in results.items():
        print(f"{name:32s} {r.corr_generated:21.3f} {r.corr_generated_clip_mean:14.3f} {r.corr_source:18.3f} "
              f"{r.psnr_outside_mouth:13.1f} dB {r.seconds_per_frame:8.3f} {r.model_calls_per_window:13d}")
    base = results["default (tau 0.92, DS-CFG)"]
    for name, r in results.items():
        if r is not base:
            print(f"default vs {name}: sync correlation {base.corr_generated:.3f} vs {r.corr_generated:.3f}, "
                  f"off-mouth PSNR {base.psnr_outside_mouth:.1f} vs {r.psnr_outside_mouth:.1f} dB")


if __name__ == "__main__":
    main()
