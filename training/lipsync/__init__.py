"""Synthetic speaking faces with exact ground truth, and the sticks that measure lip-sync.

renderer.py        procedural faces: identity, head pose, blinks, mouth (open, width, round) per frame
speech.py          espeak-ng through ctypes: audio with phoneme timings; phoneme -> viseme -> mouth track
record.py          `forcekit record --env lipsync:synthetic`: shards like the game worlds', split held-out
probes.py          the mouth-parameter regressor and the SyncNet-style audio-visual embedding
metrics.py         mouth correlation / error / offset, LSE-C / LSE-D, PSNR / SSIM outside the mouth
latents.py         lip-sync latent clips: frames, masked input frames and a reference through a codec

The audio features (log-mel windows aligned with video frames, offline and streaming) live in
`runtime.audio_features`: a live lip-sync session computes them too.

Nothing here downloads weights: the probes are trained on the synthetic data itself, whose
truth is known, so a generated clip can be judged against the mouth it should have made.
"""
