"""Merge the parts `scripts/gpu_check.sh` wrote into one JSON: ``$OUT/gpu_check.json``.

Usage: ``python scripts/gpu_check_report.py OUT TINY SECONDS``. Every step appears with its exit
status, its time and its JSON result (or the tail of its log when it wrote none), next to the
machine it ran on, so the figures can go into docs/gpu.md with the command, the GPU and the date.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def _machine() -> dict:
    info: dict = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError as e:
        info["torch"] = f"not importable: {e}"
    for name in ("triton", "diffusers", "flash_attn"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def build_report(out: Path, tiny: bool, seconds: int) -> dict:
    """The merged report: machine, total time, and one entry per step in the order they ran."""
    parts = out / "parts"
    steps = {}
    lines = (parts / "steps.tsv").read_text().splitlines() if (parts / "steps.tsv").is_file() else []
    for line in lines:
        name, rc, secs = line.split("\t")
        entry: dict = {"rc": int(rc), "seconds": int(secs), "timed_out": int(rc) in (124, 137)}
        result_file = parts / f"{name}.json"
        if result_file.is_file() and result_file.stat().st_size:
            try:
                entry["result"] = json.loads(result_file.read_text())
            except json.JSONDecodeError:
                entry["result_unparsed"] = _tail(result_file)
        if int(rc) != 0 or "result" not in entry:
            entry["log_tail"] = _tail(parts / f"{name}.log")
        steps[name] = entry
    return {"format": "forcekit.gpu_check/1", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "tiny_dry_run": tiny, "total_seconds": seconds, "machine": _machine(), "steps": steps,
            "all_ok": bool(steps) and all(s["rc"] == 0 for s in steps.values())}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: gpu_check_report.py OUT TINY SECONDS", file=sys.stderr)
        return 2
    out = Path(argv[0])
    report = build_report(out, argv[1] == "1", int(argv[2]))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    for name, s in report["steps"].items():
        print(f"{name:28} rc={s['rc']:<4} {s['seconds']:>4}s")
    print(f"wrote {out / 'gpu_check.json'} ({report['total_seconds']}s; all ok: {report['all_ok']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
