"""``omnisync eval MANIFEST``: run and score a grid of settings over clips, write an HTML report, CSV and JSON."""

from __future__ import annotations

import argparse
import sys


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if args.convert_syncnet:
        from .syncnet import convert_syncnet

        print(f"wrote {convert_syncnet(args.convert_syncnet)}")
        if not args.manifest:
            return 0
    if not args.manifest:
        raise InputError("give a manifest (YAML or JSON), e.g. omnisync eval examples/eval/demo.yaml")
    from .manifest import load_manifest
    from .report import SUMMARY_KEYS, aggregate, write_report
    from .runner import GridProgress, evaluate_manifest
    from .score import BY_KEY

    manifest = load_manifest(args.manifest, output_dir=args.out)
    if args.device:
        manifest.device = args.device
    if args.threads:
        manifest.threads = args.threads
    grid = len(manifest.clips) * len(manifest.runs)
    print(f"{manifest.name}: {len(manifest.clips)} clips x {len(manifest.runs)} runs = {grid} results "
          f"into {manifest.output_dir}")
    log = (lambda s: print(s, file=sys.stderr)) if args.verbose else (lambda s: None)
    results = evaluate_manifest(manifest, GridProgress(grid), force=args.force, log=log)
    paths = write_report(results)
    agg = aggregate(results)
    keys = [k for k in SUMMARY_KEYS if any(k in agg[r.name] for r in manifest.runs)]
    width = max(len(r.name) for r in manifest.runs) + 2
    print("".ljust(width) + "".join(f"{BY_KEY[k].label[:14]:>15s}" for k in keys))
    for r in manifest.runs:
        cells = []
        for k in keys:
            v = agg[r.name].get(k, {}).get("mean")
            cells.append("—" if v is None else f"{100 * v:.0f}%" if k == "success" else f"{v:.3f}" if abs(v) < 100
                         else f"{v:.0f}")
        print(r.name.ljust(width) + "".join(f"{c:>15s}" for c in cells))
    made = sum(c.generated for c in results.cells)
    scored = sum(c.scored for c in results.cells)
    failed = [c for c in results.cells if c.error]
    runs = sum(not r.scores_existing for r in manifest.runs) * len(manifest.clips)
    print(f"{made} outputs made ({runs - made} from the cache), {scored} scored ({grid - scored} from the cache); "
          f"{results.seconds:.0f} s")
    for note in results.notes:
        print(f"note: {note}")
    for c in failed:
        print(f"failed: {c.clip} x {c.run}: {c.error}")
    print(f"wrote {paths['html']}, {paths['csv'].name}, {paths['json'].name}")
    return 1 if failed and len(failed) == grid else 0


def add_eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="measure lip sync over a manifest of clips and settings; HTML report",
                            description="Run every setting of MANIFEST on every clip (or score outputs that exist), "
                                        "measure sync, lips, fidelity, stability, identity, success and cost, and "
                                        "write report.html, results.csv and results.json. Results are cached: a "
                                        "re-run computes only what changed.")
    p.add_argument("manifest", nargs="?", help="the manifest (.yaml/.yml or .json); see examples/eval/demo.yaml")
    p.add_argument("--out", help="output folder (default: the manifest's output_dir, else outputs/eval/NAME)")
    p.add_argument("--device", help="auto, cpu, cuda, ... (default: the manifest's, else auto)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    p.add_argument("--force", action="store_true", help="ignore the caches: run and score everything again")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failed cell")
    p.add_argument("--convert-syncnet", metavar="FILE",
                   help="convert syncnet_python's syncnet_v2.model (a pickle, read weights-only) to .safetensors "
                        "beside it, for metrics.syncnet")
    p.set_defaults(handler=_cmd_eval)
