"""Write the shipped lip-sync bundle's card from the recipe's measured results (nothing typed by hand).

    python scripts/lipsync_card.py RUNS OUT.md
reads RUNS/eval/{real,own,ab,ab_truth_a,browser}.json, RUNS/bench/lipsync_t2.json, RUNS/browser/browser.json,
RUNS/times.txt, RUNS/dmd/bundle/config.json and, for a bundle told the mouth, RUNS/audio_mouth/audio_mouth.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _r(x, digits: int = 1):
    return round(x, digits) if isinstance(x, float) else x


def _mouth(r: dict) -> str:
    m = r.get("mouth", {})
    return (f"mouth corr {m.get('corr_mean')}, offset {m.get('offset_frames')} frames" if m else "mouth: not measured")


def _sync(r: dict) -> str:
    s = r.get("sync", {})
    if not s:
        return "sync: not measured"
    real, shuf = s.get("real", {}), s.get("shuffled", {})
    return (f"LSE-C {real.get('lse_c')} (shuffled audio {shuf.get('lse_c')}), LSE-D {real.get('lse_d')} "
            f"(shuffled {shuf.get('lse_d')})")


def _students_cfg(cfg: dict) -> str:
    """The real score's CFG of the distillation stages, as their configs recorded it (None: the teacher's)."""
    scales = [cfg.get("extra", {}).get(f"{s}_config", {}).get("guidance_scale") for s in ("dcm", "dmd")]
    return " / ".join("the teacher's" if g is None else str(g) for g in scales)


def card(runs: Path) -> str:
    ev = {k: _load(runs / "eval" / f"{k}.json") for k in ("real", "own", "ab", "ab_truth_a", "browser")}
    browser = _load(runs / "browser" / "browser.json")
    bench, bench1 = _load(runs / "bench" / "lipsync_t2.json"), _load(runs / "bench" / "lipsync_t1.json")
    cfg = _load(runs / "dmd" / "bundle" / "config.json")
    times = (runs / "times.txt").read_text() if (runs / "times.txt").is_file() else ""
    ident = ev["own"].get("identity", {})
    told = cfg.get("extra", {}).get("lipsync", {}).get("condition") == "mouth"
    ear = _load(runs / "audio_mouth" / "audio_mouth.json").get("heldout", {})
    if told:
        what = ["An audio-driven causal video-to-video student in two parts: an ear (runtime/audio_mouth.py, an MLP",
                "from each frame's log-mel window to the mouth's open / width / round) and forcekit's CausalDiT told",
                "those three parameters, with the masked input frame + a reference frame on the channel axis. The",
                "renderer was trained on the true mouth track, the ear on the same clips against it; in a session",
                "the ear reads the mouth from the audio. Trained by scripts/recipe_lipsync.sh: ear, bidirectional",
                "teacher -> causal teacher (teacher forcing) -> dCM -> SF-DMD.", "",
                f"The ear alone on the held-out clips: mouth corr {ear.get('corr_mean')} "
                f"({ear.get('corr')}), offset {ear.get('offset_frames')} frames. The teacher's own command and",
                "numbers are on its card when it is committed (models/lipsync_teacher_mouth)."]
    else:
        what = ["An audio-driven causal video-to-video student (forcekit's CausalDiT with per-frame log-mel windows as",
                "`audio` and the masked input frame + a reference frame on the channel axis), trained by",
                "scripts/recipe_lipsync.sh: bidirectional teacher -> causal teacher (teacher forcing) -> dCM ->",
                "SF-DMD."]
    lines = [
        "# lipsync", "", *what,
        "", "**Trained on synthetic faces only** (training/lipsync/renderer.py, espeak-ng voices). On a real",
        "webcam face it has never seen a real mouth, skin or lighting: expect the mouth box to look synthetic.",
        "Doing better needs real talking-face video (with the same mask box and features) or a codec and",
        "renderer much closer to real faces. The apps find the face with models/face_locator, itself trained",
        "on composites of rendered faces only: on a real face it may miss or mis-frame (then it passes through).",
        "", "## Measured (held-out identities, voices and sentences)", "",
        f"- real rendered clips (the sticks' ceiling): {_mouth(ev['real'])}; {_sync(ev['real'])}",
        f"- re-synced to their own audio: {_mouth(ev['own'])}; {_sync(ev['own'])}",
        f"- identity outside the recorded mouth box: PSNR {ident.get('psnr')} dB, SSIM {ident.get('ssim')}",
        f"- A/B (face of clip A, voice of clip B): against B's truth {_mouth(ev['ab'])}; against A's truth "
        f"{_mouth(ev['ab_truth_a'])}",
        *([f"- the stream that came back through headless Chromium (forcekit eval lipsync-browser: a held-out face "
           f"as the fake camera, {browser['voice_seconds']} s of other clips' voices as the fake microphone): "
           f"{_mouth(ev['browser'])}; {_sync(ev['browser'])}; {browser['frames']} frames came back, "
           f"{browser['filled_frames']} of {browser['span_frames']} missing (held), server "
           f"{_r(browser['server'].get('fps'))} fps, audio-to-mouth p50 "
           f"{_r(browser['server'].get('audio_to_mouth_ms_p50'))} ms"]
          if browser and ev["browser"] else []),
        f"- speed (forcekit bench lipsync --threads 2, {bench.get('frame_size')} frames): {_r(bench.get('fps'))} fps "
        f"back to back, audio-to-mouth p50 {_r(bench.get('audio_to_mouth_ms_p50'))} ms / p95 "
        f"{_r(bench.get('audio_to_mouth_ms_p95'))} ms (feature lookahead {_r(bench.get('feature_lookahead_ms'))} ms), "
        f"load average {bench.get('load_avg_1min')}; with one thread {_r(bench1.get('fps'))} fps, p50 "
        f"{_r(bench1.get('audio_to_mouth_ms_p50'))} ms, load average {bench1.get('load_avg_1min')} (a load above 0.2 "
        "means other jobs shared the 2 cores)",
        "", "## Recipe", "", "Student stages: " + ", ".join(
            f"{s} {c.get('steps')} steps (batch {c.get('batch')}, lr {c.get('lr')})"
            for s, c in ((s, cfg.get("extra", {}).get(f"{s}_config", {})) for s in ("causal", "dcm", "dmd")) if c)
        + f"; dCM and SF-DMD distil the teacher at guidance {_students_cfg(cfg)}.", "",
        f"Stage times (s):\n\n```\n{times}```", "",
        f"Model: ```{json.dumps(cfg.get('model', {}))}```", "",
        f"Lip-sync spec: ```{json.dumps(cfg.get('extra', {}).get('lipsync', {}))}```", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(card(Path(sys.argv[1])))
