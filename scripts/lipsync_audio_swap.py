"""Does a bidirectional lip-sync teacher hear the audio? Sample it with the true audio and with another clip's.

The teacher is judged in its own setting: one clean frame, then the next ``--frames`` - 1 frames sampled
jointly (Euler, the bundle's audio CFG), on held-out clips paired (i, i+1), starting ``--start`` frames
into each clip (into the speech). Rolling a bidirectional teacher frame by frame through a session is
not its setting: its clean frames were never computed without the noisy one, and it paints noise in the
mask box there at any step count (docs/lipsync.md).

Printed (JSON): the mask box's PSNR against the true frames with the true audio and with the other
clip's, and the correlation of the box's change over the window with the truth's. A teacher that
follows the audio scores clearly better with the true audio; one that ignores it scores the same.
A teacher told the mouth (`train lipsync-teacher --mouth-condition`) is given the true clip's mouth
parameters and the other clip's instead: can it draw the mouth it is told?

    .venv/bin/python scripts/lipsync_audio_swap.py --bundle models/lipsync_teacher --clips data/lipsync_heldout
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from runtime.bundle import Bundle
from runtime.lipsync import LipsyncSpec, mouth_features
from training.conditions import FrameConditions
from training.lipsync.record import load_clips
from training.teacher import sample_clip


def box_scores(generated: np.ndarray, truth: np.ndarray, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """(PSNR, correlation of the change over the window) of uint8 frames ``[n, H, W, 3]`` inside ``box``."""
    y0, x0, y1, x1 = box
    g, t = (f[:, y0:y1, x0:x1].astype(np.float64) for f in (generated, truth))
    psnr = 10 * np.log10(255.0 ** 2 / max(float(((g - t) ** 2).mean()), 1e-12))
    return psnr, float(np.corrcoef((g - g.mean(0)).ravel(), (t - t.mean(0)).ravel())[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--clips", required=True, help="held-out lip-sync recording")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--start", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Bundle.load(args.bundle)
    spec = LipsyncSpec.from_dict(bundle.extra["lipsync"])
    model, codec, n, s = bundle.model.eval(), bundle.codec, args.frames, args.start
    told = spec.condition == "mouth"   # a teacher told the mouth gets the true (or the other clip's) mouth
    _, clips = load_clips(args.clips, ("frames", "actions") + (("mouth",) if told else ()), 2 * args.pairs)
    if told:
        for c in clips:
            c["actions"] = mouth_features(c["mouth"], c["actions"].shape[1])
    scores: dict[str, list[tuple[float, float]]] = {"true_audio": [], "other_audio": []}
    with torch.no_grad():
        for i in range(args.pairs):
            clip, other = clips[2 * i], clips[2 * i + 1]
            if len(clip["frames"]) < s + n or len(other["actions"]) < s + n:
                raise SystemExit(f"clips {2 * i}, {2 * i + 1}: shorter than --start + --frames = {s + n}")
            frames, masked = (torch.from_numpy(np.ascontiguousarray(f))
                              for f in spec.model_inputs(clip["frames"][s:s + n]))
            latents, masked = codec.encode(frames), codec.encode(masked)
            first = torch.from_numpy(np.ascontiguousarray(spec.crop(clip["frames"][:1])))
            video = torch.cat([masked, codec.encode(first).expand(n, -1, -1, -1)], 1)
            for name, audio in (("true_audio", clip["actions"]), ("other_audio", other["actions"])):
                cond = FrameConditions(None, torch.from_numpy(audio[s:s + n].astype(np.float32))[None], video[None])
                new = sample_clip(model, latents[None, :1], cond, args.steps, bundle.sampler.guidance_scale,
                                  torch.Generator().manual_seed(i))
                scores[name].append(box_scores(codec.decode(new[0]).numpy(), frames[1:].numpy(),
                                               spec.model_mask_box))
    out = {"bundle": args.bundle, "clips": args.clips, "pairs": args.pairs, "frames": n, "steps": args.steps}
    for name, rows in scores.items():
        out[name] = {"box_psnr": round(float(np.mean([r[0] for r in rows])), 2),
                     "box_change_corr": round(float(np.mean([r[1] for r in rows])), 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
