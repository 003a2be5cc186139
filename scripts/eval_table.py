"""Markdown table of `forcekit eval world` results (and `bench runtime` fps where given).

    python scripts/eval_table.py runs/eval/copy.json runs/eval/dcm_2.json ... [--bench NAME=bench.json ...]

Rows are labelled by file name (without .json); `--bench LABEL=FILE` puts that bench run's fps in the
row of the same label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(label: str, r: dict, fps: float | None) -> str:
    p, probe = r["psnr_by_horizon"], r.get("probe", {})
    cells = [label, r["mode"], r["steps"], r.get("guidance_scale", ""),
             p["1"], p["8"], p["32"], p.get("64", ""), r["psnr_mean"], r["ssim_mean"],
             probe.get("generated_exact", ""), probe.get("generated_per_key", ""),
             f"{fps:.1f}" if fps is not None else ""]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--bench", nargs="*", default=[], help="LABEL=bench.json (forcekit bench runtime --json)")
    args = ap.parse_args()
    fps = {}
    for item in args.bench:
        label, path = item.split("=", 1)
        fps[label] = json.loads(Path(path).read_text())["fps"]
    print("| model | mode | steps | CFG | PSNR@1 | PSNR@8 | PSNR@32 | PSNR@64 | PSNR mean | SSIM mean | probe exact "
          "| probe per key | fps |")
    print("|" + "---|" * 13)
    real = None
    for path in args.results:
        r = json.loads(Path(path).read_text())
        label = Path(path).stem
        print(row(label, r, fps.get(label)))
        real = real or r.get("probe")
    if real:
        print(f"\nProbe on the real frame pairs of the same steps: exact {real['real_exact']}, "
              f"per key {real['real_per_key']}.")


if __name__ == "__main__":
    main()
