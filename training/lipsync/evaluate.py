"""`forcekit eval lipsync`: the three measuring sticks on a directory of clips.

Clips are a lip-sync recording (training/lipsync/record.py's format): frames, the audio that
should drive them, and, where known, the true mouth track of that audio and the mouth boxes.
For real rendered clips that is the recording itself; a generator writes its output in the
same format (its frames, the driving audio, the driving audio's mouth truth) and passes the
input video as `reference` for the identity metric.
"""

from __future__ import annotations

import numpy as np

from training.lipsync.record import load_clips


def evaluate_lipsync(clips_dir: str, mouth_probe: str | None = None, syncnet: str | None = None,
                     reference: str | None = None, max_shift: int = 10, max_clips: int = 0) -> dict:
    """JSON-ready results: mouth agreement (probe), LSE-C / LSE-D real vs shuffled, identity kept."""
    if not (mouth_probe or syncnet or reference):
        raise ValueError("nothing to measure: give a mouth probe, a syncnet and/or reference frames")
    meta, clips = load_clips(clips_dir, ("frames", "audio", "mouth", "mouth_box"), max_clips)
    result: dict = {"clips_dir": clips_dir, "clips": len(clips), "frames": int(sum(len(c["frames"]) for c in clips)),
                    "resolution": meta["resolution"]}
    if mouth_probe:
        from training.lipsync.probes import load_mouth_probe, mouth_probe_report

        result["mouth"] = {"probe": mouth_probe, **mouth_probe_report(load_mouth_probe(mouth_probe), clips)}
    if syncnet:
        from training.lipsync.probes import load_syncnet, sync_report

        result["sync"] = {"syncnet": syncnet, **sync_report(load_syncnet(syncnet), clips, max_shift)}
    if reference:
        from training.lipsync.metrics import identity_scores

        _, refs = load_clips(reference, ("frames", "mouth_box"), max_clips)
        if [len(c["frames"]) for c in refs] != [len(c["frames"]) for c in clips]:
            raise ValueError(f"{reference}: reference clips differ in number or length from {clips_dir}")
        gen = np.concatenate([c["frames"] for c in clips])
        ref = np.concatenate([c["frames"] for c in refs])
        boxes = np.concatenate([c["mouth_box"] for c in refs])
        result["identity"] = {"reference": reference, **identity_scores(gen, ref, boxes)}
    return result
