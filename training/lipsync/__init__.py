"""Synthetic speaking faces with exact ground truth, and the sticks that measure lip-sync.

renderer.py        procedural faces: identity, head pose, blinks, mouth (open, width, round) per frame
speech.py          espeak-ng through ctypes: audio with phoneme timings; phoneme -> viseme -> mouth track
audio_features.py  log-mel windows aligned with video frames (torch only), resampling, silence, clipping
record.py          `forcekit record --env lipsync:synthetic`: shards like the game worlds', split held-out
probes.py          the mouth-parameter regressor and the SyncNet-style audio-visual embedding
metrics.py         mouth correlation / error / offset, LSE-C / LSE-D, PSNR / SSIM outside the mouth

Nothing here downloads weights: the probes are trained on the synthetic data itself, whose
truth is known, so a generated clip can be judged against the mouth it should have made.
"""
